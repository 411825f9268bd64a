"""The one exception type peftkit raises for bad input; the CLI prints its message as a single line."""


class PeftkitError(ValueError):
    """A clear, user-facing error: bad config, bad target, bad file. Nothing was changed when it is raised."""

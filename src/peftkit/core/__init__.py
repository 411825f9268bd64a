"""The machinery that knows no method."""

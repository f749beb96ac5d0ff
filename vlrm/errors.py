"""Errors a user can cause and fix; the CLI turns them into a short message and exit 2."""


class ConfigError(ValueError):
    """A configuration value, file or folder is wrong; the message says which and why."""

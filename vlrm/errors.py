"""Errors a user can cause and fix; the CLI turns them into a short message and exit 2."""


class ConfigError(ValueError):
    """A configuration value, file or folder is wrong; the message says which and why."""


class TrainingError(RuntimeError):
    """A run cannot go on (e.g. out of memory, non-finite updates); the message says what to
    change. The last checkpoint is intact; the CLI prints the message and exits 1."""

"""One error family. Every message says what went wrong and what to do about it."""


class GenddError(Exception):
    """Base class of all errors gendd raises on bad input or bad state.

    The CLI prints ``str(err)`` on one line and exits with status 2.
    """


class DataError(GenddError):
    """A dataset is missing, empty, corrupt or too small for the request."""


class ConfigError(GenddError):
    """A configuration value is invalid (unknown method, bad IPC, ...)."""


class NumericalError(GenddError):
    """A computation produced NaN or Inf."""

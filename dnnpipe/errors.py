"""Error types: every failure a user can cause is one of these, shown as one line by the CLI."""


class DnnpipeError(Exception):
    """Base of all errors the command-line tools report without a traceback."""


class ConfigError(DnnpipeError, ValueError):
    """A config file or dict is malformed: the message names the file and field."""


class NoPlanError(DnnpipeError):
    """No pipeline plan satisfies the memory constraints: the message says why."""


class StorageError(DnnpipeError):
    """A result file cannot be written or resumed from (a full disk, an I/O error, a damaged file): the message
    names the path and the cause. Never the pipeline's fault, so never retried as one."""

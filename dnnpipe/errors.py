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


def printable(text: str) -> str:
    """A peer's or a file's text made safe to print on one line: control and format characters (terminal escapes,
    newlines, bidi overrides) shown escaped, as Python writes them (\\x1b, \\n, \\u202e); everything else as is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)

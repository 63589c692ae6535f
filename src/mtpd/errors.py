"""The one exception type the CLI turns into a one-line message.

Library code raises `MtpdError` for anything a user can fix (a missing file, a bad flag value, a
checkpoint from another model). The message must say what is wrong *and* what to do about it.
"""


class MtpdError(Exception):
    """A user-facing error: the CLI prints `error: <message>` and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the `(reason)` a
    one-line MtpdError quotes from a library's error."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def require(checks: list[tuple[bool, str]], prefix: str = "") -> None:
    """Raise MtpdError(prefix + message) for the first (ok, message) check that failed."""
    for ok, message in checks:
        if not ok:
            raise MtpdError(prefix + message)

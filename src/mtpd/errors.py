"""The one exception type the CLI turns into a one-line message.

Library code raises `MtpdError` for anything a user can fix (a missing file, a bad flag value, a
checkpoint from another model). The message must say what is wrong *and* what to do about it.
"""


class MtpdError(Exception):
    """A user-facing error: the CLI prints `error: <message>` and exits with status 2."""

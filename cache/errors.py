"""The one exception type a user ever sees: a one-line message that names the problem and the fix."""


class UserError(Exception):
    """Bad input or environment. The CLI prints `ffnscope: error: <message>` and exits non-zero,
    without a traceback. The message is one line: what is wrong, then how to fix it."""

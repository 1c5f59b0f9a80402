"""The one exception type for mistakes a user can fix (bad flag, missing or malformed data)."""


class UserError(ValueError):
    """A problem the user can fix; its message is one sentence naming the flag or file.

    Run scripts catch it, print the message without a traceback and exit with status 2.
    """

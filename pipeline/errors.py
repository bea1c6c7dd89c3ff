"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """A bad input: the message names the value and the fix. Exit code 2."""

"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit 2.

It lives in store/, the bottom layer, because store/ raises it too and imports nothing from
pipeline/; `pipeline.errors.UserError` is this same class.
"""


class UserError(Exception):
    """A bad input or a damaged file: the message names the value (or file) and the fix. Exit code 2."""

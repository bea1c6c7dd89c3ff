"""The one exception type for mistakes a user can fix; the CLI prints it as one line.

Defined in store/errors.py (store/ raises it and imports nothing from pipeline/); this is the name
the rest of the code uses."""

from store.errors import UserError

__all__ = ["UserError"]

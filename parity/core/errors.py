"""The one exception type for mistakes a user can fix.

Every command line turns a `UserError` into a single line on stderr and exit
code 2, with no traceback. Library callers get an ordinary exception.
"""


class UserError(ValueError):
    """A bad file, config, argument or input, explained in one line."""

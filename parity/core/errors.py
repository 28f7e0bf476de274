"""The one exception type for mistakes a user can fix.

Every command line turns a `UserError` into a single line on stderr and exit
code 2, with no traceback. Library callers get an ordinary exception.
"""


class UserError(ValueError):
    """A bad file, config, argument or input, explained in one line."""


def cause(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters: a library's error quoted inside ours."""
    lines = str(e).strip().splitlines()
    text = f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'

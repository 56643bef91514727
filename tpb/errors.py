"""The one exception type that reaches the user as a single line."""

from __future__ import annotations


class TpbError(Exception):
    """A problem the operator can fix: printed as one line, exit status 2."""

    exit_code = 2

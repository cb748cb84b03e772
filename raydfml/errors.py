"""User-facing errors: one line, a non-zero exit, no traceback.

Anything the user can fix (a bad path, a corrupt file, a wrong option) raises ``UserError`` with a
message that names the file or option and what is wrong. Entry points wrap their ``main`` in
``run_cli`` so such errors print as ``error: <message>`` and exit with status 2; programming errors
still show their traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input: the message is shown to the user as a single line."""


def run_cli(main: Callable[[], int | None]) -> None:
    try:
        rc = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)

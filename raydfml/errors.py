"""User-facing errors: one line, a non-zero exit, no traceback.

Anything the user can fix (a bad path, a corrupt file, a wrong option) raises ``UserError`` with a
message that names the file or option and what is wrong. Entry points wrap their ``main`` in
``run_cli`` so such errors print as ``error: <message>`` and exit with status 2; programming errors
still show their traceback.
"""
from __future__ import annotations

import re
import sys
from typing import Callable


class UserError(Exception):
    """Bad input: the message is shown to the user as a single line."""


class RunStopped(UserError):
    """A method's round plan asks the run to stop before the round does anything (e.g. a query budget
    would be exceeded). The driver checkpoints the state so far, so ``--resume`` (with a larger budget)
    continues at that round; the message is shown as a single line."""


def user_error_of(exc: BaseException) -> "UserError | None":
    """The one-line user error behind ``exc``, also when it was raised inside a Ray task or actor.

    Ray re-raises an actor method's exception as ``RayTaskError(UserError)`` whose text is the whole
    remote traceback (its ``cause`` is the original), and an actor whose constructor failed as
    ``ActorDiedError`` carrying only the traceback text, whose last line is the error."""
    if isinstance(exc, UserError):
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, UserError) else exc
    text = getattr(exc, "error_msg", None) if getattr(exc, "actor_init_failed", False) else None
    if text:
        found = re.findall(r"raydfml\.errors\.UserError: (.+)", text)
        if found:
            return UserError(found[-1].strip())
    return None


def run_cli(main: Callable[[], int | None]) -> None:
    try:
        rc = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        user = user_error_of(exc)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)

"""One kind of user error, printed one way by every command: a problem the user can fix is one line on
stderr and exit status 2; a run that failed for a reason outside its input (another process hung or
died) is one line and exit status 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(ValueError):
    """A problem the user can fix: a bad setting or request, a missing or wrong file, a foreign checkpoint.
    The message is one line that names what is wrong and, where it can, what to do instead."""


class RunFailure(RuntimeError):
    """The run cannot go on for a reason outside the user's input, such as another process that stopped
    answering. The message is one line that says what failed, where, and how to continue."""


def not_utf8(where: str, error: UnicodeDecodeError, offset: int | None = None) -> str:
    """How every command names bytes that are not UTF-8: where, the byte, and its offset in the file (`offset`
    where the decoder saw only part of it)."""
    at = error.start if offset is None else offset
    return f"{where}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {at})"


def command(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], None]:
    """A command's entry point: a UserError, or an OSError (a path missing or unreadable, a full disk), ends it
    with `error: <message>` and status 2, printed once under torchrun (every rank meets such errors alike).
    A RunFailure ends it with `error: <message>` and status 1, printed by each process that meets it: which
    ones do depends on which process failed. Ctrl-C (KeyboardInterrupt) ends it with status 130."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> None:
        try:
            main(argv)
        except (UserError, OSError) as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)
        except RunFailure as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C: the shell's status for it (Python's own, 130, is lost once
            sys.exit(130)  # torch._dynamo is imported), without a traceback from wherever it landed

    return run

"""Two kinds of expected failure, printed one way by every command, each as one line on stderr:

- a UserError is bad input the user can fix (a setting, a request, a missing or foreign file): exit status 2;
- a RunError is a run that cannot go on (a full disk, out of memory, divergence, a process that stopped
  answering): exit status 1, as any failure at run time.

Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

BAD_INPUT, RUN_FAILED = 2, 1
# what an OSError says about the machine rather than about what the user asked for
_RUN_TIME_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EROFS}


class UserError(ValueError):
    """A problem the user can fix: a bad setting or request, a missing or wrong file, a foreign checkpoint.
    The message is one line that names what is wrong and, where it can, what to do instead."""


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line saying where it stopped, what was kept, what to try.
    Printed by rank 0 only, as every rank meets it alike, unless `every_rank` says which ranks meet it
    depends on what failed (another process that stopped answering)."""

    every_rank = False


def not_utf8(where: str, error: UnicodeDecodeError, offset: int | None = None) -> str:
    """How every command names bytes that are not UTF-8: where, the byte, and its offset in the file (`offset`
    where the decoder saw only part of it)."""
    at = error.start if offset is None else offset
    return f"{where}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {at})"


def _out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # without torch loaded no torch error can occur; importing it takes a second
    return isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError))


def _status(error: BaseException) -> int | None:
    """The exit status of an expected failure, None for a bug."""
    if isinstance(error, UserError):
        return BAD_INPUT
    if isinstance(error, RunError) or _out_of_memory(error):
        return RUN_FAILED
    if isinstance(error, OSError):  # a path missing or unreadable is input; a full disk is the run's
        return RUN_FAILED if error.errno in _RUN_TIME_ERRNOS else BAD_INPUT
    return None


def _line(error: BaseException) -> str:
    if _out_of_memory(error):
        return (f"out of memory ({' '.join(str(error).split())[:200] or type(error).__name__}); lower batch_size "
                f"(tokens_per_step keeps the recipe), or use a smaller model or block_size")
    return " ".join(str(error).split())


def command(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], None]:
    """A command's entry point: an expected failure ends it with `error: <message>` and its status, printed
    once under torchrun (every rank meets such errors alike) or by each rank that meets it (RunError.every_rank).
    Ctrl-C that reaches here (a second one, see StopRequest) ends it with status 130 and no traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> None:
        try:
            main(argv)
        except Exception as e:
            status = _status(e)
            if status is None:
                raise
            if os.environ.get("RANK", "0") == "0" or getattr(e, "every_rank", False):
                print(f"error: {_line(e)}", file=sys.stderr)
            sys.exit(status)
        except KeyboardInterrupt:  # the shell's status for Ctrl-C (Python's own, 130, is lost once
            sys.exit(130)  # torch._dynamo is imported), without a traceback from wherever it landed

    return run

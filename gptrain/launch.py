"""torchrun, except that a preemption signal is a request to checkpoint and stop, not a failure.

Usage: gptrain launch [torchrun options] train.py [config.yaml ...] [key=value ...]

torchrun forwards SIGTERM to its workers, but then re-raises it and exits 1 whatever they did, so a
scheduler cannot tell a clean preemption from a crash. Here torchrun ignores SIGTERM and SIGUSR1, and
this process passes either signal on to torchrun's workers, the training processes, which checkpoint
and exit 0; torchrun, seeing every worker succeed, exits 0 too. Any other outcome keeps torchrun's
exit code. The workers are found through Linux's /proc; elsewhere this is plain torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _ignore_stop_signals() -> None:
    """Runs in the child before torchrun starts; its workers inherit the ignoring until training
    installs its own handlers (gptrain.distributed.StopRequest)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _children(pid: int) -> list[int]:
    """The processes `pid` started: torchrun's workers, each in a session of its own."""
    return [int(child) for children in Path(f"/proc/{pid}/task").glob("*/children")
            for child in children.read_text().split()]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if args else 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", *args]
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        os.execv(sys.executable, torchrun)
    # torchrun must leave the stop signals ignored (its default handles SIGTERM): the option's
    # environment form, and the variable that older releases read directly
    handled = "SIGINT,SIGHUP,SIGQUIT"
    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": handled, "TORCHELASTIC_SIGNALS_TO_HANDLE": handled}
    launcher = subprocess.Popen(torchrun, env=env, preexec_fn=_ignore_stop_signals)

    def pass_on(signum: int, frame) -> None:
        for worker in _children(launcher.pid):
            try:
                os.kill(worker, signum)
            except ProcessLookupError:  # it has just ended
                pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, pass_on)
    while True:
        try:
            sys.exit(launcher.wait())
        except KeyboardInterrupt:  # Ctrl-C reached torchrun too, which stops its workers; wait for it
            continue


if __name__ == "__main__":
    main()

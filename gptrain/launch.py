"""torchrun, except that a preemption signal or a first Ctrl-C is a request to checkpoint and stop, not a failure.

Usage: gptrain launch [torchrun options] train.py [config.yaml ...] [key=value ...]

torchrun forwards SIGTERM to its workers, but then re-raises it and exits 1 whatever they did, so a
scheduler cannot tell a clean preemption from a crash; a terminal's Ctrl-C it forwards the same way,
as SIGINT. Here torchrun runs in a process group of its own, out of the terminal's reach, and ignores
SIGTERM and SIGUSR1; this process passes SIGTERM, SIGUSR1 and SIGINT on to torchrun's workers, the
training processes, which checkpoint and exit 0; torchrun, seeing every worker succeed, exits 0 too.
A second Ctrl-C reaches the workers the same way and stops them at once, without a checkpoint; one
before torchrun has started them (while it waits for other nodes) ends torchrun. SIGHUP and SIGQUIT
go to torchrun, which stops its workers as it always does. Any other outcome keeps torchrun's exit
code. The workers are found through Linux's /proc; elsewhere this is plain torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from gptrain.errors import UserError, command

IGNORED_BY_TORCHRUN = (signal.SIGTERM, signal.SIGUSR1)  # what a scheduler may send to every process of a job
TO_WORKERS = (*IGNORED_BY_TORCHRUN, signal.SIGINT)
TO_TORCHRUN = (signal.SIGHUP, signal.SIGQUIT)  # the terminal's other signals, which no longer reach it


def _detach() -> None:
    """Runs in the child before torchrun starts. Its workers inherit the ignoring until training installs
    its own handlers (gptrain.distributed.StopRequest)."""
    os.setpgid(0, 0)  # a terminal signals its foreground process group: this process, no longer torchrun
    for sig in IGNORED_BY_TORCHRUN:
        signal.signal(sig, signal.SIG_IGN)


def _children(pid: int) -> list[int]:
    """The processes `pid` started: torchrun's workers, each in a session of its own."""
    return [int(child) for children in Path(f"/proc/{pid}/task").glob("*/children")
            for child in children.read_text().split()]


def check(args: list[str]) -> None:
    """What torchrun would otherwise meet in each worker, or deep in its own start, each a traceback."""
    from torch.distributed.run import get_args_parser  # torch: a second to import, so only here

    parser = get_args_parser()

    def refuse(message: str):  # one line, not argparse's page of usage
        raise UserError(f"{message} (torchrun's options: python -m torch.distributed.run --help)")

    parser.error = refuse
    parsed = parser.parse_args(args)
    nproc = parsed.nproc_per_node
    if not ((nproc.isdigit() and int(nproc) > 0) or nproc in ("auto", "cpu", "gpu", "xpu")):
        raise UserError(f"--nproc_per_node={nproc}: give a number of processes per node, or auto, cpu or gpu")
    if not (parsed.module or parsed.no_python or Path(parsed.training_script).is_file()):
        raise UserError(f"{parsed.training_script}: no such training script (gptrain launch [torchrun options] "
                        f"train.py [config.yaml ...] [key=value ...])")


@command
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if not args:
        raise UserError("give the training script: gptrain launch [torchrun options] train.py [config.yaml ...] "
                        "[key=value ...]")
    check(args)
    torchrun = [sys.executable, "-m", "torch.distributed.run", *args]
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        os.execv(sys.executable, torchrun)
    # torchrun must leave SIGTERM and SIGUSR1 ignored (its default handles SIGTERM): the option's
    # environment form, and the variable that older releases read directly
    handled = "SIGINT,SIGHUP,SIGQUIT"
    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": handled, "TORCHELASTIC_SIGNALS_TO_HANDLE": handled}
    launcher = subprocess.Popen(torchrun, env=env, preexec_fn=_detach)

    def to_workers(signum: int, frame) -> None:
        workers = _children(launcher.pid)
        if not workers and signum == signal.SIGINT:
            # Ctrl-C before there are any: torchrun waits for the other nodes, inside C++ where its own
            # handler would not run until the rendezvous times out. There is nothing to save yet.
            launcher.kill()
        for worker in workers:
            try:
                os.kill(worker, signum)
            except ProcessLookupError:  # it has just ended
                pass

    for sig in TO_WORKERS:
        signal.signal(sig, to_workers)
    for sig in TO_TORCHRUN:
        signal.signal(sig, lambda signum, frame: launcher.send_signal(signum))
    code = launcher.wait()
    sys.exit(128 - code if code < 0 else code)  # killed by a signal: the shell's 128 + its number


if __name__ == "__main__":
    main()

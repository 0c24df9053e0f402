"""Catch a two-process run that finishes training but never exits, and show where each process waits.

    python bench/exit_hang.py --runs 200                      # ddp and fsdp in turn, 120 s each at most
    python bench/exit_hang.py --runs 50 --parallelism ddp --dumps /tmp/hangs
    python bench/exit_hang.py --runs 100 --layouts standalone nodes launch

Each run trains a tiny model on two CPU processes over gloo (the test suite's distributed settings: 6
steps, an evaluation and a checkpoint at 3 and 6), laid out as one of --layouts, taken in turn:
  standalone  torchrun --standalone --nproc_per_node=2 train.py
  nodes       two torchruns of one process each, --nnodes=2 on localhost (the multi-node test's layout)
  launch      gptrain launch --standalone --nproc_per_node=2 train.py
Every process is started in a session of its own. A run still alive after --timeout seconds counts as
hung: every process of it (torchrun and its workers) has its Python and native stacks dumped with
py-spy (`pip install py-spy`; without it, SIGABRT's faulthandler dump in the run's log is all there is)
into --dumps, with the run's output, before all of them are killed. Prints one line per run and then
the tally; exits 1 if any run hung or failed. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "tokens_per_step=256",
       "learning_rate=3e-3", "min_lr=3e-4", "warmup_iters=2", "max_iters=6", "lr_decay_iters=6", "eval_interval=3",
       "eval_iters=3", "log_interval=1", "dropout=0.1", "device=cpu", "dtype=float32", "compile=false",
       "tensorboard=false"]


def prepare(work: Path) -> Path:
    """The first 200 kB of tiny-shakespeare at character level, as the tests prepare it."""
    corpus = work / "input.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    subprocess.run([sys.executable, "-m", "gptrain.cli", "prepare", "--input", str(corpus), "--tokenizer", "char",
                    "--out_dir", str(work / "data")], cwd=ROOT, check=True, capture_output=True)
    return work / "data"


def tree(pid: int) -> list[int]:
    """pid and every process below it (torchrun's workers sit in sessions of their own)."""
    try:
        children = [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
    except FileNotFoundError:  # ended meanwhile
        children = []
    return [pid] + [p for child in children for p in tree(child)]


def dump_stacks(pids: list[int], into: Path) -> None:
    """Every thread's Python stack, with native frames, of each process, into one file per process."""
    py_spy = shutil.which("py-spy")
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:  # it ended after all
            continue
        if py_spy:
            try:
                dump = subprocess.run([py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True,
                                      text=True, timeout=60)
                text = dump.stdout + dump.stderr
            except subprocess.TimeoutExpired:
                text = "py-spy did not answer within 60 s\n"
        else:
            os.kill(pid, signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER=1) writes the stacks to the run's log
            text = "no py-spy: see the run's stderr for faulthandler's dump\n"
        (into / f"stack-{pid}.txt").write_text(f"{cmdline}\n\n{text}")


def commands(layout: str, args: list[str]) -> list[list[str]]:
    """The command lines that together make one two-process run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if layout == "nodes":
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [[*torchrun, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                 f"--master_port={port}", "train.py", *args] for rank in (0, 1)]
    launcher = [sys.executable, "-m", "gptrain.cli", "launch"] if layout == "launch" else torchrun
    return [[*launcher, "--standalone", "--nproc_per_node=2", "train.py", *args]]


def one_run(name: str, layout: str, parallelism: str, *, data: Path, work: Path, timeout: float,
            dumps: Path) -> str:
    """'ok', 'failed' or 'hung'; a hung or failed run leaves its output (and stacks) in dumps/<name>/."""
    out = work / name
    args = [f"data_dir={data}", f"out_dir={out / 'out'}", f"log_dir={out / 'logs'}", f"parallelism={parallelism}",
            *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    out.mkdir()
    processes = []
    for n, cmd in enumerate(commands(layout, args)):
        with open(out / f"output{n}.txt", "w") as output:
            processes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in processes]
        outcome = "ok" if not any(codes) else "failed"
    except subprocess.TimeoutExpired:
        outcome = "hung"
    into = dumps / name
    if outcome == "hung":
        pids = [pid for p in processes for pid in tree(p.pid)]
        into.mkdir(parents=True)
        dump_stacks(pids, into)
        time.sleep(1)  # faulthandler's output, when it is used
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in processes:
            p.wait()
    if outcome != "ok":
        into.mkdir(parents=True, exist_ok=True)
        for log in out.glob("output*.txt"):
            shutil.copy(log, into / log.name)
    shutil.rmtree(out)
    return outcome


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=200, help="runs in all (default 200)")
    p.add_argument("--parallelism", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"],
                   help="taken in turn (default: ddp fsdp)")
    p.add_argument("--layouts", nargs="+", choices=["standalone", "nodes", "launch"], default=["standalone"],
                   help="taken in turn, changing after each round of --parallelism (default: standalone)")
    p.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as hung (default 120)")
    p.add_argument("--dumps", type=Path, default=Path("exit_hang_dumps"), help="where hung runs' stacks go")
    args = p.parse_args()

    tally = {"ok": 0, "failed": 0, "hung": 0}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work)
        for number in range(args.runs):
            parallelism = args.parallelism[number % len(args.parallelism)]
            layout = args.layouts[number // len(args.parallelism) % len(args.layouts)]
            name = f"{number}-{layout}-{parallelism}"
            started = time.monotonic()
            outcome = one_run(name, layout, parallelism, data=data, work=work, timeout=args.timeout, dumps=args.dumps)
            tally[outcome] += 1
            print(f"run {name}: {outcome} in {time.monotonic() - started:.1f} s", flush=True)
    print(f"{args.runs} runs: {tally['ok']} exited 0, {tally['failed']} failed, {tally['hung']} hung"
          + (f" (see {args.dumps})" if tally["failed"] or tally["hung"] else ""))
    sys.exit(1 if tally["failed"] or tally["hung"] else 0)


if __name__ == "__main__":
    main()

"""What the side-by-side benchmarks against nanoGPT share: a work directory laid out the way nanoGPT's
train.py expects, both sides' data, running a trainer while timing its lines, and the markdown output.
Benchmarks of gptrain alone (ablate.py) use the same pieces without a nanoGPT checkout.

nanoGPT reads `configurator.py`, its config files and `data/<dataset>/` relative to its working
directory, so its runs start in the work directory, which links the first two and holds its data; its
checkout is only read. Not a benchmark itself, and not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

from cpu import describe_cpu

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
NEVER = 10**9  # an eval_interval that no run reaches, so only the evaluations every run makes remain


@dataclass(frozen=True)
class Trainer:
    """How one trainer reports: a training-step line (step, ms) and an evaluation line (step, val loss)."""

    name: str
    step_line: re.Pattern
    eval_line: re.Pattern


GPTRAIN = Trainer(
    "gptrain",
    re.compile(r"iter (\d+) \| loss .*?\| ([\d.]+) ms/iter"),  # gptrain.metrics.format_record; step 0 has no time
    re.compile(r"iter (\d+) \| val loss ([\d.]+)"),
)
NANOGPT = Trainer(
    "nanoGPT",
    re.compile(r"iter (\d+): loss \S+, time ([\d.]+)ms"),
    re.compile(r"step (\d+): train loss \S+, val loss ([\d.]+)"),
)


@dataclass
class Result:
    """One finished trainer process: its output lines, each with the seconds since launch it arrived at."""

    lines: list[tuple[float, str]]
    seconds: float  # launch to exit
    peak_rss: int  # bytes, the process's own high-water mark from wait4

    def step_ms(self, trainer: Trainer, first: int) -> list[float]:
        """Per-step times that the trainer printed, from step `first` on."""
        return [float(m[2]) for _, line in self.lines if (m := trainer.step_line.match(line)) and int(m[1]) >= first]

    def line_gaps_ms(self, trainer: Trainer, first: int) -> list[float]:
        """Wall time between consecutive step lines as they arrived here, from step `first` on: one clock
        for both trainers, whatever each counts in its own time (logging, a GPU still busy)."""
        arrived = {int(m[1]): t for t, line in self.lines if (m := trainer.step_line.match(line))}
        return [1000 * (t - arrived[step - 1]) for step, t in arrived.items() if step >= first and step - 1 in arrived]

    def evals(self, trainer: Trainer) -> list[tuple[float, int, float]]:
        """(seconds since launch, step, val loss) of each evaluation line."""
        return [(t, int(m[1]), float(m[2])) for t, line in self.lines if (m := trainer.eval_line.match(line))]


def run(command: list[str], cwd: Path, stop=None) -> Result:
    """Run a trainer, timestamping its output lines; `stop(line)` returning true kills it there.

    Peak RSS comes from os.wait4 on the child's pid, so it is the trainer's own, measured by the kernel.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive when printed, so their times mean something
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopped = [], False
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if stop is not None and stop(line):
                proc.kill()  # not SIGTERM: gptrain takes that as a request to checkpoint first
                stopped = True
                break
    except BaseException:  # e.g. Ctrl-C: leave no trainer behind
        proc.kill()
        raise
    finally:
        proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    if proc.returncode and not stopped:
        tail = "\n".join(line for _, line in lines[-15:])
        raise SystemExit(f"{shlex.join(command)}\nexited with {proc.returncode}:\n{tail}")
    return Result(lines, seconds, usage.ru_maxrss * 1024)


class Workspace:
    """A temporary directory with both sides' data and nanoGPT's working directory; removed on exit.
    Without a nanoGPT checkout, only gptrain's side: prepare_gptrain, run_gptrain."""

    def __init__(self, nanogpt: Path | None = None):
        self.nanogpt = nanogpt.resolve() if nanogpt else None
        self._tmp = tempfile.TemporaryDirectory(prefix="gptrain-bench-")
        self.dir = Path(self._tmp.name)
        if self.nanogpt:
            for name in ("configurator.py", "config"):  # so its commands read as in its README
                (self.dir / name).symlink_to(self.nanogpt / name)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def data(self, tokenizer: str) -> tuple[Path, str]:
        """Where each side's tokens of the corpus are: our data_dir, nanoGPT's dataset name (under data/)."""
        return self.dir / f"gptrain_{tokenizer}", f"shakespeare_{tokenizer}"

    def prepare_gptrain(self, tokenizer: str, corpus: Path = CORPUS) -> Path:
        """Tokenize a text file for gptrain alone (char or gpt2); returns its data_dir."""
        ours, _ = self.data(tokenizer)
        _check([sys.executable, "-m", "gptrain.prepare", "--input", str(corpus), "--tokenizer", tokenizer,
                "--out_dir", str(ours)], cwd=ROOT)
        return ours

    def prepare(self, tokenizer: str) -> tuple[Path, str]:
        """Tokenize the corpus for both sides (char or gpt2); returns what `data` does."""
        ours, dataset = self.data(tokenizer)
        self.prepare_gptrain(tokenizer)
        theirs = self.dir / "data" / dataset
        theirs.mkdir(parents=True)
        if tokenizer == "char":  # nanoGPT's own prepare.py makes its meta.pkl; given input.txt it downloads nothing
            shutil.copy(CORPUS, theirs / "input.txt")
            shutil.copy(self.nanogpt / "data" / "shakespeare_char" / "prepare.py", theirs)
            _check([sys.executable, "prepare.py"], cwd=theirs)
        else:  # our token files, without our meta.pkl, whose vocab_size (50,257) nanoGPT would use over its 50,304
            for split in ("train", "val"):
                (theirs / f"{split}.bin").symlink_to(ours / f"{split}.bin")
        return ours, dataset

    def gptrain_command(self, args: list[str]) -> list[str]:
        """Our training command, its checkpoints and logs in the work directory (run from the repo root)."""
        return [sys.executable, "train.py", *args, f"out_dir={self.dir / 'out_gptrain'}",
                f"log_dir={self.dir / 'logs_gptrain'}"]

    def nanogpt_command(self, args: list[str]) -> list[str]:
        """nanoGPT's training command, its checkpoint in the work directory (run from the work directory)."""
        return [sys.executable, str(self.nanogpt / "train.py"), *args, f"--out_dir={self.dir / 'out_nanogpt'}"]

    def run_gptrain(self, args: list[str], stop=None) -> Result:
        return run(self.gptrain_command(args), ROOT, stop)

    def run_nanogpt(self, args: list[str], stop=None) -> Result:
        return run(self.nanogpt_command(args), self.dir, stop)

    def shown(self, command: list[str]) -> str:
        """A command as it can be pasted: `python`, and $WORK for the temporary directory."""
        return shlex.join(["python", *command[1:]]).replace(str(self.dir), "$WORK")


@dataclass(frozen=True)
class Setup:
    """One model and batch that both trainers train, for timing their steps."""

    title: str
    tokenizer: str  # for `gptrain prepare`: char or gpt2
    steps: int  # default steps per run
    repeat: int  # default runs of each trainer
    first_timed: int  # the steps before it warm up (nanoGPT's step 0 also holds an evaluation)
    # Settings both trainers spell alike (`key=value` for gptrain, `--key=value` for nanoGPT). nanoGPT's
    # bias defaults to False; GPT-2 and gptrain have biases, so the setups give both sides bias=True.
    shared: dict
    gptrain: tuple[str, ...] = ()  # a config file first, if any
    nanogpt: tuple[str, ...] = ()

    def commands(self, work: Workspace, steps: int) -> tuple[list[str], list[str]]:
        """gptrain's and nanoGPT's arguments. Both train steps 0 .. steps-1 (nanoGPT runs max_iters + 1
        steps) and evaluate only at step 0 (gptrain again at the end, after the timed steps); a line a step."""
        data_dir, dataset = work.data(self.tokenizer)
        shared = {**self.shared, "log_interval": 1, "eval_interval": NEVER}
        ours = [*self.gptrain, *(f"{k}={v}" for k, v in shared.items()), f"data_dir={data_dir}",
                f"max_iters={steps}", "tensorboard=false"]
        theirs = [*self.nanogpt, *(f"--{k}={v}" for k, v in shared.items()), f"--dataset={dataset}",
                  f"--max_iters={steps - 1}"]
        return ours, theirs


class Timing(NamedTuple):
    """One run's medians over its timed steps."""

    ms: float  # the trainer's own per-step times
    gap_ms: float  # the time between its step lines, on our clock
    peak_rss: int  # bytes


def time_steps(work: Workspace, setup: Setup, steps: int, repeat: int) -> dict[Trainer, list[Timing]]:
    """Each run of each trainer, timed; runs alternate, gptrain first (gptrain alone without a nanoGPT checkout)."""
    ours, theirs = setup.commands(work, steps)
    sides = [(GPTRAIN, work.run_gptrain, ours)] + ([(NANOGPT, work.run_nanogpt, theirs)] if work.nanogpt else [])
    runs = {trainer: [] for trainer, _, _ in sides}
    for i in range(repeat):
        for trainer, launch, args in sides:
            result = launch(args)
            ms = result.step_ms(trainer, setup.first_timed)
            if len(ms) != steps - setup.first_timed:
                raise SystemExit(f"{trainer.name} printed {len(ms)} step times from step {setup.first_timed} on, "
                                 f"expected {steps - setup.first_timed}")
            timing = Timing(median(ms), median(result.line_gaps_ms(trainer, setup.first_timed)), result.peak_rss)
            runs[trainer].append(timing)
            print(f"{setup.title}, run {i + 1}/{repeat}, {trainer.name}: {timing.ms:,.1f} ms/step "
                  f"({timing.gap_ms:,.1f} between lines), peak RSS {timing.peak_rss / 2**20:,.0f} MiB",
                  file=sys.stderr, flush=True)
    return runs


def summary(runs: dict[Trainer, list[Timing]]) -> dict[Trainer, Timing]:
    """The median of each field over each trainer's runs."""
    return {t: Timing(*(median(values) for values in zip(*timings))) for t, timings in runs.items()}


def _check(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def nanogpt_dir(path: str) -> Path:
    """argparse type for --nanogpt: a nanoGPT checkout."""
    if not (Path(path) / "train.py").is_file() or not (Path(path) / "configurator.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a nanoGPT checkout (no train.py and configurator.py)")
    return Path(path)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: list[str], rows: list[list[str]], text_columns: int = 1) -> None:
    """A markdown table, columns padded so it also reads as plain text; the first `text_columns` columns
    left-aligned, the numbers after them right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    right = [i >= text_columns for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|")
    for row in rows:
        print(line(row))


def _git_commit(path: Path) -> str:
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def describe_machine(nanogpt: Path | None = None) -> str:
    """Machine, versions, date and the exact command, as lines to paste under a table."""
    threads = f"{torch.get_num_threads()} torch threads" + (
        f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else "")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    commits = f"gptrain {_git_commit(ROOT)}" + (f", nanoGPT {_git_commit(nanogpt)}" if nanogpt else "")
    return "\n".join([
        f"Machine: {describe_cpu()}, {os.cpu_count()} cores ({threads}){gpu}; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {commits}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
    ])

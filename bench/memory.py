"""Host RSS of a long quick-start training run on a large token file, and what drawing a batch costs.

    python bench/memory.py                            # 2 GB train.bin, RSS at steps 500 and 5,000
    python bench/memory.py --steps 100 1000 --size_gb 1

Writes a data directory the way `gptrain prepare` lays it out, with --size_gb of random character ids
below tiny-shakespeare's 65 (tiny-shakespeare itself is 1 MB: a run touches all of it in a few steps and
would never show pages piling up; OpenWebText's train.bin is 17 GB). Then, side by side:
  batches:  --batches quick-start micro-batches (24 windows of 65 tokens) drawn three ways, the same
            windows each: indexing a memmap kept open (nanoGPT's read, and gptrain's before issue 14), a
            new memmap per batch (nanoGPT's workaround), and BatchSampler; microseconds per batch, and
            the file pages each leaves resident in this process (RssFile).
  training: `python train.py config/shakespeare_char.yaml` on that directory (CPU, float32, evaluated
            only at the start and the end), reading VmRSS, RssAnon and RssFile of the process from /proc
            and the part of RssFile that is train.bin's pages (from smaps) as it logs step 0 and every
            gcd(--steps) steps; then the ratio of RSS at the last of --steps to the first.
  sharding: (--sharding, instead of the above) the peak RSS of GPT-2 124M training on the CPU, 2 steps
            with the final save, on one process and per rank of FSDP on 2 processes, at --blocks context
            lengths: what sharding saves, and what it costs. `--tree DIR` runs another checkout (an older
            commit, for a before and after).
Run with OMP_NUM_THREADS=1 on a machine busy with other work: two threads on two shared cores spend
most of their time waiting for each other. Linux only (/proc). Not part of the test suite.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.data import BatchSampler, open_tokens, read_meta  # noqa: E402

BLOCK, BATCH, SEED = 64, 24, 1337  # block_size and batch_size of the quick start this was measured with; the seed
CHUNK = 1 << 26  # tokens generated and written at a time (128 MB)


def status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def mapped(pid: int, path: Path) -> int:
    """Bytes of `path` resident in the process through its mappings of it, from /proc/PID/smaps."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header; the file's path ends it
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def write_data(data: Path, size_gb: float) -> None:
    """train.bin of random ids, a small val.bin, and meta.json last, as `gptrain prepare` does."""
    chars = "".join(sorted(set((ROOT / "data" / "tinyshakespeare.txt").read_text())))
    counts = {"train": int(size_gb * 1e9) // 2, "val": 1_000_000}
    meta_path = data / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["train"]["tokens"] == counts["train"]:
        return
    data.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        print(f"writing {count * 2 / 1e9:.3f} GB of random ids to {data / split}.bin ...", flush=True)
        with open(data / f"{split}.bin", "wb") as f:
            for start in range(0, count, CHUNK):
                rng.integers(0, len(chars), size=min(CHUNK, count - start), dtype=np.uint16).tofile(f)
    meta = {"vocab_size": len(chars), "dtype": "uint16", "tokenizer": {"name": "char", "chars": chars},
            **{split: {"tokens": count} for split, count in counts.items()}, "source": "bench/memory.py: random ids"}
    meta_path.write_text(json.dumps(meta, indent=1))


def warm_page_cache(path: Path) -> None:
    """Read the file once, so every variant and the training run start with it in the page cache."""
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def windows(tokens: np.ndarray, step: int) -> torch.Tensor:
    """The windows of micro-batch (step, 0), by indexing `tokens` as gptrain did before issue 14."""
    starts = np.random.default_rng([SEED, step, 0]).integers(0, len(tokens) - BLOCK, size=BATCH)
    return torch.from_numpy(tokens[starts[:, None] + np.arange(BLOCK + 1)].astype(np.int64))


def bench_batches(data: Path, n: int) -> None:
    path = data / "train.bin"
    kept_open = np.memmap(path, dtype=np.uint16, mode="r")
    sampler = BatchSampler(open_tokens(data, "train", read_meta(data)), BLOCK, BATCH, SEED)
    for step in range(3):  # all three draw the same windows
        x, y = sampler.batch(step, 0)
        assert torch.equal(torch.cat([x, y[:, -1:]], 1), windows(np.memmap(path, dtype=np.uint16, mode="r"), step))
    # BatchSampler first and the kept-open memmap last, so that one's pages do not count against the others.
    variants = [
        ("BatchSampler", lambda step: sampler.batch(step, 0)),
        ("new memmap per batch", lambda step: windows(np.memmap(path, dtype=np.uint16, mode="r"), step)),
        ("memmap kept open", lambda step: windows(kept_open, step)),
    ]
    print(f"\n{n:,} micro-batches of {BATCH} x {BLOCK + 1} tokens from {path.stat().st_size / 1e9:.1f} GB")
    print(f"{'':24}{'us / batch':>12}{'RssFile growth':>16}")
    for name, draw in variants:
        before = status()["RssFile"]
        start = time.perf_counter()
        for step in range(n):
            draw(step)
        seconds = time.perf_counter() - start
        print(f"{name:24}{seconds / n * 1e6:12.1f}{(status()['RssFile'] - before) / 2**20:12.0f} MiB", flush=True)


def bench_training(data: Path, work: Path, steps: list[int]) -> None:
    interval, first, last = math.gcd(*steps), min(steps), max(steps)
    # One step past the last reading, so the process is still training (not exiting) when it is read.
    command = [sys.executable, "train.py", "config/shakespeare_char.yaml", f"data_dir={data}",
               f"out_dir={work / 'out'}", f"log_dir={work / 'logs'}", f"max_iters={last + 1}",
               f"eval_interval={last + 1}", "eval_iters=10", f"log_interval={interval}", "device=cpu",
               "dtype=float32", "tensorboard=false"]
    print(f"\ntraining: {' '.join(command[1:])}", flush=True)
    columns, train_bin = ("VmRSS", "RssAnon", "RssFile", "train.bin"), (data / "train.bin").resolve()
    print(f"{'step':>6}" + "".join(f"{column:>10}" for column in columns) + f"{'ms / step':>11}", flush=True)
    readings, step_ms = {}, []
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # a record is printed, flushed, as soon as its step ends
            match = re.match(r"iter (\d+) \| loss .*?(?:([\d.]+) ms/iter|$)", line)
            if not match:
                continue
            step, ms = int(match[1]), match[2] and float(match[2])  # step 0 has no time: it pays for warm-up
            readings[step] = status(proc.pid) | {"train.bin": mapped(proc.pid, train_bin)}
            step_ms += [ms] if ms else []
            mib = "".join(f"{readings[step][key] / 2**20:6.0f} MiB" for key in columns)
            print(f"{step:6}{mib}" + (f"{ms:11.1f}" if ms else ""), flush=True)
    except BaseException:  # e.g. Ctrl-C: leave no training behind
        proc.kill()
        raise
    if proc.wait():
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    rss = {step: reading["VmRSS"] / 2**20 for step, reading in readings.items()}
    print(f"VmRSS at step {last:,} / at step {first:,}: {rss[last]:.0f} / {rss[first]:.0f} MiB = "
          f"{rss[last] / rss[first]:.3f}x (at step 0: {rss[0]:.0f} MiB); train.bin resident in the process: "
          f"{readings[last]['train.bin'] / train_bin.stat().st_size:.0%}; median {np.median(step_ms):.1f} ms per step")


# The peak RSS of the largest process a command starts, after it ends: RUSAGE_CHILDREN counts torchrun's
# workers too, as torchrun waits for them. One interpreter per command, so the peaks never mix.
PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.exit(done.stderr[-3000:]) if done.returncode else "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")


def peak_rss_mib(command: list[str], cwd: Path) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, *command], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(cwd)})
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return int(done.stdout.split()[-1])


def bench_sharding(work: Path, tree: Path, blocks: list[int]) -> None:
    """GPT-2 124M (the default config) on GPT-2 tokens of tiny-shakespeare: 2 steps of 2 sequences, one
    micro-batch of one sequence each (so one process runs two, each FSDP rank one), evaluated at the start
    and the end, then saved."""
    data = work / "gpt2_data"
    if not (data / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "gptrain.cli", "prepare", "--input", str(ROOT / "data" / "tinyshakespeare.txt"),
                        "--tokenizer", "gpt2", "--out_dir", str(data)], cwd=ROOT, check=True)
    print(f"\nsharding: {tree}, GPT-2 124M, peak RSS of the largest process")
    print(f"{'block_size':>10}{'1 process':>12}{'FSDP, 2 ranks':>16}{'ratio':>8}")
    for block in blocks:
        common = [f"data_dir={data}", f"log_dir={work / 'logs'}", "max_iters=2", "eval_interval=2", "eval_iters=1",
                  f"block_size={block}", f"tokens_per_step={2 * block}", "batch_size=1", "warmup_iters=0",
                  "device=cpu", "dtype=float32", "compile=false", "tensorboard=false"]
        one = peak_rss_mib([sys.executable, "train.py", *common, f"out_dir={work / 'one'}"], tree)
        fsdp = peak_rss_mib([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                             *common, f"out_dir={work / 'fsdp'}", "parallelism=fsdp"], tree)
        print(f"{block:>10}{one:>8} MiB{fsdp:>12} MiB{fsdp / one:>8.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[500, 5000], help="steps at which RSS is compared, "
                   "first against last (default: 500 5000)")
    p.add_argument("--size_gb", type=float, default=2.0, help="size of the generated train.bin (default: 2)")
    p.add_argument("--batches", type=int, default=5000, help="micro-batches each way of drawing them (default: 5000)")
    p.add_argument("--work_dir", default=tempfile.gettempdir(), help="where the data and the run's output go")
    p.add_argument("--sharding", action="store_true", help="only the peak RSS of one process against FSDP's ranks")
    p.add_argument("--blocks", type=int, nargs="+", default=[256, 1024], help="--sharding's context lengths")
    p.add_argument("--tree", default=str(ROOT), help="--sharding: the checkout to run (default: this one)")
    args = p.parse_args()

    work = Path(args.work_dir) / "gptrain-bench-memory"
    if args.sharding:
        bench_sharding(work, Path(args.tree).resolve(), args.blocks)
        return
    data = work / "data"
    write_data(data, args.size_gb)
    warm_page_cache(data / "train.bin")
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads (in the run too), "
          f"torch {torch.__version__}, numpy {np.__version__}")
    bench_batches(data, args.batches)
    bench_training(data, work, sorted(args.steps))


if __name__ == "__main__":
    main()

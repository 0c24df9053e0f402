"""GPT-2 tokenization throughput of `gptrain prepare` against a plain single-process tiktoken loop.

    python bench/prepare.py --size_mb 100
    python bench/prepare.py --size_mb 1000

Builds a JSON-lines corpus of the given size from random spans of the shipped tiny-shakespeare text
(documents of 0.5 to 8 KB, about OpenWebText's), then times, on the same documents, best of --repeat:
  baseline: read each line, json.loads, tiktoken encode_ordinary, one process;
  prepare:  `python -m gptrain.prepare --input corpus.jsonl` end to end (start-up, split, tokenize,
            write, checksums, metadata), and its peak RSS summed over the process and its workers.
Linux only (peak RSS is sampled from /proc). Not part of the test suite.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.tokenizer import gpt2_encoding  # noqa: E402


def build_corpus(path: Path, size_mb: int) -> None:
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
    rng = random.Random(0)
    written = 0
    with open(path.with_suffix(".tmp"), "w") as f:
        while written < size_mb * 1_000_000:
            start, length = rng.randrange(len(text) - 8192), rng.randrange(500, 8192)
            line = json.dumps({"text": text[start : start + length]}) + "\n"
            f.write(line)
            written += len(line)
    os.replace(path.with_suffix(".tmp"), path)


def baseline(path: Path) -> tuple[int, int, float]:
    """(documents, tokens, seconds) of the plain loop."""
    encode = gpt2_encoding().encode_ordinary
    docs = tokens = 0
    start = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            tokens += len(encode(json.loads(line)["text"]))
            docs += 1
    return docs, tokens, time.perf_counter() - start


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    parents, rss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # the process ended while we looked
            continue
        parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(pid)] = next((int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmRSS")), 0)
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(rss.get(pid, 0) for pid in tree)


def run_prepare(corpus: Path, out_dir: Path, num_proc: int) -> tuple[float, int]:
    """(seconds, peak tree RSS bytes) of one `gptrain prepare` run."""
    command = [sys.executable, "-m", "gptrain.prepare", "--input", str(corpus), "--out_dir", str(out_dir),
               "--tokenizer", "gpt2", "--num_proc", str(num_proc), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"gptrain prepare failed with exit code {code}")
    return seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size_mb", type=int, default=100, help="corpus size in MB (default: 100)")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="workers for gptrain prepare")
    p.add_argument("--repeat", type=int, default=3, help="runs of each side; the best time counts (default: 3)")
    p.add_argument("--work_dir", default=tempfile.gettempdir(), help="where the corpus and output go")
    args = p.parse_args()

    work = Path(args.work_dir) / "gptrain-bench-prepare"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.size_mb}mb.jsonl"
    if not corpus.exists():
        print(f"building {corpus} ...", flush=True)
        build_corpus(corpus, args.size_mb)
    print(f"corpus: {corpus.stat().st_size / 1e6:.0f} MB, {os.cpu_count()} cores, {args.num_proc} workers", flush=True)

    # Alternate the two and keep each one's best time, so a busy moment on the machine hurts neither.
    base_s = prep_s = float("inf")
    peak = 0
    for _ in range(args.repeat):
        docs, tokens, seconds = baseline(corpus)
        base_s = min(base_s, seconds)
        seconds, rss = run_prepare(corpus, work / "out", args.num_proc)
        prep_s, peak = min(prep_s, seconds), max(peak, rss)
    meta = json.loads((work / "out" / "meta.json").read_text())
    written = meta["train"]["tokens"] + meta["val"]["tokens"]
    assert written == tokens + docs, f"prepare wrote {written} tokens, expected {tokens} + {docs} end-of-text"

    print(f"{'':28}{'seconds':>9}{'M tokens/s':>12}")
    print(f"{'tiktoken loop, 1 process':28}{base_s:9.1f}{tokens / base_s / 1e6:12.2f}")
    print(f"{'gptrain prepare':28}{prep_s:9.1f}{tokens / prep_s / 1e6:12.2f}")
    print(f"{docs:,} documents, {tokens:,} tokens; speedup {base_s / prep_s:.2f}x; "
          f"prepare peak RSS {peak / 2**20:.0f} MiB (process + workers)")


if __name__ == "__main__":
    main()

"""Page faults per CPU training step, with glibc's default malloc settings and with gptrain's
keep_freed_host_memory(), which keeps freed activation buffers for reuse instead of unmapping them.

    python bench/page_faults.py                 # 20 steps each
    python bench/page_faults.py --steps 50

Each side runs in a process of its own (the settings are process-wide and cannot be undone): the quick
start's model (3 layers, 96 wide, 4 heads, context 64, 65 characters; batch 12, float32) trains on random
tokens with fused AdamW; after 3 warm-up steps, the minor page faults of --steps steps are counted with
getrusage, as are their milliseconds. A fault is a page the kernel hands back zeroed after glibc returned
it, so with the default settings their count grows with the activations a step frees. Linux with glibc
only; run it on a quiet machine for the times. Not part of the test suite.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.config import GPTConfig  # noqa: E402
from gptrain.device import keep_freed_host_memory  # noqa: E402
from gptrain.model import GPT  # noqa: E402

WARMUP = 3


def measure(steps: int, keep: bool) -> dict:
    """Faults and milliseconds per step in this process, after keep_freed_host_memory() if `keep`."""
    threshold = keep_freed_host_memory() if keep else None
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=96, block_size=64, vocab_size=65, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randint(0, 65, (2, 12, 64))

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    return {"faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
            "ms": 1000 * (time.perf_counter() - start) / steps, "threshold": threshold}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps counted on each side (default: 20)")
    p.add_argument("--side", choices=["default", "keep"], help=argparse.SUPPRESS)  # what each child process runs
    args = p.parse_args()
    if args.side:
        print(json.dumps(measure(args.steps, args.side == "keep")))
        return
    if not sys.platform.startswith("linux"):
        sys.exit("bench/page_faults.py counts glibc's page faults: Linux only")
    results = {}
    for side in ("default", "keep"):
        done = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout)
    keep = results["keep"]
    if keep["threshold"] is None:
        sys.exit("keep_freed_host_memory() changed nothing here (no glibc to tune)")
    print(f"page faults per step of the quick start's model, {args.steps} steps, {torch.get_num_threads()} threads: "
          f"{results['default']['faults']:,.0f} with glibc's defaults ({results['default']['ms']:.1f} ms/step), "
          f"{keep['faults']:,.0f} with keep_freed_host_memory() ({keep['ms']:.1f} ms/step; mmap threshold "
          f"{keep['threshold'] >> 20} MiB)")


if __name__ == "__main__":
    main()

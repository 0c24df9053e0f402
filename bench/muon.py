"""Muon's step on the quick start's model: torch.optim.Muon against gptrain's, in float32 and in bfloat16.

    python bench/muon.py                                   # config/modern_shakespeare_char.yaml, 200 steps
    python bench/muon.py --config config/default.yaml --steps 20

The blocks' matrices of the config's model (random gradients: Newton-Schulz costs the same whatever they
hold), one Muon step timed at a time, the median in ms. torch.optim.Muon iterates in bfloat16, one
matrix at a time; gptrain's batches the matrices of a shape and iterates in the dtype given. Then the
same in a subprocess with ONEDNN_MAX_CPU_ISA=AVX2, which keeps oneDNN below AVX512-BF16 (it reads the
variable once, when it starts): bfloat16 matmuls are then emulated, as on a CPU without AVX512-BF16 or
AMX (issue 27: 7x slower than float32 on a 2-core AMD EPYC). On a machine busy with other work, run with
OMP_NUM_THREADS=1: two threads on two shared cores spend most of a step waiting for each other. Not part
of the test suite.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptrain.config import load_config  # noqa: E402
from gptrain.device import native_bfloat16  # noqa: E402
from gptrain.model import GPT  # noqa: E402
from gptrain.optim import Muon, param_role  # noqa: E402

CAP = "ONEDNN_MAX_CPU_ISA"


def median_step_ms(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 5) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "config" / "modern_shakespeare_char.yaml"))
    p.add_argument("--vocab_size", type=int, default=65, help="the data's (not read here); 65: tiny-shakespeare's")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()

    config = load_config([args.config, f"vocab_size={args.vocab_size}"])
    torch.manual_seed(0)
    matrices = [p for name, p in GPT(config.model_config()).named_parameters() if param_role(name, p) == "matrix"]
    for p in matrices:
        p.grad = torch.randn_like(p) * 1e-3
    shapes = sorted({tuple(p.shape) for p in matrices})
    cap = os.environ.get(CAP, "none")
    print(f"{CAP}={cap}: native bfloat16 {'yes' if native_bfloat16(torch.device('cpu')) else 'no'}; "
          f"{len(matrices)} matrices of {len(shapes)} shapes ({', '.join('x'.join(map(str, s)) for s in shapes)}), "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    settings = {"lr": config.muon_lr, "weight_decay": 0.0, "momentum": config.muon_momentum}
    variants = {"gptrain Muon, float32": lambda: Muon(matrices, **settings, dtype=torch.float32),
                "gptrain Muon, bfloat16": lambda: Muon(matrices, **settings, dtype=torch.bfloat16)}
    if hasattr(torch.optim, "Muon"):  # new in torch 2.9
        variants = {"torch.optim.Muon (bfloat16)": lambda: torch.optim.Muon(matrices, **settings), **variants}
    baseline = None
    for name, make in variants.items():
        ms = median_step_ms(make(), args.steps)
        baseline = baseline or ms
        print(f"  {name:<28} {ms:8.2f} ms   x{baseline / ms:.2f} of the first's speed")

    if CAP not in os.environ:  # the child sees the cap set and stops there
        sys.stdout.flush()
        subprocess.run([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, CAP: "AVX2"}, check=True)


if __name__ == "__main__":
    main()

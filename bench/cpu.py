"""What kind of CPU a benchmark ran on: its model, whether it multiplies bfloat16 natively, its float32
matmul peak, and a check that forcing the path without native bfloat16 really takes it.

    python bench/cpu.py                 # the lines the CPU benchmarks print
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu.py

A CPU with AVX512-BF16 or AMX multiplies bfloat16 natively: torch's CPU matmuls go through oneDNN, and
a bfloat16 product then runs faster than a float32 one. Without them torch falls back to its own
bfloat16 kernels, many times slower. oneDNN uses no instruction set past ONEDNN_MAX_CPU_ISA, so
ONEDNN_MAX_CPU_ISA=AVX2 gives a CPU that has them the path of one that does not: the benchmarks'
--no_native_bf16 sets it for every process they start, once a matmul has shown that it does. Figures
from the two kinds of CPU differ by more than any change of ours, so every CPU benchmark says which
kind it ran on. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

# The variable oneDNN reads, and its older name, which it still honours when the new one is unset.
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
FORCED_ISA = "AVX2"
# oneDNN's names of the instruction sets at or past AVX512-BF16 (any case): a cap at one of these keeps
# the native bfloat16 path. DEFAULT and ALL cap nothing. gptrain.device.native_bfloat16, which picks
# muon_dtype=auto, decides alike from the same names; this file imports nothing of gptrain, since
# step_profile.py runs other checkouts' trainers, and their gptrain, in its process.
BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
             "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL"}
NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")  # as /proc/cpuinfo spells them
SHAPE = (768, 96, 384)  # the quick start's MLP input: 12 x 64 tokens, 96 wide, into 384
SLOW = 3.0  # bf16 at least this many times float32's time counts as the path without native bf16


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The instruction-set flags Linux reports (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_cap(env: Mapping[str, str] = os.environ) -> str | None:
    """The instruction set oneDNN is capped at, as set, or None."""
    return next((env[name] for name in ISA_VARIABLES if env.get(name)), None)


def native_bfloat16(env: Mapping[str, str] = os.environ) -> bool:
    """Whether matmuls in a process started with `env` multiply bfloat16 natively: the CPU has
    AVX512-BF16 or AMX and no ONEDNN_MAX_CPU_ISA keeps oneDNN from them."""
    cap = isa_cap(env)
    return bool(cpu_flags() & set(NATIVE_FLAGS)) and (cap is None or cap.upper() in BF16_ISAS)


def describe_cpu(env: Mapping[str, str] = os.environ) -> str:
    """The CPU's model and its kind for bfloat16, as one phrase."""
    has = sorted(cpu_flags() & set(NATIVE_FLAGS))
    if native_bfloat16(env):
        kind = f"native bfloat16 ({', '.join(has)})"
    elif has:
        kind = f"native bfloat16 ({', '.join(has)}) turned off by {ISA_VARIABLES[0]}={isa_cap(env)}"
    else:
        kind = "no native bfloat16"
    return f"{cpu_model()}, {kind}"


def matmul_seconds(dtype: torch.dtype, m: int, k: int, n: int, repeat: int, budget_s: float = 2.0) -> float:
    """Median seconds of one (m, k) @ (k, n) product, after a warm-up: `repeat` of them, or as many as
    `budget_s` allows (at least 3), since a product on the slow path can take a second."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    times = []
    while len(times) < repeat and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_over_fp32(repeat: int = 100) -> float:
    """This process's bfloat16 matmul time over float32's, at the quick start's size, on one thread:
    a thread of two that the OS has descheduled stalls its partner, which a check on a busy machine
    would read as slowness of the kernel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_seconds(torch.bfloat16, *SHAPE, repeat) / matmul_seconds(torch.float32, *SHAPE, repeat)
    finally:
        torch.set_num_threads(threads)


def bf16_paths(*, force: bool) -> str:
    """Measure bf16 / fp32 matmul time in a process as this one is and in one with ONEDNN_MAX_CPU_ISA=AVX2;
    with `force`, stop unless the latter is the slow path, then set the variable here so that every
    process started from now on takes it. Returns the line to print under the results."""
    as_is = {k: v for k, v in os.environ.items() if k not in ISA_VARIABLES} if force else dict(os.environ)
    forced = {**as_is, ISA_VARIABLES[0]: FORCED_ISA}
    ratios = [_ratio_in(env) for env in (as_is, forced)]
    line = (f"bf16 matmul / fp32 matmul ({' x '.join(map(str, SHAPE))}, 1 thread): "
            f"{ratios[0]:.1f}x {'native' if native_bfloat16(as_is) else 'as is, no native bf16'}, "
            f"{ratios[1]:.1f}x forced ({ISA_VARIABLES[0]}={FORCED_ISA})")
    if force:
        if ratios[1] < SLOW:
            raise SystemExit(f"{line}\n--no_native_bf16: {ISA_VARIABLES[0]}={FORCED_ISA} does not make bfloat16 "
                             f"matmuls {SLOW:g} times slower than float32 with torch {torch.__version__} here, "
                             "so it would not show the path without native bfloat16")
        os.environ.pop(ISA_VARIABLES[1], None)
        os.environ[ISA_VARIABLES[0]] = FORCED_ISA
    return line


def add_bf16_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no_native_bf16", action="store_true", help=f"start every process with "
                        f"{ISA_VARIABLES[0]}={FORCED_ISA}: the path of a CPU without native bfloat16 (checked first)")


def _ratio_in(env: dict[str, str]) -> float:
    """bf16_over_fp32() in a new process: oneDNN reads its cap once, when it first runs."""
    done = subprocess.run([sys.executable, __file__, "--ratio"], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode:
        raise SystemExit(f"bench/cpu.py --ratio failed:\n{done.stderr[-2000:]}")
    return float(done.stdout)


def peak_fp32_gflops(size: int = 2048, repeat: int = 5) -> float:
    """float32 GFLOP/s of a large square matmul on this process's threads: the machine's practical peak,
    which a training step's matrix products can approach but not pass."""
    return 2 * size**3 / matmul_seconds(torch.float32, size, size, size, repeat) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", action="store_true", help="print this process's bf16 / fp32 matmul time and stop")
    args = p.parse_args()
    if args.ratio:
        print(bf16_over_fp32())
        return
    print(f"CPU: {describe_cpu()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(bf16_paths(force=False))
    print(f"float32 matmul peak (2048 x 2048 x 2048, {torch.get_num_threads()} threads): "
          f"{peak_fp32_gflops():,.0f} GFLOP/s")


if __name__ == "__main__":
    main()

"""Where a training step's time goes: a trainer script run as it is under torch.profiler.

    python bench/step_profile.py --skip 10 --steps 20 -- train.py config/shakespeare_char.yaml device=cpu

Runs SCRIPT as __main__ with ARGS in this process, so the trainer is the real one, unchanged (any
trainer that steps a torch optimizer: bench/train_throughput.py runs gptrain's and nanoGPT's this way and
prints them side by side). Each call of the first optimizer's step() ends a training step; after
--skip steps, the next --steps are profiled, and the trainer is then stopped. Splits their wall time
into: matrix products (the self time of aten::mm, addmm, bmm, baddbmm, linear and matmul, with the
FLOPs the profiler counts for them), attention (the scaled_dot_product kernels, apart), every other op,
and the time outside any op (Python, the loop, waiting). Then times a large float32 matmul in the same
process: the peak the products are held against. Prints a summary, or writes it as JSON (--json).
Times under the profiler run a little longer than without it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

from cpu import describe_cpu, peak_fp32_gflops

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"}
TOP = 8  # other ops listed by name


class Profiled(BaseException):
    """Raised through the trainer once the steps are profiled: not an Exception, so no handler of its takes it."""


class StepProfiler:
    """The optimizer hook that starts the profiler after `skip` steps and stops it `steps` later."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps, self.seen = skip, steps, 0
        self.marker = None  # the optimizer whose step() ends a training step (gptrain may have two)
        self.profiler = profile(activities=[ProfilerActivity.CPU], with_flops=True)
        self.seconds = 0.0

    def __call__(self, optimizer, args, kwargs) -> None:
        self.marker = self.marker or optimizer
        if optimizer is not self.marker:
            return
        self.seen += 1
        if self.seen == self.skip:
            self.profiler.start()
            self.started = time.perf_counter()
        elif self.seen == self.skip + self.steps:
            self.seconds = time.perf_counter() - self.started
            self.profiler.stop()
            raise Profiled


def summarize(profiler: profile, seconds: float, steps: int) -> dict:
    """Milliseconds per step by kind of work, the products' GFLOP/s and the largest other ops."""
    per_step = lambda us: us / 1000 / steps  # noqa: E731
    matmul_us = attention_us = other_us = flops = 0
    others = []
    for event in profiler.key_averages():
        if event.key in MATMULS:
            matmul_us += event.self_cpu_time_total
            flops += event.flops
        elif "scaled_dot_product" in event.key:
            attention_us += event.self_cpu_time_total
        else:
            other_us += event.self_cpu_time_total
            others.append((event.key, per_step(event.self_cpu_time_total)))
    step_ms = 1000 * seconds / steps
    return {
        "steps": steps, "step_ms": step_ms, "matmul_ms": per_step(matmul_us),
        "matmul_gflops": flops / matmul_us / 1e3 if matmul_us else 0.0,
        "attention_ms": per_step(attention_us), "other_ms": per_step(other_us),
        "outside_ms": step_ms - per_step(matmul_us + attention_us + other_us),
        "top_other": sorted(others, key=lambda item: -item[1])[:TOP],
    }


def report(summary: dict) -> str:
    share = lambda ms: f"{ms:,.2f} ms ({ms / summary['step_ms']:.0%})"  # noqa: E731
    rate = summary["matmul_gflops"]
    return "\n".join([
        f"step (under the profiler): {summary['step_ms']:,.2f} ms, the mean of {summary['steps']}",
        f"matrix products: {share(summary['matmul_ms'])} at {rate:,.1f} GFLOP/s, "
        f"{rate / summary['peak_gflops']:.0%} of the {summary['peak_gflops']:,.1f} GFLOP/s float32 peak",
        f"attention: {share(summary['attention_ms'])}",
        f"other ops: {share(summary['other_ms'])}: " + ", ".join(f"{k} {ms:.2f}" for k, ms in summary["top_other"]),
        f"outside any op: {share(summary['outside_ms'])}",
        f"CPU: {summary['cpu']}, {summary['threads']} torch threads",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", type=int, default=5, help="steps before the profiled ones (default: 5)")
    p.add_argument("--steps", type=int, default=10, help="steps profiled (default: 10)")
    p.add_argument("--json", type=Path, help="write the summary here as JSON instead of printing it")
    p.add_argument("script", help="the trainer script, then its arguments (after --)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.skip < 1 or args.steps < 1:
        p.error("--skip and --steps must be >= 1")

    hook = StepProfiler(args.skip, args.steps)
    handle = register_optimizer_step_post_hook(hook)
    sys.argv = [args.script, *args.args]
    sys.path[0] = str(Path(args.script).resolve().parent)  # as `python SCRIPT` would: nanoGPT imports model.py
    try:
        runpy.run_path(args.script, run_name="__main__")
    except Profiled:
        pass
    finally:
        handle.remove()
    if not hook.seconds:
        sys.exit(f"{args.script} made {hook.seen} optimizer steps, fewer than --skip + --steps "
                 f"= {args.skip + args.steps}")
    summary = summarize(hook.profiler, hook.seconds, args.steps)
    summary |= {"peak_gflops": peak_fp32_gflops(), "cpu": describe_cpu(), "threads": torch.get_num_threads()}
    if args.json:
        args.json.write_text(json.dumps(summary))
    else:
        print(report(summary))


if __name__ == "__main__":
    main()

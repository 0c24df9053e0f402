"""Time per training step and peak memory of gptrain and nanoGPT on the CPU, side by side.

    python bench/train_throughput.py --nanogpt ~/nanoGPT                      # both configs, the defaults
    python bench/train_throughput.py --nanogpt ~/nanoGPT --configs a --steps 100 --repeat 1

Configs (the same model and batch on both sides, biases included; float32, no compile):
  a  nanoGPT's README CPU config: 4 layers, 4 heads, 128 wide, context 64, batch 12, character-level
     tiny-shakespeare (65 characters on both sides); 300 steps, 3 runs of each by default
  b  GPT-2 124M's shape: 12 layers, 12 heads, 768 wide, context 1024, vocabulary 50,304, batch 1, no
     gradient accumulation, GPT-2 tokens of tiny-shakespeare; a step takes seconds, so 8 steps, 2 runs
Runs alternate, gptrain first. ms/step is the median of the per-step times each trainer prints, from
the config's first timed step on (the earlier ones warm up, and nanoGPT's step 0 includes an
evaluation), then the median over runs. Speed ratio = nanoGPT ms/step / gptrain's (> 1: gptrain is
faster). Peak RSS is each trainer process's own high-water mark.

Then each trainer runs once more under bench/step_profile.py, which profiles the steps after the warm-up
ones (20 for a, 3 for b; --no_profile skips this) and times a 2048^3 float32 matmul in the same process:
a second table splits a step into matrix products (with their GFLOP/s against that peak), attention,
other ops and time outside any op, side by side. The CPU's kind (native bfloat16 or not) is printed
with a bf16 / fp32 matmul check; --no_native_bf16 runs every process on the path without it. Not part
of the test suite.
"""

import argparse
import json
import sys
from pathlib import Path

from cpu import add_bf16_option, bf16_paths
from side_by_side import (
    GPTRAIN, NANOGPT, ROOT, Setup, Trainer, Workspace, describe_machine, nanogpt_dir, print_table, run, summary,
    time_steps,
)

SETUPS = {
    "a": Setup(
        "a: 4 layers x 128, context 64, batch 12, char", "char", steps=300, repeat=3, first_timed=10,
        shared=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, bias=True,
                    eval_iters=20, device="cpu", compile=False),
        gptrain=("config/shakespeare_char.yaml", "tokens_per_step=768"),
        nanogpt=("config/train_shakespeare_char.py",),  # its README's CPU run starts from this file
    ),
    "b": Setup(
        "b: GPT-2 124M shape, context 1024, batch 1, GPT-2 tokens", "gpt2", steps=8, repeat=2, first_timed=2,
        shared=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=1, dropout=0.0, bias=True,
                    eval_iters=1, dtype="float32", device="cpu", compile=False),
        # lr_decay_iters: the default recipe's horizon, which a short max_iters would otherwise cut below warm-up
        gptrain=("tokens_per_step=1024", "vocab_size=50304", "lr_decay_iters=600000"),
        nanogpt=("--gradient_accumulation_steps=1",),  # vocabulary: 50,304 when the data has no meta.pkl
    ),
}
PROFILED = {"a": 20, "b": 3}  # steps profiled, after each setup's first_timed


def profile_steps(work: Workspace, name: str) -> dict[Trainer, dict]:
    """Each trainer's step_profile.py summary for setup `name`, run as it is timed."""
    setup, profiled = SETUPS[name], PROFILED[name]
    ours, theirs = setup.commands(work, setup.first_timed + profiled + 1)
    summaries = {}
    for trainer, command, cwd in ((NANOGPT, work.nanogpt_command(theirs), work.dir),
                                  (GPTRAIN, work.gptrain_command(ours), ROOT)):
        out = work.dir / f"profile_{name}_{trainer.name}.json"
        run([sys.executable, str(Path(__file__).with_name("step_profile.py")), "--skip", str(setup.first_timed),
             "--steps", str(profiled), "--json", str(out), "--", *command[1:]], cwd)
        summaries[trainer] = json.loads(out.read_text())
        print(f"{setup.title}, profiled {trainer.name}: {summaries[trainer]['step_ms']:,.1f} ms/step",
              file=sys.stderr, flush=True)
    return summaries


def profile_table(name: str, summaries: dict[Trainer, dict]) -> None:
    """Where a step of setup `name` goes, one column per trainer."""
    def share(key: str) -> list[str]:
        return [f"{s[key]:,.1f} ms ({s[key] / s['step_ms']:.0%})" for s in summaries.values()]

    print_table([f"{name}: where a step goes (torch.profiler, {PROFILED[name]} steps)",
                 *(t.name for t in summaries)], [
        ["step, under the profiler", *(f"{s['step_ms']:,.1f} ms" for s in summaries.values())],
        ["matrix products (mm, addmm, bmm, linear, matmul)", *share("matmul_ms")],
        ["their rate, against the float32 peak in the same process",
         *(f"{s['matmul_gflops']:,.0f} GFLOP/s ({s['matmul_gflops'] / s['peak_gflops']:.0%} of {s['peak_gflops']:,.0f})"
           for s in summaries.values())],
        ["attention (scaled_dot_product kernels)", *share("attention_ms")],
        ["other ops", *share("other_ms")],
        ["outside any op (Python, the loop)", *share("outside_ms")],
    ])
    print()
    for trainer, s in summaries.items():
        print(f"- {name}, {trainer.name}'s largest other ops, ms/step: "
              + ", ".join(f"{op} {ms:.2f}" for op, ms in s["top_other"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=nanogpt_dir, required=True, help="a nanoGPT checkout (only read)")
    p.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS), help="default: a b")
    p.add_argument("--steps", type=int, help="training steps per run (default: 300 for a, 8 for b)")
    p.add_argument("--repeat", type=int, help="runs of each trainer (default: 3 for a, 2 for b)")
    p.add_argument("--no_profile", action="store_true", help="skip the profiled run of each trainer")
    add_bf16_option(p)
    args = p.parse_args()
    for name in args.configs:
        if (args.steps or SETUPS[name].steps) <= SETUPS[name].first_timed:
            p.error(f"config {name} times steps {SETUPS[name].first_timed} and later: --steps must be over that")

    bf16 = bf16_paths(force=args.no_native_bf16)  # before any measured process starts
    rows, notes, profiles = [], [], {}
    with Workspace(args.nanogpt) as work:
        for name in dict.fromkeys(args.configs):
            setup = SETUPS[name]
            steps, repeat = args.steps or setup.steps, args.repeat or setup.repeat
            work.prepare(setup.tokenizer)
            runs = time_steps(work, setup, steps, repeat)
            med = summary(runs)
            rows.append([setup.title, f"{setup.first_timed}-{steps - 1}", str(repeat), f"{med[NANOGPT].ms:,.1f}",
                         f"{med[GPTRAIN].ms:,.1f}", f"**{med[NANOGPT].ms / med[GPTRAIN].ms:.2f}x**",
                         *(f"{med[t].peak_rss / 2**20:,.0f} MiB" for t in (NANOGPT, GPTRAIN))])
            ours, theirs = setup.commands(work, steps)
            notes += [f"- {name}, ms/step of each run: " + "; ".join(
                          f"{t.name} " + ", ".join(f"{r.ms:,.1f}" for r in runs[t]) for t in runs)
                      + "; median time between step lines as they arrived: " + ", ".join(
                          f"{t.name} {med[t].gap_ms:,.1f}" for t in runs),
                      f"- {name}, gptrain: `{work.shown(work.gptrain_command(ours))}`",
                      f"- {name}, nanoGPT: `{work.shown(work.nanogpt_command(theirs))}`"]
            if not args.no_profile:
                profiles[name] = profile_steps(work, name)

    print_table(["config", "steps timed", "runs", "nanoGPT ms/step", "gptrain ms/step",
                 "speed ratio (nanoGPT / gptrain)", "nanoGPT peak RSS", "gptrain peak RSS"], rows)
    print()
    print("\n".join(notes))
    print("- Both sides print a time for every step. nanoGPT's is the wall time from the end of one step to the "
          "end of the next, so it also holds its data loading, its print of the step before and any evaluation; "
          "gptrain's holds the data loading and the loss read-back, not evaluation or writing its logs. Neither "
          "evaluates during the timed steps.")
    print("- Writes besides the console: gptrain metrics.jsonl (a line a step), config.yaml and environment.json, "
          "and ckpt.pt after its final evaluation, past the timed steps (TensorBoard off); nanoGPT nothing "
          "(it checkpoints only at evaluations after step 0).")
    for name, summaries in profiles.items():
        print()
        profile_table(name, summaries)
    print()
    print(f"- {bf16}")
    print(describe_machine(args.nanogpt))


if __name__ == "__main__":
    main()

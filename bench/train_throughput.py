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
faster). Peak RSS is each trainer process's own high-water mark. Not part of the test suite.
"""

import argparse

from side_by_side import (
    GPTRAIN, NANOGPT, Setup, Workspace, describe_machine, nanogpt_dir, print_table, summary, time_steps,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=nanogpt_dir, required=True, help="a nanoGPT checkout (only read)")
    p.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS), help="default: a b")
    p.add_argument("--steps", type=int, help="training steps per run (default: 300 for a, 8 for b)")
    p.add_argument("--repeat", type=int, help="runs of each trainer (default: 3 for a, 2 for b)")
    args = p.parse_args()
    for name in args.configs:
        if (args.steps or SETUPS[name].steps) <= SETUPS[name].first_timed:
            p.error(f"config {name} times steps {SETUPS[name].first_timed} and later: --steps must be over that")

    rows, notes = [], []
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
    print(describe_machine(args.nanogpt))


if __name__ == "__main__":
    main()

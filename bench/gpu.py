"""GPT-2 124M training speed and MFU of gptrain and nanoGPT on one CUDA GPU, side by side.

    python bench/gpu.py --nanogpt ~/nanoGPT                       # 30 steps, one run of each
    python bench/gpu.py --nanogpt ~/nanoGPT --repeat 2 --peak_tflops 312    # e.g. an A100
    python bench/gpu.py --nanogpt ~/nanoGPT --dry_run             # print the two commands; runs anywhere
    python bench/gpu.py                                           # gptrain alone

Both train GPT-2 124M (12 layers, 12 heads, 768 wide, context 1024, vocabulary 50,304, with biases) in
bfloat16 with torch.compile and fused AdamW, 40 micro-batches of 12 sequences a step (491,520 tokens),
on GPT-2 tokens of tiny-shakespeare (speed does not depend on the text). From step 5 on (the first
steps compile), the script takes the median of the per-step times each prints and derives, the same
way for both: tokens/s = tokens per step / seconds per step, and MFU = tokens/s x FLOPs per token /
peak, with gptrain.model.GPT.flops_per_token (6 x parameters without the position table + 12 x layers
x width x context: 855 MFLOP) and --peak_tflops (989: H100 / H200 SXM, dense bf16). Runs alternate,
gptrain first; without --nanogpt, gptrain runs alone. Not part of the test suite.
"""

import argparse
import sys

import torch

from side_by_side import (
    GPTRAIN, NANOGPT, ROOT, Setup, Workspace, describe_machine, nanogpt_dir, print_table, summary, time_steps,
)

sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.config import GPTConfig  # noqa: E402
from gptrain.model import GPT  # noqa: E402

SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True)
VOCAB, BATCH, ACCUMULATION = 50304, 12, 40
TOKENS_PER_STEP = BATCH * ACCUMULATION * SHAPE["block_size"]
SETUP = Setup(
    "GPT-2 124M, bf16, compile", "gpt2", steps=30, repeat=1, first_timed=5,
    shared=dict(**SHAPE, batch_size=BATCH, eval_iters=1, dtype="bfloat16", compile=True, device="cuda"),
    # config/default.yaml's recipe; lr_decay_iters is its horizon, which a short max_iters would cut below warm-up
    gptrain=(f"tokens_per_step={TOKENS_PER_STEP}", f"vocab_size={VOCAB}", "lr_decay_iters=600000"),
    nanogpt=(f"--gradient_accumulation_steps={ACCUMULATION}",),  # vocabulary: 50,304 when the data has no meta.pkl
)


def flops_per_token() -> float:
    with torch.device("meta"):  # the count needs only the shapes
        return GPT(GPTConfig(**SHAPE, vocab_size=VOCAB)).flops_per_token()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=nanogpt_dir, help="a nanoGPT checkout (only read); without it, gptrain alone")
    p.add_argument("--steps", type=int, default=SETUP.steps, help=f"training steps per run (default: {SETUP.steps})")
    p.add_argument("--repeat", type=int, default=SETUP.repeat, help=f"runs of each trainer (default: {SETUP.repeat})")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak, TFLOP/s (default: 989, H100/H200)")
    p.add_argument("--dry_run", action="store_true", help="print the two training commands and stop")
    args = p.parse_args()
    if args.steps <= SETUP.first_timed:
        p.error(f"steps {SETUP.first_timed} and later are timed: --steps must be over {SETUP.first_timed}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(f"bench/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none (--dry_run works anywhere)")

    with Workspace(args.nanogpt) as work:
        ours, theirs = SETUP.commands(work, args.steps)
        commands = [f"- gptrain: `{work.shown(work.gptrain_command(ours))}`"]
        if args.nanogpt:
            commands.append(f"- nanoGPT: `{work.shown(work.nanogpt_command(theirs))}`")
        if args.dry_run:
            print("\n".join(commands))
            return
        if args.nanogpt:
            work.prepare(SETUP.tokenizer)
        else:
            work.prepare_gptrain(SETUP.tokenizer)
        runs = time_steps(work, SETUP, args.steps, args.repeat)

    flops, med = flops_per_token(), summary(runs)
    rows = []
    for trainer in sorted(runs, key=lambda t: t is GPTRAIN):  # nanoGPT first, as in the other tables
        tokens_per_sec = TOKENS_PER_STEP / (med[trainer].ms / 1000)
        rows.append([trainer.name, f"{med[trainer].ms:,.0f}", ", ".join(f"{r.ms:,.0f}" for r in runs[trainer]),
                     f"{med[trainer].gap_ms:,.0f}", f"{tokens_per_sec:,.0f}",
                     f"{tokens_per_sec * flops / (args.peak_tflops * 1e12):.1%}"])
    print_table(["trainer", f"ms/step, steps {SETUP.first_timed}-{args.steps - 1}", "each run",
                 "ms between step lines", "tokens/s", "MFU"], rows)
    print()
    ratio = ""
    if NANOGPT in med:
        ratio = f"Speed ratio (nanoGPT ms/step / gptrain's): **{med[NANOGPT].ms / med[GPTRAIN].ms:.2f}x**; "
    print(f"{ratio}{TOKENS_PER_STEP:,} tokens a step, {flops / 1e6:.0f} MFLOP per token, "
          f"peak {args.peak_tflops:g} TFLOP/s.")
    print("\n".join(commands))
    print("- nanoGPT's time per step is not synchronized with the GPU, but reading the loss on every log step is, "
          "so in a steady run each step's time is the GPU's; its own MFU figure (against an A100's peak) is not used.")
    print(describe_machine(args.nanogpt))


if __name__ == "__main__":
    main()

"""Decoding speed: gptrain's KV-cached generation, one stream and a batch of samples, against nanoGPT's
GPT.generate (which recomputes the whole context for every token), with the same weights.

    python bench/generate.py --nanogpt /path/to/nanoGPT                  # 500 tokens, median of 3 (ours)
    python bench/generate.py --nanogpt /path/to/nanoGPT --tokens 40 --repeat 1
    python bench/generate.py --device cuda --tokens 200                  # ours alone, on a GPU

Builds a GPT-2 124M-shaped model (12 layers, 12 heads, 768 wide, context 1024, vocabulary 50304), randomly
initialised under a fixed seed, and loads the same weights into nanoGPT's GPT, imported from the
checkout's model.py (never copied here); both in eval mode, float32, on --device (default: the CPU;
without --nanogpt, ours alone). Each run continues the GPT-2 tokens of
a fixed sentence by --tokens new tokens, prefill included:
  nanoGPT        GPT.generate, one stream, temperature 1 and top_k 1: deterministic, so greedy
  ours, greedy   generate_tokens with the KV cache, one stream, temperature 0
  ours, sampled  one stream sampled as `gptrain generate` does (--temperature, --top_k, a generator per sample)
  ours, batch    --samples streams sampled in one batch, as `gptrain generate --num_samples`
  ours, batch, skinny products  the same with each linear layer of 8 to 32 rows computed as W @ x.T, not
                 x @ W.T (SkinnyProducts, here: MKL computes few-row products faster that way round on
                 some CPUs). gptrain should take it if it gains 15% or more on both kinds of CPU.
The two greedy outputs must match token for token. Prints a markdown table with the ratios (the batch's
tokens/s over one stream's, whose goal is 6x; skinny over plain products), the machine and the command,
for docs/benchmarks.md. Run it on both kinds of CPU: with native bfloat16 (AVX512-BF16 or AMX) and
without (or with ONEDNN_MAX_CPU_ISA=AVX2).
On a machine busy with other work, run with OMP_NUM_THREADS=1: two threads on two shared cores spend
most of their time waiting for each other. Not part of the test suite.
"""

import argparse
import contextlib
import importlib.util
import io
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from side_by_side import ROOT, describe_machine, median, nanogpt_dir, print_table

sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.config import GPTConfig  # noqa: E402
from gptrain.sampling import generate_tokens, sample_generators  # noqa: E402
from gptrain.model import GPT  # noqa: E402
from gptrain.tokenizer import get_tokenizer  # noqa: E402

SEED = 1337
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
GPT2_124M = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True)
WARMUP_TOKENS = 8  # one short untimed run of each first: allocator and kernel caches
SKINNY_ROWS = range(8, 33)


def nanogpt_model(checkout: Path, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """nanoGPT's GPT from checkout/model.py with `weights` loaded. Its parameter names are ours; the only
    difference allowed is the causal-mask buffers (attn.bias) it keeps when its attention is not flash."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        shape = {k: v for k, v in asdict(GPT2_124M).items() if k in nano.GPTConfig.__dataclass_fields__}
        model = nano.GPT(nano.GPTConfig(**shape))  # ours also has the switches of later recipes, all off
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias")]
    if missing or unexpected:
        sys.exit(f"nanoGPT's parameters differ from ours: missing {missing}, unexpected {unexpected}")
    return model.eval()


def ours(model: GPT, prompt: torch.Tensor, tokens: int, *, samples: int = 1, temperature: float = 0.0,
         top_k: int | None = None) -> torch.Tensor:
    """(samples, tokens) new tokens, as `gptrain generate` draws them."""
    generators = sample_generators(samples, SEED, prompt.device) if temperature else None
    steps = generate_tokens(model, prompt.expand(samples, -1), tokens, temperature=temperature, top_k=top_k,
                            generators=generators)
    return torch.cat(list(steps), dim=1)


class SkinnyProducts(TorchFunctionMode):
    """Within it, a float32 linear layer on the CPU with SKINNY_ROWS rows of input computes W @ x.T rather
    than x @ W.T: the same product, in the orientation MKL's GEMM may compute faster for few rows. (The mode
    sees every operation: about 0.1 ms a layer, counted in what it gains.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return (skinny_linear if func is F.linear else func)(*args, **(kwargs or {}))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.size(-1)
    if rows not in SKINNY_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    columns = x.reshape(rows, -1).T
    y = torch.mm(weight, columns) if bias is None else torch.addmm(bias[:, None], weight, columns)
    return y.T.reshape(*x.shape[:-1], weight.size(0)).contiguous()  # the layers after it read it row by row


def skinny_products(run):
    with SkinnyProducts():
        return run()


def nanogpt(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    return model.generate(prompt, tokens, temperature=1.0, top_k=1)[:, prompt.size(1):]


def timed(run, repeat: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `repeat` calls of run(), and the tokens of the last."""
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()  # the GPU may still be working on what run() queued
        seconds.append(time.perf_counter() - start)
    return seconds, out


def ratios(results: list, speed: list[float], tokens: int, samples: int) -> list[str]:
    """The lines under the table: the batch against one stream, skinny against plain products, and ours
    against nanoGPT's where it ran."""
    *nano, greedy, sampled, batch, skinny = range(len(results))
    lines = [f"- ours {samples} samples / ours one stream (sampled): **{speed[batch] / speed[sampled]:.1f}x** "
             f"tokens/s (goal: 6x)",
             f"- {samples} samples, skinny products (W @ x.T) / plain (x @ W.T): **{speed[skinny] / speed[batch]:.2f}x** "
             f"tokens/s (worth taking into gptrain.sampling at 1.15x or more)"]
    if not nano:
        return lines
    theirs_greedy, ours_greedy = results[nano[0]][3][0], results[greedy][3][0]
    differ = (ours_greedy != theirs_greedy).nonzero()
    if len(differ):
        at = int(differ[0])
        check = f"**differs** from new token {at} on (ours {int(ours_greedy[at])}, nanoGPT {int(theirs_greedy[at])})"
    else:
        check = f"identical for all {tokens} new tokens"
    return [f"- ours one stream / nanoGPT one stream (greedy): **{speed[greedy] / speed[nano[0]]:.1f}x** tokens/s",
            *lines, f"- greedy output, ours (temperature 0) vs nanoGPT (temperature 1, top_k 1): {check}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", type=nanogpt_dir, help="a nanoGPT checkout (its model.py is imported); without "
                   "it, ours alone")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--tokens", type=int, default=500, help="new tokens per stream")
    p.add_argument("--samples", type=int, default=16, help="streams decoded together in the batched run")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each of ours (the median is reported)")
    p.add_argument("--nanogpt_repeat", type=int, default=1, help="timed runs of nanoGPT (slow: it recomputes the context)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the sampled runs")
    p.add_argument("--top_k", type=int, default=200, help="top_k of the sampled runs (gptrain generate's default)")
    args = p.parse_args()
    if min(args.tokens, args.samples, args.repeat, args.nanogpt_repeat) < 1:
        sys.exit("--tokens, --samples, --repeat and --nanogpt_repeat must be >= 1")

    device = torch.device(args.device)
    torch.manual_seed(SEED)
    model = GPT(GPT2_124M).eval()
    theirs = nanogpt_model(args.nanogpt, model.state_dict()).to(device) if args.nanogpt else None
    model.to(device)
    prompt = torch.tensor([get_tokenizer("gpt2").encode(PROMPT)], device=device)
    sampled = dict(temperature=args.temperature, top_k=args.top_k)
    runs = [  # label, streams, timed runs, what one run does
        ("nanoGPT `GPT.generate`, top_k=1", 1, args.nanogpt_repeat, lambda n: nanogpt(theirs, prompt, n)),
        ("ours, KV cache, greedy", 1, args.repeat, lambda n: ours(model, prompt, n)),
        (f"ours, KV cache, sampled (T={args.temperature}, top_k={args.top_k})", 1, args.repeat,
         lambda n: ours(model, prompt, n, **sampled)),
        (f"ours, {args.samples} samples in one batch, sampled", args.samples, args.repeat,
         lambda n: ours(model, prompt, n, samples=args.samples, **sampled)),
        (f"ours, {args.samples} samples in one batch, sampled, skinny products", args.samples, args.repeat,
         lambda n: skinny_products(lambda: ours(model, prompt, n, samples=args.samples, **sampled))),
    ][0 if theirs is not None else 1:]  # nanoGPT's row only with its checkout
    results = []
    for label, streams, repeat, run in runs:
        run(WARMUP_TOKENS)
        seconds, out = timed(lambda: run(args.tokens), repeat, device)
        results.append((label, streams, seconds, out))
        print(f"{label}: {', '.join(f'{s:.2f}' for s in seconds)} s", file=sys.stderr)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    nano_runs = f" and {args.nanogpt_repeat} of nanoGPT's" if theirs is not None else ""
    print(f"Generation, GPT-2 124M shape, float32, {where}: {args.tokens} new tokens after a {prompt.size(1)}-token "
          f"prompt; the median of {args.repeat} runs of ours{nano_runs}, prefill included\n")
    speed, rows = [], []
    for label, streams, seconds, _ in results:
        speed.append(streams * args.tokens / median(seconds))
        rows.append([label, str(streams), ", ".join(f"{s:.2f}" for s in seconds), f"{speed[-1]:,.1f}",
                     f"{1000 / speed[-1]:.2f}", f"{1000 * median(seconds) / args.tokens:.2f}"])
    print_table(["run", "streams", "runs (s)", "tokens / s", "ms / token", "ms / step"], rows)

    print()
    print("\n".join(ratios(results, speed, args.tokens, args.samples)))
    print(describe_machine(args.nanogpt))


if __name__ == "__main__":
    main()

"""Sample text from a checkpoint with the KV cache, several samples together as the rows of one batch.

One sample streams to stdout as it is produced; several are printed each in full when all are done.

Usage: gptrain generate --model_path checkpoints/ckpt.pt --prompt "..." [--max_new_tokens N] ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from gptrain.checkpoint import checkpoint_tokenizer, load_model
from gptrain.config import DTYPE_NAMES, ConfigError
from gptrain.device import autocast, resolve_device, resolve_dtype
from gptrain.errors import command, not_utf8
from gptrain.sampling import StreamDecoder, decode, generate_tokens, sample_generators


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain generate", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="checkpoints/ckpt.pt", help="checkpoint to sample from")
    p.add_argument("--meta", default=None,
                   help="vocabulary for a checkpoint that records none (nanoGPT's): a meta.pkl or meta.json, or "
                        "the data directory holding one; default data/<its dataset>/meta.pkl if present")
    p.add_argument("--prompt", default="\n", help="text to continue, or FILE:path to read it from a file")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 more random")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples, decoded together in one batch")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for reproducible sampling; sample i has its own stream, the same for any --num_samples")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="precision; auto: bfloat16 on recent GPUs")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (slow; for checks)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Every bad setting at once, each named with the value given. Each test is written to fail for NaN too
    (`nan < 0` is false), since argparse turns 'nan' into a float."""
    problems = []
    if not args.max_new_tokens >= 0:
        problems.append(f"--max_new_tokens must be >= 0 (got {args.max_new_tokens})")
    if not args.num_samples >= 1:
        problems.append(f"--num_samples must be >= 1 (got {args.num_samples})")
    if not 0 <= args.temperature < float("inf"):
        problems.append(f"--temperature must be >= 0 and finite, 0 for greedy (got {args.temperature})")
    if not args.top_k >= 0:
        problems.append(f"--top_k must be >= 0, 0 for all tokens (got {args.top_k})")
    if not 0 < args.top_p <= 1:
        problems.append(f"need 0 < --top_p <= 1, 1 for all tokens (got {args.top_p})")
    if args.seed is not None and not args.seed >= 0:
        problems.append(f"--seed must be >= 0 (got {args.seed})")
    if problems:
        raise ConfigError("; ".join(problems))


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _check_args(args)
    prompt = args.prompt
    if prompt.startswith("FILE:"):  # read before the checkpoint, so that a bad file stops the command at once
        path = Path(prompt[5:])
        if not path.is_file():
            raise ConfigError(f"--prompt FILE:{path}: no such file")
        try:
            prompt = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(not_utf8(f"--prompt FILE:{path}", e)) from None
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.model_path, device=device)
    tokenizer = checkpoint_tokenizer(checkpoint, args.meta)
    ids = tokenizer.encode(prompt) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from; give --prompt")
    n = args.num_samples
    with autocast(device, resolve_dtype(args.dtype, device)):
        tokens = generate_tokens(
            model, torch.tensor([ids] * n, dtype=torch.long, device=device), args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
            generators=sample_generators(n, args.seed, device) if args.temperature > 0 else None,
            use_cache=not args.no_cache, vocab_limit=tokenizer.vocab_size,
        )
        if n == 1:
            decoder = StreamDecoder(tokenizer)
            for token in tokens:
                print(decoder.push(token.item()), end="", flush=True)
            print(decoder.flush(), flush=True)
        else:  # a bar on a terminal only, so piped output holds nothing but the samples; it clears when done
            steps = tqdm(tokens, desc=f"{n} samples", total=args.max_new_tokens, unit="tok", leave=False,
                         disable=not sys.stderr.isatty())
            rows = torch.cat([torch.empty(n, 0, dtype=torch.long, device=device), *steps], dim=1).tolist()
            print(("\n" + "-" * 40 + "\n").join(decode(tokenizer, row) for row in rows), flush=True)


if __name__ == "__main__":
    main()

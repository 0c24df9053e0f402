"""Write a checkpoint as a Hugging Face GPT-2 or Llama directory, with the same logits as our model.

`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it as it is. Why: a model trained here
then runs wherever transformers does (evaluation harnesses, inference servers, the hub) without gptrain.
Two of our switch combinations have an exact twin there: GPT-2's own (learned positions, LayerNorm,
GELU) is `GPT2LMHeadModel`, and rotary positions with RMSNorm and SwiGLU is `LlamaForCausalLM` (our
rotary pairs (i, i + d/2) are Llama's rotate_half, so no permutation is needed).
Any other combination is refused with one line naming the switch Hugging Face has no equivalent for:
an approximate export would load without complaint and quietly compute something else.

The directory holds config.json, generation_config.json and model.safetensors, and the tokenizer the
checkpoint records as tokenizer.json and tokenizer_config.json, so `AutoTokenizer.from_pretrained(DIR)`
encodes text to the ids we would, and gptrain_tokenizer.json, the record of it `prepare` wrote, so that
`init_from=DIR` fine-tunes on data prepared as the model's own was (gptrain/hf.py). Every tokenizer we
have has an exact form there: GPT-2's is `GPT2TokenizerFast` from the shipped BPE files, a trained `bpe`
or an `hf:` one is its own tokenizers JSON, and a char vocabulary is a word-level model over single
characters. One difference is Hugging Face's convention: it reads the text "<|endoftext|>" as the special
token, where our encode treats it as text. When the embedding is padded past the tokenizer's vocabulary,
generation_config.json's suppress_tokens lists the padded ids, so Hugging Face's generate never samples
them (as our generate's vocab_limit).

Usage: gptrain export --model_path checkpoints/ckpt.pt --out hf/my-model
"""

from __future__ import annotations

import argparse
import sys

import torch

from gptrain.checkpoint import load_model
from gptrain.errors import command
from gptrain.extras import require
from gptrain.hf import ExportError, export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain export", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="checkpoints/ckpt.pt", help="checkpoint to export")
    p.add_argument("--out", required=True, help="directory to write (created; files of an earlier export overwritten)")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require("transformers", "hf", "gptrain export", error=ExportError)  # before loading a large checkpoint
    model, checkpoint = load_model(args.model_path, device=torch.device("cpu"))
    meta = checkpoint.record.tokenizer
    architecture = export(model, args.out, meta)
    if meta:
        print(f"wrote {architecture} and the '{meta['name']}' tokenizer to {args.out}")
    else:
        print(f"wrote {architecture} to {args.out}")
        print("note: the checkpoint records no tokenizer, so no tokenizer files are written; copy those of the "
              "tokenizer it was trained with into the directory", file=sys.stderr)


if __name__ == "__main__":
    main()

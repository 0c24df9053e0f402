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
import inspect
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from gptrain.checkpoint import load_model
from gptrain.config import GPTConfig
from gptrain.errors import UserError, command
from gptrain.extras import require
from gptrain.hf import CONV1D_WEIGHTS, TOKENIZER_RECORD, llama_names
from gptrain.model import GPT, mlp_width
from gptrain import tokenizer as tokenizers
from gptrain.tokenizer import ASSETS, GPT2Tokenizer

# The switches that pick a target; a model must match one target in all three.
TARGETS = {
    "GPT-2": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
    "Llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
}
# Switches neither target has, with the value that turns them off.
MUST_BE_OFF = {"qk_norm": False, "logit_softcap": None}
# The other GPTConfig fields map onto both targets' configs (or, like zero_init_proj, only say how weights
# start). tests/test_export.py checks that these four groups cover every field, so a new switch must say
# here whether Hugging Face has its equivalent.
MAPPED = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "rope_theta",
          "tie_embeddings")
INIT_ONLY = ("zero_init_proj",)
SUPPORTED = "export supports GPT-2 (learned positions, layernorm, gelu) and Llama (rope, rmsnorm, swiglu)"


class ExportError(UserError):
    """A model or setting that cannot be exported; the message is one line for the user."""


def _spelled(value) -> str:
    """A setting's value as the user writes it in YAML or key=value."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def target(config: GPTConfig) -> str:
    """The Hugging Face architecture this model is, or ExportError naming every switch that breaks the
    nearest one (the target matching more of pos_emb, norm and mlp; on a tie, the one pos_emb picks)."""
    def matches(name: str) -> tuple[int, bool]:
        switches = TARGETS[name]
        return sum(getattr(config, k) == v for k, v in switches.items()), config.pos_emb == switches["pos_emb"]

    nearest = max(TARGETS, key=matches)
    off = [f"{k}={_spelled(getattr(config, k))}" for k, v in MUST_BE_OFF.items() if getattr(config, k) != v]
    mixed = [f"{k}={_spelled(getattr(config, k))}" for k, v in TARGETS[nearest].items() if getattr(config, k) != v]
    if off or mixed:
        where = f"Hugging Face's {nearest}, the nearest target" if mixed else "Hugging Face's GPT-2 or Llama"
        verb = "has" if len(off + mixed) == 1 else "have"
        raise ExportError(f"{', '.join(off + mixed)} {verb} no equivalent in {where}; {SUPPORTED}")
    return nearest


def end_of_text(meta: dict | None) -> int | None:
    """The id `prepare` puts between documents, which serves as both BOS and EOS; None when unknown."""
    if meta is None:
        return None
    return GPT2Tokenizer.eot_id if meta["name"] == "gpt2" else meta.get("eot_id")  # char tokenizers have none


def gpt2_config(transformers, config: GPTConfig, eot: int | None, dtype: str):
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
        activation_function="gelu_new",  # the tanh approximation, as model.py's nn.GELU(approximate="tanh")
        layer_norm_epsilon=1e-5, resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eot, eos_token_id=eot,  # explicit: GPT2Config would otherwise claim 50256 for any vocabulary
        architectures=["GPT2LMHeadModel"], dtype=dtype,
    )


def gpt2_weights(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """model.py keeps OpenAI's parameter names, so they carry over as they are; Hugging Face's GPT-2
    stores c_attn, c_fc and c_proj as Conv1D, (in, out), transposed from our nn.Linear's (out, in)."""
    weights = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the same matrix as wte; transformers ties it back on load
        if not config.bias and name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight", "ln_1.weight",
                                              "ln_2.weight", "ln_f.weight")):
            # Hugging Face's GPT-2 always has biases: zeros compute what none do
            weights[name.removesuffix("weight") + "bias"] = tensor.new_zeros(tensor.size(0))
        weights[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    return weights


def llama_config(transformers, config: GPTConfig, eot: int | None, dtype: str):
    # transformers 5 takes the rotary base inside rope_parameters; 4.x took rope_theta
    takes_parameters = "rope_parameters" in inspect.signature(transformers.LlamaConfig).parameters
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}} if takes_parameters
            else {"rope_theta": config.rope_theta})
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=mlp_width(config),
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
        hidden_act="silu", max_position_embeddings=config.block_size, rms_norm_eps=1e-5, **rope,
        attention_bias=config.bias, mlp_bias=config.bias,
        attention_dropout=config.dropout,  # Llama drops attention weights only; we also drop residual updates
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=None,  # explicit: LlamaConfig would claim 1 and 2
        architectures=["LlamaForCausalLM"], dtype=dtype,
    )


def llama_weights(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our fused matrices split along their rows: c_attn into q, k, v; SwiGLU's c_fc into gate, then up."""
    weights = {}
    for ours, theirs in llama_names(config.n_layer).items():
        if ours == "lm_head" and config.tie_embeddings:
            continue  # the same matrix as the embedding; transformers ties it back on load
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                parts = state[f"{ours}.{kind}"].chunk(len(theirs))
                weights.update({f"{name}.{kind}": part for name, part in zip(theirs, parts)})
    return weights


ARCHITECTURES = {"GPT-2": (gpt2_config, gpt2_weights), "Llama": (llama_config, llama_weights)}


def hf_tokenizer(transformers, meta: dict, max_length: int):
    """The tokenizer `meta` describes as a transformers tokenizer that encodes text to the same ids."""
    name = meta["name"]
    if name == "gpt2":
        # the GPT-2 BPE files under the names transformers looks for; loading them needs no network
        with tempfile.TemporaryDirectory() as files:
            shutil.copy(ASSETS / "encoder.json", Path(files) / "vocab.json")
            shutil.copy(ASSETS / "vocab.bpe", Path(files) / "merges.txt")
            return transformers.GPT2TokenizerFast.from_pretrained(files, model_max_length=max_length)
    tk = require("tokenizers", "data", f"exporting the {name} tokenizer", error=ExportError)
    if name == "char":
        # one word per character: split before every character (newlines included), join with nothing
        chars = tokenizers.from_meta(meta).chars
        tok = tk.Tokenizer(tk.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
        tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), "isolated")
        tok.decoder = tk.decoders.Fuse()
        special = {}
    elif name == "bpe" or name.startswith("hf:"):
        try:
            tok = tk.Tokenizer.from_str(meta["tokenizer_json"])
        except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot read
            raise ExportError(f"cannot read the checkpoint's {name!r} tokenizer: {e}") from None
        eot = meta.get("eot_id")
        eot_text = tok.id_to_token(eot) if eot is not None else None
        special = {"bos_token": eot_text, "eos_token": eot_text} if eot_text is not None else {}
    else:
        raise ExportError(f"unknown tokenizer {name!r} in the checkpoint")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                                clean_up_tokenization_spaces=False, **special)


def export(model: GPT, out: str | Path, tokenizer_meta: dict | None = None) -> str:
    """Write `model` as a Hugging Face directory at `out` (created; our files overwritten), with the
    tokenizer `tokenizer_meta` describes when given. Returns the architecture's class name."""
    transformers = require("transformers", "hf", "gptrain export", error=ExportError)
    safetensors = require("safetensors.torch", "hf", "gptrain export", error=ExportError)
    config, out = model.config, Path(out)
    make_config, map_weights = ARCHITECTURES[target(config)]
    state = model.state_dict()
    dtype = str(state["transformer.wte.weight"].dtype).removeprefix("torch.")  # as stored: training keeps float32
    hf_config = make_config(transformers, config, end_of_text(tokenizer_meta), dtype)
    tokenizer = hf_tokenizer(transformers, tokenizer_meta, config.block_size) if tokenizer_meta else None
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ExportError(f"the checkpoint's {tokenizer_meta['name']!r} tokenizer has {len(tokenizer)} tokens, "
                          f"more than the model's vocab_size {config.vocab_size}")
    # safetensors refuses tensors that share memory (chunks of one matrix, a tied head): one copy each
    weights = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for name, t in map_weights(state, config).items()}
    out.mkdir(parents=True, exist_ok=True)
    safetensors.save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    hf_config.save_pretrained(out)
    generation = transformers.GenerationConfig.from_model_config(hf_config)
    if tokenizer is not None and len(tokenizer) < config.vocab_size:
        # the embedding is padded (to a multiple of 64, say): ids no text encodes to, never to be sampled
        generation.suppress_tokens = list(range(len(tokenizer), config.vocab_size))
    generation.save_pretrained(out)
    record = out / TOKENIZER_RECORD
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        record.write_text(json.dumps(tokenizer_meta) + "\n")  # what init_from=DIR compares the data's with
    else:
        record.unlink(missing_ok=True)  # an earlier export's: it would vouch for a tokenizer this model lacks
    return hf_config.architectures[0]


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

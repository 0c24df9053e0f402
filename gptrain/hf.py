"""OpenAI's GPT-2 weights in, through Hugging Face `transformers`: `init_from=gpt2` (or gpt2-medium,
gpt2-large, gpt2-xl) from the hub, or `init_from=DIR`, a local Hugging Face GPT-2 directory (config.json
with model.safetensors or pytorch_model.bin), as `save_pretrained` writes it.

model.py keeps OpenAI's parameter names, so the weights carry over one to one; only Hugging Face's
Conv1D layers store their matrices (in, out), transposed from our nn.Linear's (out, in).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptrain.checkpoint import Checkpoint, CheckpointError, RunRecord
from gptrain.config import GPT2_MODELS, GPTConfig
from gptrain.extras import require

# the weights Hugging Face's GPT-2 keeps in Conv1D layers, (in, out): transposed both ways, in and out (export.py)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# attention masks that older transformers versions keep as buffers in the state dict; ours is is_causal
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def is_hf_gpt2(init_from: str) -> bool:
    """An OpenAI GPT-2 name, or a directory holding a Hugging Face config.json."""
    return init_from in GPT2_MODELS or (Path(init_from) / "config.json").is_file()


def load_hf_gpt2(name_or_dir: str, dropout: float = 0.0) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Our model's shape and weights from a Hugging Face GPT-2, loaded by `transformers` from the hub
    (a name) or a local directory; every problem is a one-line CheckpointError."""
    transformers = require("transformers", "hf", f"init_from={name_or_dir}", error=CheckpointError)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name_or_dir)
        if hf_config.model_type != "gpt2":
            raise CheckpointError(f"{name_or_dir} holds a '{hf_config.model_type}' model; init_from takes GPT-2 "
                                  f"only ({', '.join(GPT2_MODELS)} or a directory of one)")
        _check_supported(hf_config, name_or_dir)
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(name_or_dir, dtype=torch.float32)
    except OSError as e:  # offline, no such model, or a directory without weights
        where = ("a local directory holding its config.json and model.safetensors (save_pretrained writes one)"
                 if name_or_dir in GPT2_MODELS else "its config.json and model.safetensors or pytorch_model.bin")
        raise CheckpointError(f"cannot load the Hugging Face model {name_or_dir} "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}); "
                              f"without the hub, set init_from to {where}") from None
    config = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size, n_layer=hf_config.n_layer,
                       n_head=hf_config.n_head, n_embd=hf_config.n_embd, dropout=dropout, bias=True)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith(_BUFFERS):
            continue
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor
    # our head is tied to wte (one matrix); a state dict without lm_head.weight gets it back by name
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return config, state


def hf_checkpoint(name_or_dir: str, dropout: float = 0.0) -> Checkpoint:
    """A Hugging Face GPT-2 as a checkpoint to fine-tune from: weights, shape and GPT-2's tokenizer."""
    config, state = load_hf_gpt2(name_or_dir, dropout)
    return Checkpoint(path=Path(name_or_dir), model_config=config, record=RunRecord(tokenizer={"name": "gpt2"}),
                      origin="Hugging Face", tensors={"model": state})


def _check_supported(hf_config, name: str) -> None:
    """The GPT-2 variants that model.py computes exactly; anything else would load and compute wrongly."""
    differs = []
    if hf_config.activation_function != "gelu_new":  # GELU's tanh approximation, as model.py's
        differs.append(f"activation_function={hf_config.activation_function}")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        differs.append(f"n_inner={hf_config.n_inner}")
    if not getattr(hf_config, "scale_attn_weights", True) or getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        differs.append("attention scaling")
    if abs(hf_config.layer_norm_epsilon - 1e-5) > 1e-12:
        differs.append(f"layer_norm_epsilon={hf_config.layer_norm_epsilon}")
    if not getattr(hf_config, "tie_word_embeddings", True):
        differs.append("an untied output head")
    if differs:
        raise CheckpointError(f"{name} is a GPT-2 variant gptrain's model does not compute: {', '.join(differs)}")

"""Hugging Face models in, through `transformers`: `init_from=gpt2` (or gpt2-medium, gpt2-large, gpt2-xl)
from the hub or its cache, or `init_from=DIR`, a local Hugging Face GPT-2 or Llama directory (config.json
with model.safetensors or pytorch_model.bin), as `save_pretrained` or `gptrain export` writes it.

GPT-2 is our model with every switch at its default, and model.py keeps OpenAI's parameter names, so the
weights carry over one to one; only Hugging Face's Conv1D layers store their matrices (in, out), transposed
from our nn.Linear's (out, in). Llama is our pos_emb=rope norm=rmsnorm mlp=swiglu: its q, k, v and its gate,
up matrices are our fused c_attn and c_fc, stacked by rows (LLAMA_NAMES, which export.py reads the other
way). A variant our model would compute otherwise (grouped-query attention, another epsilon or MLP width,
scaled rotary positions) is refused in one line naming what differs: loaded anyway, its weights would no
longer compute what they did, without a word.

The tokenizer: `gptrain export` writes the record `prepare` keeps in meta.json beside the weights
(TOKENIZER_RECORD), so a model we exported fine-tunes on data prepared as its own was; a Hugging Face GPT-2
with GPT-2's vocabulary reads GPT-2's tokens; of any other model the tokenizer is unknown, and training
takes the data's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptrain.checkpoint import Checkpoint, CheckpointError, RunRecord
from gptrain.config import GPT2_MODELS, GPTConfig
from gptrain.extras import require
from gptrain.model import mlp_width
from gptrain.tokenizer import GPT2Tokenizer

# the weights Hugging Face's GPT-2 keeps in Conv1D layers, (in, out): transposed both ways, in and out (export.py)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# attention masks that older transformers versions keep as buffers in the state dict; ours is is_causal
_BUFFERS = (".attn.bias", ".attn.masked_bias")
# our module: Hugging Face Llama's modules, whose weights (and biases) ours stacks by rows in this order
LLAMA_NAMES = {"transformer.wte": ("model.embed_tokens",), "transformer.ln_f": ("model.norm",), "lm_head": ("lm_head",)}
LLAMA_LAYER_NAMES = {
    "ln_1": ("input_layernorm",),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "ln_2": ("post_attention_layernorm",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),  # SwiGLU's gate, then up (model.py's SwiGLU chunks them so)
    "mlp.c_proj": ("mlp.down_proj",),
}
# what `gptrain export` writes beside the weights: the tokenizer record of the checkpoint, as `prepare` wrote it
TOKENIZER_RECORD = "gptrain_tokenizer.json"
SUPPORTED = f"init_from takes GPT-2 or Llama ({', '.join(GPT2_MODELS)} or a directory of one)"


def is_hf_model(init_from: str) -> bool:
    """An OpenAI GPT-2 name, or a directory holding a Hugging Face config.json."""
    return init_from in GPT2_MODELS or (Path(init_from) / "config.json").is_file()


def llama_names(n_layer: int) -> dict[str, tuple[str, ...]]:
    """Every module of ours with weights, and Llama's modules that hold them, for a model of n_layer blocks."""
    names = dict(LLAMA_NAMES)
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}": tuple(f"model.layers.{i}.{t}" for t in theirs)
                      for ours, theirs in LLAMA_LAYER_NAMES.items()})
    return names


def load_hf(name_or_dir: str, dropout: float = 0.0) -> tuple[GPTConfig, dict[str, torch.Tensor], dict | None]:
    """Our model's shape and weights, and the tokenizer record (None when unknown), from a Hugging Face
    GPT-2 or Llama, loaded by `transformers` from the hub or its cache (a name) or a local directory;
    every problem is a one-line CheckpointError."""
    transformers = require("transformers", "hf", f"init_from={name_or_dir}", error=CheckpointError)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name_or_dir)
        if hf_config.model_type not in ARCHITECTURES:
            raise CheckpointError(f"{name_or_dir} holds a '{hf_config.model_type}' model; {SUPPORTED}")
        architecture, model_class, unsupported, convert = ARCHITECTURES[hf_config.model_type]
        differs = unsupported(hf_config)  # before the weights, which may be gigabytes to download
        if differs:
            raise CheckpointError(f"{name_or_dir} is a {architecture} variant gptrain's model does not compute: "
                                  f"{', '.join(differs)}")
        hf_model = getattr(transformers, model_class).from_pretrained(name_or_dir, dtype=torch.float32)
    except OSError as e:  # offline, no such model, or a directory without weights
        where = ("a local directory holding its config.json and model.safetensors (save_pretrained writes one)"
                 if name_or_dir in GPT2_MODELS else "its config.json and model.safetensors or pytorch_model.bin")
        raise CheckpointError(f"cannot load the Hugging Face model {name_or_dir} "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}); "
                              f"without the hub, set init_from to {where}") from None
    config, state = convert(hf_config, hf_model.state_dict(), dropout)
    if config.tie_embeddings:  # our head is wte itself; a state dict without lm_head.weight gets it back by name
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return config, state, _tokenizer_record(name_or_dir, hf_config)


def hf_checkpoint(name_or_dir: str, dropout: float = 0.0) -> Checkpoint:
    """A Hugging Face model as a checkpoint to fine-tune from: weights, shape and tokenizer record."""
    config, state, tokenizer = load_hf(name_or_dir, dropout)
    return Checkpoint(path=Path(name_or_dir), model_config=config, record=RunRecord(tokenizer=tokenizer),
                      origin="Hugging Face", tensors={"model": state})


def _tokenizer_record(name_or_dir: str, hf_config) -> dict | None:
    record = Path(name_or_dir) / TOKENIZER_RECORD
    if record.is_file():
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the tokenizer record {record}: {e}") from None
    if hf_config.model_type == "gpt2" and hf_config.vocab_size >= GPT2Tokenizer.vocab_size:
        return GPT2Tokenizer().meta()
    return None


def _gpt2_differs(hf_config) -> list[str]:
    """What of a GPT-2 variant model.py does not compute; anything listed would load and compute wrongly."""
    differs = []
    if hf_config.activation_function != "gelu_new":  # GELU's tanh approximation, as model.py's
        differs.append(f"activation_function={hf_config.activation_function}")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        differs.append(f"n_inner={hf_config.n_inner}")
    if (not getattr(hf_config, "scale_attn_weights", True)
            or getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)):
        differs.append("attention scaling")
    if abs(hf_config.layer_norm_epsilon - 1e-5) > 1e-12:
        differs.append(f"layer_norm_epsilon={hf_config.layer_norm_epsilon}")
    return differs


def _from_gpt2(hf_config, hf_state: dict, dropout: float) -> tuple[GPTConfig, dict]:
    state = {name: tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor
             for name, tensor in hf_state.items() if not name.endswith(_BUFFERS)}
    # Hugging Face's GPT-2 always has biases, and export writes zeros for a model without: load that one without
    bias = any(tensor.any() for name, tensor in state.items() if name.endswith(".bias"))
    if not bias:
        state = {name: tensor for name, tensor in state.items() if not name.endswith(".bias")}
    config = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size, n_layer=hf_config.n_layer,
                       n_head=hf_config.n_head, n_embd=hf_config.n_embd, dropout=dropout, bias=bias,
                       tie_embeddings=hf_config.tie_word_embeddings)
    return config, state


def _rope(hf_config) -> dict:
    """Llama's rotary settings: transformers 5 keeps them in rope_parameters, 4.x in rope_theta and rope_scaling."""
    if getattr(hf_config, "rope_parameters", None):
        return hf_config.rope_parameters
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    return {"rope_theta": hf_config.rope_theta, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


def _llama_differs(hf_config) -> list[str]:
    """What of a Llama variant model.py does not compute (it has one switch for both kinds of bias)."""
    width, heads = hf_config.hidden_size, hf_config.num_attention_heads
    ours = mlp_width(GPTConfig(n_embd=width, mlp="swiglu"))
    differs = []
    if hf_config.hidden_act != "silu":
        differs.append(f"hidden_act={hf_config.hidden_act}")
    if hf_config.num_key_value_heads not in (None, heads):
        differs.append(f"num_key_value_heads={hf_config.num_key_value_heads} (grouped-query attention)")
    if width % heads or getattr(hf_config, "head_dim", None) not in (None, width // heads):
        differs.append(f"head_dim={getattr(hf_config, 'head_dim', None)} (ours is hidden_size / num_attention_heads)")
    if hf_config.intermediate_size != ours:
        differs.append(f"intermediate_size={hf_config.intermediate_size} (ours is {ours} at hidden_size={width})")
    if abs(hf_config.rms_norm_eps - 1e-5) > 1e-12:
        differs.append(f"rms_norm_eps={hf_config.rms_norm_eps}")
    mlp_bias = getattr(hf_config, "mlp_bias", False)
    if hf_config.attention_bias != mlp_bias:
        differs.append(f"attention_bias={hf_config.attention_bias} with mlp_bias={mlp_bias}")
    if _rope(hf_config).get("rope_type", "default") != "default":
        differs.append(f"rope_type={_rope(hf_config)['rope_type']}")
    return differs


def _from_llama(hf_config, hf_state: dict, dropout: float) -> tuple[GPTConfig, dict]:
    config = GPTConfig(block_size=hf_config.max_position_embeddings, vocab_size=hf_config.vocab_size,
                       n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                       n_embd=hf_config.hidden_size, dropout=dropout, bias=hf_config.attention_bias, pos_emb="rope",
                       rope_theta=float(_rope(hf_config)["rope_theta"]), norm="rmsnorm", mlp="swiglu",
                       tie_embeddings=hf_config.tie_word_embeddings)
    state = {}
    for ours, theirs in llama_names(config.n_layer).items():
        for kind in ("weight", "bias"):
            if f"{theirs[0]}.{kind}" in hf_state:
                state[f"{ours}.{kind}"] = torch.cat([hf_state[f"{name}.{kind}"] for name in theirs])
    return config, state


# model_type: its name, the transformers class that loads it, what of it we cannot compute, its weights as ours
ARCHITECTURES = {"gpt2": ("GPT-2", "GPT2LMHeadModel", _gpt2_differs, _from_gpt2),
                 "llama": ("Llama", "LlamaForCausalLM", _llama_differs, _from_llama)}

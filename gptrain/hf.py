"""Hugging Face models both ways, through `transformers`, with one table of names for both directions.

In: `init_from=gpt2` (or gpt2-medium, gpt2-large, gpt2-xl) from the hub or its cache, or `init_from=DIR`, a
local Hugging Face GPT-2 or Llama directory (config.json with model.safetensors or pytorch_model.bin), as
`save_pretrained` or `gptrain export` writes it. Out: `export()` writes our model as such a directory, for
`gptrain export` and `gptrain harness`.

GPT-2 is our model with every switch at its default, and model.py keeps OpenAI's parameter names, so the
weights carry over one to one; only Hugging Face's Conv1D layers store their matrices (in, out), transposed
from our nn.Linear's (out, in). Llama is our pos_emb=rope norm=rmsnorm mlp=swiglu: its q, k, v and its gate,
up matrices are our fused c_attn and c_fc, stacked by rows (LLAMA_NAMES, read one way on import and the other
on export). A variant our model would compute otherwise (grouped-query attention, another epsilon or MLP
width, scaled rotary positions) is refused in one line naming what differs: loaded anyway, its weights would
no longer compute what they did, without a word. So is an export of a switch Hugging Face has no twin for.

The tokenizer: an export writes the record `prepare` keeps in meta.json beside the weights (TOKENIZER_RECORD),
so a model we exported fine-tunes on data prepared as its own was; a Hugging Face GPT-2 with GPT-2's
vocabulary reads GPT-2's tokens; of any other model the tokenizer is unknown, and training takes the data's.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from pathlib import Path

import torch

from gptrain import tokenizer as tokenizers
from gptrain.checkpoint import Checkpoint, CheckpointError, RunRecord
from gptrain.config import GPT2_MODELS, GPTConfig
from gptrain.errors import UserError
from gptrain.extras import require
from gptrain.model import GPT, mlp_width
from gptrain.tokenizer import ASSETS, GPT2Tokenizer

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


# ---------------------------------------------------------------------------------------------------------
# Out: our model as a Hugging Face directory (`gptrain export`, and `gptrain harness` through it).

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
EXPORTABLE = "export supports GPT-2 (learned positions, layernorm, gelu) and Llama (rope, rmsnorm, swiglu)"


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
        raise ExportError(f"{', '.join(off + mixed)} {verb} no equivalent in {where}; {EXPORTABLE}")
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


EXPORTS = {"GPT-2": (gpt2_config, gpt2_weights), "Llama": (llama_config, llama_weights)}


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
    make_config, map_weights = EXPORTS[target(config)]
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

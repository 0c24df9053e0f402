"""Every setting in one typed object, layered from YAML and `key=value` overrides and validated once.

The help text of each setting, and the values a text setting takes, live on its field: they feed the
validation, `gptrain train --help` and the comments of `config/default.yaml`, which is generated from these
dataclasses (`python -m gptrain.config`). Its type, read once from the dataclass, decides how a value is
parsed, widened and named in messages.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from gptrain.errors import UserError, not_utf8

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "config" / "default.yaml"
DEVICES = ("cpu", "cuda", "mps")  # each may take an index, cuda:1
GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, from the Hugging Face hub (init_from)
# Settings of which a run sets one and leaves the other null; a layer that sets one drops the other from
# the layers before it (a command line's gradient_accumulation_steps=2 over a YAML file's tokens_per_step)
EXCLUSIVE = (("tokens_per_step", "gradient_accumulation_steps"),)


class ConfigError(UserError):
    """A bad setting; the message is one line naming every offending key."""


def setting(default: Any, help: str, choices: dict[str, str] | None = None) -> Any:
    """A field with its help text and, for text, the values it takes, each with what it means ("" where the
    name says it); both feed validation, `--help` and the comments of default.yaml."""
    return field(default=default, metadata={"help": help, "choices": choices or {}})


@dataclass
class GPTConfig:
    """The model's shape; stored in every checkpoint so the model can be rebuilt from it alone."""

    block_size: int = setting(1024, "context length in tokens")
    vocab_size: Optional[int] = setting(
        None, "vocabulary size; null = the data's meta.json vocab_size, rounded up to a multiple of 64 where that "
        "adds under 1%"
    )
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads per block")
    n_embd: int = setting(768, "embedding width; must be divisible by n_head")
    dropout: float = setting(0.0, "dropout probability (0 for pretraining, 0.1+ to fine-tune small data)")
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as GPT-2 has")
    # switches of a more recent recipe; each default is GPT-2's (docs/recipes.md measures each)
    pos_emb: str = setting("learned", "positions", {"learned": "a table, GPT-2", "rope": "rotary, on queries and keys"})
    rope_theta: float = setting(10000.0, "rotary base: the slowest pair of dimensions turns about one radian per this many tokens")
    norm: str = setting("layernorm", "", {"layernorm": "GPT-2", "rmsnorm": "a gain, no bias, no mean subtracted"})
    qk_norm: bool = setting(False, "normalise queries and keys (RMS, no gain) before attention")
    mlp: str = setting("gelu", "", {"gelu": "GPT-2, 4x wide", "relu2": "relu squared, 4x",
                                    "swiglu": "gated, 8/3x wide"})
    tie_embeddings: bool = setting(True, "one matrix for the token embedding and the output head, as GPT-2 has")
    logit_softcap: Optional[float] = setting(None, "squash logits into (-cap, cap) with cap * tanh(logits / cap); null = off")
    zero_init_proj: bool = setting(False, "initialise the projections into the residual stream (c_proj) at zero")


@dataclass
class TrainConfig(GPTConfig):
    """A training run: the model's shape plus data, optimisation, checkpointing, logging and system."""

    # I/O
    out_dir: str = setting("checkpoints", "where ckpt.pt is written")
    data_dir: str = setting("data/openwebtext", "directory with train.bin, val.bin and meta.json from `gptrain prepare`")
    init_from: str = setting(
        "scratch", "scratch | resume (from out_dir/ckpt.pt) | path to a ckpt.pt to fine-tune from | gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl (OpenAI's, from the hub) or a local Hugging Face GPT-2 directory to fine-tune from"
    )
    eval_interval: int = setting(2000, "evaluate on val (and maybe checkpoint) every this many iterations")
    eval_iters: int = setting(200, "batches averaged per evaluation")
    eval_only: bool = setting(False, "evaluate once and exit")
    log_interval: int = setting(1, "print a metrics line every this many iterations")
    always_save_checkpoint: bool = setting(True, "save at every evaluation, not only when val loss improves")
    keep_last_n: int = setting(2, "checkpoints kept as out_dir/ckpt-<iter>.pt (ckpt.pt is the newest, ckpt-best.pt "
                                  "the best by val loss, kept besides)")
    on_save_error: str = setting("stop", "when a checkpoint cannot be written (disk full, permissions)",
                                 {"stop": "", "retry": "go on, and try again at the next evaluation"})
    max_bad_steps: int = setting(5, "stop after this many steps in a row whose loss or gradient norm is not finite "
                                    "(each is skipped: no update)")
    # logging
    run_name: Optional[str] = setting(None, "this run's name: its TensorBoard folder log_dir/<run_name> and its W&B name; "
                                      "null = the name of out_dir")
    log_dir: str = setting("logs", "TensorBoard event files go to log_dir/<run_name> (metrics.jsonl goes to out_dir)")
    tensorboard: bool = setting(True, "write TensorBoard event files")
    wandb_log: bool = setting(False, "log metrics to Weights & Biases (needs the wandb package)")
    sample_interval: int = setting(0, "at evaluations every this many steps, print and log a sample continuing "
                                      "sample_prompt; 0 = never")
    sample_prompt: str = setting("\n", "the prompt of those samples (the same seed every time, so they show what changed)")
    wandb_project: str = setting("gptrain", "W&B project name")
    wandb_run_name: Optional[str] = setting(None, "W&B run name; null = run_name")
    # data
    batch_size: Union[int, str] = setting(
        12, "sequences per micro-batch on each process (at most, with tokens_per_step)",
        {"auto": "the most that fits, CUDA"}
    )
    tokens_per_step: Optional[int] = setting(
        491520, "tokens per optimizer step over all processes: the recipe's batch, the same on any hardware"
    )
    gradient_accumulation_steps: Optional[int] = setting(
        None, "micro-batches per optimizer step over all processes (divided by the world size); null = from tokens_per_step"
    )
    # optimizer
    optimizer: str = setting("adamw", "", {"adamw": "", "muon": "Muon on the blocks' 2-D matrices, AdamW on the rest"})
    learning_rate: float = setting(6e-4, "peak learning rate of AdamW (and of every group without its own below)")
    embedding_lr: Optional[float] = setting(None, "peak learning rate of the token (and position) embeddings; null = learning_rate")
    head_lr: Optional[float] = setting(None, "peak learning rate of an untied output head; null = learning_rate")
    muon_lr: float = setting(0.02, "peak learning rate of Muon's matrices (optimizer=muon)")
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum")
    muon_dtype: str = setting("auto", "dtype of Muon's Newton-Schulz iterations",
                              {"auto": "bfloat16 where the device multiplies it natively, else float32",
                               "float32": "", "bfloat16": ""})
    max_iters: Union[int, str] = setting(
        600000, "optimizer steps in the whole run", {"auto": "tokens_per_param x parameters / tokens_per_step"}
    )
    tokens_per_param: float = setting(20.0, "training tokens per parameter for max_iters=auto (20: Chinchilla-optimal)")
    weight_decay: float = setting(0.1, "AdamW weight decay on 2-D weights (not biases, norms, nor Muon's matrices)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 disables")
    decay_lr: bool = setting(True, "decay the learning rate; false keeps it constant after warm-up")
    lr_schedule: str = setting("cosine", "", {"cosine": "to min_lr at lr_decay_iters",
                                              "wsd": "warm-up, stable, then linear to min_lr"})
    decay_fraction: float = setting(0.2, "wsd: the last fraction of lr_decay_iters over which the learning rate decays")
    warmup_iters: int = setting(2000, "linear warm-up steps")
    lr_decay_iters: Optional[int] = setting(None, "step at which the learning rate reaches min_lr; null = max_iters")
    min_lr: float = setting(6e-5, "learning rate floor (usually learning_rate / 10); every group decays by the same factor")
    # system
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting("auto", "precision", {
        "auto": "bfloat16 on recent GPUs, float16 on older ones, float32 elsewhere", "float32": "", "bfloat16": "",
        "float16": "with a gradient scaler"})
    compile: Union[bool, str] = setting(
        "auto", "torch.compile the model (a failure falls back to eager)", {"auto": "on CUDA, where it pays"}
    )
    backend: str = setting("nccl", "torch.distributed backend under torchrun for GPUs (CPU runs always use gloo)",
                           {"nccl": "", "gloo": ""})
    parallelism: str = setting("ddp", "", {"ddp": "a full copy per process",
                                           "fsdp": "parameters, gradients and optimizer state sharded"})
    dist_timeout_s: int = setting(600, "seconds a collective waits for a process that died or hung before the run stops")
    seed: int = setting(1337, "seed for weights, data order and dropout")
    peak_tflops: float = setting(0.0, "the accelerator's peak TFLOP/s for MFU; 0 = look up the known GPUs")

    def decay_start(self) -> int:
        """The step where the learning rate leaves its peak: the end of the warm-up for the cosine, the
        start of the last decay_fraction of lr_decay_iters for wsd (which must then be resolved)."""
        if self.lr_schedule == "wsd":
            return round(self.lr_decay_iters * (1 - self.decay_fraction))
        return self.warmup_iters

    @property
    def name(self) -> str:
        """The run's name: run_name, or the name of its out_dir."""
        return self.run_name or Path(self.out_dir).resolve().name

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})

    def validate(self) -> None:
        """Check what types alone cannot, and report every problem at once."""
        problems = []
        positive = ["block_size", "n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps",
                    "tokens_per_step", "eval_interval", "eval_iters", "log_interval", "max_iters", "lr_decay_iters",
                    "tokens_per_param", "keep_last_n", "max_bad_steps"]
        problems += [f"{name} must be > 0 (got {getattr(self, name)})" for name in positive
                     if isinstance(getattr(self, name), (int, float)) and getattr(self, name) <= 0]
        problems += [f"set one of {a} and {b}, and the other to null (got {getattr(self, a)} and {getattr(self, b)})"
                     for a, b in EXCLUSIVE if (getattr(self, a) is None) == (getattr(self, b) is None)]
        by_accumulation = self.tokens_per_step is None and self.gradient_accumulation_steps is not None
        if by_accumulation and "auto" in (self.batch_size, self.max_iters):
            problems.append("batch_size=auto and max_iters=auto need tokens_per_step, so the recipe's batch stays fixed")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.vocab_size is not None and self.vocab_size <= 0:
            problems.append(f"vocab_size must be > 0 or null (got {self.vocab_size})")
        problems += _choice_problems(self)
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            problems.append(f"logit_softcap must be > 0 or null (got {self.logit_softcap})")
        if self.pos_emb == "rope" and (head_size := self.n_embd // max(self.n_head, 1)) % 2:
            problems.append(f"pos_emb=rope needs an even head size (n_embd / n_head = {head_size})")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        problems += [f"{name} must be > 0 (got {getattr(self, name)})" for name in
                     ("rope_theta", "muon_lr", "embedding_lr", "head_lr")
                     if getattr(self, name) is not None and getattr(self, name) <= 0]
        if self.sample_interval < 0 or (self.sample_interval and not self.sample_prompt):
            problems.append("sample_interval must be >= 0, and sample_prompt not empty when it is on")
        if not 0 <= self.muon_momentum < 1:
            problems.append(f"muon_momentum must be in [0, 1) (got {self.muon_momentum})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"beta1 and beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if not (self.init_from in ("scratch", "resume", *GPT2_MODELS) or Path(self.init_from).is_file()
                or (Path(self.init_from) / "config.json").is_file()):
            problems.append(f"init_from must be scratch, resume, the path of a checkpoint file, one of "
                            f"{', '.join(GPT2_MODELS)} or a Hugging Face GPT-2 directory (got '{self.init_from}')")
        if self.dist_timeout_s <= 0:
            problems.append(f"dist_timeout_s must be > 0 (got {self.dist_timeout_s})")
        if self.device.split(":")[0] not in ("auto", *DEVICES):
            problems.append(f"device must be auto, cpu, cuda, cuda:N or mps (got '{self.device}')")
        if not 0 < self.learning_rate < math.inf or self.min_lr < 0 or self.min_lr > self.learning_rate:
            problems.append(f"need 0 <= min_lr ({self.min_lr}) <= learning_rate ({self.learning_rate}), learning_rate > 0")
        if isinstance(decay_end := self.lr_decay_iters or self.max_iters, int):  # max_iters=auto: plan_horizon
            problems += _warmup_problems(replace(self, lr_decay_iters=decay_end))
        if self.warmup_iters < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("warmup_iters, grad_clip and weight_decay must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))


def plan_batch(config: TrainConfig, block_size: int, world_size: int, max_batch: int) -> TrainConfig:
    """The micro-batch and the global micro-batches per step, for this world size.

    With tokens_per_step the step always holds the same sequences; the micro-batch is the largest
    divisor of each process's share that is at most `max_batch`, and the accumulation follows.
    Without it, batch_size and gradient_accumulation_steps are taken as they are.
    """
    if config.tokens_per_step is None:
        if config.gradient_accumulation_steps % world_size:
            raise ConfigError(f"gradient_accumulation_steps ({config.gradient_accumulation_steps}) must be divisible "
                              f"by the number of processes ({world_size}) so the global batch stays the same")
        return replace(config, batch_size=max_batch)
    sequences, remainder = divmod(config.tokens_per_step, block_size)
    if remainder:
        raise ConfigError(f"tokens_per_step ({config.tokens_per_step:,}) must be a multiple of block_size ({block_size})")
    if sequences % world_size:
        raise ConfigError(f"tokens_per_step ({config.tokens_per_step:,}) is {sequences} sequences of {block_size} "
                          f"tokens, which {world_size} processes cannot share evenly")
    share = sequences // world_size
    micro = max(b for b in range(1, min(max_batch, share) + 1) if share % b == 0)
    return replace(config, batch_size=micro, gradient_accumulation_steps=sequences // micro)


def plan_horizon(config: TrainConfig, num_params: int) -> TrainConfig:
    """max_iters=auto: tokens_per_param tokens for each parameter; lr_decay_iters follows max_iters."""
    max_iters = config.max_iters
    if max_iters == "auto":
        max_iters = -(-round(config.tokens_per_param * num_params) // config.tokens_per_step)
    plan = replace(config, max_iters=max_iters, lr_decay_iters=config.lr_decay_iters or max_iters)
    if problems := _warmup_problems(plan):
        raise ConfigError(problems[0])
    return plan


def _warmup_problems(config: TrainConfig) -> list[str]:
    """The warm-up must end before the decay starts: at lr_decay_iters for the cosine, at the start of the
    last decay_fraction of it for wsd."""
    if not config.decay_lr:
        return []
    if config.lr_schedule == "wsd":
        if config.warmup_iters > config.decay_start():
            return [f"warmup_iters ({config.warmup_iters}) must be <= {config.decay_start()}, where lr_schedule=wsd "
                    f"starts decaying ({1 - config.decay_fraction:g} x lr_decay_iters {config.lr_decay_iters})"]
    elif config.warmup_iters > config.lr_decay_iters:
        return [f"warmup_iters ({config.warmup_iters}) must be <= lr_decay_iters ({config.lr_decay_iters})"]
    return []


# ---------------------------------------------------------------------------------------------
# Each setting's type, read once from the dataclass; what accepts, names and parses a value follows from it.

FIELDS = {f.name: f for f in fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)  # classes, not the strings that `from __future__ import annotations` leaves
DTYPE_NAMES = tuple(FIELDS["dtype"].metadata["choices"])  # for the commands that take --dtype


def _kinds(name: str) -> tuple[type, ...]:
    """The classes a setting's value takes besides null: (int,) for Optional[int], (bool, str) for Union[bool, str]."""
    return tuple(t for t in typing.get_args(_TYPES[name]) or (_TYPES[name],) if t is not type(None))


def _nullable(name: str) -> bool:
    return type(None) in typing.get_args(_TYPES[name])


def _values(name: str) -> list[str]:
    """What a setting with choices takes, as typed: its choices, after "true", "false" or "a number" for a
    setting that takes those too (compile, batch_size)."""
    typed = {bool: ["true", "false"], int: ["a number"], float: ["a number"]}
    words = [word for kind in _kinds(name) if kind is not str for word in typed[kind]]
    return words + list(FIELDS[name].metadata["choices"])


def _type_name(name: str) -> str:
    """What a type error says a setting takes: int, float or null, bool or auto."""
    kinds = _kinds(name)
    words = [kind.__name__ for kind in kinds if kind is not str or len(kinds) == 1]
    if len(kinds) > 1:  # a number or a word: the words are its choices
        words += list(FIELDS[name].metadata["choices"])
    return " or ".join(words + ["null"] * _nullable(name))


def _choice_problems(config: TrainConfig) -> list[str]:
    """Each text value that is not one of its setting's choices."""
    problems = []
    for name, f in FIELDS.items():
        value, choices = getattr(config, name), f.metadata["choices"]
        if not choices or not isinstance(value, str) or value in choices:
            continue
        if _kinds(name) == (str,):
            problems.append(f"{name} must be one of {', '.join(choices)} (got '{value}')")
        else:
            *others, last = _values(name)
            problems.append(f"{name} must be {', '.join(others)} or {last} (got '{value}')")
    return problems


def describe(name: str) -> str:
    """A setting's help followed by its choices and what each means, as `--help` and default.yaml show it."""
    help, choices = FIELDS[name].metadata["help"], FIELDS[name].metadata["choices"]
    if not choices:
        return help
    listed = " | ".join(f"{value} ({choices[value]})" if choices.get(value) else value for value in _values(name))
    return f"{help}: {listed}" if help else listed


def _coerce(value: Any, name: str) -> Any:
    """Widen ints to floats and scalars to strings ourselves: OmegaConf deprecates doing it implicitly."""
    if _kinds(name) == (float,) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if _kinds(name) == (str,) and isinstance(value, (int, float)):
        return str(value)
    return value


def _override(name: str, text: str) -> Any:
    """A `key=value` override's value: YAML (`n_layer=4`, `bias=false`, `vocab_size=null`), except that a text
    setting takes the text as typed (`run_name=0123` stays '0123', `sample_prompt=ROMEO:` stays 'ROMEO:'; quote it
    for YAML's escapes). What YAML cannot read stays text, for the type check to name."""
    if name in FIELDS and _kinds(name) == (str,) and not (len(text) > 1 and text[0] == text[-1] and text[0] in "'\""):
        return None if _nullable(name) and text in ("", "~", "null", "Null", "NULL") else text
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except (yaml.YAMLError, OmegaConfBaseException):
        return text


# ---------------------------------------------------------------------------------------------
# Layering: defaults, default.yaml, the YAML files named, then key=value, each layer over the ones before.

# nanoGPT's config files (Python that its configurator execs) and what takes the place of each here
NANOGPT_CONFIGS = {
    "train_shakespeare_char.py": "use config/shakespeare_char.yaml",
    "finetune_shakespeare.py": "use config/finetune_shakespeare.yaml",
    "train_gpt2.py": "its GPT-2 124M on OpenWebText is gptrain's default (config/default.yaml), so leave it out; "
                     "config/modern_124m.yaml is the same shape with a modern recipe",
    **{f"eval_gpt2{size}.py": f"use init_from=gpt2{size.replace('_', '-')} eval_only=true eval_iters=500 batch_size=8"
       for size in ("", "_medium", "_large", "_xl")},
}


def _read_yaml(path: str | Path) -> dict:
    """The settings in a YAML file, its interpolations resolved, as a plain dict; a file that is not YAML,
    not UTF-8, or not a mapping of settings is one ConfigError naming it (and the line, where it can)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        document = yaml.compose(text, Loader=yaml.SafeLoader)  # the shape alone, before OmegaConf reads values
        if document is None or document.tag == "tag:yaml.org,2002:null":  # empty, only comments, or null
            return {}
        if not isinstance(document, yaml.MappingNode):
            found = "a list" if isinstance(document, yaml.SequenceNode) else f"the single value {document.value!r}"
            raise ConfigError(f"{path}: expected `key: value` settings at the top level, found {found}")
        return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except UnicodeDecodeError as e:
        raise ConfigError(not_utf8(str(path), e)) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"{path}:{mark.line + 1}: not valid YAML: {e.problem or e.context}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None


def _layers(args: list[str], default_yaml: Path | None) -> list[tuple[str, dict]]:
    """(source, settings) of default.yaml, each YAML file in `args`, then the `key=value` arguments."""
    layers = []
    if default_yaml is not None and default_yaml.exists():
        layers.append((str(default_yaml), _read_yaml(default_yaml)))
    overrides = {}
    for arg in args:
        if "=" in arg:
            key, _, text = arg.removeprefix("--").partition("=")
            overrides[key] = _override(key, text)
        elif arg.endswith((".yaml", ".yml")):
            if not Path(arg).is_file():
                raise ConfigError(f"config file not found: {arg}")
            layers.append((arg, _read_yaml(arg)))
        elif arg.endswith(".py"):
            advice = NANOGPT_CONFIGS.get(Path(arg).name, "write its settings as `key: value` lines in a .yaml file "
                                                          "(config/*.yaml are examples) or give them as key=value")
            raise ConfigError(f"{arg} is a Python config file as nanoGPT's configurator runs them, which gptrain does "
                              f"not run; {advice}")
        else:
            raise ConfigError(f"expected a .yaml file or key=value, got '{arg}'")
    return layers + [("command line", overrides)]


def _drop_exclusive(merged: DictConfig, given: dict[str, tuple[str, Any]], source: str, layer: dict) -> None:
    """A layer that sets one key of an EXCLUSIVE pair drops the other's value from the layers before it, with
    a note where the user had set it (default.yaml's goes silently). `given`: the user's values, by key."""
    for pair in EXCLUSIVE:
        for key, other in (pair, pair[::-1]):
            if layer.get(key) is None or other in layer:
                continue
            earlier, value = given.pop(other, (None, None))
            if value is not None and os.environ.get("RANK", "0") == "0":  # each process of a run loads the config
                print(f"note: {other}={value} ({earlier}) dropped for {key}={layer[key]} ({source}); a run sets one "
                      "of the two", file=sys.stderr)
            merged[other] = None


def load_config(args: list[str], default_yaml: Path | None = DEFAULT_YAML) -> TrainConfig:
    """Layer the dataclass defaults, default.yaml, YAML files named in `args`, then `key=value` overrides;
    a layer that sets one key of an EXCLUSIVE pair drops the other from the layers before it."""
    merged = OmegaConf.structured(TrainConfig)
    given: dict[str, tuple[str, Any]] = {}  # (source, value) of each setting the user's files and arguments set
    problems = []
    for source, layer in _layers(args, default_yaml):
        for key, value in layer.items():
            if key not in FIELDS:
                close = difflib.get_close_matches(str(key), FIELDS, n=1)
                problems.append(f"unknown key {str(key)!r} in {source}" + (f" (did you mean '{close[0]}'?)" if close else ""))
                continue
            try:
                merged[key] = _coerce(value, key)
            except ValidationError:
                problems.append(f"{key} must be {_type_name(key)}, got {value!r} in {source}")
            except OmegaConfBaseException as e:  # a broken interpolation, such as '${'
                problems.append(f"{key}: cannot read {value!r} in {source} ({str(e).splitlines()[0]})")
            if source != str(default_yaml):
                given[key] = (source, value)
        if not problems:
            _drop_exclusive(merged, given, source, layer)
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # an interpolation, ${...}, that does not resolve
        raise ConfigError(f"cannot resolve {getattr(e, 'full_key', 'a setting')}: {str(e).splitlines()[0]}") from None
    config.validate()
    return config


def record_yaml(config: TrainConfig) -> str:
    """A run's settings as YAML that `train.py FILE` loads back into the same run (with derived values
    left derived: an accumulation that tokens_per_step fixes stays null)."""
    if config.tokens_per_step is not None:
        config = replace(config, gradient_accumulation_steps=None)
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def default_yaml_text() -> str:
    """config/default.yaml, generated from the dataclass so its values and comments never drift."""
    lines = ["# GPT-2 124M on OpenWebText: the defaults of every `gptrain train` setting.",
             "# Generated by `python -m gptrain.config > config/default.yaml`; each key can be overridden",
             "# by a YAML file given on the command line, then by key=value.", ""]
    for name, f in FIELDS.items():
        value = OmegaConf.to_yaml({name: f.default}).strip()
        lines.append(f"{value:<40} # {describe(name)}")
    return "\n".join(lines) + "\n"


def help_text() -> str:
    rows = [f"  {name:<28} {f.default!s:<18} {describe(name)}" for name, f in FIELDS.items()]
    return "settings (key=value, default, meaning):\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(default_yaml_text())

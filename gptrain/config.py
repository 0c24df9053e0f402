"""Every setting in one typed object, layered from YAML and `key=value` overrides and validated once.

The help text of each setting lives on its field: it feeds `gptrain train --help` and the comments of
`config/default.yaml`, which is generated from these dataclasses (`python -m gptrain.config`).
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "config" / "default.yaml"
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
PARALLELISMS = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A bad setting; the message is one line naming every offending key."""


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class GPTConfig:
    """The model's shape; stored in every checkpoint so the model can be rebuilt from it alone."""

    block_size: int = setting(1024, "context length in tokens")
    vocab_size: Optional[int] = setting(
        None, "vocabulary size; null = the data's meta.json vocab_size rounded up to a multiple of 64"
    )
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads per block")
    n_embd: int = setting(768, "embedding width; must be divisible by n_head")
    dropout: float = setting(0.0, "dropout probability (0 for pretraining, 0.1+ to fine-tune small data)")
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as GPT-2 has")


@dataclass
class TrainConfig(GPTConfig):
    """A training run: the model's shape plus data, optimisation, checkpointing, logging and system."""

    # I/O
    out_dir: str = setting("checkpoints", "where ckpt.pt is written")
    data_dir: str = setting("data/openwebtext", "directory with train.bin, val.bin and meta.json from `gptrain prepare`")
    init_from: str = setting("scratch", "scratch | resume (from out_dir/ckpt.pt) | path to a ckpt.pt to fine-tune from")
    eval_interval: int = setting(2000, "evaluate on val (and maybe checkpoint) every this many iterations")
    eval_iters: int = setting(200, "batches averaged per evaluation")
    eval_only: bool = setting(False, "evaluate once and exit")
    log_interval: int = setting(1, "print a metrics line every this many iterations")
    always_save_checkpoint: bool = setting(True, "save at every evaluation, not only when val loss improves")
    # logging
    log_dir: str = setting("logs", "TensorBoard event files and metrics.jsonl go here")
    tensorboard: bool = setting(True, "write TensorBoard event files to log_dir")
    wandb_log: bool = setting(False, "log metrics to Weights & Biases (needs the wandb package)")
    wandb_project: str = setting("gptrain", "W&B project name")
    wandb_run_name: str = setting("gpt2-124M", "W&B run name")
    # data
    batch_size: int = setting(12, "sequences per micro-batch on each process")
    gradient_accumulation_steps: int = setting(
        40, "micro-batches per optimizer step, summed over all processes (divided by the world size)"
    )
    # optimizer
    learning_rate: float = setting(6e-4, "peak learning rate")
    max_iters: int = setting(600000, "optimizer steps in the whole run")
    weight_decay: float = setting(0.1, "AdamW weight decay on 2-D weights (not biases, norms)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 disables")
    decay_lr: bool = setting(True, "cosine-decay the learning rate; false keeps it constant after warm-up")
    warmup_iters: int = setting(2000, "linear warm-up steps")
    lr_decay_iters: int = setting(600000, "step at which the cosine reaches min_lr (usually max_iters)")
    min_lr: float = setting(6e-5, "learning rate floor (usually learning_rate / 10)")
    # system
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting("auto", "auto | float32 | bfloat16 | float16 (float16 uses a gradient scaler)")
    compile: bool = setting(True, "torch.compile the model (PyTorch 2.x)")
    backend: str = setting("nccl", "torch.distributed backend under torchrun for GPUs; CPU runs always use gloo")
    parallelism: str = setting("ddp", "ddp (a full copy per process) | fsdp (parameters, gradients and optimizer state sharded)")
    dist_timeout_s: int = setting(600, "seconds a collective waits for a process that died or hung before the run stops")
    seed: int = setting(1337, "seed for weights, data order and dropout")
    peak_tflops: float = setting(0.0, "the accelerator's peak TFLOP/s for MFU; 0 = look up the known GPUs")

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})

    def validate(self) -> None:
        """Check what types alone cannot, and report every problem at once."""
        problems = []
        positive = ["block_size", "n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval", "max_iters"]
        problems += [f"{name} must be > 0 (got {getattr(self, name)})" for name in positive if getattr(self, name) <= 0]
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.vocab_size is not None and self.vocab_size <= 0:
            problems.append(f"vocab_size must be > 0 or null (got {self.vocab_size})")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"dtype must be one of {', '.join(DTYPE_NAMES)} (got '{self.dtype}')")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"beta1 and beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if self.init_from not in ("scratch", "resume") and not Path(self.init_from).is_file():
            problems.append(f"init_from must be scratch, resume or the path of a checkpoint file (got '{self.init_from}')")
        if self.backend not in ("nccl", "gloo"):
            problems.append(f"backend must be nccl or gloo (got '{self.backend}')")
        if self.parallelism not in PARALLELISMS:
            problems.append(f"parallelism must be one of {', '.join(PARALLELISMS)} (got '{self.parallelism}')")
        if self.dist_timeout_s <= 0:
            problems.append(f"dist_timeout_s must be > 0 (got {self.dist_timeout_s})")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            problems.append(f"device must be auto, cpu, cuda, cuda:N or mps (got '{self.device}')")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            problems.append(f"need 0 <= min_lr ({self.min_lr}) <= learning_rate ({self.learning_rate}), learning_rate > 0")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            problems.append(f"warmup_iters ({self.warmup_iters}) must be <= lr_decay_iters ({self.lr_decay_iters})")
        if self.warmup_iters < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("warmup_iters, grad_clip and weight_decay must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))


def _coerce(value: Any, declared: Any) -> Any:
    """Widen ints to floats and scalars to strings ourselves: OmegaConf deprecates doing it implicitly."""
    if declared is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if declared is str and isinstance(value, (int, float)):
        return str(value)
    return value


def _type_name(declared: Any) -> str:
    return "int or null" if declared == Optional[int] else declared.__name__


def load_config(args: list[str], default_yaml: Path | None = DEFAULT_YAML) -> TrainConfig:
    """Layer the dataclass defaults, default.yaml, YAML files named in `args`, then `key=value` overrides."""
    layers = []
    if default_yaml is not None and default_yaml.exists():
        layers.append((str(default_yaml), OmegaConf.load(default_yaml)))
    overrides = []
    for arg in args:
        if "=" in arg:
            overrides.append(arg.removeprefix("--"))
        elif arg.endswith((".yaml", ".yml")):
            if not Path(arg).is_file():
                raise ConfigError(f"config file not found: {arg}")
            layers.append((arg, OmegaConf.load(arg)))
        else:
            raise ConfigError(f"expected a .yaml file or key=value, got '{arg}'")
    layers.append(("command line", OmegaConf.from_dotlist(overrides)))

    hints = {f.name: _resolved_type(f) for f in fields(TrainConfig)}
    merged = OmegaConf.structured(TrainConfig)
    problems = []
    for source, layer in layers:
        for key, value in layer.items():
            if key not in hints:
                close = difflib.get_close_matches(str(key), hints, n=1)
                problems.append(f"unknown key '{key}' in {source}" + (f" (did you mean '{close[0]}'?)" if close else ""))
                continue
            try:
                merged[key] = _coerce(value, hints[key])
            except ValidationError:
                problems.append(f"{key} must be {_type_name(hints[key])}, got {value!r} in {source}")
    if problems:
        raise ConfigError("; ".join(problems))
    config = OmegaConf.to_object(merged)
    config.validate()
    return config


def _resolved_type(f) -> Any:
    """Field types are strings under `from __future__ import annotations`; map them back to classes."""
    return {"int": int, "float": float, "bool": bool, "str": str, "Optional[int]": Optional[int]}[f.type]


def default_yaml_text() -> str:
    """config/default.yaml, generated from the dataclass so its values and comments never drift."""
    lines = ["# GPT-2 124M on OpenWebText: the defaults of every `gptrain train` setting.",
             "# Generated by `python -m gptrain.config > config/default.yaml`; each key can be overridden",
             "# by a YAML file given on the command line, then by key=value.", ""]
    for f in fields(TrainConfig):
        value = OmegaConf.to_yaml({f.name: f.default}).strip()
        lines.append(f"{value:<40} # {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def help_text() -> str:
    rows = [f"  {f.name:<28} {f.default!s:<18} {f.metadata['help']}" for f in fields(TrainConfig)]
    return "settings (key=value, default, meaning):\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(default_yaml_text())

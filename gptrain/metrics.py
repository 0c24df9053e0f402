"""One record per log step, fanned out to the console, metrics.jsonl, TensorBoard and W&B; and MFU."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from gptrain.config import ConfigError, TrainConfig
from gptrain.distributed import DistInfo
from gptrain.extras import require
from gptrain.files import atomic_write_text, remove_temporaries

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from the vendors' datasheets.
# Matched in order against torch.cuda.get_device_name(), so the more specific names come first.
_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0),
]


def peak_flops(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s at the run's precision, or None when unknown (then no MFU is shown).

    float32 matmuls run as TF32 on tensor cores (we enable it), at half the bf16 rate.
    """
    if config.peak_tflops > 0:
        return config.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0)
    return None


def bits_per_byte(mean_loss: float, tokens: int, text_bytes: int) -> float:
    """Bits per byte of text: the mean loss (nats per token) over `tokens` tokens spread over the bytes
    they encode. Unlike the loss, it does not depend on the tokenizer, so any two runs compare."""
    return mean_loss * tokens / (math.log(2) * text_bytes)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_record(record: dict) -> str:
    parts = [f"iter {record['step']}"]
    for key, label, fmt in [
        ("train/loss", "loss", "{:.4f}"), ("val/loss", "val loss", "{:.4f}"), ("eval/train_loss", "train loss", "{:.4f}"),
        ("lr", "lr", "{:.2e}"), ("grad_norm", "grad norm", "{:.2f}"), ("ms_per_iter", "", "{:.1f} ms/iter"),
        ("tokens_per_sec", "", "{:,.0f} tok/s"), ("mfu", "mfu", "{:.1%}"), ("eta_s", "eta", _duration),
    ]:
        if record.get(key) is not None:
            text = fmt(record[key]) if callable(fmt) else fmt.format(record[key])
            parts.append(f"{label} {text}".strip())
    return " | ".join(parts) + (f"\n{record['sample']}" if "sample" in record else "")


class MetricsLogger:
    """Rank 0 writes every sink; the other ranks get a logger that drops everything.

    A run is one folder: metrics.jsonl sits in out_dir beside the checkpoint, TensorBoard's events go to
    log_dir/<run name> (so `tensorboard --logdir logs` shows runs side by side), W&B's local files to
    out_dir/wandb. A resumed run (`resume_step`) continues all three and first drops what was logged
    past the checkpoint's step, so no step appears twice; W&B resumes the same run (`wandb_id`).
    """

    def __init__(self, config: TrainConfig, info: DistInfo, resume_step: int | None = None,
                 wandb_id: str | None = None):
        self.active = info.is_main
        self.history: deque[dict] = deque(maxlen=10_000)  # the latest records, for callers such as tests
        self.jsonl = self.tensorboard = self.wandb = None
        # checked on every rank, so that all stop alike
        wandb = require("wandb", "wandb", "wandb_log=true", error=ConfigError) if config.wandb_log else None
        if not self.active:
            return
        out_dir = Path(config.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path, kept = out_dir / "metrics.jsonl", []
        if resume_step is not None:
            kept = _records_before(path, resume_step)
            remove_temporaries(path)  # left by a run killed while rewriting it
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))  # a crash now loses nothing
        self.jsonl = open(path, "a" if resume_step is not None else "w")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it takes a second

            self.tensorboard = SummaryWriter(log_dir=str(Path(config.log_dir) / config.name), purge_step=resume_step)
            for record in kept:  # the purge took the evaluation at the checkpoint's step too; it is not repeated
                if record["step"] == resume_step:
                    self._write_tensorboard(record)
        if wandb is not None:
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name or config.name,
                                    id=wandb_id, resume="allow", dir=str(out_dir), config=vars(config))

    @property
    def wandb_id(self) -> str | None:
        """The W&B run to continue on resume; the checkpoint keeps it."""
        return self.wandb.id if self.wandb is not None else None

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.history.append(record)
        tqdm.write(format_record(record))  # above the progress bar, when there is one
        # an fp16 overflow step has an infinite gradient norm; strict JSON has no Infinity, so null
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
        self.jsonl.write(json.dumps(finite) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            self._write_tensorboard(record)
        if self.wandb is not None:
            self.wandb.log({**_scalars(record), **_texts(record)}, step=record["step"])

    def _write_tensorboard(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.tensorboard.add_scalar(key, value, record["step"])
        for key, value in _texts(record).items():
            self.tensorboard.add_text(key, value, record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


def _texts(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, str)}


def _records_before(path: Path, step: int) -> list[dict]:
    """The records a run resumed at `step` keeps: those of earlier steps, and the evaluation at `step`
    itself, which the checkpoint saved after and the resumed run does not repeat."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] < step or (r["step"] == step and "val/loss" in r)]

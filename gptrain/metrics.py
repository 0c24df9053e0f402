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
    return " | ".join(parts)


class MetricsLogger:
    """Rank 0 writes every sink; the other ranks get a logger that drops everything."""

    def __init__(self, config: TrainConfig, info: DistInfo, resume: bool):
        self.active = info.is_main
        self.history: deque[dict] = deque(maxlen=10_000)  # the latest records, for callers such as tests
        self.jsonl = self.tensorboard = self.wandb = None
        # checked on every rank, so that all stop alike
        wandb = require("wandb", "wandb", "wandb_log=true", error=ConfigError) if config.wandb_log else None
        if not self.active:
            return
        log_dir = Path(config.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / "metrics.jsonl", "a" if resume else "w")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it takes a second

            self.tensorboard = SummaryWriter(log_dir=str(log_dir))
        if wandb is not None:
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name,
                                    config=vars(config), resume="allow")

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self.history.append(record)
        tqdm.write(format_record(record))  # above the progress bar, when there is one
        # an fp16 overflow step has an infinite gradient norm; strict JSON has no Infinity, so null
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
        self.jsonl.write(json.dumps(finite) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

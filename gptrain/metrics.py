"""One record per log step, fanned out to the console, metrics.jsonl, TensorBoard and W&B; and MFU.

Every metric a record may carry is in one table below: its key, how the console line shows it and how
`gptrain plot` draws it. torch is imported only where it is used, so that `gptrain plot`, which reads the
table, starts without it.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from gptrain.config import ConfigError, TrainConfig
from gptrain.extras import require
from gptrain.files import atomic_write_text, remove_temporaries

if TYPE_CHECKING:
    import torch

    from gptrain.distributed import DistInfo

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
    import torch

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


# ---------------------------------------------------------------------------------------------
# The metrics: one table for the console line, metrics.jsonl, TensorBoard, W&B and `gptrain plot`.

SMOOTHED, LINE, POINTS = "smoothed", "line", "points"  # how a plot draws a metric (see Metric)
PLOT_PANELS = {"loss": "loss (nats per token)", "val bits per byte": "bits per byte"}  # title: y axis, in order


class Metric(str):
    """A metric's key in a record, metrics.jsonl, TensorBoard and W&B, which also says how it is shown.

    Being the key itself, it builds and reads records as a string would: {TRAIN_LOSS: 2.5}, record[VAL_LOSS].
    On the console line it reads `label` then its value in `fmt` (a format string or a function); without
    `fmt` it is not on the line. A plotted metric sits in a panel of PLOT_PANELS, drawn as a thin line
    (SMOOTHED, or LINE as logged) or as POINTS, one per evaluation; `unless` names a metric whose presence
    in a run leaves this one out of its plot (the evaluated train loss stands in for a per-step one).
    """

    def __new__(cls, key: str, label: str = "", fmt: str | Callable[[float], str] | None = None, *,
                panel: str | None = None, style: str = LINE, unless: str | None = None) -> Metric:
        metric = super().__new__(cls, key)
        metric.label, metric.fmt, metric.panel, metric.style, metric.unless = label, fmt, panel, style, unless
        return metric

    def show(self, value) -> str:
        """The value as the console line shows it, after its label."""
        text = self.fmt(value) if callable(self.fmt) else self.fmt.format(value)
        return f"{self.label} {text}".strip()


STEP = Metric("step", "iter", "{}")  # every record's; the x of TensorBoard and W&B, not a scalar of its own
TOKENS = Metric("tokens")  # tokens seen before this step: the x of `gptrain plot`
TRAIN_LOSS = Metric("train/loss", "loss", "{:.4f}", panel="loss", style=SMOOTHED)
VAL_LOSS = Metric("val/loss", "val loss", "{:.4f}", panel="loss", style=POINTS)
EVAL_TRAIN_LOSS = Metric("eval/train_loss", "train loss", "{:.4f}", panel="loss", unless=TRAIN_LOSS)
LR = Metric("lr", "lr", "{:.2e}")
GRAD_NORM = Metric("grad_norm", "grad norm", "{:.2f}")
MS_PER_ITER = Metric("ms_per_iter", "", "{:.1f} ms/iter")
TOKENS_PER_SEC = Metric("tokens_per_sec", "", "{:,.0f} tok/s")
MFU = Metric("mfu", "mfu", "{:.1%}")
ETA_S = Metric("eta_s", "eta", _duration)  # training time left, evaluations aside
VAL_BPB = Metric("val/bpb", panel="val bits per byte", style=POINTS)
SKIPPED_STEPS = Metric("skipped_steps")  # steps so far whose loss or gradient was not finite: no update made
OVERFLOW_STEPS = Metric("overflow_steps")  # float16 steps so far that the gradient scaler skipped (normal at first)
SAMPLE = Metric("sample")  # text: on the lines below the console line, and as text in TensorBoard and W&B
METRICS = (STEP, TOKENS, TRAIN_LOSS, VAL_LOSS, EVAL_TRAIN_LOSS, LR, GRAD_NORM, MS_PER_ITER, TOKENS_PER_SEC, MFU,
           ETA_S, VAL_BPB, SKIPPED_STEPS, OVERFLOW_STEPS, SAMPLE)  # in the console line's order


def format_record(record: dict) -> str:
    parts = [metric.show(record[metric]) for metric in METRICS if metric.fmt and record.get(metric) is not None]
    return " | ".join(parts) + (f"\n{record[SAMPLE]}" if SAMPLE in record else "")


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
                if record[STEP] == resume_step:
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
            self.wandb.log({**_scalars(record), **_texts(record)}, step=record[STEP])

    def _write_tensorboard(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.tensorboard.add_scalar(key, value, record[STEP])
        for key, value in _texts(record).items():
            self.tensorboard.add_text(key, value, record[STEP])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != STEP and isinstance(v, (int, float)) and math.isfinite(v)}


def _texts(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, str)}


def _records_before(path: Path, step: int) -> list[dict]:
    """The records a run resumed at `step` keeps: those of earlier steps, and the evaluation at `step`
    itself, which the checkpoint saved after and the resumed run does not repeat."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r[STEP] < step or (r[STEP] == step and VAL_LOSS in r)]

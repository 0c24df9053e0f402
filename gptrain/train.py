"""The training loop: build everything from one TrainConfig, then step, evaluate, checkpoint and log.

Usage: gptrain train [config.yaml ...] [key=value ...]   (or: python train.py ..., torchrun ... train.py ...)
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from gptrain.checkpoint import CheckpointError, load_checkpoint, load_weights, model_config_from, save_checkpoint
from gptrain.config import ConfigError, GPTConfig, TrainConfig, help_text, load_config
from gptrain.device import autocast, resolve_device, resolve_dtype
from gptrain.data import BatchSampler, DataError, open_tokens, read_meta, to_device
from gptrain.distributed import (
    DistInfo, StopRequest, check_parallelism, clip_grad_norm, dist_info, gradient_sync, init_distributed,
    mean_across_ranks, parallelize, print0, teardown,
)
from gptrain.evaluate import estimate_loss
from gptrain.metrics import MetricsLogger, peak_flops
from gptrain.model import GPT
from gptrain.optim import build_optimizer, lr_at


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says where and what to try."""


@dataclass
class Run:
    """Everything the loop reads and advances, built once by `build`."""

    config: TrainConfig
    info: DistInfo
    device: torch.device
    dtype: torch.dtype
    raw_model: GPT  # the model whose parameters are trained and saved (sharded in place under FSDP)
    model: nn.Module  # what the loop calls: the same model, possibly compiled and wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_batches: BatchSampler
    eval_batches: dict[str, BatchSampler]
    tokenizer_meta: dict | None
    logger: MetricsLogger
    stop: StopRequest
    step: int = 0
    start_step: int = 0
    saved_step: int = 0
    best_val_loss: float = float("inf")

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all processes: the recipe's batch size."""
        return self.config.batch_size * self.raw_model.config.block_size * self.config.gradient_accumulation_steps

    @property
    def autocast(self):
        """FSDP casts the weights itself (its precision policy), so autocast is only for the others."""
        return nullcontext() if self.config.parallelism == "fsdp" else autocast(self.device, self.dtype)


def _model_config(config: TrainConfig, meta: dict, checkpoint: dict | None, info: DistInfo) -> GPTConfig:
    """The checkpoint's shape when starting from one (only dropout may change), else the config's."""
    if checkpoint is None:
        vocab = config.vocab_size or -(-meta["vocab_size"] // 64) * 64  # a multiple of 64 is faster on GPUs
        return replace(config.model_config(), vocab_size=vocab)
    model_config = model_config_from(checkpoint, dropout=config.dropout)
    ignored = [f"{f.name}={getattr(config, f.name)}" for f in fields(GPTConfig)
               if getattr(config, f.name) not in (getattr(model_config, f.name), None)]
    if ignored:
        print0(info, f"note: the checkpoint fixes the model's shape; ignoring {', '.join(ignored)}")
    return model_config


def build(config: TrainConfig, info: DistInfo) -> Run:
    device = resolve_device(config.device, info.local_rank, info.enabled)
    init_distributed(info, config.backend, device, config.dist_timeout_s)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    meta = read_meta(config.data_dir)
    resume = config.init_from == "resume"
    checkpoint = None
    if config.init_from != "scratch":
        path = Path(config.out_dir) / "ckpt.pt" if resume else Path(config.init_from)
        checkpoint = load_checkpoint(path)  # on the CPU: each rank copies what it keeps to the device
    model_config = _model_config(config, meta, checkpoint, info)
    saved_tokenizer = checkpoint.get("tokenizer") if checkpoint else None
    if saved_tokenizer and meta.get("tokenizer") and saved_tokenizer != meta["tokenizer"]:
        raise DataError(f"{config.data_dir} was tokenized with '{meta['tokenizer']['name']}' but the checkpoint "
                        f"with a different '{saved_tokenizer['name']}' tokenizer; prepare the data with the checkpoint's")
    if meta["vocab_size"] > model_config.vocab_size:
        raise DataError(f"the data's vocabulary ({meta['vocab_size']}) is larger than the model's ({model_config.vocab_size})")

    # Every rank builds the same full model on the CPU, so initial weights never depend on the world
    # size; parallelize() then keeps each rank's shard (FSDP) or a full copy (DDP) on the device.
    torch.manual_seed(config.seed)
    raw_model = GPT(model_config)
    model = parallelize(raw_model, config, info, device, dtype)
    optimizer = build_optimizer(raw_model, config, device.type)
    if checkpoint is not None:
        load_weights(raw_model, checkpoint, path, optimizer if resume else None)

    train_tokens, val_tokens = open_tokens(config.data_dir, "train", meta), open_tokens(config.data_dir, "val", meta)
    sampler = lambda tokens, seed: BatchSampler(tokens, model_config.block_size, config.batch_size, seed)  # noqa: E731
    run = Run(
        config=config, info=info, device=device, dtype=dtype, raw_model=raw_model, model=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        train_batches=sampler(train_tokens, config.seed),
        # evaluation draws from its own streams, apart from the training data
        eval_batches={"train": sampler(train_tokens, config.seed + 1), "val": sampler(val_tokens, config.seed + 1)},
        tokenizer_meta=meta.get("tokenizer"), logger=MetricsLogger(config, info, resume),
        stop=StopRequest(info, device),
    )
    if resume:
        if run.scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run before was not float16
            run.scaler.load_state_dict(checkpoint["scaler"])
        run.step = run.start_step = run.saved_step = checkpoint["iter_num"]  # also the data position
        run.best_val_loss = checkpoint["best_val_loss"]

    print0(info, f"{raw_model.num_params() / 1e6:.2f}M parameters | device {device} | "
                 f"dtype {str(dtype).removeprefix('torch.')} | {info.world_size} process(es), {config.parallelism} | "
                 f"{run.tokens_per_step:,} tokens per step "
                 f"({config.batch_size} x {model_config.block_size} x {config.gradient_accumulation_steps} micro-batches)")
    if checkpoint is not None:
        print0(info, f"{'resuming' if resume else 'fine-tuning'} from {path} (iter {checkpoint.get('iter_num', 0)})")
    return run


def save(run: Run) -> None:
    """Every rank takes part: FSDP writes one shard per rank; otherwise rank 0 writes."""
    run_state = {
        "model_config": asdict(run.raw_model.config),
        "scaler": run.scaler.state_dict(),
        "config": asdict(run.config),
        "iter_num": run.step,  # with the seed, this is the data position too
        "best_val_loss": run.best_val_loss,
        "tokenizer": run.tokenizer_meta,
    }
    path = Path(run.config.out_dir) / "ckpt.pt"
    save_checkpoint(path, run_state, run.raw_model, run.optimizer, run.info, sharded=run.config.parallelism == "fsdp")
    run.saved_step = run.step
    print0(run.info, f"saved {path} at iter {run.step}")


def train_step(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the step's `gradient_accumulation_steps` micro-batches, of which rank r of
    W takes r, r+W, ...; returns this rank's share of the mean loss and the gradient norm."""
    model, info, config = run.model, run.info, run.config
    mine = range(info.rank, config.gradient_accumulation_steps, info.world_size)
    total_loss = torch.zeros((), device=run.device)
    x, y = to_device(run.train_batches.batch(run.step, mine[0]), run.device)
    for n, index in enumerate(mine):
        last = n == len(mine) - 1
        if run.raw_model.config.dropout > 0:  # dropout masks too depend on (seed, step, micro-batch) alone
            torch.manual_seed(int(np.random.SeedSequence([config.seed, run.step, index]).generate_state(1)[0]))
        with gradient_sync(model, last):  # only the last micro-batch needs its gradients reduced
            with run.autocast:
                _, loss = model(x, y)
                loss = loss / len(mine)
            if not last:  # fetch the next micro-batch while the GPU works on this one
                x, y = to_device(run.train_batches.batch(run.step, mine[n + 1]), run.device)
            run.scaler.scale(loss).backward()
        total_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = clip_grad_norm(run.raw_model, config.grad_clip if config.grad_clip > 0 else float("inf"))
    run.scaler.step(run.optimizer)  # skipped by the scaler if fp16 gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return total_loss, grad_norm


def evaluate(run: Run) -> dict:
    losses = {split: estimate_loss(run.model, sampler, run.config.eval_iters, run.device, run.autocast, run.info)
              for split, sampler in run.eval_batches.items()}
    return {"step": run.step, "val/loss": losses["val"], "eval/train_loss": losses["train"]}


def _check_finite(loss: float, run: Run, what: str) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"{what} became {loss} at iter {run.step} (lr {lr_at(run.step, run.config):.2e}); "
            f"the last checkpoint is left untouched. Try a lower learning_rate, grad_clip > 0, "
            f"a longer warmup_iters, or dtype=bfloat16 instead of float16"
        )


def train(config: TrainConfig) -> list[dict]:
    """Run training to max_iters; returns the latest records that were logged (rank 0)."""
    info = dist_info()
    check_parallelism(config, info)
    run, finished = None, False
    try:
        run = build(config, info)
        with run.stop:
            _loop(run)
        finished = True
    finally:
        if run is not None:
            run.logger.close()
        teardown(finished)
    return list(run.logger.history)


def _loop(run: Run) -> None:
    config = run.config
    if run.start_step >= config.max_iters and not config.eval_only:
        print0(run.info, f"the checkpoint is at iter {run.start_step}, max_iters is {config.max_iters}: "
                         f"nothing to train (raise max_iters to continue)")
        return
    flops_per_token = run.raw_model.flops_per_token()
    peak = peak_flops(config, run.device, run.dtype)
    timer, timed_steps = time.perf_counter(), 0
    while True:
        due = run.step % config.eval_interval == 0 or run.step == config.max_iters
        resumed_here = run.step == run.start_step > 0  # the checkpoint already holds this evaluation
        if config.eval_only or (due and not resumed_here):
            eval_started = time.perf_counter()
            record = evaluate(run)
            run.logger.log(record)
            _check_finite(record["val/loss"], run, "val loss")
            if record["val/loss"] < run.best_val_loss or config.always_save_checkpoint:
                run.best_val_loss = min(run.best_val_loss, record["val/loss"])
                if run.step > run.start_step:
                    save(run)
            timer += time.perf_counter() - eval_started  # evaluation is not training time
        if run.step >= config.max_iters or config.eval_only:
            return
        if run.stop.requested():
            if run.step > run.saved_step:
                save(run)
            print0(run.info, f"stopped at iter {run.step} on {run.stop.name}; continue with init_from=resume")
            return

        lr = lr_at(run.step, config)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(run)
        timed_steps += 1
        if run.step % config.log_interval == 0:
            loss = mean_across_ranks(loss, run.info).item()  # a CPU-GPU sync point, so only on log steps
            _check_finite(loss, run, "training loss")
            record = {"step": run.step, "train/loss": loss, "lr": lr, "grad_norm": grad_norm.item()}
            if run.step > run.start_step:  # the first step pays for compilation and warm-up
                seconds = (time.perf_counter() - timer) / timed_steps
                tokens_per_sec = run.tokens_per_step / seconds
                record |= {"ms_per_iter": 1000 * seconds, "tokens_per_sec": tokens_per_sec,
                           "mfu": flops_per_token * tokens_per_sec / (peak * run.info.world_size) if peak else None}
            run.logger.log(record)
            timer, timed_steps = time.perf_counter(), 0
        run.step += 1


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(__doc__.strip() + "\n\n" + help_text())
        return
    try:
        train(load_config(args))
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        if dist_info().is_main:  # every rank meets these alike; one line is enough
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The training loop: build everything from one TrainConfig, then step, evaluate, checkpoint and log.

Usage: gptrain train [config.yaml ...] [key=value ...]   (or: python train.py ..., torchrun ... train.py ...)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

from gptrain.checkpoint import (
    CheckpointError, load_checkpoint, load_weights, model_config_from, newest_checkpoint, save_checkpoint,
)
from gptrain.config import (
    ConfigError, GPTConfig, TrainConfig, help_text, load_config, plan_batch, plan_horizon, record_yaml,
)
from gptrain.device import autocast, environment, keep_freed_host_memory, resolve_device, resolve_dtype
from gptrain.data import BatchSampler, DataError, open_tokens, read_meta, to_device
from gptrain.distributed import (
    DistInfo, StopRequest, check_parallelism, clip_grad_norm, dist_info, eager, gradient_sync, init_distributed,
    lost_rank, mean_across_ranks, min_across_ranks, parallelize, print0, teardown,
)
from gptrain.errors import UserError, command
from gptrain.evaluate import estimate_loss, split_bits_per_byte
from gptrain.generate import decode, generate_tokens, sample_generators
from gptrain.hf import hf_checkpoint, is_hf_gpt2
from gptrain.metrics import MetricsLogger, peak_flops
from gptrain.model import GPT
from gptrain.optim import build_optimizers, lr_multiplier, set_lr
from gptrain.tokenizer import from_meta


SAMPLE_TOKENS = 100  # the length of the samples printed at evaluations (sample_interval)
# how a training step went: updated, skipped by float16's gradient scaler, or skipped as not finite
Outcome = Literal["ok", "overflow", "bad"]


class TrainingError(UserError):
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
    optimizers: list[torch.optim.Optimizer]  # AdamW, and Muon with optimizer=muon
    scaler: torch.amp.GradScaler
    train_batches: BatchSampler
    eval_batches: dict[str, BatchSampler]
    tokenizer_meta: dict | None
    val_meta: dict  # the val split's tokens and text bytes as prepare recorded them, for bits per byte
    logger: MetricsLogger
    stop: StopRequest
    step: int = 0
    start_step: int = 0
    saved_step: int = 0
    best_val_loss: float = float("inf")
    compiled_ok: bool = False  # a training step has run, so torch.compile (if on) has worked
    skipped_steps: int = 0  # steps whose loss or gradient was not finite, so no update was made
    bad_in_a_row: int = 0
    overflow_steps: int = 0  # float16 steps the gradient scaler skipped (normal while it finds its scale)
    save_pending: bool = False  # a save failed (on_save_error=retry): try again at the next evaluation
    pending_best: bool = False  # and it held the best val loss so far
    environment: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all processes: the recipe's batch size."""
        return self.config.batch_size * self.raw_model.config.block_size * self.config.gradient_accumulation_steps

    @property
    def autocast(self):
        """FSDP casts the weights itself (its precision policy), so autocast is only for the others."""
        return nullcontext() if self.config.parallelism == "fsdp" else autocast(self.device, self.dtype)


def padded_vocab(vocab_size: int) -> int:
    """The vocabulary rounded up to a multiple of 64, at which GPU matmuls run faster (GPT-2's 50,257
    becomes 50,304), where that costs under 1% more; a small one (65 characters) would almost double,
    for nothing: its output layer is cheap anyway."""
    padded = -(-vocab_size // 64) * 64
    return padded if padded - vocab_size < vocab_size / 100 else vocab_size


# what the weights' shapes or their computation depend on: a fine-tune or a resume keeps the source's
FIXED_BY_CHECKPOINT = ("vocab_size", "n_layer", "n_head", "n_embd", "bias", "pos_emb", "rope_theta", "norm", "qk_norm",
                       "mlp", "tie_embeddings", "logit_softcap")


def _model_config(config: TrainConfig, meta: dict, checkpoint: dict | None, info: DistInfo) -> GPTConfig:
    """The checkpoint's shape when starting from one, else the config's.

    A shape key the config leaves at its default takes the checkpoint's value (said in a note); one set to
    something else is refused. Only dropout may change, and a fine-tune's block_size (cropped to it)."""
    if checkpoint is None:
        return replace(config.model_config(), vocab_size=config.vocab_size or padded_vocab(meta["vocab_size"]))
    model_config = model_config_from(checkpoint, dropout=config.dropout)
    resume = config.init_from == "resume"
    default = GPTConfig()
    differing = [name for name in (*FIXED_BY_CHECKPOINT, "block_size")
                 if getattr(config, name) != getattr(model_config, name)]
    set_here = [name for name in differing if getattr(config, name) != getattr(default, name)]
    changed = [name for name in set_here if name != "block_size" or resume]
    if changed:
        source = "the checkpoint in out_dir" if resume else config.init_from
        raise ConfigError(f"{source} has {', '.join(f'{n}={getattr(model_config, n)}' for n in changed)}, which a "
                          f"{'resumed' if resume else 'fine-tuned'} model keeps, but the config sets "
                          f"{', '.join(f'{n}={getattr(config, n)}' for n in changed)}: remove the setting, or train "
                          f"from scratch")
    if "block_size" in set_here:
        model_config = _cropped(model_config, checkpoint, config)
    kept = [f"{n}={getattr(model_config, n)}" for n in differing if n not in set_here and getattr(config, n) is not None]
    if kept:
        print0(info, f"note: the model keeps the checkpoint's {', '.join(kept)} (the config leaves them at their defaults)")
    return model_config


def _cropped(model_config: GPTConfig, checkpoint: dict, config: TrainConfig) -> GPTConfig:
    """Fine-tune on a shorter context than the source's: keep the first block_size rows of the position
    table (rotary positions are recomputed for any length when the model is built)."""
    if model_config.pos_emb == "rope":
        return replace(model_config, block_size=config.block_size)
    if config.block_size > model_config.block_size:
        raise ConfigError(f"block_size={config.block_size} is larger than the {model_config.block_size} learned "
                          f"positions of {config.init_from}; set block_size <= {model_config.block_size}")
    if "sharded" in checkpoint:
        raise CheckpointError(f"{config.init_from} is sharded, and its position table cannot be cropped to "
                              f"block_size={config.block_size}; fine-tune at block_size={model_config.block_size}")
    wpe = "transformer.wpe.weight"
    checkpoint["model"][wpe] = checkpoint["model"][wpe][:config.block_size].clone()
    return replace(model_config, block_size=config.block_size)


def build(config: TrainConfig, info: DistInfo) -> Run:
    device = resolve_device(config.device, info.local_rank, info.enabled)
    init_distributed(info, config.backend, device, config.dist_timeout_s)
    dtype = resolve_dtype(config.dtype, device)
    if config.optimizer == "muon" and dtype == torch.float16:  # dtype=auto picks float16 on older GPUs
        raise ConfigError("optimizer=muon takes dtype float32 or bfloat16: with float16's gradient scaler, an "
                          "overflow would skip one optimizer's step and not the other's")
    if device.type == "cpu":
        keep_freed_host_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    meta = read_meta(config.data_dir)
    resume = config.init_from == "resume"
    checkpoint = None
    # on the CPU: each rank copies what it keeps to the device
    if resume:
        checkpoint, path, skipped = newest_checkpoint(config.out_dir)
        for reason in skipped:
            print0(info, f"note: skipped a checkpoint: {reason}")
    elif is_hf_gpt2(config.init_from):  # a checkpoint of weights, shape and GPT-2's tokenizer alone
        checkpoint, path = hf_checkpoint(config.init_from, config.dropout), Path(config.init_from)
    elif config.init_from != "scratch":
        path = Path(config.init_from)
        checkpoint = load_checkpoint(path)
    model_config = _model_config(config, meta, checkpoint, info)
    saved_tokenizer = checkpoint.get("tokenizer") if checkpoint else None
    if saved_tokenizer and meta.get("tokenizer") and saved_tokenizer != meta["tokenizer"]:
        raise DataError(f"{config.data_dir} was tokenized with '{meta['tokenizer']['name']}' but the checkpoint "
                        f"with a different '{saved_tokenizer['name']}' tokenizer; prepare the data with the checkpoint's")
    if meta["vocab_size"] > model_config.vocab_size:
        raise DataError(f"the data's vocabulary ({meta['vocab_size']}) is larger than the model's ({model_config.vocab_size})")

    auto_batch = config.batch_size == "auto"
    eval_batch = config.batch_size  # as asked: evaluation batches must not change with the world size
    config = plan_batch(replace(config, compile=device.type == "cuda" if config.compile == "auto" else config.compile),
                        model_config.block_size, info.world_size, 1 if auto_batch else config.batch_size)

    # Every rank builds the same full model on the CPU, so initial weights never depend on the world
    # size; parallelize() then keeps each rank's shard (FSDP) or a full copy (DDP) on the device.
    torch.manual_seed(config.seed)
    raw_model = GPT(model_config)
    model = parallelize(raw_model, config, info, device, dtype)
    if auto_batch:
        eval_batch = _largest_micro_batch(config, model, raw_model, info, device, dtype)
        config = plan_batch(config, model_config.block_size, info.world_size, eval_batch)
    config = plan_horizon(config, raw_model.num_params())
    optimizers = build_optimizers(raw_model, config, device.type)
    if resume:
        _check_resumable(checkpoint, path, config)
    if checkpoint is not None:
        load_weights(raw_model, checkpoint, path, optimizers if resume else [])

    train_tokens, val_tokens = open_tokens(config.data_dir, "train", meta), open_tokens(config.data_dir, "val", meta)
    sampler = lambda tokens, size, seed: BatchSampler(tokens, model_config.block_size, size, seed)  # noqa: E731
    run = Run(
        config=config, info=info, device=device, dtype=dtype, raw_model=raw_model, model=model,
        optimizers=optimizers, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        train_batches=sampler(train_tokens, config.batch_size, config.seed),
        # evaluation draws from its own streams, apart from the training data
        eval_batches={"train": sampler(train_tokens, eval_batch, config.seed + 1),
                      "val": sampler(val_tokens, eval_batch, config.seed + 1)},
        tokenizer_meta=meta.get("tokenizer"), val_meta=meta.get("val") or {},
        logger=MetricsLogger(config, info, resume_step=checkpoint["iter_num"] if resume else None,
                             wandb_id=checkpoint.get("wandb_id") if resume else None),
        stop=StopRequest(info, device),
    )
    if resume:
        if run.scaler.is_enabled() and checkpoint.get("scaler"):  # empty when the run before was not float16
            run.scaler.load_state_dict(checkpoint["scaler"])
        run.step = run.start_step = run.saved_step = checkpoint["iter_num"]  # also the data position
        run.best_val_loss = checkpoint.get("best_val_loss", float("inf"))
        run.skipped_steps = checkpoint.get("skipped_steps", 0)
        run.overflow_steps = checkpoint.get("overflow_steps", 0)

    if info.is_main:
        run.environment = environment(info.world_size)
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.out_dir) / "config.yaml").write_text(record_yaml(config))
        (Path(config.out_dir) / "environment.json").write_text(json.dumps(run.environment, indent=2) + "\n")
    print0(info, _summary(run, len(train_tokens)))
    if checkpoint is not None:
        print0(info, f"{'resuming' if resume else 'fine-tuning'} from {path} (iter {checkpoint.get('iter_num', 0)})")
    if resume and "model_args" in checkpoint:
        print0(info, f"note: {path} is nanoGPT's: its weights, AdamW state, iteration and best val loss go on, but "
                     f"not its data position or random state (nanoGPT draws batches from its own generator); from "
                     f"here batches and dropout follow seed={config.seed}, as in any gptrain run")
    return run


def _check_resumable(checkpoint: dict, path: Path, config: TrainConfig) -> None:
    """The optimizer state must fit the optimizers it goes back into; if not, say how to go on instead."""
    saved = checkpoint.get("config", {})
    fine_tune = f"fine-tune from its weights with init_from={path} instead of resuming"
    if saved.get("optimizer", "adamw") != config.optimizer:
        raise CheckpointError(f"{path} was trained with optimizer={saved.get('optimizer', 'adamw')}; resume with it, "
                              f"or {fine_tune}")
    if "sharded" in checkpoint and "optimizer" not in saved:
        raise CheckpointError(f"{path} keeps its sharded optimizer state in two groups, as gptrain did before "
                              f"optimizer groups by role; {fine_tune}")


def _summary(run: Run, dataset_tokens: int) -> str:
    """What the run will do and cost, before it starts."""
    config, model, info = run.config, run.raw_model, run.info
    c = model.config
    micro_per_rank = config.gradient_accumulation_steps // info.world_size
    shard = info.world_size if config.parallelism == "fsdp" else 1
    state_bytes = 16 * model.num_params(non_embedding=False) / shard  # fp32 weights, gradients, AdamW's 2 moments
    # activations kept for backward, per micro-batch: about 34 values per token, layer and channel
    # (Korthikanti et al. 2022, with fused attention), at 2 bytes under mixed precision
    activation_bytes = 34 * config.batch_size * c.block_size * c.n_embd * c.n_layer * (4 if run.dtype == torch.float32 else 2)
    memory = (torch.cuda.get_device_properties(run.device).total_memory if run.device.type == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    peak = peak_flops(config, run.device, run.dtype)
    total_tokens = config.max_iters * run.tokens_per_step
    return "\n".join([
        f"model      {_size(model.num_params(non_embedding=False))} parameters "
        f"({_size(model.num_params() - c.vocab_size * c.n_embd)} without embeddings): {c.n_layer} layers, "
        f"{c.n_embd} wide, {c.n_head} heads, context {c.block_size}, vocabulary {c.vocab_size:,}",
        f"batch      {run.tokens_per_step:,} tokens per step = {config.gradient_accumulation_steps} "
        f"micro-batch{'es' if config.gradient_accumulation_steps > 1 else ''} of "
        f"{config.batch_size} x {c.block_size}: {micro_per_rank} on each of {info.world_size} process(es), "
        f"{config.parallelism}",
        f"compute    {model.flops_per_token() / 1e6:,.1f} MFLOP per token (6 per parameter + 12 x layers x width x "
        f"context); MFU against " + (f"{peak / 1e12:,.0f} TFLOP/s" if peak else "no known peak (set peak_tflops)"),
        f"memory     about {_size(state_bytes)}B of weights, gradients and AdamW state + {_size(activation_bytes)}B "
        f"of activations per process, of {_size(memory)}B on {run.device}",
        f"run        {config.max_iters:,} steps = {_size(total_tokens)} tokens = "
        f"{total_tokens / dataset_tokens:,.2f} epochs of {dataset_tokens:,} training tokens; learning rate "
        f"{config.learning_rate:.1e}" + (f" (Muon {config.muon_lr:.1e})" if config.optimizer == "muon" else "")
        + f", warm-up {config.warmup_iters:,}"
        + _schedule(config),
        f"system     device {run.device}, dtype {str(run.dtype).removeprefix('torch.')}, "
        f"compile {str(config.compile).lower()}, seed {config.seed}",
    ])


def _schedule(config: TrainConfig) -> str:
    if not config.decay_lr:
        return ", constant"
    if config.lr_schedule == "wsd":
        return f", stable to {config.decay_start():,}, linear to {config.min_lr:.1e} at {config.lr_decay_iters:,}"
    return f", cosine to {config.min_lr:.1e} at {config.lr_decay_iters:,}"


def _size(n: float) -> str:
    """1.5k, 3.2M, 12.4G: a count (or with a B after it, bytes) readable at a glance."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.3g}{unit}" if unit else f"{n:.0f}"
        n /= 1000


def find_batch_size(trial, sizes: list[int]) -> int:
    """The largest of `sizes` whose trial step fits in memory, backing off on out-of-memory."""
    for size in sorted(sizes, reverse=True):
        try:
            trial(size)
            return size
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise TrainingError("not even one sequence per micro-batch fits in memory: try parallelism=fsdp, a smaller "
                        "model or block_size, or dtype=bfloat16")


def _largest_micro_batch(config: TrainConfig, model: nn.Module, raw_model: GPT, info: DistInfo,
                         device: torch.device, dtype: torch.dtype) -> int:
    """batch_size=auto: the most of each process's sequences per step that fit (on CUDA; at most 12
    elsewhere, where nothing runs out of memory), agreed by every rank."""
    block_size = raw_model.config.block_size
    share = config.tokens_per_step // block_size // info.world_size
    sizes = [b for b in range(1, share + 1) if share % b == 0 and (device.type == "cuda" or b <= 12)]
    fits = find_batch_size(lambda size: _trial_step(model, raw_model, size, block_size=block_size, device=device,
                                                    amp=autocast(device, dtype)), sizes)
    return min_across_ranks(fits, info, device)


def _trial_step(model: nn.Module, raw_model: nn.Module, size: int, *, block_size: int, device: torch.device,
                amp) -> None:
    """A forward and backward at the real shape, with AdamW's two moments (not allocated before its first
    step) stood in for by as much memory; gradients are not reduced, so each rank probes alone."""
    reserve = [torch.empty_like(p) for p in raw_model.parameters() for _ in range(2)]
    x = torch.zeros((size, block_size), dtype=torch.long, device=device)
    try:
        with gradient_sync(model, False), amp:
            _, loss = model(x, x)
            loss.backward()
    finally:
        raw_model.zero_grad(set_to_none=True)
        del reserve


def save(run: Run, best: bool = False, final: bool = False) -> None:
    """Every rank takes part: FSDP writes one shard per rank; otherwise rank 0 writes. A checkpoint that
    cannot be written (a full disk, permissions) leaves the earlier ones as they were, and stops the run or,
    with on_save_error=retry, is tried again at the next evaluation (a `final` one has none: it stops)."""
    run_state = {
        "model_config": asdict(run.raw_model.config),
        "scaler": run.scaler.state_dict(),
        "config": asdict(run.config),
        "environment": run.environment,
        "iter_num": run.step,  # with the seed, this is the data position too
        "best_val_loss": run.best_val_loss,
        "skipped_steps": run.skipped_steps,
        "overflow_steps": run.overflow_steps,
        "tokenizer": run.tokenizer_meta,
        "wandb_id": run.logger.wandb_id,
    }
    config, best, error = run.config, best or run.pending_best, None
    try:
        path = save_checkpoint(config.out_dir, run_state, model=run.raw_model, optimizers=run.optimizers,
                               info=run.info, sharded=config.parallelism == "fsdp", keep_last_n=config.keep_last_n,
                               best=best)
    except Exception as e:  # every rank must learn of it before any raises, or the others wait for it
        error = e
    if min_across_ranks(int(error is None), run.info, run.device) == 1:
        run.save_pending = run.pending_best = False
        run.saved_step = run.step
        print0(run.info, f"saved {path}{' (the best so far: ckpt-best.pt)' if best else ''}")
        return
    if error is not None and not isinstance(error, (OSError, CheckpointException)):
        raise error  # a bug, not the disk: keep its traceback
    reason = f": {getattr(error, 'strerror', None) or str(error).splitlines()[0]}" if error else " (on another rank)"
    message = f"cannot write the checkpoint of iter {run.step} to {config.out_dir}{reason}; the earlier ones are untouched"
    if config.on_save_error == "stop" or final:
        raise TrainingError(f"{message}; make room (or fix permissions) and continue with init_from=resume"
                            + ("" if final else ", or set on_save_error=retry"))
    print0(run.info, f"warning: {message}; trying again at the next evaluation (on_save_error=retry)")
    run.save_pending, run.pending_best = True, best


def train_step(run: Run) -> tuple[torch.Tensor, torch.Tensor, Outcome]:
    """One optimizer step over the step's `gradient_accumulation_steps` micro-batches, of which rank r of
    W takes r, r+W, ...; returns this rank's share of the mean loss, the gradient norm, and how the step
    went: ok, overflow (float16's scaler skipped it) or bad (not finite: skipped, no update)."""
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
    for optimizer in run.optimizers:
        run.scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = clip_grad_norm(run.raw_model, config.grad_clip if config.grad_clip > 0 else float("inf"))
    # One sync a step: a non-finite gradient (every rank sees the same, reduced one) must not reach the
    # optimizers. With float16 the scaler skips such a step itself and lowers its scale: an overflow.
    finite = bool(torch.isfinite(grad_norm))
    outcome = "ok" if finite else "overflow" if run.scaler.is_enabled() and run.scaler.get_scale() >= 1 else "bad"
    if finite or run.scaler.is_enabled():  # the scaler skips a non-finite step itself
        for optimizer in run.optimizers:
            run.scaler.step(optimizer)
        run.scaler.update()
    run.raw_model.zero_grad(set_to_none=True)
    return total_loss, grad_norm, outcome


def evaluate(run: Run) -> dict:
    losses = {split: estimate_loss(run.model, sampler, run.config.eval_iters, run.device, run.autocast, run.info)
              for split, sampler in run.eval_batches.items()}
    record = {"step": run.step, "tokens": run.step * run.tokens_per_step, "val/loss": losses["val"],
              "eval/train_loss": losses["train"]}
    if (bpb := split_bits_per_byte(losses["val"], run.val_meta.get("tokens"), run.val_meta)) is not None:
        record["val/bpb"] = bpb  # nanoGPT's data records no text bytes
    return record


@torch.no_grad()
def sample(run: Run) -> str:
    """SAMPLE_TOKENS tokens continuing sample_prompt, drawn from the same random stream every time, so
    successive samples show what the model learned. Every rank draws it (FSDP's forwards are collective)."""
    tokenizer = from_meta(run.tokenizer_meta or {"name": "gpt2"})
    prompt = torch.tensor([tokenizer.encode(run.config.sample_prompt)], device=run.device)
    run.raw_model.eval()
    with run.autocast:
        tokens = list(generate_tokens(run.raw_model, prompt, SAMPLE_TOKENS, temperature=0.8, top_k=200,
                                      generators=sample_generators(1, run.config.seed, run.device),
                                      vocab_limit=tokenizer.vocab_size))
    run.raw_model.train()
    return decode(tokenizer, torch.cat(tokens, dim=1)[0].tolist())


def _guarding_compile(run: Run, step):
    """Call step(run). Until a training step has succeeded, a failure with compile on is taken for
    torch.compile failing (no compiler, or none for this GPU, OS or version): warn, go eager, retry."""
    if not run.config.compile or run.compiled_ok:
        return step(run)
    try:
        return step(run)
    except Exception as e:
        reason = getattr(e, "inner_exception", None) or e  # what the compiler backend raised, if it did
        print0(run.info, f"warning: torch.compile failed ({type(reason).__name__}: "
                         f"{(str(reason).strip().splitlines() or [''])[0][:200]}); continuing without it, as with compile=false")
        run.raw_model.zero_grad(set_to_none=True)
        run.config = replace(run.config, compile=False)
        run.model = eager(run.raw_model, run.info, run.device)
        return step(run)


def _tally(run: Run, outcome: Outcome, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Tally skipped steps; max_bad_steps bad ones in a row stop the run, its checkpoints as they were."""
    if outcome == "overflow":
        run.overflow_steps += 1
        return
    run.bad_in_a_row = run.bad_in_a_row + 1 if outcome == "bad" else 0
    if outcome != "bad":
        return
    run.skipped_steps += 1
    what = f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
    if run.bad_in_a_row >= run.config.max_bad_steps:
        _diverged(run, f"the loss or its gradient stayed non-finite for {run.bad_in_a_row} steps in a row "
                       f"({what}, max_bad_steps={run.config.max_bad_steps})")
    print0(run.info, f"warning: iter {run.step}: {what}, not finite; step skipped, weights and optimizer state "
                     f"untouched ({run.bad_in_a_row} in a row, max_bad_steps={run.config.max_bad_steps})")


def _diverged(run: Run, what: str) -> None:
    lr = run.config.learning_rate * lr_multiplier(run.step, run.config)
    raise TrainingError(
        f"{what} at iter {run.step} (lr {lr:.2e}); the checkpoints are left untouched. Try a lower learning_rate, "
        f"grad_clip > 0, a longer warmup_iters, or dtype=bfloat16 instead of float16"
    )


def train(config: TrainConfig) -> list[dict]:
    """Run training to max_iters; returns the latest records that were logged (rank 0)."""
    info = dist_info()
    check_parallelism(config, info)
    run, finished, history = None, False, []
    try:
        run = build(config, info)
        # a bar with the time left, on a terminal only: logs and pipes get the metrics lines alone
        bar = tqdm(total=run.config.max_iters, initial=run.step, unit="step", dynamic_ncols=True, leave=False,
                   disable=not (info.is_main and sys.stdout.isatty()))
        with run.stop, bar:
            _loop(run, bar)
        finished = True
    except RuntimeError as e:  # another process hung or died: one line in place of gloo's traceback
        failure = lost_rank(e, info, timeout_s=config.dist_timeout_s, step=run.step if run else None)
        if failure is None:
            raise
        raise failure from None
    finally:
        if run is not None:
            run.logger.close()
            history = list(run.logger.history)
        # The model's DDP wrapper holds the process group: let it go first, so that the group is not
        # destroyed under it and then torn down again, waiting on ranks already gone, as it is freed.
        del run
        teardown(finished)
    return history


def _loop(run: Run, bar: tqdm) -> None:
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
            record = _guarding_compile(run, evaluate)
            if config.sample_interval and run.step % config.sample_interval == 0:
                record["sample"] = sample(run)
            run.logger.log(record)
            if not math.isfinite(record["val/loss"]):
                _diverged(run, f"val loss became {record['val/loss']}")
            improved = record["val/loss"] < run.best_val_loss
            run.best_val_loss = min(run.best_val_loss, record["val/loss"])
            if (improved or config.always_save_checkpoint or run.save_pending) and run.step > run.start_step:
                save(run, best=improved, final=run.step >= config.max_iters)
            timer += time.perf_counter() - eval_started  # evaluation is not training time
        if run.step >= config.max_iters or config.eval_only:
            return
        if run.stop.requested():
            if run.step > run.saved_step:
                save(run, final=True)
            print0(run.info, f"stopped at iter {run.step} on {run.stop.name}; continue with init_from=resume")
            return

        multiplier = lr_multiplier(run.step, config)
        set_lr(run.optimizers, config, multiplier)
        lr = config.learning_rate * multiplier  # the logged one: AdamW's, that of the norms and biases
        loss, grad_norm, outcome = _guarding_compile(run, train_step)
        run.compiled_ok = True
        timed_steps += 1
        _tally(run, outcome, loss, grad_norm)
        if run.step % config.log_interval == 0 or outcome != "ok":
            loss = mean_across_ranks(loss, run.info).item()  # a CPU-GPU sync point, so only on log steps
            record = {"step": run.step, "tokens": run.step * run.tokens_per_step,  # seen before this step's
                      "train/loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "skipped_steps": run.skipped_steps, "overflow_steps": run.overflow_steps}
            if run.step > run.start_step:  # the first step pays for compilation and warm-up
                seconds = (time.perf_counter() - timer) / timed_steps
                tokens_per_sec = run.tokens_per_step / seconds
                record |= {"ms_per_iter": 1000 * seconds, "tokens_per_sec": tokens_per_sec,
                           "mfu": flops_per_token * tokens_per_sec / (peak * run.info.world_size) if peak else None,
                           "eta_s": seconds * (config.max_iters - run.step - 1)}  # training time, evals aside
            run.logger.log(record)
            timer, timed_steps = time.perf_counter(), 0
        run.step += 1
        bar.update()


@command
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(__doc__.strip() + "\n\n" + help_text())
        return
    train(load_config(args))


if __name__ == "__main__":
    main()

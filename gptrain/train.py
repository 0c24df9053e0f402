"""The training loop: build everything from one TrainConfig, then step, evaluate, checkpoint and log.

Usage: gptrain train [config.yaml ...] [key=value ...]   (or: python train.py ..., torchrun ... train.py ...)
"""

from __future__ import annotations

import json
import math
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
    Checkpoint, CheckpointError, Progress, RunRecord, load_checkpoint, newest_checkpoint, save_checkpoint,
)
from gptrain.config import ConfigError, GPTConfig, TrainConfig, help_text, load_config, plan_batch, plan_horizon, record_yaml
from gptrain.data import BatchSampler, DataError, open_tokens, read_meta, to_device
from gptrain.device import autocast, environment, keep_freed_host_memory, resolve_device, resolve_dtype
from gptrain.distributed import (
    DistInfo, StopRequest, check_parallelism, clip_grad_norm, dist_info, eager, gradient_sync, init_distributed,
    lost_rank, mean_across_ranks, min_across_ranks, parallelize, place_whole, print0, teardown,
)
from gptrain.errors import RunError, command
from gptrain.evaluate import estimate_loss, split_bits_per_byte
from gptrain.files import atomic_write_text
from gptrain.hf import hf_checkpoint, is_hf_model
from gptrain.metrics import (
    EVAL_TRAIN_LOSS, ETA_S, GRAD_NORM, LR, MFU, MS_PER_ITER, OVERFLOW_STEPS, SAMPLE, SKIPPED_STEPS, STEP, TOKENS,
    TOKENS_PER_SEC, TRAIN_LOSS, VAL_BPB, VAL_LOSS, MetricsLogger, peak_flops,
)
from gptrain.model import GPT
from gptrain.optim import build_optimizers, lr_multiplier, set_lr
from gptrain.plan import summary
from gptrain.sampling import decode, generate_tokens, sample_generators
from gptrain.tokenizer import from_meta

SAMPLE_TOKENS = 100  # the length of the samples printed at evaluations (sample_interval)
# how a training step went: updated, skipped by float16's gradient scaler, or skipped as not finite
Outcome = Literal["ok", "overflow", "bad"]


class TrainingError(RunError):
    """The run cannot go on (e.g. the loss diverged); the message says where and what to try."""


@dataclass
class LoopState:
    """The loop's counters. `progress` is what a checkpoint keeps; the rest lives and dies with this process."""

    progress: Progress
    start_step: int = 0  # where this process began: 0, or the step it resumed at
    saved_step: int = 0  # the step of the newest checkpoint written
    bad_in_a_row: int = 0  # steps in a row whose loss or gradient was not finite
    compiled_ok: bool = False  # a training step has run, so torch.compile (if on) has worked
    save_pending: bool = False  # a save failed (on_save_error=retry): try again at the next evaluation
    pending_best: bool = False  # and it held the best val loss so far


@dataclass
class Run:
    """What `build` assembles, once; the loop advances `state` and reads the rest."""

    config: TrainConfig
    info: DistInfo
    device: torch.device
    dtype: torch.dtype
    model: GPT  # whose parameters are trained and saved (sharded in place under FSDP)
    wrapped: nn.Module  # what the loop calls: the same model, possibly compiled and wrapped in DDP
    optimizers: list[torch.optim.Optimizer]  # AdamW, and Muon with optimizer=muon
    scaler: torch.amp.GradScaler
    train_batches: BatchSampler
    eval_batches: dict[str, BatchSampler]
    tokenizer_meta: dict | None
    val_meta: dict  # the val split's tokens and text bytes as prepare recorded them, for bits per byte
    logger: MetricsLogger
    stop: StopRequest
    state: LoopState
    environment: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all processes: the recipe's batch size."""
        return self.config.batch_size * self.model.config.block_size * self.config.gradient_accumulation_steps

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


# ---------------------------------------------------------------------------------------------------------
# build(): the system, where the weights come from, the plan, the model and its optimizers, the state a
# resume restores, and the run's record, in that order.


def build(config: TrainConfig, info: DistInfo) -> Run:
    config, device, dtype = _system(config, info)
    meta = read_meta(config.data_dir)
    source = _source(config, info)
    model_config = _model_config(config, meta, source, info)
    if source is not None and source.model_config.block_size != model_config.block_size:
        source = source.cropped(model_config.block_size)
    with torch.device("meta"):  # no memory and no work yet: parallelize() gives each rank its part
        model = GPT(model_config)
    eval_batch = config.batch_size  # as asked (auto until probed): evaluations do not change with the world size
    config = _plan(config, model, info, max_batch=1 if eval_batch == "auto" else eval_batch)
    wrapped = parallelize(model, config, info, device, dtype,
                          fill=source.load_weights if source else _initial_weights(config.seed))
    optimizers = build_optimizers(model, config, device.type)
    if eval_batch == "auto":
        eval_batch = _largest_micro_batch(config, wrapped, model, info, device, dtype)
        config = _plan(config, model, info, max_batch=eval_batch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = _restore(config, source, model, optimizers, scaler)

    train_tokens, val_tokens = open_tokens(config.data_dir, "train", meta), open_tokens(config.data_dir, "val", meta)
    sampler = lambda tokens, size, seed: BatchSampler(tokens, model_config.block_size, size, seed)  # noqa: E731
    resume = config.init_from == "resume"
    run = Run(
        config=config, info=info, device=device, dtype=dtype, model=model, wrapped=wrapped, optimizers=optimizers,
        scaler=scaler, train_batches=sampler(train_tokens, config.batch_size, config.seed),
        # evaluation draws from its own streams, apart from the training data
        eval_batches={"train": sampler(train_tokens, eval_batch, config.seed + 1),
                      "val": sampler(val_tokens, eval_batch, config.seed + 1)},
        tokenizer_meta=meta.get("tokenizer"), val_meta=meta.get("val") or {},
        logger=MetricsLogger(config, info, resume_step=state.progress.step if resume else None,
                             wandb_id=source.record.wandb_id if resume else None),
        stop=StopRequest(info, device), state=state,
    )
    _record(run, source, len(train_tokens))
    return run


def _system(config: TrainConfig, info: DistInfo) -> tuple[TrainConfig, torch.device, torch.dtype]:
    """The device and precision for the hardware, the process group, and compile=auto decided."""
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
    return replace(config, compile=device.type == "cuda" if config.compile == "auto" else config.compile), device, dtype


def _source(config: TrainConfig, info: DistInfo) -> Checkpoint | None:
    """Where the weights come from: None for fresh ones, else the newest checkpoint in out_dir (resume), a
    checkpoint file, or a Hugging Face model (fine-tuning). Loaded on the CPU: each rank copies what it keeps."""
    if config.init_from == "scratch":
        return None
    if config.init_from == "resume":
        source, skipped = newest_checkpoint(config.out_dir)
        for reason in skipped:
            print0(info, f"note: skipped a checkpoint: {reason}")
        return source
    if is_hf_model(config.init_from):  # weights, shape and tokenizer record alone
        return hf_checkpoint(config.init_from, config.dropout)
    return load_checkpoint(config.init_from)


# what the weights' shapes or their computation depend on: a fine-tune or a resume keeps the source's
FIXED_BY_CHECKPOINT = ("vocab_size", "n_layer", "n_head", "n_embd", "bias", "pos_emb", "rope_theta", "norm", "qk_norm",
                       "mlp", "tie_embeddings", "logit_softcap")


def _model_config(config: TrainConfig, meta: dict, source: Checkpoint | None, info: DistInfo) -> GPTConfig:
    """The source's shape when starting from one, else the config's; the data must fit it.

    A shape key the config leaves at its default takes the source's value (said in a note); one set to
    something else is refused. Only dropout may change, and a fine-tune's block_size (cropped to it)."""
    if source is None:
        model_config = replace(config.model_config(), vocab_size=config.vocab_size or padded_vocab(meta["vocab_size"]))
    else:
        model_config = _fixed_by(source, config, info)
        saved = source.record.tokenizer
        if saved and meta.get("tokenizer") and saved != meta["tokenizer"]:
            raise DataError(f"{config.data_dir} was tokenized with '{meta['tokenizer']['name']}' but the checkpoint "
                            f"with a different '{saved['name']}' tokenizer; prepare the data with the checkpoint's")
    if meta["vocab_size"] > model_config.vocab_size:
        raise DataError(f"the data's vocabulary ({meta['vocab_size']}) is larger than the model's ({model_config.vocab_size})")
    return model_config


def _fixed_by(source: Checkpoint, config: TrainConfig, info: DistInfo) -> GPTConfig:
    resume = config.init_from == "resume"
    model_config = replace(source.model_config, dropout=config.dropout)
    default = GPTConfig()
    differing = [name for name in (*FIXED_BY_CHECKPOINT, "block_size")
                 if getattr(config, name) != getattr(model_config, name)]
    set_here = [name for name in differing if getattr(config, name) != getattr(default, name)]
    changed = [name for name in set_here if name != "block_size" or resume]
    if changed:
        where = "the checkpoint in out_dir" if resume else config.init_from
        raise ConfigError(f"{where} has {', '.join(f'{n}={getattr(model_config, n)}' for n in changed)}, which a "
                          f"{'resumed' if resume else 'fine-tuned'} model keeps, but the config sets "
                          f"{', '.join(f'{n}={getattr(config, n)}' for n in changed)}: remove the setting, or train "
                          f"from scratch")
    kept = [f"{n}={getattr(model_config, n)}" for n in differing if n not in set_here and getattr(config, n) is not None]
    if kept:
        print0(info, f"note: the model keeps the checkpoint's {', '.join(kept)} (the config leaves them at their defaults)")
    return replace(model_config, block_size=config.block_size) if "block_size" in set_here else model_config


def _plan(config: TrainConfig, model: GPT, info: DistInfo, *, max_batch: int) -> TrainConfig:
    """The micro-batch and accumulation for this world size, and the horizon."""
    planned = plan_batch(config, model.config.block_size, info.world_size, max_batch)
    return plan_horizon(planned, model.num_params())


def _initial_weights(seed: int):
    """Fresh weights: the same seed gives the same ones on any world size, sharded or not."""
    return lambda model: model.init_weights(seed, place=place_whole)


def _restore(config: TrainConfig, source: Checkpoint | None, model: GPT, optimizers: list[torch.optim.Optimizer],
             scaler: torch.amp.GradScaler) -> LoopState:
    """A resumed run takes back its optimizers' and scaler's state and its progress; any other starts at 0."""
    if config.init_from != "resume":
        return LoopState(Progress())
    saved = source.record.config
    fine_tune = f"fine-tune from its weights with init_from={source.path} instead of resuming"
    if saved.get("optimizer", "adamw") != config.optimizer:
        raise CheckpointError(f"{source.path} was trained with optimizer={saved.get('optimizer', 'adamw')}; resume "
                              f"with it, or {fine_tune}")
    if source.shards is not None and "optimizer" not in saved:
        raise CheckpointError(f"{source.path} keeps its sharded optimizer state in two groups, as gptrain did before "
                              f"optimizer groups by role; {fine_tune}")
    source.load_training_state(model, optimizers, scaler)
    source.release()
    step = source.progress.step  # also the data position
    return LoopState(source.progress, start_step=step, saved_step=step)


def _record(run: Run, source: Checkpoint | None, dataset_tokens: int) -> None:
    """The run's record in out_dir (its settings as resolved, which `train.py out_dir/config.yaml` runs
    again, and the machine), and what it will do, before it starts."""
    config, info = run.config, run.info
    if info.is_main:
        run.environment = environment(info.world_size)
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(config.out_dir) / "config.yaml", record_yaml(config))
        atomic_write_text(Path(config.out_dir) / "environment.json", json.dumps(run.environment, indent=2) + "\n")
    print0(info, summary(config, run.model, info, device=run.device, dtype=run.dtype, dataset_tokens=dataset_tokens))
    if source is None:
        return
    resume = config.init_from == "resume"
    print0(info, f"{'resuming' if resume else 'fine-tuning'} from {source.path} (iter {source.progress.step})")
    if resume and source.origin == "nanoGPT":
        print0(info, f"note: {source.path} is nanoGPT's: its weights, AdamW state, iteration and best val loss go on, "
                     f"but not its data position or random state (nanoGPT draws batches from its own generator); from "
                     f"here batches and dropout follow seed={config.seed}, as in any gptrain run")


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


def _largest_micro_batch(config: TrainConfig, wrapped: nn.Module, model: GPT, info: DistInfo,
                         device: torch.device, dtype: torch.dtype) -> int:
    """batch_size=auto: the most of each process's sequences per step that fit (on CUDA; at most 12
    elsewhere, where nothing runs out of memory), agreed by every rank."""
    block_size = model.config.block_size
    share = config.tokens_per_step // block_size // info.world_size
    sizes = [b for b in range(1, share + 1) if share % b == 0 and (device.type == "cuda" or b <= 12)]
    fits = find_batch_size(lambda size: _trial_step(wrapped, model, size, block_size=block_size, device=device,
                                                    amp=autocast(device, dtype)), sizes)
    return min_across_ranks(fits, info, device)


def _trial_step(wrapped: nn.Module, model: nn.Module, size: int, *, block_size: int, device: torch.device,
                amp) -> None:
    """A forward and backward at the real shape, with AdamW's two moments (not allocated before its first
    step) stood in for by as much memory; gradients are not reduced, so each rank probes alone."""
    reserve = [torch.empty_like(p) for p in model.parameters() for _ in range(2)]
    x = torch.zeros((size, block_size), dtype=torch.long, device=device)
    try:
        with gradient_sync(wrapped, False), amp:
            _, loss = wrapped(x, x)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        del reserve


# ---------------------------------------------------------------------------------------------------------
# The step, evaluation, samples and checkpoints.


def train_step(run: Run) -> tuple[torch.Tensor, torch.Tensor, Outcome]:
    """One optimizer step over the step's `gradient_accumulation_steps` micro-batches, of which rank r of
    W takes r, r+W, ...; returns this rank's share of the mean loss, the gradient norm, and how the step
    went: ok, overflow (float16's scaler skipped it) or bad (not finite: skipped, no update)."""
    wrapped, info, config, step = run.wrapped, run.info, run.config, run.state.progress.step
    mine = range(info.rank, config.gradient_accumulation_steps, info.world_size)
    total_loss = torch.zeros((), device=run.device)
    x, y = to_device(run.train_batches.batch(step, mine[0]), run.device)
    for n, index in enumerate(mine):
        last = n == len(mine) - 1
        if run.model.config.dropout > 0:  # dropout masks too depend on (seed, step, micro-batch) alone
            torch.manual_seed(int(np.random.SeedSequence([config.seed, step, index]).generate_state(1)[0]))
        with gradient_sync(wrapped, last):  # only the last micro-batch needs its gradients reduced
            with run.autocast:
                _, loss = wrapped(x, y)
                loss = loss / len(mine)
            if not last:  # fetch the next micro-batch while the GPU works on this one
                x, y = to_device(run.train_batches.batch(step, mine[n + 1]), run.device)
            run.scaler.scale(loss).backward()
        total_loss += loss.detach()
    for optimizer in run.optimizers:
        run.scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = clip_grad_norm(run.model, config.grad_clip if config.grad_clip > 0 else float("inf"))
    # One sync a step: a non-finite gradient (every rank sees the same, reduced one) must not reach the
    # optimizers. With float16 the scaler skips such a step itself and lowers its scale: an overflow.
    finite = bool(torch.isfinite(grad_norm))
    outcome = "ok" if finite else "overflow" if run.scaler.is_enabled() and run.scaler.get_scale() >= 1 else "bad"
    if finite or run.scaler.is_enabled():  # the scaler skips a non-finite step itself
        for optimizer in run.optimizers:
            run.scaler.step(optimizer)
        run.scaler.update()
    run.model.zero_grad(set_to_none=True)
    return total_loss, grad_norm, outcome


def evaluate(run: Run) -> dict:
    losses = {split: estimate_loss(run.wrapped, sampler, run.config.eval_iters, run.device, run.autocast, run.info)
              for split, sampler in run.eval_batches.items()}
    progress = run.state.progress
    record = {STEP: progress.step, TOKENS: progress.tokens_seen, VAL_LOSS: losses["val"],
              EVAL_TRAIN_LOSS: losses["train"]}
    if (bpb := split_bits_per_byte(losses["val"], run.val_meta.get("tokens"), run.val_meta)) is not None:
        record[VAL_BPB] = bpb  # nanoGPT's data records no text bytes
    return record


@torch.no_grad()
def sample(run: Run) -> str:
    """SAMPLE_TOKENS tokens continuing sample_prompt, drawn from the same random stream every time, so
    successive samples show what the model learned. Every rank draws it (FSDP's forwards are collective)."""
    tokenizer = from_meta(run.tokenizer_meta or {"name": "gpt2"})
    prompt = torch.tensor([tokenizer.encode(run.config.sample_prompt)], device=run.device)
    run.model.eval()
    with run.autocast:
        tokens = list(generate_tokens(run.model, prompt, SAMPLE_TOKENS, temperature=0.8, top_k=200,
                                      generators=sample_generators(1, run.config.seed, run.device),
                                      vocab_limit=tokenizer.vocab_size))
    run.model.train()
    return decode(tokenizer, torch.cat(tokens, dim=1)[0].tolist())


def save(run: Run, best: bool = False, final: bool = False) -> None:
    """Every rank takes part: FSDP writes one shard per rank; otherwise rank 0 writes. A checkpoint that
    cannot be written (a full disk, permissions) leaves the earlier ones as they were, and stops the run or,
    with on_save_error=retry, is tried again at the next evaluation (a `final` one has none: it stops)."""
    config, state, best, error = run.config, run.state, best or run.state.pending_best, None
    record = RunRecord(config=asdict(config), tokenizer=run.tokenizer_meta, environment=run.environment,
                       wandb_id=run.logger.wandb_id)
    try:
        path = save_checkpoint(config.out_dir, model=run.model, progress=state.progress, record=record,
                               optimizers=run.optimizers, scaler=run.scaler, info=run.info,
                               sharded=config.parallelism == "fsdp", keep_last_n=config.keep_last_n, best=best)
    except Exception as e:  # every rank must learn of it before any raises, or the others wait for it
        error = e
    if min_across_ranks(int(error is None), run.info, run.device) == 1:
        state.save_pending = state.pending_best = False
        state.saved_step = state.progress.step
        print0(run.info, f"saved {path}{' (the best so far: ckpt-best.pt)' if best else ''}")
        return
    if error is not None and not isinstance(error, (OSError, CheckpointException)):
        raise error  # a bug, not the disk: keep its traceback
    reason = f": {getattr(error, 'strerror', None) or str(error).splitlines()[0]}" if error else " (on another rank)"
    message = (f"cannot write the checkpoint of iter {state.progress.step} to {config.out_dir}{reason}; the earlier "
               f"ones are untouched")
    if config.on_save_error == "stop" or final:
        raise TrainingError(f"{message}; make room (or fix permissions) and continue with init_from=resume"
                            + ("" if final else ", or set on_save_error=retry"))
    print0(run.info, f"warning: {message}; trying again at the next evaluation (on_save_error=retry)")
    state.save_pending, state.pending_best = True, best


def _guarding_compile(run: Run, step):
    """Call step(run). Until a training step has succeeded, a failure with compile on is taken for
    torch.compile failing (no compiler, or none for this GPU, OS or version): warn, go eager, retry."""
    if not run.config.compile or run.state.compiled_ok:
        return step(run)
    try:
        return step(run)
    except Exception as e:
        reason = getattr(e, "inner_exception", None) or e  # what the compiler backend raised, if it did
        print0(run.info, f"warning: torch.compile failed ({type(reason).__name__}: "
                         f"{(str(reason).strip().splitlines() or [''])[0][:200]}); continuing without it, as with compile=false")
        run.model.zero_grad(set_to_none=True)
        run.config = replace(run.config, compile=False)
        run.wrapped = eager(run.model, run.info, run.device)
        return step(run)


def _tally(run: Run, outcome: Outcome, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Tally skipped steps; max_bad_steps bad ones in a row stop the run, its checkpoints as they were."""
    state, progress = run.state, run.state.progress
    if outcome == "overflow":
        progress.overflow_steps += 1
        return
    state.bad_in_a_row = state.bad_in_a_row + 1 if outcome == "bad" else 0
    if outcome != "bad":
        return
    progress.skipped_steps += 1
    what = f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
    if state.bad_in_a_row >= run.config.max_bad_steps:
        _diverged(run, f"the loss or its gradient stayed non-finite for {state.bad_in_a_row} steps in a row "
                       f"({what}, max_bad_steps={run.config.max_bad_steps})")
    print0(run.info, f"warning: iter {progress.step}: {what}, not finite; step skipped, weights and optimizer state "
                     f"untouched ({state.bad_in_a_row} in a row, max_bad_steps={run.config.max_bad_steps})")


def _diverged(run: Run, what: str) -> None:
    step = run.state.progress.step
    lr = run.config.learning_rate * lr_multiplier(step, run.config)
    raise TrainingError(
        f"{what} at iter {step} (lr {lr:.2e}); the checkpoints are left untouched. Try a lower learning_rate, "
        f"grad_clip > 0, a longer warmup_iters, or dtype=bfloat16 instead of float16"
    )


# ---------------------------------------------------------------------------------------------------------
# The loop.


class StepClock:
    """Seconds per training step since the last log line, evaluations left out: they are not training time."""

    def __init__(self):
        self.start, self.steps = time.perf_counter(), 0

    def exclude(self, started: float) -> None:
        self.start += time.perf_counter() - started

    def lap(self) -> float:
        seconds = (time.perf_counter() - self.start) / max(self.steps, 1)
        self.start, self.steps = time.perf_counter(), 0
        return seconds


def train(config: TrainConfig) -> list[dict]:
    """Run training to max_iters; returns the latest records that were logged (rank 0)."""
    info = dist_info()
    check_parallelism(config, info)
    run, finished, history = None, False, []
    try:
        run = build(config, info)
        # a bar with the time left, on a terminal only: logs and pipes get the metrics lines alone
        bar = tqdm(total=run.config.max_iters, initial=run.state.progress.step, unit="step", dynamic_ncols=True,
                   leave=False, disable=not (info.is_main and sys.stdout.isatty()))
        with run.stop, bar:
            _loop(run, bar)
        finished = True
    except RuntimeError as e:  # another process hung or died: one line in place of gloo's traceback
        failure = lost_rank(e, info, timeout_s=config.dist_timeout_s, step=run.state.progress.step if run else None)
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
    config, state = run.config, run.state
    if state.start_step >= config.max_iters and not config.eval_only:
        print0(run.info, f"the checkpoint is at iter {state.start_step}, max_iters is {config.max_iters}: "
                         f"nothing to train (raise max_iters to continue)")
        return
    clock = StepClock()
    while True:
        step = state.progress.step
        due = step % config.eval_interval == 0 or step == config.max_iters
        resumed_here = step == state.start_step > 0  # the checkpoint already holds this evaluation
        if config.eval_only or (due and not resumed_here):
            started = time.perf_counter()
            _evaluate_and_save(run)
            clock.exclude(started)
        if step >= config.max_iters or config.eval_only:
            return
        if run.stop.requested():
            if step > state.saved_step:
                save(run, final=True)
            print0(run.info, f"stopped at iter {step} on {run.stop.name}; continue with init_from=resume")
            return
        _train_and_log(run, clock)
        bar.update()


def _evaluate_and_save(run: Run) -> None:
    """Estimate the losses (and draw a sample, when due), log them, and checkpoint: at every evaluation, or
    when val loss improves (always_save_checkpoint=false), or to retry a save that failed."""
    config, state, progress = run.config, run.state, run.state.progress
    record = _guarding_compile(run, evaluate)
    if config.sample_interval and progress.step % config.sample_interval == 0:
        record[SAMPLE] = sample(run)
    run.logger.log(record)
    if not math.isfinite(record[VAL_LOSS]):
        _diverged(run, f"val loss became {record[VAL_LOSS]}")
    improved = record[VAL_LOSS] < progress.best_val_loss
    progress.best_val_loss = min(progress.best_val_loss, record[VAL_LOSS])
    if (improved or config.always_save_checkpoint or state.save_pending) and progress.step > state.start_step:
        save(run, best=improved, final=progress.step >= config.max_iters)


def _train_and_log(run: Run, clock: StepClock) -> None:
    """One training step at this step's learning rate, then its record on log steps (or when it went wrong)."""
    config, progress = run.config, run.state.progress
    multiplier = lr_multiplier(progress.step, config)
    set_lr(run.optimizers, config, multiplier)
    loss, grad_norm, outcome = _guarding_compile(run, train_step)
    run.state.compiled_ok = True
    clock.steps += 1
    _tally(run, outcome, loss, grad_norm)
    if progress.step % config.log_interval == 0 or outcome != "ok":
        loss = mean_across_ranks(loss, run.info).item()  # a CPU-GPU sync point, so only on log steps
        record = {STEP: progress.step, TOKENS: progress.tokens_seen,  # seen before this step's
                  TRAIN_LOSS: loss, LR: config.learning_rate * multiplier,  # AdamW's: the norms' and biases'
                  GRAD_NORM: grad_norm.item(), SKIPPED_STEPS: progress.skipped_steps,
                  OVERFLOW_STEPS: progress.overflow_steps}
        seconds = clock.lap()
        if progress.step > run.state.start_step:  # the first step pays for compilation and warm-up
            record |= _speed(run, seconds)
        run.logger.log(record)
    progress.step += 1
    progress.tokens_seen += run.tokens_per_step


def _speed(run: Run, seconds: float) -> dict:
    tokens_per_sec = run.tokens_per_step / seconds
    peak = peak_flops(run.config, run.device, run.dtype)
    return {MS_PER_ITER: 1000 * seconds, TOKENS_PER_SEC: tokens_per_sec,
            MFU: run.model.flops_per_token() * tokens_per_sec / (peak * run.info.world_size) if peak else None,
            ETA_S: seconds * (run.config.max_iters - run.state.progress.step - 1)}  # training time, evals aside


@command
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(__doc__.strip() + "\n\n" + help_text())
        return
    train(load_config(args))


if __name__ == "__main__":
    main()

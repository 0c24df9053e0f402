"""What a run will do and cost, said before its first step: the model, how the step's tokens are made up,
the FLOPs per token, the memory it needs against the device's, and how far it goes."""

from __future__ import annotations

import os

import torch

from gptrain.config import TrainConfig
from gptrain.distributed import DistInfo
from gptrain.metrics import peak_flops
from gptrain.model import GPT
from gptrain.optim import muon_dtype


def summary(config: TrainConfig, model: GPT, info: DistInfo, *, device: torch.device, dtype: torch.dtype,
            dataset_tokens: int) -> str:
    c = model.config
    tokens_per_step = config.batch_size * c.block_size * config.gradient_accumulation_steps
    peak = peak_flops(config, device, dtype)
    total_tokens = config.max_iters * tokens_per_step
    return "\n".join([
        f"model      {size(model.num_params(non_embedding=False))} parameters "
        f"({size(model.num_params() - c.vocab_size * c.n_embd)} without embeddings): {c.n_layer} layers, "
        f"{c.n_embd} wide, {c.n_head} heads, context {c.block_size}, vocabulary {c.vocab_size:,}",
        f"batch      {tokens_per_step:,} tokens per step = {config.gradient_accumulation_steps} "
        f"micro-batch{'es' if config.gradient_accumulation_steps > 1 else ''} of "
        f"{config.batch_size} x {c.block_size}: {config.gradient_accumulation_steps // info.world_size} on each of "
        f"{info.world_size} process(es), {config.parallelism}",
        f"compute    {model.flops_per_token() / 1e6:,.1f} MFLOP per token (6 per parameter + 12 x layers x width x "
        f"context); MFU against " + (f"{peak / 1e12:,.0f} TFLOP/s" if peak else "no known peak (set peak_tflops)"),
        _memory(config, model, info, device=device, dtype=dtype),
        f"run        {config.max_iters:,} steps = {size(total_tokens)} tokens = "
        f"{total_tokens / dataset_tokens:,.2f} epochs of {dataset_tokens:,} training tokens; learning rate "
        f"{config.learning_rate:.1e}" + _muon(config, device) + f", warm-up {config.warmup_iters:,}" + _schedule(config),
        f"system     device {device}, dtype {str(dtype).removeprefix('torch.')}, "
        f"compile {str(config.compile).lower()}, seed {config.seed}",
    ])


def _memory(config: TrainConfig, model: GPT, info: DistInfo, *, device: torch.device, dtype: torch.dtype) -> str:
    c = model.config
    shard = info.world_size if config.parallelism == "fsdp" else 1
    state_bytes = 16 * model.num_params(non_embedding=False) / shard  # fp32 weights, gradients, AdamW's 2 moments
    # activations kept for backward, per micro-batch: about 34 values per token, layer and channel
    # (Korthikanti et al. 2022, with fused attention), at 2 bytes under mixed precision
    activation_bytes = 34 * config.batch_size * c.block_size * c.n_embd * c.n_layer * (4 if dtype == torch.float32 else 2)
    memory = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return (f"memory     about {size(state_bytes)}B of weights, gradients and AdamW state + {size(activation_bytes)}B "
            f"of activations per process, of {size(memory)}B on {device}")


def _muon(config: TrainConfig, device: torch.device) -> str:
    if config.optimizer != "muon":
        return ""
    dtype = str(muon_dtype(config.muon_dtype, device)).removeprefix("torch.")
    return f" (Muon {config.muon_lr:.1e}, Newton-Schulz in {dtype})"


def _schedule(config: TrainConfig) -> str:
    if not config.decay_lr:
        return ", constant"
    if config.lr_schedule == "wsd":
        return f", stable to {config.decay_start():,}, linear to {config.min_lr:.1e} at {config.lr_decay_iters:,}"
    return f", cosine to {config.min_lr:.1e} at {config.lr_decay_iters:,}"


def size(n: float) -> str:
    """1.5k, 3.2M, 12.4G: a count (or with a B after it, bytes) readable at a glance."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.3g}{unit}" if unit else f"{n:.0f}"
        n /= 1000

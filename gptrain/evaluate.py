"""Loss estimates on held-out data."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn as nn

from gptrain.data import BatchSampler, to_device
from gptrain.distributed import DistInfo, sum_across_ranks


@torch.no_grad()
def estimate_loss(model: nn.Module, sampler: BatchSampler, iters: int, device: torch.device,
                  autocast: AbstractContextManager, info: DistInfo) -> float:
    """Mean loss over the sampler's batches 0 .. iters-1, the same on every world size: rank r of W
    takes batches r, r+W, ... and the sums are all-reduced. Every evaluation sees the same batches,
    so successive figures compare like with like."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    rounds = -(-iters // info.world_size)
    for i in range(rounds):
        index = info.rank + i * info.world_size
        # Every rank runs as many forwards as the busiest one (FSDP gathers weights collectively);
        # a rank past the last batch repeats one and leaves it out of the sum.
        x, y = to_device(sampler.batch(0, min(index, iters - 1)), device)
        with autocast:
            _, loss = model(x, y)
        if index < iters:
            total += loss.float()
    model.train(was_training)
    return sum_across_ranks(total, info).item() / iters

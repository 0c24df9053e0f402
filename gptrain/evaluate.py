"""Loss estimates on held-out data."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn as nn

from gptrain.data import BatchSampler, to_device


@torch.no_grad()
def estimate_loss(model: nn.Module, sampler: BatchSampler, iters: int, device: torch.device,
                  autocast: AbstractContextManager) -> torch.Tensor:
    """Mean loss over the sampler's first `iters` batches; the sampler is rewound first, so every
    evaluation sees the same batches and successive figures compare like with like."""
    was_training = model.training
    model.eval()
    sampler.load_state_dict({"position": 0})
    total = torch.zeros((), device=device)
    for _ in range(iters):
        x, y = to_device(sampler.next_batch(), device)
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    model.train(was_training)
    return total / iters

"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return int(math.ceil(total_steps * warmup_ratio))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float,
    *,
    warmup: int = 0,
    start_factor: float = 0.0,
    floor_factor: float = 0.0,
) -> LambdaLR:
    """Multiplier of the base lr: over the first w steps (`warmup`, or warmup_ratio of total_steps when 0)
    it rises linearly from start_factor to 1 (from (s + 1) / (w + 1) when start_factor is 0); then it
    follows a cosine from 1 down to floor_factor at total_steps. The official BinLLM runs use w = 200,
    start 1e-5 / 1e-4 and floor 8e-5 / 1e-4."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not (0.0 <= start_factor <= 1.0 and 0.0 <= floor_factor <= 1.0):
        raise ValueError(f"start_factor and floor_factor must be in [0, 1], got {start_factor}, {floor_factor}")
    warm = warmup if warmup > 0 else warmup_steps(total_steps, warmup_ratio)

    def multiplier(step: int) -> float:
        if step < warm:
            if start_factor == 0.0:
                return (step + 1) / (warm + 1)
            return start_factor + (1.0 - start_factor) * step / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return floor_factor + (1.0 - floor_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, multiplier)

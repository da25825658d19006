"""Copying a state dict of full tensors into a model's parameters: the one loader of trainable state."""
from __future__ import annotations

from typing import Callable

import torch


def copy_into_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor], *,
                         copy: Callable[[str, torch.nn.Parameter, torch.Tensor], None] | None = None) -> None:
    """Copies each tensor of `state` into the parameter of the same name (cast to its device and dtype);
    `copy(name, param, value)` replaces the plain copy (sharded parameters need a gathering one)."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"state names parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            if copy is None:
                params[name].data.copy_(value.to(params[name].device, params[name].dtype))
            else:
                copy(name, params[name], value)

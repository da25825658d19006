"""The collaborative models: BinMF (MF + hashing layer -> ±1 codes) and the continuous MF baseline."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Side = Literal["user", "item"]


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0 (so sign(0) = +1), -1 elsewhere; the backward pass hands the gradient through unchanged."""
    return _SignSTE.apply(x)


class HashingLayer(nn.Module):
    """h = sign(tanh(W e + b)); `soft` gives tanh(W e + b), the value before the sign."""

    def __init__(self, dim: int, bits: int):
        super().__init__()
        self.linear = nn.Linear(dim, bits)

    def soft(self, e: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(e))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return sign_ste(self.soft(e))


def _embedding(n: int, dim: int) -> nn.Embedding:
    if n <= 0:
        raise ValueError(f"an embedding table needs at least one row, got {n}")
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=0.1)
    return table


class BinaryEncoder(nn.Module):
    """BinMF: MF embeddings (no biases) hashed into `bits` ±1 digits per side; logit = <h_u, h_i>.

    Training anneals from soft to hard codes: each element is the tanh value with probability 1 - beta
    and the straight-through sign with probability beta (shared_mask: one draw per row and bit serves the
    user and the item side, as in the official code). Evaluation (model.eval()) always uses hard codes.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 32, bits: int = 32, shared_mask: bool = False):
        super().__init__()
        self.n_users, self.n_items, self.dim, self.bits = n_users, n_items, dim, bits
        self.shared_mask = shared_mask
        self.user_embedding = _embedding(n_users, dim)
        self.item_embedding = _embedding(n_items, dim)
        self.user_hash = HashingLayer(dim, bits)
        self.item_hash = HashingLayer(dim, bits)

    def _side(self, side: Side) -> tuple[nn.Embedding, HashingLayer]:
        if side == "user":
            return self.user_embedding, self.user_hash
        if side == "item":
            return self.item_embedding, self.item_hash
        raise ValueError(f"side must be 'user' or 'item', got {side!r}")

    def encode(self, side: Side, idx: torch.Tensor, beta: float = 1.0,
               take_hard: torch.Tensor | None = None) -> torch.Tensor:
        """The codes of rows `idx`: hard in eval mode; annealed (share `beta` hard, or where `take_hard`)
        in training mode."""
        table, hashing = self._side(side)
        soft = hashing.soft(table(idx))
        hard = sign_ste(soft)
        if not self.training:
            return hard
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        if take_hard is None:
            take_hard = torch.rand(soft.shape, device=soft.device) < beta
        return torch.where(take_hard, hard, soft)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        mask = None
        if self.training and self.shared_mask:
            mask = torch.rand((*user_idx.shape, self.bits), device=user_idx.device) < beta
        return (self.encode("user", user_idx, beta, mask) * self.encode("item", item_idx, beta, mask)).sum(-1)

    @torch.no_grad()
    def codes(self, side: Side) -> torch.Tensor:
        """±1 float32 codes of every user or item, computed in float32 (half precision can flip signs near 0)."""
        table, hashing = self._side(side)
        w, b = hashing.linear.weight.float(), hashing.linear.bias.float()
        soft = torch.tanh(torch.nn.functional.linear(table.weight.float(), w, b))
        return torch.where(soft >= 0, 1.0, -1.0).to(torch.float32)


class MatrixFactorization(nn.Module):
    """Continuous MF baseline (no biases): logit = <e_u, e_i>. `beta` is accepted and ignored."""

    def __init__(self, n_users: int, n_items: int, dim: int = 32):
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.user_embedding = _embedding(n_users, dim)
        self.item_embedding = _embedding(n_items, dim)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        return (self.user_embedding(user_idx) * self.item_embedding(item_idx)).sum(-1)

    @torch.no_grad()
    def embeddings(self, side: Side) -> torch.Tensor:
        """float32 embeddings of every user or item."""
        if side == "user":
            return self.user_embedding.weight.detach().float()
        if side == "item":
            return self.item_embedding.weight.detach().float()
        raise ValueError(f"side must be 'user' or 'item', got {side!r}")

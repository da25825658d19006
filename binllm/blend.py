"""A post-hoc blend of methods' logits: logistic regression on validation rows (Newton / IRLS, numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

L2 = 1e-3


@dataclass(frozen=True)
class Blend:
    """logit = ((features - mean) / std) @ weights + bias; `names`: one per feature column."""
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    names: tuple[str, ...]

    def logits(self, features) -> np.ndarray:
        """The blended logit of each row, float32 (a row with a NaN feature gets NaN)."""
        x = _as_matrix(features)
        if x.shape[1] != len(self.weights):
            raise ValueError(f"blend: features have {x.shape[1]} columns, the blend was fitted on "
                             f"{len(self.weights)} ({', '.join(self.names)})")
        return (((x - self.mean) / self.std) @ self.weights + self.bias).astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-able fields (lists and floats)."""
        return {"weights": self.weights.tolist(), "bias": float(self.bias), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: dict) -> Blend:
        """The blend `to_dict` wrote."""
        weights, mean, std = (np.asarray(data[k], dtype=np.float64) for k in ("weights", "mean", "std"))
        names = tuple(data["names"])
        if not (weights.ndim == 1 and weights.shape == mean.shape == std.shape and len(names) == len(weights)):
            raise ValueError(f"blend: weights, mean, std and names must have one entry per feature, got "
                             f"{weights.shape}, {mean.shape}, {std.shape} and {len(names)}")
        if (std <= 0).any() or not np.isfinite(np.concatenate([weights, mean, std, [data["bias"]]])).all():
            raise ValueError("blend: std must be > 0 and every number finite")
        return cls(weights, float(data["bias"]), mean, std, names)


def _as_matrix(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"blend: features must be [rows, features], got shape {x.shape}")
    return x


def _objective(z: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> float:
    """Mean log loss of logits z plus l2/2 * |weights|^2 (the intercept, w[0], is not penalised)."""
    return float(np.mean(np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))) + 0.5 * l2 * (w[1:] @ w[1:]))


def fit_blend(features, labels, names: Sequence[str] | None = None, l2: float = L2, max_iter: int = 100,
              tol: float = 1e-10) -> Blend:
    """Logistic regression of `labels` (0/1) on `features` [rows, k] (a 1-D array is one feature), each
    column standardised with its mean and std over these rows (std 1 for a constant column), an intercept,
    and an L2 penalty `l2` on the weights; Newton steps (halved while the objective rises) until a step's
    largest change is below `tol`."""
    x = _as_matrix(features)
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"blend: {len(x)} feature rows but labels of shape {y.shape}")
    if len(y) == 0:
        raise ValueError("blend: no rows to fit on")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("blend: labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError(f"blend: labels have one class only (all {int(y[0])}); a blend needs both")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"blend: features have {bad} NaN or infinite values")
    names = tuple(names) if names is not None else tuple(f"x{j}" for j in range(x.shape[1]))
    if len(names) != x.shape[1]:
        raise ValueError(f"blend: {len(names)} names for {x.shape[1]} feature columns")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    design = np.hstack([np.ones((len(x), 1)), (x - mean) / std])
    penalty = np.diag(np.r_[0.0, np.full(x.shape[1], l2)])
    w = np.zeros(design.shape[1])
    loss = _objective(design @ w, y, w, l2)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) / len(y) + penalty @ w
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + penalty
        step = np.linalg.solve(hessian + 1e-12 * np.eye(len(w)), grad)
        scale = 1.0
        while scale > 1e-6:
            candidate = w - scale * step
            new_loss = _objective(design @ candidate, y, candidate, l2)
            if new_loss <= loss:
                break
            scale /= 2
        else:
            break
        w, loss = candidate, new_loss
        if np.max(np.abs(scale * step)) < tol:
            break
    return Blend(w[1:].copy(), float(w[0]), mean, std, names)

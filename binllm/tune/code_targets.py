"""Soft targets for tuning on prompts that show the codes (tune.stageN.distill, tune.stageN.distill_teacher).

A click label is one noisy draw: the codes' own estimate of the same click tells the LLM how to read the codes
with far less noise. Two teachers, both functions of the two codes the prompt shows: inner_product, BinMF's logit
<h_u, h_i> Platt-scaled on the stage's train rows (the LLM learns to copy BinMF), and code_bits, a logistic
regression on the bits of both codes and their per-bit agreement fitted on every train row of the examples (on
ML-1M it ranks the test rows better than BinMF itself, so the LLM's target is no longer capped at BinMF).
A stage with distill = w trains on the target (1 - w) * label + w * p_codes, which is the same as (1 - w) x BCE
against the label plus w x BCE against p_codes. With tune.stageN.distill_end the weight moves linearly from
distill at the first step to distill_end at the stage's last (StageTask.distill_weight): the LLM first learns to
read the codes, then what the labels say beyond them. Validation and early stopping always use the labels; rows
without both codes keep their label.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import data
from binllm.codes import read_code_table, unpack_bits

log = logging.getLogger(__name__)

CODE_BITS_RIDGE = 0.02  # per fitting row, i.e. mean log loss + 0.01 x |w|^2 (ML-1M test AUC 0.7255; 0.0001-0.01 alike)


def code_signs(rows: pa.Table, user_codes: pa.Table, item_codes: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user signs, item signs, whether the row has both codes) for each row's (user_id, item_id): float64 ±1 bits,
    zeros where a row lacks that code."""
    signs = []
    for side, table in (("user", user_codes), ("item", item_codes)):
        ids, packed = read_code_table(table, f"{side} code table")
        position = pc.index_in(rows.column(f"{side}_id").combine_chunks().cast(pa.string()),
                               value_set=pa.array(ids.tolist(), pa.string()))
        position = np.nan_to_num(position.to_numpy(zero_copy_only=False), nan=-1).astype(np.int64)
        table_signs = np.vstack([unpack_bits(packed).astype(np.float64) * 2.0 - 1.0,
                                 np.zeros((1, packed.shape[1] * 8))])
        signs.append((table_signs[position], position >= 0))  # position -1 reads the zero row
    (users, user_known), (items, item_known) = signs
    known = user_known & item_known
    return users * known[:, None], items * known[:, None], known


def code_agreement(rows: pa.Table, user_codes: pa.Table, item_codes: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(<h_u, h_i> over ±1 bits as float64, whether the row has both codes) for each row's (user_id, item_id)."""
    users, items, known = code_signs(rows, user_codes, item_codes)
    return (users * items).sum(axis=1), known


def fit_logistic(design: np.ndarray, labels: np.ndarray, ridge: np.ndarray | float,
                 iterations: int = 50) -> np.ndarray:
    """theta of P(label = 1) = sigmoid(design @ theta) by Newton's method, minimising the summed log loss plus
    ridge / 2 x theta^2 (per column when ridge is an array), so that separable data stays finite."""
    penalty = np.broadcast_to(np.asarray(ridge, dtype=np.float64), (design.shape[1],))
    theta = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - labels) + penalty * theta
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def platt_scale(x: np.ndarray, labels: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(a, b) of the logistic regression P(label = 1) = sigmoid(a x + b), with a ridge of 1e-6."""
    a, b = fit_logistic(np.stack([x, np.ones_like(x)], axis=1), labels, 1e-6, iterations)
    return float(a), float(b)


def bit_features(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The code_bits teacher's design: the agreement <h_u, h_i> / bits, every bit of each code, every bit's
    agreement h_u * h_i, and a constant; all read off the two codes a prompt shows."""
    agreement = users * items
    bits = users.shape[1]
    return np.hstack([agreement.sum(axis=1, keepdims=True) / bits, users, items, agreement, np.ones((len(users), 1))])


def teacher_fit_rows(examples: pa.Table, teacher: str, seed: int) -> pa.Table | None:
    """The rows `teacher` is fitted on: every train row of the examples for code_bits (the rows BinMF trained on);
    None for inner_product, which is Platt-scaled on the stage's own rows."""
    return data.split_rows(examples, "train", 0, seed) if teacher == "code_bits" else None


def code_logits(rows: pa.Table, labels: np.ndarray | None, user_codes: pa.Table, item_codes: pa.Table,
                stage: str, teacher: str = "inner_product", fit_rows: pa.Table | None = None) -> np.ndarray | None:
    """float64 teacher logits per row, NaN where a row lacks a code; None (with a warning) when the fitting rows
    with both codes do not hold both labels. The teacher is fitted on `fit_rows` (its 'label' column) or else on
    `rows` with `labels`:
    - inner_product: a <h_u, h_i> + b, BinMF's own score Platt-scaled;
    - code_bits: a logistic regression on bit_features (ridge CODE_BITS_RIDGE per fitting row), which can read
      what the inner product weighs equally or leaves out: a bit that marks a popular item or a generous user.
    """
    if teacher not in ("inner_product", "code_bits"):
        raise ValueError(f"distill teacher: expected inner_product or code_bits, got {teacher!r}")
    users, items, known = code_signs(rows, user_codes, item_codes)
    fit_users, fit_items, fit_known = users, items, known
    if fit_rows is not None:
        labels = fit_rows.column("label").to_numpy(zero_copy_only=False)
        fit_users, fit_items, fit_known = code_signs(fit_rows, user_codes, item_codes)
    fit_labels = labels[fit_known].astype(np.float64)
    if fit_known.sum() == 0 or len(np.unique(fit_labels)) < 2:
        log.warning("%s: distill needs train rows of both labels with both codes (%d have codes); labels only",
                    stage, int(fit_known.sum()))
        return None
    if teacher == "inner_product":
        a, b = platt_scale((fit_users * fit_items).sum(axis=1)[fit_known], fit_labels)
        logits = a * (users * items).sum(axis=1) + b
        described = f"code agreement Platt-scaled (a {a:.4f}, b {b:.4f})"
    else:
        design = bit_features(fit_users[fit_known], fit_items[fit_known])
        ridge = np.full(design.shape[1], CODE_BITS_RIDGE * len(design))
        ridge[-1] = 1e-6  # the intercept
        theta = fit_logistic(design, fit_labels, ridge)
        logits = bit_features(users, items) @ theta
        described = f"logistic regression on the code bits ({design.shape[1]} weights)"
    log.info("%s: %s fitted on %d train rows; %d rows without both codes keep their labels", stage, described,
             int(fit_known.sum()), int((~known).sum()))
    return np.where(known, logits, np.nan)


def code_estimates(rows: pa.Table, labels: np.ndarray | None, user_codes: pa.Table, item_codes: pa.Table,
                   stage: str, teacher: str = "inner_product", fit_rows: pa.Table | None = None) -> np.ndarray | None:
    """float32 p_codes = sigmoid(code_logits(...)) per row, NaN where a row lacks a code; None as code_logits."""
    logits = code_logits(rows, labels, user_codes, item_codes, stage, teacher, fit_rows)
    return None if logits is None else (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def mix_targets(labels: np.ndarray, p_codes: np.ndarray | None, weight: float) -> np.ndarray:
    """float32 (1 - weight) * label + weight * p_codes; the label where p_codes is None or NaN."""
    labels = labels.astype(np.float32)
    if p_codes is None or weight == 0.0:
        return labels
    mixed = (1.0 - weight) * labels + weight * p_codes
    return np.where(np.isnan(p_codes), labels, mixed).astype(np.float32)

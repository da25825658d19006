"""Soft targets for tuning on prompts that show the codes (tune.stageN.distill).

A click label is one noisy draw: the codes' own estimate of the same click (BinMF's logit, the agreement
<h_u, h_i> of the two codes the prompt shows, Platt-scaled on the stage's train rows) tells the LLM how to read
the codes with far less noise. A stage with distill = w trains on the target (1 - w) * label + w * p_codes, which
is the same as (1 - w) x BCE against the label plus w x BCE against p_codes. With tune.stageN.distill_end the
weight moves linearly from distill at the first step to distill_end at the stage's last (StageTask.distill_weight):
the LLM first learns to read the codes, then what the labels say beyond them. Validation and early stopping
always use the labels; rows without both codes keep their label.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm.codes import read_code_table, unpack_bits

log = logging.getLogger(__name__)


def code_agreement(rows: pa.Table, user_codes: pa.Table, item_codes: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(<h_u, h_i> over ±1 bits as float64, whether the row has both codes) for each row's (user_id, item_id)."""
    dots = np.zeros(rows.num_rows, dtype=np.float64)
    signs, positions = [], []
    for side, table in (("user", user_codes), ("item", item_codes)):
        ids, packed = read_code_table(table, f"{side} code table")
        position = pc.index_in(rows.column(f"{side}_id").combine_chunks().cast(pa.string()),
                               value_set=pa.array(ids.tolist(), pa.string()))
        positions.append(position.to_numpy(zero_copy_only=False))
        signs.append(unpack_bits(packed).astype(np.float64) * 2.0 - 1.0)
    user_pos, item_pos = (np.nan_to_num(p, nan=-1).astype(np.int64) for p in positions)
    known = (user_pos >= 0) & (item_pos >= 0)
    dots[known] = (signs[0][user_pos[known]] * signs[1][item_pos[known]]).sum(axis=1)
    return dots, known


def platt_scale(x: np.ndarray, labels: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(a, b) of the logistic regression P(label = 1) = sigmoid(a x + b), by Newton's method with a small ridge
    so that separable data stays finite."""
    design = np.stack([x, np.ones_like(x)], axis=1)
    theta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - labels) + 1e-6 * theta
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + 1e-6 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def code_estimates(rows: pa.Table, labels: np.ndarray, user_codes: pa.Table, item_codes: pa.Table,
                   stage: str) -> np.ndarray | None:
    """float32 p_codes = sigmoid(a <h_u, h_i> + b) per row, Platt-fitted on `rows` and `labels`; NaN where a row
    lacks a code. None (with a warning) when the rows with both codes do not hold both labels."""
    dots, known = code_agreement(rows, user_codes, item_codes)
    if known.sum() == 0 or len(np.unique(labels[known])) < 2:
        log.warning("%s: distill needs train rows of both labels with both codes (%d have codes); labels only",
                    stage, int(known.sum()))
        return None
    a, b = platt_scale(dots[known], labels[known].astype(np.float64))
    p_codes = np.where(known, 1.0 / (1.0 + np.exp(-(a * dots + b))), np.nan)
    log.info("%s: code agreement Platt-scaled on %d train rows (a %.4f, b %.4f); %d rows without both codes keep "
             "their labels", stage, int(known.sum()), a, b, int((~known).sum()))
    return p_codes.astype(np.float32)


def mix_targets(labels: np.ndarray, p_codes: np.ndarray | None, weight: float) -> np.ndarray:
    """float32 (1 - weight) * label + weight * p_codes; the label where p_codes is None or NaN."""
    labels = labels.astype(np.float32)
    if p_codes is None or weight == 0.0:
        return labels
    mixed = (1.0 - weight) * labels + weight * p_codes
    return np.where(np.isnan(p_codes), labels, mixed).astype(np.float32)

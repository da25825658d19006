"""Soft targets for tuning on prompts that show the codes (tune.stageN.distill).

A click label is one noisy draw: the codes' own estimate of the same click (BinMF's logit, the agreement
<h_u, h_i> of the two codes the prompt shows, Platt-scaled on the stage's train rows) tells the LLM how to read
the codes with far less noise. A stage with distill = w trains on the target (1 - w) * label + w * p_codes, which
is the same as (1 - w) x BCE against the label plus w x BCE against p_codes. Validation and early stopping
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


def distill_targets(rows: pa.Table, labels: np.ndarray, user_codes: pa.Table, item_codes: pa.Table,
                    weight: float, stage: str) -> np.ndarray:
    """float32 targets (1 - weight) * label + weight * p_codes for `rows` (label where a code is missing)."""
    dots, known = code_agreement(rows, user_codes, item_codes)
    if known.sum() == 0 or len(np.unique(labels[known])) < 2:
        log.warning("%s: distill needs train rows of both labels with both codes (%d have codes); labels only",
                    stage, int(known.sum()))
        return labels.astype(np.float32)
    a, b = platt_scale(dots[known], labels[known].astype(np.float64))
    p_codes = 1.0 / (1.0 + np.exp(-(a * dots + b)))
    targets = np.where(known, (1.0 - weight) * labels + weight * p_codes, labels)
    log.info("%s: distill %.2f: code agreement Platt-scaled on %d train rows (a %.4f, b %.4f); %d rows without "
             "both codes keep their labels", stage, weight, int(known.sum()), a, b, int((~known).sum()))
    return targets.astype(np.float32)

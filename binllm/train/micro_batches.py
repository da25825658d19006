"""Micro-batch plans for training: which rows each optimizer micro-batch of a rank holds, epoch by epoch.

Plans are seeded by (seed, epoch) and the same on every rank, so ranks take equal shares and their
collectives line up; within windows of BUCKET_MICRO_BATCHES micro-batches rows are sorted by length (little
padding) and the micro-batch order is shuffled again. Three planners: by rows, by a token budget, and by
prefix groups for shared-prefix training. `stage_steps` counts a stage's optimizer steps from the same plans.
"""
from __future__ import annotations

import numpy as np

from binllm.config import StageConfig
from binllm.data.schema import DataError
from binllm.llm.batching import length_buckets
from binllm.train.backend import Backend

BUCKET_MICRO_BATCHES = 16  # micro-batches per length-sorting window: less padding, still shuffled


def train_micro_batches(lengths: np.ndarray, backend: Backend, micro_batch_size: int, grad_accum: int,
                        seed: int, epoch: int, *, micro_batch_tokens: int = 0) -> list[np.ndarray]:
    """This rank's micro-batches (row indices) for `epoch`: the same on every call with the same arguments.

    All ranks shuffle the rows with the same seed and take their share (equal counts, so steps match);
    windows of BUCKET_MICRO_BATCHES micro-batches are sorted by length, so a micro-batch holds prompts
    of similar length (little padding), and the micro-batch order is shuffled again. The tail that does
    not fill a whole accumulation group is dropped, so every optimizer step sees grad_accum micro-batches.

    micro_batch_tokens > 0 sizes micro-batches by tokens instead of rows: as many rows as keep
    rows x longest row within the budget (see `token_budget_micro_batches`).
    """
    if micro_batch_tokens > 0:
        return token_budget_micro_batches(lengths, micro_batch_tokens, grad_accum, seed, epoch,
                                          rank=backend.rank, world_size=backend.world_size)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))[backend.shard_indices(len(lengths), even=True)]
    window = micro_batch_size * BUCKET_MICRO_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches[: len(batches) // grad_accum * grad_accum]


def token_budget_micro_batches(lengths: np.ndarray, micro_batch_tokens: int, grad_accum: int, seed: int,
                               epoch: int, *, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Micro-batches of rows x longest row <= micro_batch_tokens (a longer row gets one of its own).

    Every rank plans all rows the same way (same seed), windows of about BUCKET_MICRO_BATCHES budgets of
    shuffled rows are cut by `length_buckets` (length-sorted), the batches are shuffled, whole groups of
    world_size x grad_accum are kept, and rank r takes every world_size-th batch from r: the ranks run
    the same number of micro-batches per step, so their collectives line up.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window_tokens = micro_batch_tokens * BUCKET_MICRO_BATCHES
    batches: list[np.ndarray] = []
    start = 0
    cumulative = np.cumsum(lengths[order])
    while start < len(order):
        done = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, done + window_tokens, side="right")))
        chunk = order[start:stop]
        batches.extend(chunk[rows] for rows in length_buckets(lengths[chunk], micro_batch_tokens))
        start = stop
    return _deal(batches, rng, grad_accum, rank, world_size)


def _deal(batches: list[np.ndarray], rng: np.random.Generator, grad_accum: int, rank: int,
          world_size: int) -> list[np.ndarray]:
    """The batches shuffled, whole groups of world_size x grad_accum kept, and rank r's share: every
    world_size-th batch from r (the ranks run the same number of micro-batches per step)."""
    batches = [batches[i] for i in rng.permutation(len(batches))]
    group = world_size * grad_accum
    batches = batches[: len(batches) // group * group]
    return batches[rank::world_size]


def shared_prefix_micro_batches(prefix_of_row: np.ndarray, prefix_lengths: np.ndarray, lengths: np.ndarray,
                                grad_accum: int, seed: int, epoch: int, *, micro_batch_size: int = 0,
                                micro_batch_tokens: int = 0, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Micro-batches (row indices) that keep the rows of one prefix together, for shared-prefix training.

    A micro-batch costs what the shared-prefix forward computes: its distinct prefixes x the longest of
    them, plus its rows x the longest suffix (suffix = lengths - prefix_lengths). micro_batch_tokens > 0
    caps that cost; otherwise micro_batch_size caps the rows. The prefix groups, and the rows within each,
    are shuffled with (seed, epoch); windows of about BUCKET_MICRO_BATCHES micro-batches of groups are
    sorted by prefix length and cut greedily (a group over the cap alone is cut into pieces that fit, each
    running the prefix). Then as in token_budget_micro_batches: batches shuffled, whole groups of
    world_size x grad_accum kept, rank r takes every world_size-th batch from r.
    """
    cost = _PrefixBatchCost(micro_batch_tokens if micro_batch_tokens > 0 else micro_batch_size, micro_batch_tokens > 0)
    if cost.cap < 1:
        raise ValueError(f"shared-prefix micro-batches need micro_batch_tokens or micro_batch_size >= 1, got "
                         f"{micro_batch_tokens} and {micro_batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = order[np.argsort(prefix_of_row[order], kind="stable")]
    groups = np.split(order, np.flatnonzero(np.diff(prefix_of_row[order])) + 1) if len(order) else []
    groups = [groups[i] for i in rng.permutation(len(groups))]
    suffix_lengths = lengths - prefix_lengths
    shapes = [(int(prefix_lengths[g[0]]), int(suffix_lengths[g].max())) for g in groups]
    batches: list[np.ndarray] = []
    start = 0
    while start < len(groups):
        stop, window = start, 0
        while stop < len(groups) and window < cost.cap * BUCKET_MICRO_BATCHES:
            window += cost(1, shapes[stop][0], len(groups[stop]), shapes[stop][1])
            stop += 1
        batches.extend(_pack_prefix_groups(groups[start:stop], shapes[start:stop], cost))
        start = stop
    return _deal(batches, rng, grad_accum, rank, world_size)


class _PrefixBatchCost:
    """What a shared-prefix micro-batch costs against its cap: tokens computed, or rows."""

    def __init__(self, cap: int, by_tokens: bool):
        self.cap, self.by_tokens = cap, by_tokens

    def __call__(self, prefixes: int, longest_prefix: int, rows: int, longest_suffix: int) -> int:
        return prefixes * longest_prefix + rows * longest_suffix if self.by_tokens else rows


def _pack_prefix_groups(groups: list[np.ndarray], shapes: list[tuple[int, int]],
                        cost: _PrefixBatchCost) -> list[np.ndarray]:
    """One window's prefix groups, longest prefix first, packed greedily into micro-batches within the cap."""
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    prefixes = longest_prefix = rows = longest_suffix = 0
    for k in sorted(range(len(groups)), key=lambda k: -shapes[k][0]):
        group, (prefix, suffix) = groups[k], shapes[k]
        if current and cost(prefixes + 1, max(longest_prefix, prefix), rows + len(group),
                            max(longest_suffix, suffix)) > cost.cap:
            batches.append(np.concatenate(current))
            current, prefixes, longest_prefix, rows, longest_suffix = [], 0, 0, 0, 0
        if cost(1, prefix, len(group), suffix) > cost.cap:
            piece = max(1, (cost.cap - prefix) // max(suffix, 1)) if cost.by_tokens else cost.cap
            batches.extend(group[i:i + piece] for i in range(0, len(group), piece))
            continue
        current.append(group)
        prefixes, longest_prefix = prefixes + 1, max(longest_prefix, prefix)
        rows, longest_suffix = rows + len(group), max(longest_suffix, suffix)
    if current:
        batches.append(np.concatenate(current))
    return batches


def stage_steps(n_rows: int, world_size: int, settings: StageConfig,
                lengths: np.ndarray | None = None, seed: int = 0,
                prefixes: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps of the stage). Token-budget stages count the
    micro-batches of each epoch's plan (`lengths`: the training rows' token counts); so do shared-prefix
    stages (`prefixes`: the rows' prefix_of_row and prefix_lengths, see shared_prefix_micro_batches)."""
    if settings.micro_batch_tokens > 0 or prefixes is not None:
        if lengths is None:
            raise ValueError("stage_steps: token-budget and shared-prefix micro-batches need the rows' lengths")

        def plan(epoch: int) -> list[np.ndarray]:
            if prefixes is not None:
                return shared_prefix_micro_batches(
                    *prefixes, lengths, settings.grad_accum, seed, epoch, micro_batch_size=settings.micro_batch_size,
                    micro_batch_tokens=settings.micro_batch_tokens, world_size=world_size)
            return token_budget_micro_batches(lengths, settings.micro_batch_tokens, settings.grad_accum, seed, epoch,
                                              world_size=world_size)

        counts = [len(plan(epoch)) // settings.grad_accum for epoch in range(settings.epochs)]
        if counts[0] == 0:
            size = (f"micro_batch_tokens={settings.micro_batch_tokens}" if settings.micro_batch_tokens > 0
                    else f"micro_batch_size={settings.micro_batch_size}")
            what = "shared-prefix micro-batches of " if prefixes is not None else ""
            raise DataError(f"{n_rows} training rows make no optimizer step with {what}{size}, grad_accum="
                             f"{settings.grad_accum} on {world_size} rank(s); lower them or add rows")
        total = sum(counts)
        return counts[0], min(total, settings.max_steps) if settings.max_steps else total
    per_rank = -(-n_rows // world_size)
    per_epoch = -(-per_rank // settings.micro_batch_size) // settings.grad_accum
    if per_epoch == 0:
        raise DataError(
            f"{per_rank} training rows per rank make no optimizer step with micro_batch_size="
            f"{settings.micro_batch_size} and grad_accum={settings.grad_accum}; lower them or add rows")
    total = per_epoch * settings.epochs
    return per_epoch, min(total, settings.max_steps) if settings.max_steps else total

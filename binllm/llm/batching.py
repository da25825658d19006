"""Planning forward batches under a token budget: length buckets for whole prompts, and the
user-group / packed-row layout of shared-prefix scoring."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def length_buckets(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length with rows x longest <= max_batch_tokens
    (a single sequence longer than the budget gets a batch of its own)."""
    order = np.argsort(lengths, kind="stable")[::-1]
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, max_batch_tokens // max(longest, 1))
        batches.append(order[start : start + rows])
        start += rows
    return batches


@dataclass(frozen=True)
class PackedRow:
    """Candidates of one user whose suffixes are laid side by side in one sequence after the prefix."""

    user: int  # index into the prefix table
    pairs: np.ndarray  # pair indices, in packing order

    def width(self, suffix_lengths: np.ndarray) -> int:
        return int(suffix_lengths[self.pairs].sum())


@dataclass(frozen=True)
class PrefixGroup:
    """Users whose prefixes run through the model together once, and the packed rows that reuse them."""

    users: np.ndarray  # indices into the prefix table; row g of the prefix batch is users[g]
    row_batches: list[list[PackedRow]]


def _pack_user_rows(user: int, pairs: np.ndarray, suffix_lengths: np.ndarray, max_row_tokens: int) -> list[PackedRow]:
    rows, current, width = [], [], 0
    for pair in pairs.tolist():
        length = int(suffix_lengths[pair])
        if current and width + length > max_row_tokens:
            rows.append(PackedRow(user, np.asarray(current, dtype=np.int64)))
            current, width = [], 0
        current.append(pair)
        width += length
    rows.append(PackedRow(user, np.asarray(current, dtype=np.int64)))
    return rows


def _batch_rows(rows: list[PackedRow], suffix_lengths: np.ndarray, max_batch_tokens: int) -> list[list[PackedRow]]:
    widths = np.asarray([row.width(suffix_lengths) for row in rows])
    return [[rows[i] for i in batch.tolist()] for batch in length_buckets(widths, max_batch_tokens)]


def plan_shared_prefix(
    prefix_lengths: np.ndarray,
    suffix_lengths: np.ndarray,
    pair_prefix: np.ndarray,
    *,
    max_batch_tokens: int,
    max_row_tokens: int,
) -> list[PrefixGroup]:
    """Group users by prefix length into prefix batches (users x longest prefix <= max_batch_tokens);
    split each user's candidates into packed rows of at most max_row_tokens suffix tokens (a row
    holds at least one candidate); batch each group's rows (rows x widest row <= max_batch_tokens)."""
    pairs_by_user = np.argsort(pair_prefix, kind="stable")
    boundaries = np.searchsorted(pair_prefix[pairs_by_user], np.arange(len(prefix_lengths) + 1))
    users = np.flatnonzero(np.diff(boundaries) > 0)
    users = users[np.argsort(prefix_lengths[users], kind="stable")[::-1]]

    groups: list[PrefixGroup] = []
    start = 0
    while start < len(users):
        longest = int(prefix_lengths[users[start]])
        count = max(1, max_batch_tokens // max(longest, 1))
        group_users = users[start : start + count]
        rows = [
            row
            for user in group_users.tolist()
            for row in _pack_user_rows(
                user, pairs_by_user[boundaries[user] : boundaries[user + 1]], suffix_lengths, max_row_tokens
            )
        ]
        groups.append(PrefixGroup(group_users, _batch_rows(rows, suffix_lengths, max_batch_tokens)))
        start += count
    return groups

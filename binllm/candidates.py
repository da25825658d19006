"""Top-K candidate items per user by Hamming distance between packed binary codes.

Codes are packed bits (uint8, MSB first, as `binllm.codes.pack_bits` writes them). Distances are XOR +
popcount over 32-bit words, a block of users against every item at once, so memory stays at about
`chunk_users * n_items` bytes. Ties are broken by item index, so the result is deterministic.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

_EXCLUDED = np.uint8(255)  # distance given to seen items; codes longer than 254 bits are refused


def packed_words(packed: np.ndarray) -> np.ndarray:
    """(n, bytes) packed uint8 codes -> (n, words) uint32, zero-padded to a whole number of words."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2:
        raise ValueError(f"packed codes: expected a 2-d uint8 array (n, bytes), got shape {packed.shape}")
    if packed.shape[1] * 8 > 254:
        raise ValueError(f"packed codes: at most 254 bits supported, got {packed.shape[1] * 8}")
    pad = (-packed.shape[1]) % 4
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return packed.view(">u4").astype(np.uint32)


def hamming_matrix(user_words: np.ndarray, item_words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(n_users, n_items) uint8 Hamming distances between word-packed codes (written into `out` if given)."""
    shape = (user_words.shape[0], item_words.shape[0])
    dist = np.empty(shape, np.uint8) if out is None else out
    xor = np.empty(shape, np.uint32)
    for w in range(user_words.shape[1]):
        np.bitwise_xor(user_words[:, None, w], item_words[None, :, w], out=xor)
        if w == 0:
            np.bitwise_count(xor, out=dist)
        else:
            dist += np.bitwise_count(xor)
    return dist


@dataclass(frozen=True)
class SeenItems:
    """CSR of the items each user interacted with: items of user u are indices[indptr[u]:indptr[u+1]]."""

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_pairs(cls, user_index: np.ndarray, item_index: np.ndarray, n_users: int) -> "SeenItems":
        user_index = np.asarray(user_index, dtype=np.int64)
        item_index = np.asarray(item_index, dtype=np.int64)
        order = np.argsort(user_index, kind="stable")
        counts = np.bincount(user_index, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, item_index[order])

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "SeenItems":
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = [i for x in lists for i in x]
        return cls(indptr, np.asarray(flat, dtype=np.int64))


def _nearest(dist: np.ndarray, threshold: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the kk nearest unseen items among those with distance <= threshold[row], ordered by
    (distance, item index). Also returns how many qualified per row (< kk means the threshold was too low)."""
    n_rows, n_items = dist.shape
    flat = np.flatnonzero((dist <= threshold) & (dist != _EXCLUDED))
    rows, cols = np.divmod(flat, n_items)
    d = dist.ravel()[flat]
    order = np.lexsort((cols, d, rows))
    rows, cols, d = rows[order], cols[order], d[order]
    row_start = np.searchsorted(rows, np.arange(n_rows))
    keep = np.arange(rows.size) - row_start[rows] < kk
    return rows[keep], cols[keep], d[keep], np.bincount(rows, minlength=n_rows)


def _top_k_block(
    user_words: np.ndarray, item_words: np.ndarray, k: int, seen: SeenItems | None, first_user: int, hint: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n_rows, n_items = user_words.shape[0], item_words.shape[0]
    dist = hamming_matrix(user_words, item_words)
    if seen is not None:
        start, stop = seen.indptr[first_user], seen.indptr[first_user + n_rows]
        counts = np.diff(seen.indptr[first_user:first_user + n_rows + 1])
        dist[np.repeat(np.arange(n_rows), counts), seen.indices[start:stop]] = _EXCLUDED
    kk = min(k, n_items)
    if hint is not None:
        # Cheap path: one comparison against a distance that usually holds k items per row.
        rows, cols, d, qualified = _nearest(dist, np.uint8(hint), kk)
        short = np.flatnonzero(qualified < kk)
        if short.size:  # rows with fewer than kk unseen items in all are complete as they are
            unseen = n_items - np.count_nonzero(dist[short] == _EXCLUDED, axis=1)
            short = short[qualified[short] < np.minimum(kk, unseen)]
        if short.size == 0:
            return rows + first_user, cols, d, hint
        ok = ~np.isin(rows, short)
        rows, cols, d = rows[ok], cols[ok], d[ok]
    else:
        short = np.arange(n_rows)
    # Exact path for the remaining rows: the k-th smallest distance per row (a stable sort of uint8 is a
    # radix sort: linear, several times faster than np.partition); ties at it are taken by item index.
    sub = dist[short]
    kth = np.sort(sub, axis=1, kind="stable")[:, kk - 1 : kk]
    srows, scols, sd, _ = _nearest(sub, kth, kk)
    rows = np.concatenate([rows, short[srows]]) if hint is not None else short[srows]
    cols = np.concatenate([cols, scols]) if hint is not None else scols
    d = np.concatenate([d, sd]) if hint is not None else sd
    order = np.lexsort((cols, d, rows))
    valid = kth[kth != _EXCLUDED]
    new_hint = int(valid.max()) if valid.size else hint
    return rows[order] + first_user, cols[order], d[order], new_hint


def top_k_hamming(
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    k: int,
    seen: SeenItems | None = None,
    *,
    chunk_users: int | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k nearest items of every user by Hamming distance, seen items excluded.

    Returns (user_index int64, item_index int64, hamming uint8), sorted by user, then distance, then item
    index. A user with fewer than k unseen items gets them all. Work is split into blocks of users
    (about 4 MB of distances each), run on `num_threads` threads (numpy releases the GIL).
    """
    if k <= 0:
        raise ValueError(f"k: expected a positive number of candidates, got {k}")
    user_words, item_words = packed_words(user_codes), packed_words(item_codes)
    if user_words.shape[1] != item_words.shape[1]:
        raise ValueError(
            f"user codes have {user_codes.shape[1] * 8} bits, item codes {item_codes.shape[1] * 8}; they must match"
        )
    n_users, n_items = user_words.shape[0], item_words.shape[0]
    if seen is not None and seen.indptr.shape[0] != n_users + 1:
        raise ValueError(f"seen items: indptr has {seen.indptr.shape[0]} entries, expected n_users + 1 = {n_users + 1}")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8))
    if n_users == 0 or n_items == 0:
        return empty
    chunk = chunk_users or max(1, min(n_users, (4 << 20) // n_items))
    starts = range(0, n_users, chunk)
    threads = num_threads or min(os.cpu_count() or 1, len(starts))

    # The first block takes the exact path and yields a distance that usually holds k items per row; the
    # others try that distance first and fall back to the exact path for rows it does not cover.
    first = _top_k_block(user_words[:chunk], item_words, k, seen, 0, None)
    hint = first[3]

    def block(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        return _top_k_block(user_words[start:start + chunk], item_words, k, seen, start, hint)

    rest = starts[1:]
    if threads > 1 and len(rest) > 1:
        with ThreadPoolExecutor(threads) as pool:
            parts = [first, *pool.map(block, rest)]
    else:
        parts = [first, *(block(s) for s in rest)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def top_k_popular(ranked_items: np.ndarray, k: int, seen: SeenItems, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For users without a code: the k most popular items each has not seen. Returns (user_index, item_index)."""
    out_users, out_items = [], []
    for u in np.asarray(users, dtype=np.int64):
        own = seen.indices[seen.indptr[u]:seen.indptr[u + 1]]
        window = ranked_items[: k + own.size]  # k unseen items are among the first k + |seen|
        picked = window[~np.isin(window, own)][:k]
        out_users.append(np.full(picked.size, u, dtype=np.int64))
        out_items.append(picked.astype(np.int64))
    if not out_users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_users), np.concatenate(out_items)


def candidate_table(
    user_ids: np.ndarray, item_ids: np.ndarray, user_index: np.ndarray, item_index: np.ndarray, hamming: np.ndarray | None
) -> pa.Table:
    """Rows (user_id string, item_id string, hamming uint8 or null)."""
    ham = (
        pa.array(hamming, type=pa.uint8())
        if hamming is not None
        else pa.nulls(len(user_index), type=pa.uint8())
    )
    return pa.table(
        {
            "user_id": pa.array(np.asarray(user_ids, dtype=object)[user_index], type=pa.string()),
            "item_id": pa.array(np.asarray(item_ids, dtype=object)[item_index], type=pa.string()),
            "hamming": ham,
        }
    )

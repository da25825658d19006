"""Top-K by Hamming distance over packed codes: brute force agreement, seen items, ties, popularity."""
import numpy as np
import pyarrow as pa
import pytest

from binllm.candidates import SeenItems, candidate_table, packed_words, top_k_hamming, top_k_popular


def brute_force(users, items, k, seen_lists):
    ub, ib = np.unpackbits(users, axis=1), np.unpackbits(items, axis=1)
    out = []
    for u in range(len(users)):
        seen = set(seen_lists[u]) if seen_lists else set()
        ranked = sorted((int((ub[u] != ib[i]).sum()), i) for i in range(len(items)) if i not in seen)
        out += [(u, i, d) for d, i in ranked[:k]]
    return out


@pytest.mark.parametrize("seed,n_bytes,chunk", [(0, 4, 7), (1, 1, 1), (2, 8, 50), (3, 5, 13), (4, 4, None)])
def test_matches_brute_force_with_seen_items_and_ties(seed, n_bytes, chunk):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 256, (90, n_bytes), dtype=np.uint8)
    items = rng.integers(0, 256, (70, n_bytes), dtype=np.uint8)
    users[:20] = users[0]
    items[:25] = items[0]  # many equal distances: ties must go by item index
    k = int(rng.integers(1, 12))
    seen_lists = [rng.choice(70, rng.integers(0, 71 if u % 9 == 0 else 12), replace=False).tolist() for u in range(90)]
    got = top_k_hamming(users, items, k, SeenItems.from_lists(seen_lists), chunk_users=chunk, num_threads=2)
    rows = list(zip(*(a.tolist() for a in got)))
    assert rows == brute_force(users, items, k, seen_lists)
    for u, i, _ in rows:
        assert i not in seen_lists[u]


def test_user_who_saw_everything_gets_nothing_and_k_larger_than_catalog():
    items = np.arange(6, dtype=np.uint8).reshape(6, 1)
    users = np.array([[0], [255]], dtype=np.uint8)
    seen = SeenItems.from_pairs(np.array([0] * 6), np.arange(6), n_users=2)
    u, i, d = top_k_hamming(users, items, 10, seen)
    assert u.tolist() == [1] * 6 and i.tolist() == [3, 5, 1, 2, 4, 0] and d.tolist() == [6, 6, 7, 7, 7, 8]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="must match"):
        top_k_hamming(np.zeros((2, 4), np.uint8), np.zeros((2, 8), np.uint8), 1)
    with pytest.raises(ValueError, match="positive"):
        top_k_hamming(np.zeros((2, 4), np.uint8), np.zeros((2, 4), np.uint8), 0)
    assert packed_words(np.array([[1, 2, 3, 4, 5]], np.uint8)).tolist() == [[0x01020304, 0x05000000]]


def test_popular_fallback_skips_seen_items():
    ranked = np.array([4, 2, 0, 1, 3])
    seen = SeenItems.from_lists([[4, 2], [], [0, 1, 2, 3, 4]])
    u, i = top_k_popular(ranked, 2, seen, np.array([0, 1, 2]))
    assert list(zip(u.tolist(), i.tolist())) == [(0, 0), (0, 1), (1, 4), (1, 2)]
    table = candidate_table(np.array(["a", "b", "c"], object), np.array(["x0", "x1", "x2", "x3", "x4"], object), u, i, None)
    assert table.column("item_id").to_pylist() == ["x0", "x1", "x4", "x2"]
    assert table.schema.field("hamming").type == pa.uint8() and table.column("hamming").null_count == 4

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from binllm.codes import read_code_table, unpack_bits
from binllm.config import EncoderConfig
from binllm.encoder import (BinaryEncoder, MatrixFactorization, anneal_beta, export_codes, load_encoder,
                            read_code_tables, rows_auc, save_encoder, score_pairs, sign_ste, train_encoder,
                            write_code_tables)
from binllm.metrics import auc
from binllm.train.backend import LocalBackend
from synthetic import make_planted_examples


@pytest.fixture(scope="module")
def planted():
    examples, _ = make_planted_examples(200, 100, 20000, seed=0)
    return examples


@pytest.fixture(scope="module")
def binmf(planted):
    return train_encoder(planted, EncoderConfig(), kind="binary", seed=0)


@pytest.fixture(scope="module")
def mf(planted):
    return train_encoder(planted, EncoderConfig(), kind="mf", seed=0)


def split(examples, name):
    return examples.filter(pc.equal(examples.column("split"), name))


def split_auc(result, examples, name):
    rows = split(examples, name)
    scores = score_pairs(result, rows.column("user_id"), rows.column("item_id"))
    return auc(rows.column("label").to_numpy(), scores)


def test_sign_ste_forward_and_straight_through_gradient():
    x = torch.tensor([-2.0, -1e-8, -0.0, 0.0, 1e-8, 3.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    upstream = torch.tensor([0.3, -1.5, 2.0, 0.7, -0.1, 4.0])
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_annealing_extremes_are_exactly_soft_or_hard():
    torch.manual_seed(0)
    model = BinaryEncoder(5, 7, dim=8, bits=16).train()
    idx = torch.arange(5)
    soft = model.user_hash.soft(model.user_embedding(idx))
    hard = torch.where(soft >= 0, 1.0, -1.0)
    assert torch.equal(model.encode("user", idx, beta=1.0), hard)
    assert torch.equal(model.encode("user", idx, beta=0.0), soft)
    mixed = model.encode("user", idx, beta=0.5)
    is_hard, is_soft = mixed == hard, mixed == soft
    assert bool((is_hard | is_soft).all()) and 0 < int(is_hard.sum()) < mixed.numel()
    model.eval()
    assert torch.equal(model.encode("user", idx, beta=0.0), hard)  # evaluation ignores beta
    with pytest.raises(ValueError, match="beta"):
        model.train().encode("user", idx, beta=1.5)


def test_codes_are_float32_signs_matching_eval_forward():
    torch.manual_seed(1)
    model = BinaryEncoder(6, 9, dim=8, bits=16).eval()
    codes = model.codes("item")
    assert codes.dtype == torch.float32 and codes.shape == (9, 16)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes, model.encode("item", torch.arange(9)))
    logits = model(torch.tensor([0, 5]), torch.tensor([3, 8]))
    assert torch.equal(logits, (model.codes("user")[[0, 5]] * codes[[3, 8]]).sum(-1))


def test_anneal_beta_schedule():
    assert [anneal_beta(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert anneal_beta(0, 0) == 1.0


def test_binmf_and_mf_learn_planted_structure(binmf, mf, planted):
    for result in (binmf, mf):
        assert result.best_auc > 0.75
        assert split_auc(result, planted, "test") > 0.75
        assert rows_auc(result, split(planted, "test")) == pytest.approx(split_auc(result, planted, "test"), abs=1e-12)
    assert binmf.kind == "binary" and isinstance(binmf.model, BinaryEncoder)
    assert mf.kind == "mf" and isinstance(mf.model, MatrixFactorization)
    train_rows = split(planted, "train")
    assert sorted(binmf.user_ids) == sorted(set(train_rows.column("user_id").to_pylist()))
    assert sorted(binmf.item_ids) == sorted(set(train_rows.column("item_id").to_pylist()))


def test_early_stopping_and_best_state_restored(mf, binmf, planted):
    cfg = EncoderConfig()
    for result in (mf, binmf):
        aucs = [h["auc"] for h in result.history]
        assert result.stopped_early and result.epochs < cfg.max_epochs
        assert len(aucs) == result.epochs
        assert result.best_auc == max(aucs)
        # the best validation came exactly `patience` validations before the end
        assert aucs.index(result.best_auc) == len(aucs) - 1 - cfg.patience
        # the returned model is the best one, not the last one
        assert split_auc(result, planted, "valid") == pytest.approx(result.best_auc, abs=1e-9)


def test_unknown_ids_score_zero(binmf):
    user, item = binmf.user_ids[0], binmf.item_ids[0]
    scores = score_pairs(binmf, [user, "nobody", user], [item, item, "nothing"])
    assert scores.dtype == np.float32
    assert scores[1] == 0.0 and scores[2] == 0.0
    expected = (binmf.model.codes("user")[0] * binmf.model.codes("item")[0]).sum().item()
    assert scores[0] == expected
    with pytest.raises(ValueError, match="user ids"):
        score_pairs(binmf, [user], [item, item])


def test_code_tables_round_trip(binmf, tmp_path):
    users, items = export_codes(binmf)
    write_code_tables(users, items, tmp_path / "codes")
    users_back, items_back = read_code_tables(tmp_path / "codes")
    for table, ids, side in ((users_back, binmf.user_ids, "user"), (items_back, binmf.item_ids, "item")):
        read_ids, packed = read_code_table(table)
        assert list(read_ids) == list(ids)
        assert np.array_equal(unpack_bits(packed), (binmf.model.codes(side).numpy() > 0).astype(np.uint8))


def test_mf_has_no_codes(mf):
    with pytest.raises(TypeError, match="binary encoder"):
        export_codes(mf)


def test_save_load_gives_identical_scores(binmf, mf, planted, tmp_path):
    rows = split(planted, "test")
    for result in (binmf, mf):
        folder = tmp_path / result.kind
        save_encoder(result, folder)
        loaded = load_encoder(folder)
        assert loaded.kind == result.kind and loaded.config == result.config
        assert list(loaded.user_ids) == list(result.user_ids) and list(loaded.item_ids) == list(result.item_ids)
        before = score_pairs(result, rows.column("user_id"), rows.column("item_id"))
        after = score_pairs(loaded, rows.column("user_id"), rows.column("item_id"))
        assert np.array_equal(before, after)
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_encoder(tmp_path / "missing")


def test_deterministic_given_seed():
    examples, _ = make_planted_examples(60, 40, 3000, seed=3)
    cfg = EncoderConfig(max_epochs=4, batch_size=256)
    runs = [train_encoder(examples, cfg, seed=s) for s in (7, 7, 8)]
    first, again, other = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert runs[0].history == runs[1].history
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_bad_examples_raise_clear_errors(planted):
    with pytest.raises(ValueError, match="missing column.*'split'"):
        train_encoder(planted.drop_columns(["split"]), EncoderConfig())
    no_valid = planted.filter(pc.not_equal(planted.column("split"), "valid"))
    with pytest.raises(ValueError, match="split 'valid'"):
        train_encoder(no_valid, EncoderConfig())
    bad_labels = planted.set_column(2, "label", pa.array(np.full(planted.num_rows, 2, dtype=np.int8)))
    with pytest.raises(ValueError, match="'label'"):
        train_encoder(bad_labels, EncoderConfig())


class ThreadRankBackend(LocalBackend):
    """A rank of a world run in threads: rank 0's initial weights, averaged gradients, gathered arrays."""

    def __init__(self, rank, world_size, shared):
        super().__init__()
        self.rank, self.world_size, self.shared = rank, world_size, shared

    def _exchange(self, value):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        barrier.wait()
        slots[self.rank] = value
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def prepare(self, model, optimizer, scheduler):
        state = self._exchange({k: v.clone() for k, v in model.state_dict().items()})[0]
        model.load_state_dict(state)
        return super().prepare(model, optimizer, scheduler)

    def backward_step(self, loss):
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = self._exchange([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad.copy_(sum(g[i] for g in grads) / self.world_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def gather(self, arrays):
        parts = self._exchange({k: np.asarray(v) for k, v in arrays.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def test_two_ranks_train_one_model(planted):
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=60)}
    results, errors = [None, None], []

    def work(rank):
        try:
            results[rank] = train_encoder(planted, EncoderConfig(), backend=ThreadRankBackend(rank, 2, shared), seed=0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    a, b = results
    assert a.steps == b.steps and a.history == b.history
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert a.best_auc > 0.75
    assert split_auc(a, planted, "valid") == pytest.approx(a.best_auc, abs=1e-9)


def test_encoder_and_code_tables_on_s3(binmf, planted, s3_bucket):
    from binllm.storage import s3_filesystem

    save_encoder(binmf, f"{s3_bucket}/run/encoder")
    write_code_tables(*export_codes(binmf), f"{s3_bucket}/run/codes", filesystem=s3_filesystem())
    loaded = load_encoder(f"{s3_bucket}/run/encoder", filesystem=s3_filesystem())
    rows = split(planted, "test")
    assert np.array_equal(score_pairs(loaded, rows.column("user_id"), rows.column("item_id")),
                          score_pairs(binmf, rows.column("user_id"), rows.column("item_id")))
    users, items = read_code_tables(f"{s3_bucket}/run/codes")
    assert users.equals(export_codes(binmf)[0]) and items.equals(export_codes(binmf)[1])


def test_vocabulary_all_gives_every_id_a_code(planted):
    new = planted.slice(0, 1)
    for name, value in (("user_id", "u_new"), ("item_id", "i_new"), ("split", "valid")):
        new = new.set_column(new.schema.get_field_index(name), name, pa.array([value], new.schema.field(name).type))
    examples = pa.concat_tables([planted, new])
    train_users = set(split(examples, "train").column("user_id").to_pylist())
    all_users = set(examples.column("user_id").to_pylist())
    cfg = EncoderConfig(max_epochs=2, patience=5, vocabulary="all", shared_mask=True, anneal_epochs=2)
    result = train_encoder(examples, cfg, kind="binary", seed=0)
    users, items = export_codes(result)
    assert set(users.column("id").to_pylist()) == all_users != train_users
    assert set(items.column("id").to_pylist()) == set(examples.column("item_id").to_pylist())
    mf = train_encoder(examples, EncoderConfig(max_epochs=1, mf_dim=8), kind="mf", seed=0)
    assert mf.model.dim == 8


def test_shared_mask_draws_one_hard_soft_mask_for_both_sides():
    torch.manual_seed(0)
    model = BinaryEncoder(4, 4, dim=8, bits=16, shared_mask=True).train()
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 2, 1])
    torch.manual_seed(5)
    logits = model(users, items, beta=0.5)
    torch.manual_seed(5)
    mask = torch.rand((3, 16)) < 0.5
    expected = (model.encode("user", users, 0.5, mask) * model.encode("item", items, 0.5, mask)).sum(-1)
    torch.testing.assert_close(logits, expected)

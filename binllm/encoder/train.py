"""Encoder pretraining (BinMF or the MF baseline) on prepared examples, through the shared training loop.

Runs the same way in one process (LocalBackend) and in a Ray Train worker (the DeepSpeed backend):
every rank trains on its own shard of the shuffled train rows and validation gathers all ranks' scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from binllm.config import EncoderConfig
from binllm.data import split_rows
from binllm.data.schema import DataError
from binllm.encoder.model import BinaryEncoder, MatrixFactorization
from binllm.encoder.vocab import as_string_array, build_vocabulary, lookup
from binllm.metrics import auc
from binllm.train.backend import Backend, LocalBackend
from binllm.train.loop import LoopSettings, run_training

EncoderKind = Literal["binary", "mf"]
REQUIRED_COLUMNS = ("user_id", "item_id", "label", "split")
EVAL_CHUNK = 1 << 16


@dataclass
class EncoderResult:
    """A trained encoder. `model` holds the best state (by validation AUC), on CPU, in eval mode;
    user_ids[k] / item_ids[k] is the id of embedding row k."""

    model: BinaryEncoder | MatrixFactorization
    user_ids: np.ndarray
    item_ids: np.ndarray
    best_auc: float
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    stopped_early: bool = False
    kind: EncoderKind = "binary"
    config: EncoderConfig = field(default_factory=EncoderConfig)


def build_model(kind: EncoderKind, n_users: int, n_items: int, cfg: EncoderConfig) -> BinaryEncoder | MatrixFactorization:
    if kind == "binary":
        return BinaryEncoder(n_users, n_items, dim=cfg.dim, bits=cfg.bits, shared_mask=cfg.shared_mask)
    if kind == "mf":
        return MatrixFactorization(n_users, n_items, dim=cfg.mf_dim or cfg.dim)
    raise ValueError(f"encoder kind must be 'binary' or 'mf', got {kind!r}")


def anneal_beta(epoch: int, anneal_epochs: int) -> float:
    """Share of hard code elements in `epoch` (0-based): rises linearly and is 1 from epoch anneal_epochs - 1 on."""
    if anneal_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / anneal_epochs)


def _check_examples(examples: pa.Table) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in examples.column_names]
    if missing:
        raise DataError(f"examples: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    labels = examples.column("label")
    if labels.null_count or not pc.all(pc.is_in(labels, value_set=pa.array([0, 1], type=labels.type))).as_py():
        raise DataError("examples: column 'label' must hold 0/1 values without nulls")


def _labels(table: pa.Table) -> np.ndarray:
    return table.column("label").to_numpy().astype(np.float32)


def train_encoder(
    examples: pa.Table,
    cfg: EncoderConfig,
    *,
    kind: EncoderKind = "binary",
    backend: Backend | None = None,
    seed: int = 0,
) -> EncoderResult:
    """Trains BinMF (`kind="binary"`) or MF (`kind="mf"`) on the train split, early-stopping on validation AUC.

    The vocabularies are the users and items of the train split (cfg.vocabulary "train"), or of every
    split ("all", the official code: ids never seen in training get rows that only weight decay moves,
    so they still get a code). Validation AUC (the early-stopping
    signal) is taken over the valid rows whose user and item both have an embedding: rows of new users
    or items score a constant, which only adds noise. cfg.batch_size is the global batch: each of the
    backend's ranks takes ceil(batch_size / world_size) rows per step. MF uses cfg.mf_lr and
    cfg.mf_weight_decay, BinMF cfg.lr and cfg.weight_decay.
    """
    _check_examples(examples)
    backend = backend or LocalBackend()
    train, valid = split_rows(examples, "train"), split_rows(examples, "valid")
    if train.num_rows == 0:
        raise DataError("examples: split 'train' has no rows")
    valid_labels = _labels(valid)
    if valid.num_rows == 0 or valid_labels.min() == valid_labels.max():
        raise DataError("examples: split 'valid' needs rows of both labels (0 and 1) for early stopping on AUC")

    vocabulary_rows = train if cfg.vocabulary == "train" else examples
    user_ids = build_vocabulary(as_string_array(vocabulary_rows.column("user_id"), "examples column 'user_id'"))
    item_ids = build_vocabulary(as_string_array(vocabulary_rows.column("item_id"), "examples column 'item_id'"))
    task = _EncoderTask(backend, train, valid, user_ids, item_ids, cfg, seed)
    device = backend.device

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(kind, len(user_ids), len(item_ids), cfg)
        lr, weight_decay = (cfg.lr, cfg.weight_decay) if kind == "binary" else (cfg.mf_lr, cfg.mf_weight_decay)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        prepared = backend.prepare(model, optimizer, None)
        torch.manual_seed(seed + 1 + backend.rank)  # annealing masks differ per rank, reproducibly
        loop = run_training(
            backend, prepared,
            batches=task.batches, loss_fn=task.loss, evaluate=lambda: task.evaluate(prepared),
            settings=LoopSettings(max_epochs=cfg.max_epochs, patience=cfg.patience),
        )

    backend.load_trainable_state(prepared, loop.best_state)
    best = build_model(kind, len(user_ids), len(item_ids), cfg)
    best.load_state_dict(_strip_wrapper_prefix(loop.best_state, best))
    best.eval()
    return EncoderResult(
        model=best, user_ids=user_ids, item_ids=item_ids, best_auc=loop.best_auc, history=loop.history,
        steps=loop.steps, epochs=loop.epochs, stopped_early=loop.stopped_early, kind=kind, config=cfg,
    )


class _EncoderTask:
    """The encoder's rows as id tensors on the backend's device, and its batches, loss and validation for
    run_training. Validation covers this rank's share of the valid rows whose user and item both have an
    embedding."""

    def __init__(self, backend: Backend, train: pa.Table, valid: pa.Table, user_ids: pa.Array, item_ids: pa.Array,
                 cfg: EncoderConfig, seed: int):
        self.backend, self.cfg, self.seed, self.user_ids, self.item_ids = backend, cfg, seed, user_ids, item_ids
        self.train_users, self.train_items, self.train_labels = self._indexed(train)
        self.valid_users, self.valid_items, self.valid_labels = self._indexed(
            valid, backend.shard_indices(valid.num_rows, even=False))
        self.per_rank_batch = max(1, math.ceil(cfg.batch_size / backend.world_size))

    def _indexed(self, table: pa.Table, rows: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
        if rows is not None:
            table = table.take(pa.array(rows))
        users = lookup(self.user_ids, as_string_array(table.column("user_id"), "examples column 'user_id'"))
        items = lookup(self.item_ids, as_string_array(table.column("item_id"), "examples column 'item_id'"))
        device = self.backend.device
        return (torch.from_numpy(users).to(device), torch.from_numpy(items).to(device),
                torch.from_numpy(_labels(table)).to(device))

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.train_labels)
        order = np.random.default_rng(self.seed + epoch).permutation(n)
        rows = torch.from_numpy(order[self.backend.shard_indices(n, even=True)]).to(self.backend.device)
        for start in range(0, len(rows), self.per_rank_batch):
            take = rows[start:start + self.per_rank_batch]
            yield self.train_users[take], self.train_items[take], self.train_labels[take]

    def loss(self, model, batch, epoch: int) -> torch.Tensor:
        users, items, labels = batch
        logits = model(users, items, anneal_beta(epoch, self.cfg.anneal_epochs))
        return F.binary_cross_entropy_with_logits(logits.float(), labels)

    def evaluate(self, model) -> dict[str, float]:
        rows = torch.nonzero((self.valid_users >= 0) & (self.valid_items >= 0)).squeeze(1)
        scores = torch.empty(len(rows), dtype=torch.float32, device=self.backend.device)
        for start in range(0, len(rows), EVAL_CHUNK):
            take = rows[start:start + EVAL_CHUNK]
            scores[start:start + len(take)] = model(self.valid_users[take], self.valid_items[take], 1.0).float()
        gathered = self.backend.gather({"label": self.valid_labels[rows].cpu().numpy(),
                                        "score": scores.cpu().numpy()})
        return {"auc": auc(gathered["label"], gathered["score"])}


def _strip_wrapper_prefix(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The best state keyed like `model`'s own parameters (a wrapping engine may prefix them with 'module.')."""
    expected = set(model.state_dict())
    out = {}
    for name, value in state.items():
        key = name if name in expected else name.removeprefix("module.")
        if key not in expected:
            raise KeyError(f"trained state has parameter '{name}', which the {type(model).__name__} does not have")
        out[key] = value.detach().to("cpu", torch.float32)
    return out

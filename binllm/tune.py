"""LoRA tuning of a causal LM to answer "Yes"/"No" on click prompts (BinLLM method, section 4).

Two-step tuning trains LoRA on text-only prompts (stage 1), then continues the same LoRA on the full
prompts with codes (stage 2); intuitive tuning runs stage 2 alone from fresh LoRA. Each stage is one
`run_training` call: score = the answer token's logit at the last prompt position, loss = BCE with
logits against the click label, AdamW on the LoRA parameters, warm-up then cosine decay, validation AUC
with early stopping, best LoRA state kept. The same code runs in one process (LocalBackend) and in Ray
Train workers under DeepSpeed (binllm.train.distributed.DeepSpeedBackend).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field


import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from binllm import data
from binllm.config import Config, StageConfig
from binllm.data.schema import DataError
from binllm.llm import (AnswerTokens, EncodedPrompts, answer_tokens, apply_lora, autocast_dtype, collate_prompts,
                        encode_prompt_parts, yes_logits)
from binllm.llm.batching import length_buckets
from binllm.llm.forward import unwrap_causal_lm
from binllm.llm.shared_prefix_logits import shared_prefix_yes_logits
from binllm.llm.trunk import TrunkCache
from binllm.metrics import auc
from binllm.prompts import build_prompts
from binllm.train.backend import Backend, LocalBackend
from binllm.train.loop import LoopSettings, run_training
from binllm.train.schedule import warmup_cosine
from binllm.train.stages import StageAware
from binllm.train.state import copy_into_parameters

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("user_id", "item_id", "label", "split", "history")
BUCKET_MICRO_BATCHES = 16  # micro-batches per length-sorting window: less padding, still shuffled


@dataclass
class Stage:
    name: str  # "stage1" or "stage2"
    prompt_kind: str  # "text", "full" or "codes"
    settings: StageConfig


@dataclass
class StageResult:
    name: str
    prompt_kind: str
    best_auc: float
    steps: int
    epochs: int
    stopped_early: bool
    history: list[dict[str, float]]
    train_rows: int
    valid_rows: int
    train_tokens: int  # real (non-padding) tokens this rank trained on
    padded_tokens: int  # tokens including left padding
    train_seconds: float  # wall time of the stage minus validation
    resumed_from_step: int | None = None


@dataclass
class TuneResult:
    """`model` carries the best adapter (for ZeRO-3 workers, whose parameters are sharded, write
    `adapter_state` instead: see save_tuned_adapter). best_auc is the last stage's best validation AUC."""

    model: torch.nn.Module
    adapter_state: dict[str, torch.Tensor]
    answer: AnswerTokens
    best_auc: float
    stages: list[StageResult] = field(default_factory=list)


@dataclass
class PromptSet:
    token_ids: list[list[int]]
    labels: np.ndarray  # float32 0/1
    # Row i's tokens are its prefix's (token_ids[i][:prefix_lengths[i]]) then its suffix's; rows with the same
    # prefix_of_row share the prefix tokens. None: not known (no shared-prefix training).
    prefix_of_row: np.ndarray | None = None  # int64
    prefix_lengths: np.ndarray | None = None  # int64

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), dtype=np.int64, count=len(self.token_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    def encoded(self, rows: np.ndarray) -> EncodedPrompts:
        """`rows` as prompts with each distinct prefix once; pair j is row rows[j]."""
        if self.prefix_of_row is None or self.prefix_lengths is None:
            raise ValueError("this PromptSet has no prefix/suffix split (build it with tokenize_rows)")
        _, first, pair_prefix = np.unique(self.prefix_of_row[rows], return_index=True, return_inverse=True)
        cut = self.prefix_lengths[rows].tolist()
        prefix_ids = [self.token_ids[r][: cut[j]] for r, j in zip(rows[first].tolist(), first.tolist())]
        suffix_ids = [self.token_ids[r][n:] for r, n in zip(rows.tolist(), cut)]
        return EncodedPrompts(prefix_ids=prefix_ids, suffix_ids=suffix_ids,
                              pair_prefix=pair_prefix.reshape(-1).astype(np.int64))


def tuning_stages(cfg: Config) -> list[Stage]:
    full = Stage("stage2", cfg.prompt.kind, cfg.tune.stage2)
    if cfg.tune.mode == "two_step":
        return [Stage("stage1", "text", cfg.tune.stage1), full]
    if cfg.tune.mode == "intuitive":
        return [full]
    raise ValueError(f"config key 'tune.mode': expected 'two_step' or 'intuitive', got {cfg.tune.mode!r}")


def split_rows(examples: pa.Table, split: str, max_rows: int, seed: int) -> pa.Table:
    """Rows of `split`; at most max_rows of them (0: all), a seeded random subset kept in input order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in examples.column_names]
    if missing:
        raise DataError(f"examples: missing column(s) {missing}; has {examples.column_names}")
    return data.split_rows(examples, split, max_rows, seed)


def tokenize_rows(rows: pa.Table, items: pa.Table, user_codes: pa.Table | None, item_codes: pa.Table | None,
                  cfg: Config, kind: str, tokenizer: PreTrainedTokenizerBase) -> tuple[PromptSet, str]:
    """Canonical prompt tokens and labels of `rows`; also one prompt text (for the answer token)."""
    batch = build_prompts(rows, items, user_codes, item_codes, cfg.prompt, kind=kind, tokenizer=tokenizer)
    labels = rows.column("label").to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DataError("examples: column 'label' must hold 0/1 values")
    encoded = encode_prompt_parts(tokenizer, batch.prefix, batch.suffix)
    prefix_lengths = np.fromiter(map(len, encoded.prefix_ids), dtype=np.int64, count=len(encoded.prefix_ids))
    prompts = PromptSet(encoded.sequences(), labels, prefix_of_row=encoded.pair_prefix,
                        prefix_lengths=prefix_lengths[encoded.pair_prefix])
    return prompts, batch.prefix[0] + batch.suffix[0]


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
    by_tokens = micro_batch_tokens > 0
    cap = micro_batch_tokens if by_tokens else micro_batch_size
    if cap < 1:
        raise ValueError(f"shared-prefix micro-batches need micro_batch_tokens or micro_batch_size >= 1, got "
                         f"{micro_batch_tokens} and {micro_batch_size}")

    def cost(prefixes: int, longest_prefix: int, rows: int, longest_suffix: int) -> int:
        return prefixes * longest_prefix + rows * longest_suffix if by_tokens else rows

    rng = np.random.default_rng([seed, epoch])
    suffix_lengths = lengths - prefix_lengths
    order = rng.permutation(len(lengths))
    order = order[np.argsort(prefix_of_row[order], kind="stable")]
    starts = np.flatnonzero(np.diff(prefix_of_row[order])) + 1
    groups = np.split(order, starts) if len(order) else []
    groups = [groups[i] for i in rng.permutation(len(groups))]
    shape = [(int(prefix_lengths[g[0]]), int(suffix_lengths[g].max())) for g in groups]

    batches: list[np.ndarray] = []
    start = 0
    while start < len(groups):
        stop, window = start, 0
        while stop < len(groups) and window < cap * BUCKET_MICRO_BATCHES:
            window += cost(1, shape[stop][0], len(groups[stop]), shape[stop][1])
            stop += 1
        current: list[np.ndarray] = []
        prefixes = longest_prefix = rows = longest_suffix = 0
        for k in sorted(range(start, stop), key=lambda k: -shape[k][0]):
            group, (prefix, suffix) = groups[k], shape[k]
            if current and cost(prefixes + 1, max(longest_prefix, prefix), rows + len(group),
                                max(longest_suffix, suffix)) > cap:
                batches.append(np.concatenate(current))
                current, prefixes, longest_prefix, rows, longest_suffix = [], 0, 0, 0, 0
            if cost(1, prefix, len(group), suffix) > cap:
                piece = max(1, (cap - prefix) // max(suffix, 1)) if by_tokens else cap
                batches.extend(group[i:i + piece] for i in range(0, len(group), piece))
                continue
            current.append(group)
            prefixes, longest_prefix = prefixes + 1, max(longest_prefix, prefix)
            rows, longest_suffix = rows + len(group), max(longest_suffix, suffix)
        if current:
            batches.append(np.concatenate(current))
        start = stop
    batches = [batches[i] for i in rng.permutation(len(batches))]
    group_size = world_size * grad_accum
    batches = batches[: len(batches) // group_size * group_size]
    return batches[rank::world_size]


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


class _StageTask:
    """Batches, loss and validation of one stage, for run_training. shared_prefix: micro-batches keep the
    rows of a prefix together and each distinct prefix runs once (shared_prefix_yes_logits); train_tokens
    then counts the tokens computed (each prefix once plus the suffixes), not the prompts' tokens.
    trunks: (train, valid) TrunkCaches; the frozen layers below LoRA then run once per prompt and every
    step and validation runs the adapted layers only."""

    def __init__(self, backend: Backend, train: PromptSet, valid: PromptSet, settings: StageConfig,
                 answer: AnswerTokens, pad_id: int, seed: int, autocast: torch.dtype | None = None,
                 shared_prefix: bool = False, trunks: tuple[TrunkCache, TrunkCache] | None = None):
        self.backend, self.train, self.valid, self.settings = backend, train, valid, settings
        self.answer, self.pad_id, self.seed, self.autocast = answer, pad_id, seed, autocast
        self.shared_prefix, self.trunks = shared_prefix, trunks
        self.train_lengths = train.lengths
        self.train_tokens = self.padded_tokens = 0
        self.eval_seconds = 0.0

    def _autocast(self):
        return torch.autocast(self.backend.device.type, dtype=self.autocast or torch.bfloat16,
                              enabled=self.autocast is not None)

    def _tensors(self, prompts: PromptSet, rows: np.ndarray):
        input_ids, mask = collate_prompts([prompts.token_ids[i] for i in rows.tolist()], self.pad_id)
        labels = torch.from_numpy(prompts.labels[rows])
        device = self.backend.device
        return input_ids.to(device), mask.to(device), labels.to(device)

    def _scores(self, model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return yes_logits(model, input_ids, mask, self.answer)

    def _shared_scores(self, model: torch.nn.Module, encoded: EncodedPrompts) -> torch.Tensor:
        with self._autocast():
            return shared_prefix_yes_logits(model, encoded, self.answer, self.pad_id)

    def _shared_plan(self, prompts: PromptSet, rows: np.ndarray, grad_accum: int, epoch: int, scale: int = 1, *,
                     rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
        """Shared-prefix micro-batches of `rows` (positions in rows), caps scaled by `scale`."""
        return shared_prefix_micro_batches(
            prompts.prefix_of_row[rows], prompts.prefix_lengths[rows], prompts.lengths[rows], grad_accum, self.seed,
            epoch, micro_batch_size=scale * self.settings.micro_batch_size,
            micro_batch_tokens=scale * max(self.settings.micro_batch_tokens, 0), rank=rank, world_size=world_size)

    def batches(self, epoch: int):
        if self.shared_prefix:
            yield from self._shared_plan(self.train, np.arange(len(self.train)), self.settings.grad_accum, epoch,
                                         rank=self.backend.rank, world_size=self.backend.world_size)
            return
        for rows in train_micro_batches(self.train_lengths, self.backend, self.settings.micro_batch_size,
                                        self.settings.grad_accum, self.seed, epoch,
                                        micro_batch_tokens=self.settings.micro_batch_tokens):
            yield rows

    def _row_scores(self, model: torch.nn.Module, prompts: PromptSet, trunk: TrunkCache | None,
                    rows: np.ndarray) -> torch.Tensor:
        """Scores of `rows` of `prompts`, each prompt whole: the top layers over the cached trunk, or the full
        forward when there is no trunk cache."""
        if trunk is not None:
            with self._autocast():
                return trunk.scores(model, rows, self.answer)
        input_ids, mask, _ = self._tensors(prompts, rows)
        return self._scores(model, input_ids, mask)

    def loss(self, model: torch.nn.Module, rows: np.ndarray, epoch: int) -> torch.Tensor:
        labels = torch.from_numpy(self.train.labels[rows]).to(self.backend.device)
        if self.shared_prefix:
            encoded = self.train.encoded(rows)
            prefix_lengths = [len(ids) for ids in encoded.prefix_ids]
            suffix_lengths = [len(ids) for ids in encoded.suffix_ids]
            self.train_tokens += sum(prefix_lengths) + sum(suffix_lengths)
            self.padded_tokens += max(prefix_lengths) * len(prefix_lengths) + max(suffix_lengths) * len(rows)
            return F.binary_cross_entropy_with_logits(self._shared_scores(model, encoded), labels)
        lengths = self.train_lengths[rows]
        self.train_tokens += int(lengths.sum())  # from the host-side lengths: no device sync per micro-batch
        self.padded_tokens += int(lengths.max()) * len(rows)
        trunk = self.trunks[0] if self.trunks is not None else None
        return F.binary_cross_entropy_with_logits(self._row_scores(model, self.train, trunk, rows), labels)

    def _eval_batches(self, sorted_lengths: np.ndarray) -> list[np.ndarray]:
        """Positions in length-sorted rows, per forward: 2 x micro_batch_size rows, or rows x longest
        <= 2 x micro_batch_tokens (no activations are kept for a backward pass)."""
        if self.settings.micro_batch_tokens <= 0:
            size = 2 * self.settings.micro_batch_size
            return [np.arange(s, min(s + size, len(sorted_lengths))) for s in range(0, len(sorted_lengths), size)]
        return length_buckets(sorted_lengths, 2 * self.settings.micro_batch_tokens)

    def _shared_eval_batches(self, mine: np.ndarray) -> list[np.ndarray]:
        """Positions in `mine` per shared-prefix forward (twice the training caps); every rank gets as many
        batches as the rank with the most (its first batch repeated), since ZeRO-3 forwards are collective."""
        plan = self._shared_plan(self.valid, mine, 1, 0, scale=2)
        most = int(self.backend.gather({"batches": np.asarray([len(plan)])})["batches"].max())
        return plan + plan[:1] * (most - len(plan))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """AUC and mean BCE over all validation rows. Every rank scores the same number of batches
        (ZeRO-3 forwards are collective), so shards wrap around and duplicates are dropped after the gather."""
        started = time.perf_counter()
        mine = self.backend.shard_indices(len(self.valid), even=True)
        mine = mine[np.argsort(self.valid.lengths[mine], kind="stable")]
        scores = np.empty(len(mine), dtype=np.float32)
        if self.shared_prefix:
            for batch in self._shared_eval_batches(mine):
                scores[batch] = self._shared_scores(model, self.valid.encoded(mine[batch])).cpu().numpy()
        else:
            trunk = self.trunks[1] if self.trunks is not None else None
            for batch in self._eval_batches(self.valid.lengths[mine]):
                scores[batch] = self._row_scores(model, self.valid, trunk, mine[batch]).cpu().numpy()
        gathered = self.backend.gather({"index": mine, "score": scores})
        index, first = np.unique(gathered["index"], return_index=True)
        scores, labels = gathered["score"][first], self.valid.labels[index]
        loss = F.binary_cross_entropy_with_logits(torch.from_numpy(scores), torch.from_numpy(labels))
        self.eval_seconds += time.perf_counter() - started
        return {"auc": auc(labels, scores), "loss": float(loss)}


def _backend_for(backend: Backend | None, stage: Stage, device: torch.device) -> Backend:
    if backend is None:
        return LocalBackend(device, grad_accum=stage.settings.grad_accum)
    return backend


AUTO_BUDGET_SHARE = 0.6  # share of free GPU memory that an auto-sized micro-batch may take
AUTO_BUDGET_MAX = 1 << 18


def fit_micro_batch_tokens(model: torch.nn.Module, answer: AnswerTokens, lengths: np.ndarray, backend: Backend,
                           probe_tokens: int = 8192) -> int:
    """A token budget for training micro-batches sized from free GPU memory: one forward + backward on
    probe_tokens tokens of the rows' median length measures the memory a token takes; the budget is
    AUTO_BUDGET_SHARE of the free memory at that rate (the smallest over ranks). Off CUDA: 0 (rows)."""
    device = backend.device
    if device.type != "cuda":
        return 0
    width = int(np.median(lengths))
    rows = max(1, probe_tokens // width)
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.train()
    vocab = unwrap_causal_lm(model).config.vocab_size
    input_ids = torch.randint(min(10, vocab - 1), vocab, (rows, width), device=device)
    logits = yes_logits(model, input_ids, torch.ones_like(input_ids), answer)
    F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    per_token = (torch.cuda.max_memory_allocated(device) - before) / (rows * width)
    model.zero_grad(set_to_none=True)
    budget = int(min(AUTO_BUDGET_MAX, AUTO_BUDGET_SHARE * free / max(per_token, 1.0)))
    budget = int(backend.gather({"budget": np.asarray([budget])})["budget"].min())
    if backend.is_main:
        log.info("micro-batch budget %d tokens (%.0f KiB per token, %.1f GiB free)", budget, per_token / 1024,
                 free / 2**30)
    return max(budget, width)


def _run_stage(stage: Stage, backend: Backend, model: PeftModel, train: PromptSet, valid: PromptSet,
               answer: AnswerTokens, pad_id: int, seed: int, autocast: torch.dtype | None = None,
               shared_prefix: bool = False, cache_trunk: bool = False) -> tuple[StageResult, dict[str, torch.Tensor]]:
    settings = stage.settings
    if settings.micro_batch_tokens < 0:
        settings = dataclasses.replace(
            settings, micro_batch_tokens=fit_micro_batch_tokens(model, answer, train.lengths, backend))
    _, total_steps = stage_steps(len(train), backend.world_size, settings, train.lengths, seed,
                                 (train.prefix_of_row, train.prefix_lengths) if shared_prefix else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = warmup_cosine(
        optimizer, total_steps, settings.warmup_ratio, warmup=settings.warmup_steps,
        start_factor=settings.warmup_start_lr / settings.lr if settings.lr else 0.0,
        floor_factor=settings.min_lr / settings.lr if settings.lr else 0.0)
    prepared = backend.prepare(model, optimizer, scheduler)
    store = autocast or torch.float32
    trunks = (TrunkCache(model, train.token_ids, pad_id, store), TrunkCache(model, valid.token_ids, pad_id, store)) \
        if cache_trunk else None
    task = _StageTask(backend, train, valid, settings, answer, pad_id, seed, autocast, shared_prefix, trunks)
    started = time.perf_counter()
    result = run_training(
        backend, prepared,
        batches=task.batches,
        loss_fn=task.loss,
        evaluate=lambda: task.evaluate(prepared),
        settings=LoopSettings(max_epochs=settings.epochs, patience=settings.patience,
                              eval_every=settings.eval_every, max_steps=settings.max_steps),
    )
    seconds = time.perf_counter() - started - task.eval_seconds
    backend.load_trainable_state(prepared, result.best_state)
    summary = StageResult(
        name=stage.name, prompt_kind=stage.prompt_kind, best_auc=float(result.best_auc), steps=result.steps,
        epochs=result.epochs, stopped_early=result.stopped_early, history=result.history,
        train_rows=len(train), valid_rows=len(valid), train_tokens=task.train_tokens,
        padded_tokens=task.padded_tokens, train_seconds=seconds, resumed_from_step=result.resumed_from_step,
    )
    if backend.is_main:
        log.info("%s (%s prompts): best validation AUC %.4f after %d steps; %d tokens in %.1f s",
                 stage.name, stage.prompt_kind, summary.best_auc, summary.steps, summary.train_tokens, seconds)
        if trunks is not None:
            log.info("%s: frozen trunk (layers below %d) cached for %d train and %d valid prompts, %.0f MiB",
                     stage.name, trunks[0].split, sum(s is not None for s in trunks[0].states),
                     sum(s is not None for s in trunks[1].states), (trunks[0].nbytes + trunks[1].nbytes) / 2**20)
    return summary, result.best_state


def tune_lora(
    examples: pa.Table,
    items: pa.Table,
    user_codes: pa.Table | None,
    item_codes: pa.Table | None,
    cfg: Config,
    *,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    backend: Backend | None = None,
    initial_adapter: dict[str, torch.Tensor] | None = None,
) -> TuneResult:
    """Attach LoRA (cfg.tune.lora) to `model` and tune it on the train rows of `examples`, validating on
    the valid rows; two-step or intuitive per cfg.tune.mode. Returns the model with its best adapter loaded.

    backend: None runs here, on the model's device, with each stage's grad_accum. A given Backend runs
    every stage (a LocalBackend keeps its own grad_accum; a StageAware backend, as in Ray Train workers,
    takes each stage's batch settings and skips stages that a resumed run had already finished).

    initial_adapter: LoRA tensors (a TuneResult's adapter_state) to start from instead of fresh LoRA; with
    intuitive mode this is stage 2 of a two-step run whose stage 1 ran before (the paper table reuses
    its text-only run that way).
    """
    if isinstance(model, PeftModel):
        raise TypeError("tune_lora expects the base causal LM; it attaches the LoRA adapter itself")
    stages = tuning_stages(cfg)
    seed = cfg.run.seed
    autocast = autocast_dtype(cfg.tune.autocast)
    lora = cfg.tune.lora
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    peft_model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                            top_layers=lora.top_layers)
    if initial_adapter is not None:
        copy_into_parameters(peft_model, initial_adapter)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")

    results: list[StageResult] = []
    answer: AnswerTokens | None = None
    best_state: dict[str, torch.Tensor] | None = None
    for stage in stages:
        settings = stage.settings
        train_rows = split_rows(examples, "train", settings.max_train_rows, seed)
        valid_rows = split_rows(examples, "valid", settings.max_valid_rows, seed + 1)
        if train_rows.num_rows == 0 or valid_rows.num_rows == 0:
            raise DataError(f"{stage.name}: examples have {train_rows.num_rows} train and {valid_rows.num_rows} "
                             "valid rows; tuning needs both")
        train, prompt = tokenize_rows(train_rows, items, user_codes, item_codes, cfg, stage.prompt_kind, tokenizer)
        valid, _ = tokenize_rows(valid_rows, items, user_codes, item_codes, cfg, stage.prompt_kind, tokenizer)
        if len(np.unique(valid.labels)) < 2:
            raise DataError(f"{stage.name}: the validation rows hold one label class only; AUC is undefined")
        if answer is None:
            answer = answer_tokens(tokenizer, prompt, cfg.llm.answer, cfg.llm.negative_answer)

        stage_backend = _backend_for(backend, stage, device)
        finished = None
        if isinstance(stage_backend, StageAware):
            finished = stage_backend.begin_stage(stage.name, micro_batch_size=settings.micro_batch_size,
                                                 grad_accum=settings.grad_accum)
        if finished is not None:
            summary, best_state = StageResult(**finished["result"]), finished["best_state"]
            log.info("%s already finished in an earlier attempt (best AUC %.4f); skipping it", stage.name,
                     summary.best_auc)
            copy_into_parameters(peft_model, best_state)
        else:
            summary, best_state = _run_stage(stage, stage_backend, peft_model, train, valid, answer, pad_id, seed,
                                              autocast, cfg.tune.shared_prefix, cfg.tune.cache_trunk)
            if isinstance(stage_backend, StageAware):
                stage_backend.end_stage(stage.name, {"result": dataclasses.asdict(summary), "best_state": best_state})
        results.append(summary)

    return TuneResult(model=peft_model, adapter_state=best_state, answer=answer,
                      best_auc=results[-1].best_auc, stages=results)

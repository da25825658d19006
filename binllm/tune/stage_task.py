"""One tuning stage's micro-batches, loss and validation, in the shape run_training drives: the full
forward, the shared-prefix forward (each distinct prefix once) or the top layers over a cached frozen trunk."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from binllm.config import StageConfig
from binllm.llm import AnswerTokens, EncodedPrompts, collate_prompts, yes_logits
from binllm.llm.batching import length_buckets
from binllm.llm.shared_prefix_logits import shared_prefix_yes_logits
from binllm.llm.trunk import TrunkCache
from binllm.metrics import auc
from binllm.train.backend import Backend
from binllm.train.micro_batches import shared_prefix_micro_batches, train_micro_batches
from binllm.tune.stage_data import PromptSet


class StageTask:
    """Batches, loss and validation of one stage, for run_training. shared_prefix: micro-batches keep the
    rows of a prefix together and each distinct prefix runs once (shared_prefix_yes_logits); train_tokens
    then counts the tokens computed (each prefix once plus the suffixes), not the prompts' tokens.
    trunks: (train, valid) TrunkCaches; the frozen layers below LoRA then run once per prompt and every
    step and validation runs the adapted layers only."""

    def __init__(self, backend: Backend, train: PromptSet, valid: PromptSet, settings: StageConfig,
                 answer: AnswerTokens, pad_id: int, seed: int, autocast: torch.dtype | None = None,
                 shared_prefix: bool = False, trunks: tuple[TrunkCache, TrunkCache] | None = None,
                 total_steps: int = 0):
        self.backend, self.train, self.valid, self.settings = backend, train, valid, settings
        self.answer, self.pad_id, self.seed, self.autocast = answer, pad_id, seed, autocast
        self.shared_prefix, self.trunks = shared_prefix, trunks
        self.train_lengths = train.lengths
        self.train_tokens = self.padded_tokens = 0
        self.eval_seconds = 0.0
        self.total_steps, self.step = total_steps, 0
        # Scores of every validation row (row order) from this process's best validation so far; None before one.
        self.best_auc, self.best_valid_scores = -np.inf, None

    def at_step(self, step: int) -> None:
        """run_training's on_step: the optimizer steps taken so far (also after a resume)."""
        self.step = step

    def distill_weight(self) -> float:
        """The distill weight of the step being taken: linear from distill to distill_end over total_steps."""
        first, last = self.settings.distill_weights
        progress = min(self.step / self.total_steps, 1.0) if self.total_steps > 0 else 0.0
        return first + (last - first) * progress

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
        targets = torch.from_numpy(self.train.targets(rows, self.distill_weight())).to(self.backend.device)
        if self.shared_prefix:
            encoded = self.train.encoded(rows)
            prefix_lengths = [len(ids) for ids in encoded.prefix_ids]
            suffix_lengths = [len(ids) for ids in encoded.suffix_ids]
            self.train_tokens += sum(prefix_lengths) + sum(suffix_lengths)
            self.padded_tokens += max(prefix_lengths) * len(prefix_lengths) + max(suffix_lengths) * len(rows)
            return F.binary_cross_entropy_with_logits(self._shared_scores(model, encoded), targets)
        lengths = self.train_lengths[rows]
        self.train_tokens += int(lengths.sum())  # from the host-side lengths: no device sync per micro-batch
        self.padded_tokens += int(lengths.max()) * len(rows)
        trunk = self.trunks[0] if self.trunks is not None else None
        return F.binary_cross_entropy_with_logits(self._row_scores(model, self.train, trunk, rows), targets)

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
        metrics = {"auc": auc(labels, scores), "loss": float(loss)}
        if metrics["auc"] > self.best_auc:  # run_training's rule: the first of equal AUCs is kept
            self.best_auc, self.best_valid_scores = metrics["auc"], scores
        return metrics

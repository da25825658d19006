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
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from binllm.config import LLMConfig, PromptConfig, TuneConfig
from binllm.data.schema import DataError
from binllm.llm import AnswerTokens, answer_tokens, apply_lora, autocast_dtype
from binllm.llm.trunk import TrunkCache
from binllm.train.backend import Backend, LocalBackend
from binllm.train.loop import LoopSettings, run_training
from binllm.train.micro_batches import stage_steps
from binllm.train.schedule import warmup_cosine
from binllm.train.stages import StageAware
from binllm.train.state import copy_into_parameters
from binllm.tune.code_targets import code_estimates, teacher_fit_rows
from binllm.tune.memory_probe import fit_micro_batch_tokens
from binllm.tune.stage_data import PromptSet, Stage, stage_rows, tokenize_rows, tuning_stages
from binllm.tune.stage_task import StageTask

log = logging.getLogger(__name__)


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
    prompts_per_step: float = 0.0  # train prompts an optimizer step took, on average over an epoch


@dataclass
class TuneResult:
    """`model` carries the best adapter (for ZeRO-3 workers, whose parameters are sharded, write
    `adapter_state` instead: see save_tuned_adapter). best_auc is the last stage's best validation AUC."""

    model: torch.nn.Module
    adapter_state: dict[str, torch.Tensor]
    answer: AnswerTokens
    best_auc: float
    stages: list[StageResult] = field(default_factory=list)
    # The last stage's validation rows (examples' columns) and the scores of its best validation (None when that
    # stage was resumed as finished), in row order: paired comparisons of tuning variants on the same rows, and a
    # blend fitted without scoring them again.
    valid_rows: pa.Table | None = None
    valid_scores: np.ndarray | None = None

    @property
    def valid_labels(self) -> np.ndarray | None:
        """valid_rows' click labels, float32 (as tuning validated on them)."""
        if self.valid_rows is None:
            return None
        return self.valid_rows.column("label").to_numpy(zero_copy_only=False).astype(np.float32)


def run_stage(stage: Stage, backend: Backend, model: PeftModel, train: PromptSet, valid: PromptSet,
               answer: AnswerTokens, pad_id: int, seed: int, autocast: torch.dtype | None = None,
               shared_prefix: bool = False,
               cache_trunk: bool = False) -> tuple[StageResult, dict[str, torch.Tensor], np.ndarray | None]:
    """One stage: its summary, best LoRA state (loaded into `model`) and the best validation's scores."""
    settings = stage.settings
    if settings.micro_batch_tokens < 0:
        settings = dataclasses.replace(
            settings, micro_batch_tokens=fit_micro_batch_tokens(model, answer, train.lengths, backend))
    steps_per_epoch, total_steps = stage_steps(len(train), backend.world_size, settings, train.lengths, seed,
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
    task = StageTask(backend, train, valid, settings, answer, pad_id, seed, autocast, shared_prefix, trunks,
                     total_steps=total_steps)
    if train.code_estimates is not None and backend.is_main:
        log.info("%s: training targets (1 - w) x label + w x the %s teacher's estimate, w %.2f to %.2f over %d steps",
                 stage.name, settings.distill_teacher, *settings.distill_weights, total_steps)
    started = time.perf_counter()
    result = run_training(
        backend, prepared,
        batches=task.batches,
        loss_fn=task.loss,
        on_step=task.at_step,
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
        prompts_per_step=len(train) / steps_per_epoch if steps_per_epoch else 0.0,
    )
    if backend.is_main:
        log.info("%s (%s prompts): best validation AUC %.4f after %d steps; %d tokens in %.1f s",
                 stage.name, stage.prompt_kind, summary.best_auc, summary.steps, summary.train_tokens, seconds)
        if trunks is not None:
            log.info("%s: frozen trunk (layers below %d) cached for %d train and %d valid prompts, %.0f MiB",
                     stage.name, trunks[0].split, sum(s is not None for s in trunks[0].states),
                     sum(s is not None for s in trunks[1].states), (trunks[0].nbytes + trunks[1].nbytes) / 2**20)
    # None when the kept state came from before a resume: this process never scored the validation rows with it
    valid_scores = task.best_valid_scores if task.best_auc == result.best_auc else None
    return summary, result.best_state, valid_scores


def tune_lora(
    examples: pa.Table,
    items: pa.Table,
    user_codes: pa.Table | None,
    item_codes: pa.Table | None,
    *,
    tune: TuneConfig,
    prompt: PromptConfig,
    llm: LLMConfig,
    seed: int,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    backend: Backend | None = None,
    initial_adapter: dict[str, torch.Tensor] | None = None,
) -> TuneResult:
    """Attach LoRA (tune.lora) to `model` and tune it on the train rows of `examples`, validating on the
    valid rows; two-step or intuitive per tune.mode, on `prompt` prompts answered with llm.answer.
    Returns the model with its best adapter loaded.

    backend: None runs here, on the model's device, with each stage's grad_accum. A given Backend runs
    every stage (a LocalBackend keeps its own grad_accum; a StageAware backend, as in Ray Train workers,
    takes each stage's batch settings and skips stages that a resumed run had already finished).

    initial_adapter: LoRA tensors (a TuneResult's adapter_state) to start from instead of fresh LoRA; with
    intuitive mode this is stage 2 of a two-step run whose stage 1 ran before (the paper table reuses
    its text-only run that way).
    """
    if isinstance(model, PeftModel):
        raise TypeError("tune_lora expects the base causal LM; it attaches the LoRA adapter itself")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    peft_model = apply_lora(model, r=tune.lora.r, alpha=tune.lora.alpha, dropout=tune.lora.dropout,
                            target_modules=tune.lora.target_modules, top_layers=tune.lora.top_layers)
    if initial_adapter is not None:
        copy_into_parameters(peft_model, initial_adapter)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")

    results: list[StageResult] = []
    answer: AnswerTokens | None = None
    best_state: dict[str, torch.Tensor] | None = None
    valid_scores: np.ndarray | None = None
    for stage in tuning_stages(tune, prompt.kind):
        train, valid, valid_rows, prompt_text = _stage_prompts(stage, examples, items, user_codes, item_codes, prompt,
                                                               tokenizer, seed)
        answer = answer or answer_tokens(tokenizer, prompt_text, llm.answer, llm.negative_answer)
        stage_backend = backend or LocalBackend(device, grad_accum=stage.settings.grad_accum)
        summary, best_state, valid_scores = _run_or_resume_stage(stage, stage_backend, peft_model, train, valid,
                                                                 answer, pad_id, seed, tune)
        results.append(summary)

    return TuneResult(model=peft_model, adapter_state=best_state, answer=answer, best_auc=results[-1].best_auc,
                      stages=results, valid_rows=valid_rows, valid_scores=valid_scores)


def _run_or_resume_stage(stage: Stage, backend: Backend, model: PeftModel, train: PromptSet, valid: PromptSet,
                         answer: AnswerTokens, pad_id: int, seed: int,
                         tune: TuneConfig) -> tuple[StageResult, dict[str, torch.Tensor], np.ndarray | None]:
    """run_stage, unless a StageAware backend (Ray Train workers) says an earlier attempt finished the stage:
    then its recorded result and best LoRA state, loaded into `model` (and no validation scores)."""
    finished = None
    if isinstance(backend, StageAware):
        finished = backend.begin_stage(stage.name, micro_batch_size=stage.settings.micro_batch_size,
                                       grad_accum=stage.settings.grad_accum)
    if finished is not None:
        summary, best_state = StageResult(**finished["result"]), finished["best_state"]
        log.info("%s already finished in an earlier attempt (best AUC %.4f); skipping it", stage.name,
                 summary.best_auc)
        copy_into_parameters(model, best_state)
        return summary, best_state, None
    summary, best_state, valid_scores = run_stage(
        stage, backend, model, train, valid, answer, pad_id, seed, autocast_dtype(tune.autocast, backend.device),
        tune.shared_prefix, tune.cache_trunk)
    if isinstance(backend, StageAware):
        backend.end_stage(stage.name, {"result": dataclasses.asdict(summary), "best_state": best_state})
    return summary, best_state, valid_scores


def _stage_prompts(stage: Stage, examples: pa.Table, items: pa.Table, user_codes: pa.Table | None,
                   item_codes: pa.Table | None, prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase,
                   seed: int) -> tuple[PromptSet, PromptSet, pa.Table, str]:
    """The stage's train and valid prompts (seeded subsets of at most max_train_rows / max_valid_rows), the valid
    rows, and one prompt text; refuses a stage without rows of both splits or with one validation label only."""
    train_rows, valid_rows = stage_rows(examples, stage.settings, seed)
    if train_rows.num_rows == 0 or valid_rows.num_rows == 0:
        raise DataError(f"{stage.name}: examples have {train_rows.num_rows} train and {valid_rows.num_rows} "
                         "valid rows; tuning needs both")
    train, prompt_text = tokenize_rows(train_rows, items, user_codes, item_codes, prompt, stage.prompt_kind, tokenizer)
    weights = stage.settings.distill_weights
    if max(weights) > 0:
        if stage.prompt_kind == "text":
            log.info("%s: distill %s unused: text-only prompts show no codes", stage.name, weights)
        else:
            teacher = stage.settings.distill_teacher
            train.code_estimates = code_estimates(train_rows, train.labels, user_codes, item_codes, stage.name,
                                                  teacher, teacher_fit_rows(examples, teacher, seed))
    valid, _ = tokenize_rows(valid_rows, items, user_codes, item_codes, prompt, stage.prompt_kind, tokenizer)
    if len(np.unique(valid.labels)) < 2:
        raise DataError(f"{stage.name}: the validation rows hold one label class only; AUC is undefined")
    return train, valid, valid_rows, prompt_text

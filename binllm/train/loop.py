"""The one training loop: steps, periodic validation, early stopping on AUC, checkpoint and resume.

Task code (encoder pretraining, LoRA tuning) supplies the batches, the loss and the evaluation;
the `Backend` decides where it runs. Batches must be deterministic per epoch, so that a resumed run
skips exactly the batches it had already trained on.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from binllm.train.backend import Backend

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The training loss or the validation loss became NaN or infinite."""


@dataclass
class LoopSettings:
    max_epochs: int = 1
    patience: int = 3  # validations without improvement before stopping
    eval_every: int = 0  # optimizer steps between validations; 0: at the end of each epoch
    max_steps: int = 0  # 0: no cap
    log_every_s: float = 30.0  # progress line (step, mean loss) at most this often


@dataclass
class LoopState:
    """Where a run stands; saved with every checkpoint, so a resumed run continues from it."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # micro-batches of the current epoch already trained
    best_auc: float = -math.inf
    bad_evals: int = 0  # validations since the last improvement
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    stopped: bool = False
    evaluated_at: int = -1  # the step of the last validation

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class LoopResult:
    best_auc: float
    best_state: dict[str, torch.Tensor]
    steps: int
    epochs: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int | None = None


def run_training(
    backend: Backend,
    model: torch.nn.Module,
    *,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[torch.nn.Module, Any, int], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    settings: LoopSettings,
    on_step: Callable[[int], None] = lambda steps: None,
) -> LoopResult:
    """Trains `model` (already passed through backend.prepare) and returns its best state by validation AUC.

    batches(epoch) yields this rank's micro-batches; loss_fn(model, batch, epoch) returns the loss;
    evaluate() returns metrics with "auc" over all ranks' rows; on_step(steps taken) is called before the first
    micro-batch (after a resume: the restored count) and after every optimizer step.
    """
    state, resumed_from = _restore(backend)
    validate = _Validation(backend, model, evaluate, settings, state)
    report_progress = _LossLog(backend, settings, state)
    stopped = state.stopped
    # A progress bar on a terminal (off in logs and on ranks other than 0); log lines every log_every_s.
    bar = tqdm(desc="training", unit="step", initial=state.step, total=settings.max_steps or None, leave=False,
               disable=None if backend.is_main else True)
    on_step(state.step)
    model.train()
    while state.epoch < settings.max_epochs and not stopped:
        epoch = state.epoch
        for index, batch in enumerate(batches(epoch)):
            if index < state.batch:
                continue
            loss = loss_fn(model, batch, epoch)
            report_progress(loss)
            state.batch = index + 1
            if not backend.backward_step(loss):
                continue
            state.step += 1
            bar.update(1)
            on_step(state.step)
            at_cap = settings.max_steps and state.step >= settings.max_steps
            if (settings.eval_every and state.step % settings.eval_every == 0) or at_cap:
                if validate(at_cap=bool(at_cap)):
                    stopped = True
                    break
        if stopped:
            break
        state.epoch, state.batch = epoch + 1, 0
        if state.evaluated_at != state.step:  # not already validated at this step (also across a resume)
            stopped = validate()
    bar.close()
    if state.best_state is None:
        state.best_state = backend.trainable_state(model)
    return LoopResult(
        best_auc=state.best_auc, best_state=state.best_state, steps=state.step, epochs=state.epoch,
        stopped_early=stopped, history=state.history, resumed_from_step=resumed_from,
    )


def _restore(backend: Backend) -> tuple[LoopState, int | None]:
    """The loop state from the backend's last checkpoint (a fresh one without), and the step it resumes from."""
    restored = backend.load_checkpoint()
    if restored is None:
        return LoopState(), None
    state = LoopState(**restored)
    log.info("resumed from checkpoint at step %d (epoch %d)", state.step, state.epoch)
    return state, state.step


class _Validation:
    """One validation: metrics into the history, the best state kept, patience counted, a checkpoint saved.
    Calling it returns True when training should stop; the checkpoint records that, so a resumed run stops too."""

    def __init__(self, backend: Backend, model: torch.nn.Module, evaluate: Callable[[], dict[str, float]],
                 settings: LoopSettings, state: LoopState):
        self.backend, self.model, self.evaluate, self.settings, self.state = backend, model, evaluate, settings, state

    def __call__(self, at_cap: bool = False) -> bool:
        state, backend = self.state, self.backend
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate()
        self.model.train()
        if not all(math.isfinite(float(v)) for k, v in metrics.items() if k == "loss"):
            raise TrainingDiverged(f"validation loss is {metrics['loss']} at step {state.step}: the model "
                                   "diverged (lower the learning rate) or a kernel produced NaN")
        auc = float(metrics["auc"])
        state.history.append({"step": state.step, **{k: float(v) for k, v in metrics.items()}})
        state.evaluated_at = state.step
        improved = auc > state.best_auc
        if improved:
            state.best_auc, state.bad_evals = auc, 0
            state.best_state = backend.trainable_state(self.model)
        else:
            state.bad_evals += 1
        state.stopped = bool(at_cap or state.bad_evals >= self.settings.patience)
        if backend.is_main:
            log.log(logging.INFO if improved or state.stopped else logging.DEBUG,
                    "step %d: validation %s (best auc %.4f)%s", state.step,
                    " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), state.best_auc,
                    ", stopping" if state.stopped else "")
        backend.save_checkpoint(state.to_dict(), {"step": state.step, **metrics, "best_auc": state.best_auc})
        return state.stopped


class _LossLog:
    """The mean training loss logged every settings.log_every_s; a non-finite mean stops training."""

    def __init__(self, backend: Backend, settings: LoopSettings, state: LoopState):
        self.backend, self.settings, self.state = backend, settings, state
        self.last, self.loss, self.count = time.monotonic(), None, 0

    def __call__(self, loss: torch.Tensor) -> None:
        detached = loss.detach().float()
        self.loss = detached if self.loss is None else self.loss + detached
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.settings.log_every_s:
            mean = self.loss.item() / self.count
            if not math.isfinite(mean):
                raise TrainingDiverged(f"training loss is {mean} in the micro-batches before step {self.state.step}")
            if self.backend.is_main:
                log.info("epoch %d, step %d: mean loss %.4f over the last %d micro-batches", self.state.epoch,
                         self.state.step, mean, self.count)
            self.last, self.loss, self.count = now, None, 0

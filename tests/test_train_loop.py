"""The shared training loop: early stopping, step cap, checkpoint and resume (LocalBackend)."""
import numpy as np
import pytest
import torch

from binllm.metrics import auc
from binllm.train.backend import LocalBackend
from binllm.train.loop import LoopSettings, TrainingDiverged, run_training
from binllm.train.schedule import warmup_cosine

g = torch.Generator().manual_seed(0)
X = torch.randn(256, 4, generator=g)
Y = (X[:, 0] > 0).float()


def _task(checkpoint_dir=None, lr=0.5, noise_eval=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    backend = LocalBackend(checkpoint_dir=checkpoint_dir)
    model = backend.prepare(model, torch.optim.SGD(model.parameters(), lr=lr), None)
    seen = []

    def batches(epoch):
        for i in range(0, 256, 32):
            yield X[i:i + 32], Y[i:i + 32]

    def loss_fn(m, batch, epoch):
        seen.append(epoch)
        return torch.nn.functional.binary_cross_entropy_with_logits(m(batch[0]).squeeze(-1), batch[1])

    def evaluate():
        if noise_eval:  # a validation signal that never improves after the first evaluation
            return {"auc": 0.5}
        return {"auc": auc(Y.numpy(), model(X).squeeze(-1).numpy())}

    return backend, model, batches, loss_fn, evaluate, seen


def test_trains_and_keeps_the_best_state():
    backend, model, batches, loss_fn, evaluate, _ = _task()
    result = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                          settings=LoopSettings(max_epochs=3, eval_every=4))
    assert result.steps == 24 and result.epochs == 3
    assert result.best_auc > 0.95
    assert result.best_auc == max(h["auc"] for h in result.history)
    assert set(result.best_state) == {"weight", "bias"}


def test_early_stopping_after_patience_validations():
    backend, model, batches, loss_fn, evaluate, _ = _task(noise_eval=True)
    result = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                          settings=LoopSettings(max_epochs=50, patience=2))
    assert result.stopped_early and result.epochs == 3 and len(result.history) == 3


def test_max_steps_caps_training():
    backend, model, batches, loss_fn, evaluate, _ = _task()
    result = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                          settings=LoopSettings(max_epochs=10, max_steps=5))
    assert result.steps == 5 and result.history[-1]["step"] == 5


def test_resume_continues_the_step_counter_and_skips_trained_batches(tmp_path):
    backend, model, batches, loss_fn, evaluate, _ = _task(checkpoint_dir=tmp_path)
    first = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                         settings=LoopSettings(max_epochs=2, eval_every=3))
    assert first.steps == 16 and first.resumed_from_step is None
    backend, model, batches, loss_fn, evaluate, seen = _task(checkpoint_dir=tmp_path)
    second = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                          settings=LoopSettings(max_epochs=3, eval_every=3))
    # the last checkpoint is the end-of-epoch validation at step 16; the run goes on from there, not from 0
    assert second.resumed_from_step == 16 and second.steps == 24
    assert len(seen) == 24 - 16
    assert [h["step"] for h in second.history][:5] == [h["step"] for h in first.history][:5]


def test_on_step_sees_the_steps_taken_from_the_restored_count_after_a_resume(tmp_path):
    backend, model, batches, loss_fn, evaluate, _ = _task(checkpoint_dir=tmp_path)
    steps = []
    run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate, on_step=steps.append,
                 settings=LoopSettings(max_epochs=1))
    assert steps == list(range(9))
    backend, model, batches, loss_fn, evaluate, _ = _task(checkpoint_dir=tmp_path)
    steps.clear()
    run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate, on_step=steps.append,
                 settings=LoopSettings(max_epochs=2))
    assert steps == list(range(8, 17))


def test_a_stopped_run_resumed_does_not_train_again(tmp_path):
    backend, model, batches, loss_fn, evaluate, _ = _task(checkpoint_dir=tmp_path, noise_eval=True)
    first = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                         settings=LoopSettings(max_epochs=50, patience=2))
    backend, model, batches, loss_fn, evaluate, seen = _task(checkpoint_dir=tmp_path, noise_eval=True)
    again = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                         settings=LoopSettings(max_epochs=50, patience=2))
    assert seen == [] and again.steps == first.steps and again.stopped_early


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_rows_evenly_or_exactly(world_size):
    shards_even, shards_exact = [], []
    for rank in range(world_size):
        b = LocalBackend()
        b.rank, b.world_size = rank, world_size
        shards_even.append(b.shard_indices(10, even=True))
        shards_exact.append(b.shard_indices(10, even=False))
    assert len({len(s) for s in shards_even}) == 1
    assert set(np.concatenate(shards_even)) == set(range(10))
    assert sorted(np.concatenate(shards_exact).tolist()) == list(range(10))


def test_a_nan_validation_loss_stops_training_with_a_clear_error():
    backend, model, batches, loss_fn, _, _ = _task()
    with pytest.raises(TrainingDiverged, match="validation loss is nan at step 8"):
        run_training(backend, model, batches=batches, loss_fn=loss_fn,
                     evaluate=lambda: {"auc": 0.5, "loss": float("nan")}, settings=LoopSettings(max_epochs=2))


def test_a_nan_training_loss_stops_training_at_the_next_progress_check():
    backend, model, batches, _, evaluate, _ = _task()
    nan_loss = lambda m, batch, epoch: m(batch[0]).sum() * float("nan")  # noqa: E731
    with pytest.raises(TrainingDiverged, match="training loss is nan"):
        run_training(backend, model, batches=batches, loss_fn=nan_loss, evaluate=evaluate,
                     settings=LoopSettings(max_epochs=1, log_every_s=0.0))


def test_warmup_cosine_starts_ends_and_floors_where_configured():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-4)
    schedule = warmup_cosine(optimizer, 1000, 0.0, warmup=200, start_factor=0.1, floor_factor=0.8)
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[200] == pytest.approx(1e-4)
    assert lrs[100] == pytest.approx(5.5e-5)
    assert lrs[-1] == pytest.approx(8e-5, rel=1e-3) and min(lrs[200:]) >= 8e-5 - 1e-12
    with pytest.raises(ValueError, match="floor_factor"):
        warmup_cosine(optimizer, 10, 0.1, floor_factor=1.5)


def test_training_shows_a_progress_bar_of_steps(monkeypatch):
    import binllm.train.loop as loop_module

    bars = []

    class RecordingBar:
        def __init__(self, **kwargs):
            self.kwargs, self.steps, self.closed = kwargs, 0, False
            bars.append(self)

        def update(self, n):
            self.steps += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(loop_module, "tqdm", RecordingBar)
    backend, model, batches, loss_fn, evaluate, _ = _task()
    result = run_training(backend, model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                          settings=LoopSettings(max_epochs=2, patience=5))
    (bar,) = bars
    assert bar.steps == result.steps == 16 and bar.closed
    assert bar.kwargs["unit"] == "step" and bar.kwargs["disable"] is None  # shown on a terminal, not in logs

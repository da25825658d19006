"""No configuration can hang the nightly job: the resource check before any work starts, and a stall watchdog
on the Ray Data execution.

`check_resources` refuses an actor pool that the Ray cluster cannot hold next to the read and join tasks
(they need one free CPU); on a joined cluster that may autoscale, `ensure_resources` first asks the
autoscaler for the pool and waits for it (up to score.stall_timeout_s). `StallWatchdog`, a Ray Data
execution callback, fails an execution in which no operator has made progress (a task submitted or finished,
a block entered or left a queue, an output was taken) for score.stall_timeout_s, naming the stage that
stalled. Ray Data's own no-progress guard does not
watch executions with an all-to-all operator, and the pipeline's per-user repartition is one.
"""
from __future__ import annotations

import logging
import math
import time

import ray
import ray.data
from ray.autoscaler.sdk import request_resources

from binllm.config import ConfigError, ScoreConfig

logger = logging.getLogger(__name__)

CONFIG_KEY = "binllm.stall_timeout_s"  # the DataContext setting the watchdog reads (seconds; 0: off)
FREE_CPUS = 1.0  # CPUs the read, join and write tasks need besides the actor pool


class PipelineStalled(ConfigError):
    """A scoring pipeline made no progress for score.stall_timeout_s; the message names the stage and the keys
    to change (a ConfigError: the job ends with one line and exit code 2)."""


def check_resources(score: ScoreConfig, cluster: dict[str, float]) -> None:
    """Refuses (ConfigError) a scoring actor pool (score.num_actors x score.cpus_per_actor / gpus_per_actor) that
    would leave the read and join tasks no CPU, or that asks for more GPUs than the cluster has.
    `cluster`: ray.cluster_resources()."""
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    want_cpus = score.num_actors * score.cpus_per_actor
    room = cpus - FREE_CPUS
    if want_cpus > room + 1e-9:
        if score.cpus_per_actor > 0 and room > 0:
            fits = int(math.floor((room + 1e-9) / score.cpus_per_actor))
            fix = (f"set score.num_actors to {fits} or less (or score.cpus_per_actor to "
                   f"{room / score.num_actors:.3g} or less)" if fits >= 1 else
                   f"set score.num_actors to 1 and score.cpus_per_actor to {room:.3g} or less")
        elif room >= 0:
            fix = "set score.cpus_per_actor to 0, or score on a cluster with more CPUs"
        else:
            fix = "score on a cluster with CPUs for them (this one has fewer than the read and join tasks need)"
        raise ConfigError(
            f"config keys 'score.num_actors' ({score.num_actors}) x 'score.cpus_per_actor' ({score.cpus_per_actor:g}) "
            f"ask for {want_cpus:g} CPUs for the scoring actors; the Ray cluster has {cpus:g} CPUs and the read and "
            f"join tasks need {FREE_CPUS:g} besides the actors, so the pipeline would never finish: {fix}")
    want_gpus = score.num_actors * score.gpus_per_actor
    if want_gpus > gpus + 1e-9:
        fits = int(math.floor((gpus + 1e-9) / score.gpus_per_actor))
        fix = f"set score.num_actors to {fits} or less" if fits >= 1 else "set score.gpus_per_actor to 0 (CPU scoring)"
        raise ConfigError(
            f"config keys 'score.num_actors' ({score.num_actors}) x 'score.gpus_per_actor' ({score.gpus_per_actor:g}) "
            f"ask for {want_gpus:g} GPUs; the Ray cluster has {gpus:g}: {fix}")


def ensure_resources(score: ScoreConfig, *, joined: bool, poll_s: float = 2.0) -> bool:
    """check_resources against the running cluster. A local Ray (started by this job) cannot grow: refused at
    once. A joined cluster (RAY_ADDRESS: `ray job submit`, KubeRay) may autoscale from zero workers: the pool
    plus one CPU is requested from its autoscaler and the check repeated until it passes or
    score.stall_timeout_s has passed (0: refused at once). Returns whether resources were requested (the caller
    clears the request with `release_resources` once the run is over)."""
    try:
        check_resources(score, ray.cluster_resources())
        return False
    except ConfigError:
        if not joined or score.stall_timeout_s <= 0:
            raise
    actor = {k: v for k, v in (("CPU", score.cpus_per_actor), ("GPU", score.gpus_per_actor)) if v > 0}
    request_resources(bundles=([actor] * score.num_actors if actor else []) + [{"CPU": FREE_CPUS}])
    logger.info("the Ray cluster cannot hold %d scoring actors yet: asked its autoscaler, waiting up to %g s "
                "(score.stall_timeout_s)", score.num_actors, score.stall_timeout_s)
    deadline = time.monotonic() + score.stall_timeout_s
    while True:
        time.sleep(poll_s)
        try:
            check_resources(score, ray.cluster_resources())
            return True
        except ConfigError as exc:
            if time.monotonic() >= deadline:
                release_resources()
                raise ConfigError(f"{exc} (waited {score.stall_timeout_s:g} s for the cluster to grow: "
                                  "score.stall_timeout_s)") from None


def release_resources() -> None:
    """Clears this job's request to the autoscaler (see ensure_resources)."""
    request_resources(bundles=[])


def _progress(executor) -> tuple:
    """Per operator: what moves when it makes progress (tasks started and finished, outputs, queued blocks)."""
    state = []
    for op, op_state in executor._topology.items():
        metrics = op.metrics
        state.append((
            op.num_active_tasks(), getattr(metrics, "num_tasks_finished", 0), getattr(metrics, "num_outputs_taken", 0),
            getattr(metrics, "num_task_outputs_generated", 0), op_state.total_enqueued_input_blocks(),
            op_state.total_enqueued_output_blocks(), op.has_completed(),
        ))
    return tuple(state)


def _stalled_stage(executor) -> str:
    """The first operator (sources first) that has not completed, with its task counts."""
    for op in executor._topology:
        if not op.has_completed():
            metrics = op.metrics
            return (f"'{op.name}' ({op.num_active_tasks()} tasks submitted, "
                    f"{getattr(metrics, 'num_tasks_finished', 0)} finished)")
    return "'the output'"


def _resources_line() -> str:
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        return (f"; the Ray cluster has {free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g} CPUs and "
                f"{free.get('GPU', 0.0):g} of {total.get('GPU', 0.0):g} GPUs free")
    except Exception:  # noqa: BLE001 - the message is what matters here
        return ""


try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # a Ray Data without execution callbacks: no watchdog (the resource check still runs)
    ExecutionCallback = object


class StallWatchdog(ExecutionCallback):
    """Fails a Ray Data execution that made no progress for the DataContext setting CONFIG_KEY (seconds)."""

    def before_execution_starts(self, executor) -> None:
        context = getattr(executor, "_data_context", None)
        self.timeout_s = float(context.get_config(CONFIG_KEY, 0) or 0) if context is not None else 0.0
        self.last_state, self.last_change = None, time.monotonic()

    def on_execution_step(self, executor) -> None:
        if not getattr(self, "timeout_s", 0):
            return
        state = _progress(executor)
        now = time.monotonic()
        if state != self.last_state:
            self.last_state, self.last_change = state, now
            return
        if now - self.last_change >= self.timeout_s:
            raise PipelineStalled(
                f"score: the scoring pipeline made no progress for {now - self.last_change:.0f} s "
                f"(score.stall_timeout_s {self.timeout_s:g}); stalled at stage {_stalled_stage(executor)}"
                f"{_resources_line()}; check score.num_actors, score.cpus_per_actor and score.gpus_per_actor against "
                "what the cluster can give, or raise score.stall_timeout_s (0: off)")


def install(timeout_s: float):
    """Registers the watchdog with `timeout_s` on the current DataContext (datasets created afterwards carry
    it); returns a function that puts the context back."""
    context = ray.data.DataContext.get_current()
    if ExecutionCallback is object or not hasattr(context, "custom_execution_callback_classes"):
        return lambda: None
    classes = context.custom_execution_callback_classes
    added = StallWatchdog not in classes
    if added:
        classes.append(StallWatchdog)
    before = context.get_config(CONFIG_KEY, None)
    context.set_config(CONFIG_KEY, float(timeout_s))

    def restore() -> None:
        if added and StallWatchdog in classes:
            classes.remove(StallWatchdog)
        context.set_config(CONFIG_KEY, before)

    return restore

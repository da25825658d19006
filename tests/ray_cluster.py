"""Helpers for tests that start a real Ray: a local one per test module (`local_ray`), or a head that jobs
are submitted to (fixture `ray_head` in conftest)."""
import contextlib
import socket
import time

import ray
import ray.data


@contextlib.contextmanager
def local_ray(*, progress_bars: bool = True):
    """A real local Ray (2 CPUs, no dashboard) for one test module; the jobs' init_ray joins it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if not progress_bars:
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def submit_job(client, **job) -> str:
    """submit_job, retried while the head's job agent is still starting ("No available agent")."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)

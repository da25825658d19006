"""Helpers for tests that start a real Ray head and submit jobs to it (fixture `ray_head` in conftest)."""
import socket
import time


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

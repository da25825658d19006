"""Starting or joining Ray the same way in every job, test and benchmark."""
from __future__ import annotations

import os


def loopback_ray_env() -> None:
    """Keeps a local Ray on 127.0.0.1 with no auth token; harmless when joining a real cluster."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(num_cpus: int | None = None):
    """Joins the cluster named by RAY_ADDRESS (ray job submit sets it), else starts a local Ray."""
    loopback_ray_env()
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # address="local": a fresh local Ray even when another one runs on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    return ray

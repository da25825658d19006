"""What every job entry point shares: `--config FILE --set key=value` parsing, logging, Ray start-up."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from typing import Any, Callable

from binllm.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "ray_config.yaml"


def parse_job_args(description: str, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=None,
                        help=f"YAML config (default: ./{DEFAULT_CONFIG}); repeat to layer presets, later files win")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set encoder.lr=0.001 (repeatable)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        configs = args.config or ([DEFAULT_CONFIG] if os.path.exists(DEFAULT_CONFIG) else [])
        return load_config(configs, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    for noisy in ("urllib3", "filelock", "httpx", "fsspec", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


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


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input or configuration: shown as one line, never as a traceback."""
    from binllm.assets import AssetError
    from binllm.data.schema import DataError
    from binllm.storage import StorageError

    return ConfigError, DataError, StorageError, AssetError, FileNotFoundError


def run_job(run: Callable[[Config], Any], description: str, argv: list[str] | None = None) -> None:
    """Entry-point body: parse the config, run, and turn input errors into `error: ...` with exit code 2."""
    cfg = parse_job_args(description, argv)
    try:
        run(cfg)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

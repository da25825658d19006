"""What every job entry point shares: `--config FILE --set key=value` parsing, logging, one-line errors,
and the `binllm <job>` console command."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from types import ModuleType

from binllm.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "ray_config.yaml"


def _sections_help(sections: tuple[str, ...]) -> str:
    if not sections:
        return ""
    return (f"config sections this job reads: {', '.join(sections)} (every key is documented in "
            f"{DEFAULT_CONFIG}; --set section.key=value, or --set 'section={{key: value}}')")


def parse_job_args(description: str, argv: list[str] | None = None, *, sections: tuple[str, ...] = (),
                   prog: str | None = None) -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_sections_help(sections),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input or configuration: shown as one line, never as a traceback."""
    from binllm.assets import AssetError
    from binllm.data.schema import DataError
    from binllm.storage import StorageError

    return ConfigError, DataError, StorageError, AssetError, FileNotFoundError


def run_recipe(recipe: ModuleType, argv: list[str] | None = None, prog: str | None = None):
    """Entry-point body of a job: parse the config, run the recipe, and turn input errors into
    `error: ...` with exit code 2."""
    cfg = parse_job_args(recipe.__doc__ or "", argv, sections=getattr(recipe, "SECTIONS", ()), prog=prog)
    try:
        return recipe.main(cfg)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """`binllm <job> [--config FILE ...] [--set key=value ...]`, the same as `python -m jobs.<job>`."""
    from binllm.recipes import RECIPES, load_recipe

    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: binllm <job> [--config FILE] [--set KEY=VALUE ...]\njobs: {', '.join(RECIPES)}\n"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage + "`binllm <job> --help` lists the job's config sections.")
        raise SystemExit(0 if argv else 2)
    try:
        recipe = load_recipe(argv[0])
    except KeyError as exc:
        print(f"error: {exc.args[0]}\n{usage}", file=sys.stderr)
        raise SystemExit(2) from None
    run_recipe(recipe, argv[1:], prog=f"binllm {argv[0]}")

"""Loading the config: YAML files layered, `--set key=value` overrides, types coerced, values validated.

Unknown keys and wrong types raise `ConfigError` naming the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from binllm.config.sections import CODE_METHODS, CREDENTIAL_KEYS, PAPER_METHODS, Config, ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, _dt.date)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _apply(section: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Sets `values` on a section that holds its defaults; keys left out keep them (stage1's lr, say)."""
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if key in CREDENTIAL_KEYS:
            raise ConfigError(f"config key '{key}': credentials are not read from configs; set {CREDENTIAL_KEYS[key]} "
                              "in the job's environment (or use an AWS profile or instance role) instead")
        if name not in hints:
            raise ConfigError(f"unknown config key '{key}'; known keys here: {sorted(hints)}")
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
            _apply(current, value, key)
        else:
            setattr(section, name, _coerce(value, hints[name], key))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. encoder.lr=0.001")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': the value is not valid YAML: {exc}") from None
    except ValueError:  # YAML reads 2026-02-30 as a date that does not exist: keep the text for the key's check
        value = raw
    return key.strip().split("."), value


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date that does not exist (2026-02-30)
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded or {}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Reads YAML (or the defaults when path is None; a list of files is layered, later keys win), applies
    `key=value` overrides, validates. Keys a file leaves out keep their defaults."""
    values: dict[str, Any] = {}
    for one in ([] if path is None else [path] if isinstance(path, (str, Path)) else path):
        values = _merge(values, _read_yaml(one))
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        # A mapping merges into the section (--set 'tune.stage1={lr: 0.01}' keeps the section's other keys).
        current = node.get(keys[-1])
        node[keys[-1]] = _merge(current, value) if isinstance(value, dict) and isinstance(current, dict) else value
    cfg = Config()
    _apply(cfg, values)
    if not cfg.run.name:
        cfg.run.name = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    _validate(cfg)
    return cfg


# run.name becomes a folder under run.output_root (and the Ray Train runs' <run.name>-<job>): one path component.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _validate(cfg: Config) -> None:
    for check in (_check_run_and_storage, _check_data, _check_encoder_and_tuning, _check_scoring, _check_paper,
                  _check_tracking):
        check(cfg)


def _check_run_and_storage(cfg: Config) -> None:
    """Refuses (ConfigError naming the key) bad values of run.* and storage.*."""
    if not _RUN_NAME.match(cfg.run.name):
        raise ConfigError(f"config key 'run.name': {cfg.run.name!r} becomes a folder under run.output_root; expected "
                          "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/' or '..')")
    if cfg.storage.max_attempts < 1:
        raise ConfigError(f"config key 'storage.max_attempts': expected >= 1, got {cfg.storage.max_attempts}")


def _check_data(cfg: Config) -> None:
    """Refuses (ConfigError naming the key) bad values of data.*."""
    if cfg.data.split.kind == "fractions":
        fr = cfg.data.split.fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"config key 'data.split.fractions': expected three non-negative shares summing to 1, got {fr}")
    scale = cfg.data.rating_scale
    if scale and (len(scale) != 2 or scale[0] > scale[1]):
        raise ConfigError(f"config key 'data.rating_scale': expected [lowest, highest] (or null: inferred from the "
                          f"ratings), got {scale}")
    if scale and not scale[0] <= cfg.data.min_rating <= scale[1]:
        raise ConfigError(f"config key 'data.min_rating': {cfg.data.min_rating:g} lies outside data.rating_scale "
                          f"[{scale[0]:g}, {scale[1]:g}]; set data.min_rating inside it (the lowest rating that counts "
                          "as a positive)")
    if not 0 <= cfg.data.max_out_of_scale <= 1:
        raise ConfigError(f"config key 'data.max_out_of_scale': expected a share in [0, 1], got "
                          f"{cfg.data.max_out_of_scale:g}")
    if cfg.data.negatives.k < 0:
        raise ConfigError(f"config key 'data.negatives.k': expected >= 0 (0: off), got {cfg.data.negatives.k}")
    if cfg.data.warm_min_train < 1:
        raise ConfigError(f"config key 'data.warm_min_train': expected >= 1, got {cfg.data.warm_min_train}")
    if cfg.data.history_len < 0:
        raise ConfigError(f"config key 'data.history_len': expected >= 0, got {cfg.data.history_len}")


def _check_encoder_and_tuning(cfg: Config) -> None:
    """Refuses (ConfigError naming the key) bad values of encoder.*, distributed.*, llm.*, prompt.* and tune.*."""
    if cfg.encoder.bits % 8 != 0 or cfg.encoder.bits <= 0:
        raise ConfigError(f"config key 'encoder.bits': expected a positive multiple of 8, got {cfg.encoder.bits}")
    if cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'distributed.zero_stage': expected 0, 1, 2 or 3, got {cfg.distributed.zero_stage}")
    if cfg.llm.answer == cfg.llm.negative_answer:
        raise ConfigError("config keys 'llm.answer' and 'llm.negative_answer' must differ")
    if cfg.tune.lora.top_layers < 0:
        raise ConfigError(f"config key 'tune.lora.top_layers': expected >= 0 (0: every layer), got {cfg.tune.lora.top_layers}")
    if cfg.tune.cache_trunk:
        if cfg.tune.lora.top_layers == 0:
            raise ConfigError("config key 'tune.cache_trunk' needs 'tune.lora.top_layers' > 0: with LoRA on every "
                              "layer no layer is frozen")
        if cfg.tune.shared_prefix:
            raise ConfigError("config keys 'tune.cache_trunk' and 'tune.shared_prefix' exclude each other: set one")
        if cfg.distributed.zero_stage == 3:
            raise ConfigError("config key 'tune.cache_trunk' does not work with 'distributed.zero_stage' 3 "
                              "(partitioned layers); use stage 2 or turn the cache off")
    for name in ("stage1", "stage2"):
        for key, weight in zip(("distill", "distill_end"), getattr(cfg.tune, name).distill_weights):
            if not 0.0 <= weight <= 1.0:
                raise ConfigError(f"config key 'tune.{name}.{key}': expected a weight in [0, 1], got {weight}")
    for key in ("max_title_tokens", "max_tokens"):
        if getattr(cfg.prompt, key) < 0:
            raise ConfigError(f"config key 'prompt.{key}': expected >= 0 (0: no cap), got {getattr(cfg.prompt, key)}")


def _check_scoring(cfg: Config) -> None:
    """Refuses (ConfigError naming the key) bad values of score.*."""
    if cfg.score.dt and not _DATE.match(cfg.score.dt):
        raise ConfigError(f"config key 'score.dt': expected a date YYYY-MM-DD, got {cfg.score.dt!r}")
    if cfg.score.dt:
        try:
            _dt.date.fromisoformat(cfg.score.dt)
        except ValueError as exc:
            raise ConfigError(f"config key 'score.dt': {cfg.score.dt!r} is not a calendar date ({exc})") from None
    if cfg.score.num_actors < 1:
        raise ConfigError(f"config key 'score.num_actors': expected >= 1, got {cfg.score.num_actors}")
    if cfg.score.cpus_per_actor < 0 or cfg.score.gpus_per_actor < 0:
        raise ConfigError("config keys 'score.cpus_per_actor' and 'score.gpus_per_actor': expected >= 0, got "
                          f"{cfg.score.cpus_per_actor:g} and {cfg.score.gpus_per_actor:g}")
    if cfg.score.stall_timeout_s < 0:
        raise ConfigError(f"config key 'score.stall_timeout_s': expected >= 0 seconds (0: off), got "
                          f"{cfg.score.stall_timeout_s:g}")
    if cfg.score.stale_run_hours <= 0:
        raise ConfigError(f"config key 'score.stale_run_hours': expected > 0 hours, got {cfg.score.stale_run_hours}")


def _check_paper(cfg: Config) -> None:
    """Refuses (ConfigError naming the key) bad values of paper.*."""
    if set(cfg.paper.methods) - set(PAPER_METHODS) or not cfg.paper.methods:
        raise ConfigError(f"config key 'paper.methods': expected some of {list(PAPER_METHODS)}, got "
                          f"{cfg.paper.methods}")
    bad_formats = sorted(set(cfg.paper.code_formats) - {"binary", "dotted"})
    if bad_formats or not cfg.paper.code_formats:
        raise ConfigError(f"config key 'paper.code_formats': expected some of ['binary', 'dotted'], got "
                          f"{cfg.paper.code_formats}")
    if set(cfg.paper.blend) - set(CODE_METHODS):
        raise ConfigError(f"config key 'paper.blend': expected some of {list(CODE_METHODS)} (the methods "
                          f"that read the codes), got {cfg.paper.blend}")
    if cfg.paper.blend_valid_rows < 0:
        raise ConfigError(f"config key 'paper.blend_valid_rows': expected >= 0 (0: no blend rows), got "
                          f"{cfg.paper.blend_valid_rows}")


# A registered adapter (jobs.score): models:/<name>/<version> or models:/<name>@<alias> (binllm.tracking).
_REGISTERED = re.compile(r"^models:/[^/@]+(/[0-9]+|@[A-Za-z0-9_-]+)$")
_MODEL_NAME = re.compile(r"^[^/@:\s]+$")


def _check_tracking(cfg: Config) -> None:
    """Refuses (ConfigError naming the key) bad values of tracking.* and a malformed models:/ tune.adapter."""
    registered = cfg.tune.adapter.startswith("models:")
    if registered and not _REGISTERED.match(cfg.tune.adapter):
        raise ConfigError(f"config key 'tune.adapter': expected models:/<name>/<version> or models:/<name>@<alias> "
                          f"(a registered adapter), got {cfg.tune.adapter!r}")
    if registered and cfg.score.model_version:
        raise ConfigError("config keys 'score.model_version' and 'tune.adapter' (a models:/ URI) exclude each other: "
                          "the scores carry the registered version (models:/<name>/<version>); leave "
                          "score.model_version empty")
    if not cfg.tracking.experiment.strip():
        raise ConfigError("config key 'tracking.experiment': expected an MLflow experiment name, got ''")
    if cfg.tracking.model_name and not _MODEL_NAME.match(cfg.tracking.model_name):
        raise ConfigError(f"config key 'tracking.model_name': {cfg.tracking.model_name!r} becomes part of models:/ "
                          "URIs; expected no '/', '@', ':' or spaces (empty: tuning registers nothing)")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:[^/@]*@", cfg.tracking.uri):  # user:password@host
        raise ConfigError("config key 'tracking.uri': credentials are not read from configs (a config is copied into "
                          "manifests and MLflow params); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                          "MLFLOW_TRACKING_TOKEN) in the job's environment instead")

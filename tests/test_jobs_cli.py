"""The thin entry points as a user runs them: `python -m jobs.X --config ... --set ...`."""
import importlib
import runpy
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm import evaluation
from binllm.config import load_config
from binllm.recipes import evaluate

pytestmark = pytest.mark.integration  # runs the jobs as processes of their own


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def table_source(tmp_path):
    # 10 rows, fractions 0.6/0.2/0.2: every split holds both labels (4+ stars), as prepare requires
    pq.write_table(pa.table({"uid": [1, 1, 2, 2, 1, 2, 1, 2, 1, 2], "iid": [10, 11, 10, 12, 12, 11, 11, 10, 12, 10],
                             "stars": [5, 2, 4, 1, 5, 2, 5, 1, 4, 2], "ts": list(range(1, 11))}), tmp_path / "inter.parquet")
    pq.write_table(pa.table({"iid": [10, 11, 12], "name": ["A", "B", "C"]}), tmp_path / "items.parquet")
    return tmp_path


def _prepare_args(src):
    return ["jobs.prepare", "--config", "ray_config.yaml", "--set", "run.name=r1",
            "--set", f"run.output_root={src / 'runs'}", "--set", "data.format=table",
            "--set", f"data.interactions={src / 'inter.parquet'}", "--set", f"data.items={src / 'items.parquet'}",
            "--set", "data.columns={user_id: uid, item_id: iid, rating: stars, timestamp: ts, title: name}",
            "--set", "data.split.fractions=[0.6, 0.2, 0.2]"]


def test_prepare_job_writes_examples(table_source, request):
    result = _run(*_prepare_args(table_source), cwd=request.config.rootpath)
    assert result.returncode == 0, result.stderr
    examples = pq.read_table(table_source / "runs/r1/examples/examples.parquet")
    assert examples.num_rows == 10
    assert examples.column("split").to_pylist() == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    # user 1's earlier positives, not item 11 at 2 stars
    assert examples.column("history").to_pylist()[-2] == ["10", "12", "11"]
    assert (table_source / "runs/r1/examples/profile.json").is_file() and "data profile" in result.stdout


def test_bad_config_and_bad_data_are_one_line_errors(table_source, request):
    result = _run("jobs.prepare", "--set", "encoder.lrr=1", cwd=request.config.rootpath)
    assert result.returncode == 2 and "unknown config key 'encoder.lrr'" in result.stderr
    args = _prepare_args(table_source)
    args[args.index("data.columns={user_id: uid, item_id: iid, rating: stars, timestamp: ts, title: name}")] = \
        "data.columns={user_id: user, item_id: iid, rating: stars, timestamp: ts, title: name}"
    result = _run(*args, cwd=request.config.rootpath)
    assert result.returncode == 2
    assert "inter.parquet: missing column(s) ['user']" in result.stderr and "Traceback" not in result.stderr
    assert not (table_source / "runs/r1/examples").exists()


def test_evaluate_job_reads_scores_and_writes_the_table(tmp_path):
    cfg = load_config(None, ["run.name=ev", f"run.output_root={tmp_path}"])
    (tmp_path / "ev/eval").mkdir(parents=True)
    pq.write_table(pa.table({
        "user_id": ["a", "a", "b", "b"] * 2, "item_id": ["1", "2", "3", "4"] * 2,
        "label": pa.array([1, 0, 1, 0] * 2, pa.int8()), "warm": [True, True, False, False] * 2,
        "method": ["good"] * 4 + ["bad"] * 4, "logit": pa.array([2.0, -1.0, 1.0, 0.0, -2.0, 1.0, -1.0, 0.0], pa.float32()),
    }), tmp_path / "ev/eval/test_scores.parquet")
    table = evaluate.main(cfg)
    rows = {r["method"]: r for r in table.to_pylist()}
    assert rows["good"]["all_auc"] == 1.0 and rows["bad"]["all_auc"] == 0.0
    assert rows["good"]["warm_rows"] == 2 and rows["good"]["cold_uauc"] == 1.0
    assert "good" in (tmp_path / "ev/eval/metrics.md").read_text()
    with pytest.raises(ValueError, match="missing column"):
        evaluation.metrics_table(pa.table({"method": ["x"]}))


BINLLM = Path(sys.executable).with_name("binllm")  # the console command pyproject.toml installs


def test_binllm_command_runs_the_same_recipes(table_source, request):
    root = request.config.rootpath
    listing = subprocess.run([str(BINLLM), "--help"], capture_output=True, text=True, cwd=root, timeout=120)
    assert listing.returncode == 0 and "prepare, pretrain_encoder, tune_lora, score, evaluate, paper_table, demo" \
        in listing.stdout
    unknown = subprocess.run([str(BINLLM), "nosuch"], capture_output=True, text=True, cwd=root, timeout=120)
    assert unknown.returncode == 2 and "unknown job 'nosuch'" in unknown.stderr
    help_text = subprocess.run([str(BINLLM), "tune_lora", "--help"], capture_output=True, text=True, cwd=root,
                               timeout=120)
    assert help_text.returncode == 0
    assert "config sections this job reads: run, storage, data, encoder, prompt, llm, tune, distributed" in \
        " ".join(help_text.stdout.split())
    args = _prepare_args(table_source)
    result = subprocess.run([str(BINLLM), "prepare", *args[1:]], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr
    assert pq.read_table(table_source / "runs/r1/examples/examples.parquet").num_rows == 10


@pytest.mark.parametrize("job", ["prepare", "pretrain_encoder", "tune_lora", "score", "evaluate", "paper_table",
                                 "demo"])
def test_every_job_help_lists_its_config_sections(job, monkeypatch, capsys):
    # The entry module run as `python -m jobs.<job> --help` runs it, in this process: one import of the stack for
    # all seven (test_binllm_command_runs_the_same_recipes starts a real process)
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"jobs.{job}", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    sections = getattr(importlib.import_module(f"binllm.recipes.{job}"), "SECTIONS")
    assert f"config sections this job reads: {', '.join(sections)}" in " ".join(capsys.readouterr().out.split())
    assert sections[:2] == ("run", "storage")

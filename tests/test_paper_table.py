"""The paper-table job on planted data with the tiny LLM: every method, the blend rows, the code_bits teacher's
row, the report files, the kept adapters, reuse on rerun."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from safetensors.torch import load_file

from binllm import sources
from binllm.blend import fit_blend
from binllm.config import load_config
from binllm.data import split_rows
from binllm.encoder import export_codes, load_encoder, score_pairs
from binllm.evaluation import llm_logits
from binllm.llm.lora import apply_lora
from binllm.metrics import auc
from binllm.recipes import paper_table
from binllm.recipes.paper_table import MethodSpec, method_specs, run_order, run_paper_table
from binllm.train.state import copy_into_parameters
from binllm.tune import stage_rows
from binllm.tune.code_targets import code_estimates, code_logits
from synthetic import make_planted_examples

STAGE = {"epochs": 1, "micro_batch_size": 16, "max_train_rows": 96, "max_valid_rows": 32, "eval_every": 3,
         "lr": 0.01}


@pytest.fixture(scope="module")
def paper_cfg(tmp_path_factory, tiny_llm_dir):
    root = tmp_path_factory.mktemp("paper")
    examples, items = make_planted_examples(n_users=60, n_items=40, n_rows=1500, seed=3, history_len=3)
    pq.write_table(examples.select(["user_id", "item_id", "label", "timestamp"]), root / "interactions.parquet")
    pq.write_table(items, root / "items.parquet")
    stage = ",".join(f"{k}: {v}" for k, v in STAGE.items())
    return load_config(["ray_config.yaml", "cluster/presets/paper_ml1m.yaml"], [
        f"run.output_root={root / 'runs'}", "run.name=paper-test",
        "data.format=table", f"data.interactions={root / 'interactions.parquet'}",
        f"data.items={root / 'items.parquet'}", "data.columns.rating=", "data.columns.label=label",
        "data.split.kind=fractions", "data.history_len=3",
        "encoder.max_epochs=30", "encoder.patience=5", "encoder.anneal_epochs=10", "encoder.mf_dim=16",
        f"llm.model={tiny_llm_dir}", "paper.max_test_rows=60", "paper.blend=[IO, BinLLM]", "paper.blend_valid_rows=40",
        f"tune.stage1={{{stage}}}", f"tune.stage2={{{stage}}}",
    ])


@pytest.fixture(scope="module")
def paper_run(paper_cfg):
    return run_paper_table(paper_cfg, device="cpu")


def test_every_method_of_the_table_with_both_code_formats(paper_run):
    names = [row["method"] for row in paper_run.metrics.to_pylist()]
    assert names == ["MF", "BinMF", "TO", "IO (binary)", "IO (dotted)", "IT (binary)", "IT (dotted)",
                     "BinLLM (binary)", "BinLLM (dotted)", "IO+BinMF (binary)", "IO+BinMF (dotted)",
                     "BinLLM+BinMF (binary)", "BinLLM+BinMF (dotted)"]
    assert all(row["all_rows"] == 60 for row in paper_run.metrics.to_pylist())
    assert all(0.0 <= row["all_auc"] <= 1.0 for row in paper_run.metrics.to_pylist())
    by_name = {r.spec.name: r for r in paper_run.results}
    binllm = by_name["BinLLM (binary)"]
    # Two-step: stage 1 is TO's own stage, stage 2 ran on full prompts from TO's adapter.
    assert [(s["name"], s["prompt_kind"]) for s in binllm.stages] == [("stage1", "text"), ("stage2", "full")]
    assert binllm.stages[0]["history"] == by_name["TO"].stages[0]["history"]
    assert by_name["IO (dotted)"].stages[0]["prompt_kind"] == "codes"
    assert by_name["TO"].notes["text_only_fallbacks"] == 0  # the preset codes every id


def test_report_files(paper_cfg, paper_run):
    folder = f"{paper_cfg.run_dir()}/paper"
    for name in ("metrics.md", "metrics.json", "test_scores.parquet", "auc_bars.png", "valid_auc.png",
                 "score_dist.png"):
        assert os.path.getsize(f"{folder}/{name}") > 0, name
    with open(f"{folder}/auc_bars.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(open(f"{folder}/metrics.json").read())
    assert set(payload["methods"]) == {r.spec.name for r in paper_run.results}
    assert any("warm: user and item each have >= 4 train rows" in n for n in payload["notes"])
    scores = pq.read_table(f"{folder}/test_scores.parquet")
    assert scores.num_rows == 13 * 60
    md = open(f"{folder}/metrics.md").read()
    assert "BinLLM (dotted)" in md and "LLM score: logit(' Yes') - logit(' No')" in md
    # AUC differences of the paper's pairs, per code format: 6 pairs with a coded method on each side x 2 + 3;
    # then each blend row against BinMF and against its method alone: 2 blended methods x 2 formats x 2
    pairs = payload["pairs"]
    assert len(pairs) == 15 + 8 and (pairs[0]["a"], pairs[0]["b"]) == ("BinLLM (binary)", "BinMF")
    named = {(p["a"], p["b"]) for p in pairs}
    assert ("BinLLM (dotted)", "IO (dotted)") in named
    assert {("IO+BinMF (dotted)", "BinMF"), ("IO+BinMF (dotted)", "IO (dotted)"),
            ("BinLLM+BinMF (binary)", "BinLLM (binary)")} <= named
    assert all(p["rows"] == 60 and p["low"] <= p["high"] and 0 <= p["p_le_0"] <= 1 for p in pairs)
    assert "BinLLM (binary) - BinMF" in md and "BinLLM (binary) - BinMF" in paper_run.text
    # valid_auc.png draws validation AUC against prompts tuned, with BinMF's AUC on the same validation rows.
    stage2 = next(s for s in payload["stages"]["BinLLM (binary)"] if s["name"] == "stage2")
    assert stage2["prompts_per_step"] == 16  # 96 train rows, 16 a step, one epoch
    examples = pq.read_table(f"{paper_cfg.run_dir()}/examples/examples.parquet")
    valid = split_rows(examples, "valid", paper_cfg.tune.stage2.max_valid_rows, paper_cfg.run.seed + 1)
    assert stage2["valid_rows"] == valid.num_rows
    binmf = load_encoder(f"{paper_cfg.run_dir()}/encoder")
    want = auc(valid.column("label").to_numpy(), np.asarray(score_pairs(binmf, valid.column("user_id"),
                                                                       valid.column("item_id"))))
    assert payload["valid_references"] == {"BinMF on the stage-2 validation rows": pytest.approx(want)}


def test_rerun_reuses_finished_methods(paper_cfg, paper_run, tmp_path):
    # On a copy of the run: the module's run stays as the other tests read it.
    shutil.copytree(paper_cfg.run_dir(), tmp_path / "runs" / paper_cfg.run.name)
    copy_cfg = dataclasses.replace(paper_cfg, run=dataclasses.replace(paper_cfg.run, output_root=str(tmp_path / "runs")))
    folder = f"{copy_cfg.run_dir()}/paper/methods"
    stamps = {name: os.path.getmtime(f"{folder}/{name}") for name in os.listdir(folder)}
    again = run_paper_table(copy_cfg, device="cpu")
    assert {name: os.path.getmtime(f"{folder}/{name}") for name in os.listdir(folder)} == stamps
    assert again.metrics.column("all_auc").to_pylist() == paper_run.metrics.column("all_auc").to_pylist()


def test_a_reused_method_without_blend_validation_scores_gets_no_blend_row_and_a_note(paper_cfg, paper_run, tmp_path):
    shutil.copytree(paper_cfg.run_dir(), tmp_path / "runs" / paper_cfg.run.name)
    copy_cfg = dataclasses.replace(paper_cfg, run=dataclasses.replace(paper_cfg.run, output_root=str(tmp_path / "runs")))
    os.remove(f"{copy_cfg.run_dir()}/paper/methods/IO-binary.valid.parquet")  # as if scored before paper.blend
    again = run_paper_table(copy_cfg, device="cpu")
    names = [r.spec.name for r in again.results]
    assert "IO+BinMF (binary)" not in names and "IO+BinMF (dotted)" in names and "BinLLM+BinMF (binary)" in names
    md = open(f"{copy_cfg.run_dir()}/paper/metrics.md").read()
    assert "no blend row for IO (binary) (its scores of the 40 blend validation rows are missing" in md
    assert "IO+BinMF (binary) - BinMF" not in md and "IO+BinMF (dotted) - BinMF" in md


def _copy_without_scores(paper_cfg, tmp_path, slug):
    """A copy of the module's run as if it stopped while `slug` scored: adapter and tuned record kept, scores not."""
    shutil.copytree(paper_cfg.run_dir(), tmp_path / "runs" / paper_cfg.run.name)
    copy_cfg = dataclasses.replace(paper_cfg, run=dataclasses.replace(paper_cfg.run, output_root=str(tmp_path / "runs")))
    for suffix in (".json", ".parquet", ".valid.parquet"):
        if os.path.exists(f"{copy_cfg.run_dir()}/paper/methods/{slug}{suffix}"):
            os.remove(f"{copy_cfg.run_dir()}/paper/methods/{slug}{suffix}")
    assert os.path.exists(f"{copy_cfg.run_dir()}/paper/methods/{slug}.tuned.json")
    return copy_cfg


def _no_tuning(*args, **kwargs):
    raise AssertionError("tune_lora called")


def test_a_rerun_scores_the_kept_adapter_of_a_method_tuned_but_not_scored(paper_cfg, paper_run, tmp_path,
                                                                         monkeypatch):
    copy_cfg = _copy_without_scores(paper_cfg, tmp_path, "BinLLM-binary")
    record = json.loads(open(f"{copy_cfg.run_dir()}/paper/methods/BinLLM-binary.tuned.json").read())
    adapter = f"{copy_cfg.run_dir()}/paper/adapters/BinLLM-binary.safetensors"
    stamp = os.path.getmtime(adapter)
    monkeypatch.setattr(paper_table, "tune_lora", _no_tuning)
    again = run_paper_table(copy_cfg, device="cpu")
    before = {r.spec.name: r for r in paper_run.results}["BinLLM (binary)"]
    after = {r.spec.name: r for r in again.results}["BinLLM (binary)"]
    np.testing.assert_allclose(after.logits, before.logits, atol=1e-4)
    np.testing.assert_allclose(after.valid_logits, before.valid_logits, atol=1e-4)  # the blend row is fitted again
    assert after.stages == before.stages == record["stages"]  # TO's stage 1, then stage 2
    assert after.notes["answer"] == before.notes["answer"] == record["answer"]
    assert after.seconds > record["seconds"] > 0
    assert os.path.getmtime(adapter) == stamp
    saved = json.loads(open(f"{copy_cfg.run_dir()}/paper/methods/BinLLM-binary.json").read())
    assert saved["stages"] == record["stages"]
    assert "BinLLM+BinMF (binary)" in [r.spec.name for r in again.results]


def test_a_tuned_record_without_its_adapter_tunes_again(paper_cfg, paper_run, tmp_path, monkeypatch):
    copy_cfg = _copy_without_scores(paper_cfg, tmp_path, "IT-binary")
    os.remove(f"{copy_cfg.run_dir()}/paper/adapters/IT-binary.safetensors")
    monkeypatch.setattr(paper_table, "tune_lora", _no_tuning)
    with pytest.raises(AssertionError, match="tune_lora called"):
        run_paper_table(copy_cfg, device="cpu")


def test_run_order_puts_the_headline_comparison_first():
    specs = method_specs(["MF", "BinMF", "IO", "IT", "BinLLM"], ["binary", "dotted"])
    assert MethodSpec("TO") in specs  # BinLLM's stage 1
    assert [s.name for s in run_order(specs)] == [
        "MF", "BinMF", "TO", "BinLLM (binary)", "IT (binary)", "IO (binary)", "BinLLM (dotted)", "IT (dotted)",
        "IO (dotted)"]


def test_blend_row_is_a_logistic_regression_on_binmf_and_the_kept_adapters_scores(paper_cfg, paper_run):
    # The kept adapter, attached to a fresh base model, scores the blend validation rows as the run saved them;
    # the blend row is the logistic regression on BinMF's and those logits, applied to the test rows.
    folder = f"{paper_cfg.run_dir()}/paper"
    examples = pq.read_table(f"{paper_cfg.run_dir()}/examples/examples.parquet")
    items = pq.read_table(f"{paper_cfg.run_dir()}/examples/items.parquet")
    valid = split_rows(examples, "valid", 40, paper_cfg.run.seed + 2)
    binmf = load_encoder(f"{paper_cfg.run_dir()}/encoder")
    user_codes, item_codes = export_codes(binmf)
    saved = pq.read_table(f"{folder}/methods/IO-dotted.valid.parquet").column("logit").to_numpy()
    assert len(saved) == valid.num_rows == 40

    model, tokenizer = sources.load_base_model(paper_cfg.llm, paper_cfg.storage, device="cpu")
    lora = paper_cfg.tune.lora
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                       top_layers=lora.top_layers)
    adapter = load_file(f"{folder}/adapters/IO-dotted.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # tuned, not fresh LoRA
    copy_into_parameters(model, adapter)
    model.eval()
    prompt = dataclasses.replace(paper_cfg.prompt, kind="codes", code_format="dotted")
    again, _ = llm_logits(valid, items, user_codes, item_codes, prompt=prompt, llm=paper_cfg.llm,
                          score=paper_cfg.score, model=model, tokenizer=tokenizer)
    np.testing.assert_allclose(again, saved, atol=1e-4)

    def binmf_logits(rows):
        return np.asarray(score_pairs(binmf, rows.column("user_id"), rows.column("item_id")), np.float64)

    blend = fit_blend(np.column_stack([binmf_logits(valid), saved]), valid.column("label").to_numpy(),
                      names=("BinMF", "IO"))
    by_name = {r.spec.name: r for r in paper_run.results}
    test = paper_run.test
    want = blend.logits(np.column_stack([binmf_logits(test), by_name["IO (dotted)"].logits]))
    np.testing.assert_allclose(by_name["IO+BinMF (dotted)"].logits, want, rtol=1e-5, atol=1e-5)
    assert by_name["IO+BinMF (dotted)"].notes["blend"]["names"] == ["BinMF", "IO"]
    assert not os.path.exists(f"{folder}/methods/IT-dotted.valid.parquet")  # IT is not in paper.blend
    assert os.path.exists(f"{folder}/adapters/IT-dotted.safetensors")  # every LLM method's adapter is kept


def test_a_code_bits_teacher_gets_its_own_row_pairs_and_validation_reference(paper_cfg, paper_run, tmp_path):
    # A rerun of the finished methods under tune.stage2.distill_teacher code_bits: nothing is tuned again, and the
    # table gains the teacher's row, fitted on every train row of the examples as tune_lora fits it.
    shutil.copytree(paper_cfg.run_dir(), tmp_path / "runs" / paper_cfg.run.name)
    stage2 = dataclasses.replace(paper_cfg.tune.stage2, distill=0.9, distill_teacher="code_bits")
    copy_cfg = dataclasses.replace(paper_cfg, run=dataclasses.replace(paper_cfg.run, output_root=str(tmp_path / "runs")),
                                   tune=dataclasses.replace(paper_cfg.tune, stage2=stage2))
    again = run_paper_table(copy_cfg, device="cpu")
    by_name = {r.spec.name: r for r in again.results}
    assert list(by_name)[:-1] == [r.spec.name for r in paper_run.results] and list(by_name)[-1] == "CodeBits"
    examples = pq.read_table(f"{copy_cfg.run_dir()}/examples/examples.parquet")
    user_codes, item_codes = export_codes(load_encoder(f"{copy_cfg.run_dir()}/encoder"))
    logits = code_logits(paper_run.test, None, user_codes, item_codes, "test", "code_bits",
                         split_rows(examples, "train", 0, copy_cfg.run.seed))
    np.testing.assert_array_equal(by_name["CodeBits"].logits, logits.astype(np.float32))
    payload = json.loads(open(f"{copy_cfg.run_dir()}/paper/metrics.json").read())
    named = {(q["a"], q["b"]) for q in payload["pairs"]}
    assert {("BinLLM (binary)", "CodeBits"), ("IO (dotted)", "CodeBits"), ("IT (binary)", "CodeBits"),
            ("CodeBits", "BinMF")} <= named
    assert len(payload["pairs"]) == 23 + 7
    _, valid = stage_rows(examples, copy_cfg.tune.stage2, copy_cfg.run.seed)
    p_valid = code_estimates(valid, None, user_codes, item_codes, "test", "code_bits",
                             split_rows(examples, "train", 0, copy_cfg.run.seed))
    assert payload["valid_references"]["CodeBits (the teacher) on the stage-2 validation rows"] == pytest.approx(
        auc(valid.column("label").to_numpy(), p_valid))
    assert "CodeBits" not in {r.spec.name for r in paper_run.results}  # inner_product or no distill: no row

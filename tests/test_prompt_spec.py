"""The adapter folder records the prompt spec it was tuned with; scoring and evaluation refuse a mismatch.

Scoring refuses before any Ray work, so these tests need no Ray. A matching spec scoring end to end is
tests/test_demo_e2e.py: the demo publishes its adapter with the spec, then the nightly scoring job and the
evaluate job score with it.
"""
import hashlib
import json
import logging
import os

import pytest

from binllm import cli, prompt_spec, storage
from binllm.config import ConfigError
from binllm.llm import AnswerTokens, apply_lora, load_causal_lm
from binllm.pipeline import run_scoring
from binllm.recipes import evaluate
from binllm.recipes.score import scoring_job
from binllm.run_steps import publish_adapter
from binllm.tune import TuneResult
from pipeline_helpers import random_code_table, scoring_config, write_inputs

ADAPTER_SETTINGS = ("adapter {adapter} was tuned with other prompt settings than this job's config "
                    "(binllm_prompt_spec.json): {diffs}; run with the adapter's settings or tune a new adapter")


@pytest.fixture
def published(tmp_path, tiny_llm_dir):
    """A run's inputs (examples, code tables, requests) and an adapter published by tune_lora's writer."""
    root = str(tmp_path)
    write_inputs(root, tiny_llm_dir)
    cfg = scoring_config(root, tiny_llm_dir)
    model, _ = load_causal_lm(tiny_llm_dir, dtype="float32")
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    spec = prompt_spec.spec_for(cfg.prompt, cfg.llm, cfg.data.history_len, cfg.layout())
    publish_adapter(TuneResult(model=lora, adapter_state=None, answer=AnswerTokens(5, 6), best_auc=0.5),
                    f"{root}/adapter", spec, cfg.llm.model, cfg.storage)
    return root, cfg


def check_adapter(adapter: str, cfg) -> None:
    prompt_spec.check_adapter(adapter, cfg.prompt, cfg.llm, cfg.data.history_len, cfg.layout())


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_publish_adapter_writes_the_spec_beside_the_adapter(published, tiny_llm_dir):
    root, cfg = published
    spec = json.loads(open(f"{root}/adapter/{prompt_spec.SPEC_FILE}").read())
    assert spec == {
        "format": "binllm-prompt-spec/1", "prompt_kind": "full", "code_format": "dotted", "code_layout": "paper",
        "domain": "movie", "domain_plural": "", "empty_history": "nothing yet", "max_title_tokens": 32, "max_tokens": 512,
        "answer": " Yes", "negative_answer": " No", "history_len": 5,
        "base_model_sha256": storage.dir_checksum(str(tiny_llm_dir)),
        "user_codes_sha256": sha256(f"{root}/codes/users.parquet"),
        "item_codes_sha256": sha256(f"{root}/codes/items.parquet"),
    }
    check_adapter(f"{root}/adapter", cfg)  # its own config matches


def test_a_spec_recorded_before_code_layout_existed_reads_as_the_paper_layout(published):
    root, cfg = published
    spec = json.loads(open(f"{root}/adapter/{prompt_spec.SPEC_FILE}").read())
    del spec["code_layout"]
    expected = prompt_spec.spec_for(cfg.prompt, cfg.llm, cfg.data.history_len, cfg.layout())
    assert prompt_spec.differences(spec, expected) == []
    adjacent = {**expected, "code_layout": "adjacent"}
    assert prompt_spec.differences(spec, adjacent) == ["prompt.code_layout: adapter 'paper', config 'adjacent'"]


MISMATCHES = [
    ("prompt.kind=codes", "prompt.kind: adapter 'full', config 'codes'"),
    ("prompt.code_format=binary", "prompt.code_format: adapter 'dotted', config 'binary'"),
    ("prompt.code_layout=adjacent", "prompt.code_layout: adapter 'paper', config 'adjacent'"),
    ("prompt.domain=book", "prompt.domain: adapter 'movie', config 'book'"),
    ("prompt.domain_plural=films", "prompt.domain_plural: adapter '', config 'films'"),
    ("prompt.empty_history=none", "prompt.empty_history: adapter 'nothing yet', config 'none'"),
    ("prompt.max_title_tokens=16", "prompt.max_title_tokens: adapter 32, config 16"),
    ("prompt.max_tokens=0", "prompt.max_tokens: adapter 512, config 0"),
    ("llm.answer=Sure", "llm.answer: adapter ' Yes', config 'Sure'"),
    ("llm.negative_answer=", "llm.negative_answer: adapter ' No', config ''"),
    ("data.history_len=3", "data.history_len: adapter 5, config 3"),
]


@pytest.mark.reliability(kind="bad input", what="scoring with prompt settings other than the adapter's",
                         outcome="refused before any scoring, one line naming each field and both values")
@pytest.mark.parametrize("override, diff", MISMATCHES)
def test_scoring_refuses_each_prompt_setting_that_differs(published, tiny_llm_dir, override, diff):
    root, _ = published
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as error:
        run_scoring(scoring_job(scoring_config(root, tiny_llm_dir, **{key: value})))
    assert str(error.value) == ADAPTER_SETTINGS.format(adapter=f"{root}/adapter", diffs=diff)


@pytest.mark.reliability(kind="bad input", what="scoring with another base model or other code tables",
                         outcome="refused, naming the checksums of the adapter's and the config's")
def test_scoring_refuses_another_base_model_and_other_code_tables(published, tiny_llm_dir,
                                                                  tiny_sentencepiece_llm_dir):
    root, cfg = published
    tuned_on, other = storage.dir_checksum(str(tiny_llm_dir)), storage.dir_checksum(str(tiny_sentencepiece_llm_dir))
    with pytest.raises(ConfigError) as error:
        run_scoring(scoring_job(scoring_config(root, tiny_sentencepiece_llm_dir)))
    assert str(error.value) == ADAPTER_SETTINGS.format(
        adapter=f"{root}/adapter", diffs=f"llm.model sha256: adapter {tuned_on[:12]}, config {other[:12]}")

    users, items = sha256(f"{root}/codes/users.parquet"), sha256(f"{root}/codes/items.parquet")
    storage.write_table(random_code_table([f"i{k}" for k in range(28)], seed=99), f"{root}/codes/items.parquet")
    with pytest.raises(ConfigError) as error:
        run_scoring(scoring_job(cfg))
    assert str(error.value) == ADAPTER_SETTINGS.format(
        adapter=f"{root}/adapter",
        diffs=f"item code table sha256: adapter {items[:12]}, config {sha256(f'{root}/codes/items.parquet')[:12]}")

    with pytest.raises(ConfigError) as error:  # text-only prompts use no codes: every difference on one line
        run_scoring(scoring_job(scoring_config(root, tiny_llm_dir, **{"prompt.kind": "text"})))
    assert str(error.value) == ADAPTER_SETTINGS.format(
        adapter=f"{root}/adapter", diffs=f"prompt.kind: adapter 'full', config 'text'; user code table sha256: "
                                         f"adapter {users[:12]}, config ''; item code table sha256: adapter "
                                         f"{items[:12]}, config ''")


@pytest.mark.reliability(kind="bad input", what="evaluating an adapter with other prompt settings",
                         outcome="exit code 2, one-line error naming the field")
def test_the_evaluate_job_refuses_a_mismatch_with_exit_code_2(published, tiny_llm_dir, capsys):
    root, cfg = published
    settings = {"run.output_root": root, "run.name": "nightly", "llm.model": str(tiny_llm_dir),
                "data.examples": f"{root}/examples", "encoder.codes": f"{root}/codes",
                "tune.adapter": f"{root}/adapter", "data.history_len": 8,
                "prompt.code_format": cfg.prompt.code_format}  # ray_config.yaml's own differs from the fixture's
    with pytest.raises(SystemExit) as exit_:
        cli.run_recipe(evaluate, [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: " + ADAPTER_SETTINGS.format(adapter=f"{root}/adapter",
                                                       diffs="data.history_len: adapter 5, config 8") + "\n"
    assert not storage.exists(f"{root}/nightly/eval")


@pytest.mark.reliability(kind="bad input", what="an adapter folder without a prompt spec (older adapters)",
                         outcome="accepted with a logged warning")
def test_an_adapter_without_a_spec_is_accepted_with_a_warning(published, caplog):
    root, cfg = published
    os.remove(f"{root}/adapter/{prompt_spec.SPEC_FILE}")
    with caplog.at_level(logging.WARNING, logger="binllm.prompt_spec"):
        check_adapter(f"{root}/adapter", cfg)
    assert (f"adapter {root}/adapter has no binllm_prompt_spec.json (published before binllm recorded prompt "
            "specs): its prompt settings, base model and code tables cannot be checked") in caplog.text


@pytest.mark.reliability(kind="bad input", what="a prompt spec file of another format", outcome="ConfigError naming the file")
def test_a_spec_of_another_format_is_refused(published):
    root, cfg = published
    storage.write_json({"format": "something-else/9"}, f"{root}/adapter/{prompt_spec.SPEC_FILE}")
    with pytest.raises(ConfigError) as error:
        check_adapter(f"{root}/adapter", cfg)
    assert str(error.value) == (f"{root}/adapter/binllm_prompt_spec.json: expected a prompt spec of format "
                                "'binllm-prompt-spec/1', found 'something-else/9'")


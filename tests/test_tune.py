"""LoRA tuning in one process: learning, the two-step hand-over, and the saved adapter."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from peft import PeftModel

from binllm.codes import code_table
from binllm.config import load_config
from binllm.llm import load_causal_lm, score_prompts
from binllm.metrics import auc
from binllm.prompts import build_prompts
from binllm.train.backend import LocalBackend
from binllm.config import StageConfig
from binllm.llm import apply_lora, save_adapter
from binllm.train.micro_batches import shared_prefix_micro_batches, stage_steps, train_micro_batches
from binllm.tune import split_rows, tokenize_rows, tune_lora
from synthetic import make_planted_examples

TUNE_SETTINGS = [
    "tune.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
    *(f"tune.{stage}.{key}" for stage in ("stage1", "stage2") for key in (
        "lr=0.01", "micro_batch_size=16", "max_train_rows=320", "max_valid_rows=64", "eval_every=10", "epochs=1")),
]


@pytest.fixture(scope="module")
def planted():
    """Planted signal the tiny LLM can learn quickly: the label is whether the target title says "Space"."""
    examples, items = make_planted_examples(40, 30, 1000, seed=0, history_len=3)
    space = np.array(["Space" in title for title in items.column("title").to_pylist()])
    row_item = pc.index_in(examples.column("item_id"), items.column("item_id")).to_numpy()
    labels = pa.array(space[row_item].astype(np.int8))
    examples = examples.set_column(examples.schema.get_field_index("label"), "label", labels)
    rng = np.random.default_rng(0)
    user_codes = code_table([f"u{k}" for k in range(40)], rng.integers(0, 256, (40, 4), dtype=np.uint8))
    item_codes = code_table([f"i{k}" for k in range(30)], rng.integers(0, 256, (30, 4), dtype=np.uint8))
    return examples, items, user_codes, item_codes


def _tune(planted, llm_dir, *overrides):
    examples, items, user_codes, item_codes = planted
    cfg = load_config(None, [*TUNE_SETTINGS, *overrides])
    model, tokenizer = load_causal_lm(llm_dir)
    tuned = tune_lora(examples, items, user_codes, item_codes, tune=cfg.tune, prompt=cfg.prompt, llm=cfg.llm,
                      seed=cfg.run.seed, model=model, tokenizer=tokenizer)
    return tuned, cfg, tokenizer


def _valid_prompts(planted, cfg, tokenizer):
    examples, items, user_codes, item_codes = planted
    rows = split_rows(examples, "valid", 0, 0)
    return build_prompts(rows, items, user_codes, item_codes, cfg.prompt, kind="full", tokenizer=tokenizer), rows


def test_intuitive_tuning_learns_the_planted_signal(planted, tiny_llm_dir):
    result, _, _ = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "tune.stage2.epochs=3",
                         "tune.stage2.eval_every=20")
    (stage,) = result.stages
    assert stage.name == "stage2" and stage.prompt_kind == "full"
    assert stage.steps == 60 and [h["step"] for h in stage.history] == [20, 40, 60]
    assert stage.history[-1]["loss"] < stage.history[0]["loss"] / 2
    assert result.best_auc > 0.9
    # the best validation's scores come back in row order, beside the labels they were scored against
    assert len(result.valid_scores) == len(result.valid_labels) == stage.valid_rows == 64
    assert auc(result.valid_labels, result.valid_scores) == pytest.approx(result.best_auc, abs=1e-12)
    assert 0 < stage.train_tokens <= stage.padded_tokens
    assert all(name in dict(result.model.named_parameters()) for name in result.adapter_state)
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in result.adapter_state.items())


def test_lora_on_the_top_layer_under_bf16_autocast_learns_the_planted_signal(planted, tiny_llm_dir):
    result, _, _ = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "tune.stage2.epochs=3",
                         "tune.stage2.eval_every=20", "tune.lora.top_layers=1", "tune.autocast=bfloat16")
    trained = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in name for name in trained)  # the tiny LLaMA has layers 0 and 1
    assert result.best_auc > 0.9


def test_lora_top_layers_beyond_the_model_are_refused(tiny_llm_dir):
    model, _ = load_causal_lm(tiny_llm_dir)
    with pytest.raises(ValueError, match=r"LoRA top_layers must be 0 \(every layer\) to 2 for LlamaForCausalLM, got 3"):
        apply_lora(model, top_layers=3)


def test_two_step_runs_both_stages_and_stage2_continues_stage1_lora(planted, tiny_llm_dir):
    # Stage 2 with lr=0 leaves the adapter as stage 1 left it; stage 1 alone is the intuitive run on text prompts.
    stage1 = ["tune.stage1.max_steps=10", "tune.stage2.max_steps=10"]
    two_step, _, _ = _tune(planted, tiny_llm_dir, "tune.mode=two_step", "tune.stage2.lr=0.0", *stage1)
    text_only, _, _ = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "prompt.kind=text", *stage1)
    assert [(s.name, s.prompt_kind) for s in two_step.stages] == [("stage1", "text"), ("stage2", "full")]
    assert all(s.steps > 0 for s in two_step.stages)
    assert two_step.stages[0].best_auc == pytest.approx(text_only.best_auc)
    assert two_step.adapter_state.keys() == text_only.adapter_state.keys()
    for name, value in text_only.adapter_state.items():
        torch.testing.assert_close(two_step.adapter_state[name], value)


def test_saved_adapter_loads_with_peft_and_scores_identically(planted, tiny_llm_dir, tmp_path):
    result, cfg, tokenizer = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "tune.stage2.max_steps=5")
    folder = save_adapter(result.model, tmp_path / "adapter", state=result.adapter_state)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()

    base, _ = load_causal_lm(tiny_llm_dir)
    loaded = PeftModel.from_pretrained(base, folder).eval()
    prompts, rows = _valid_prompts(planted, cfg, tokenizer)
    kwargs = dict(answer_id=result.answer, shared_prefix=False)
    tuned_scores = score_prompts(result.model.eval(), tokenizer, prompts.prefix, prompts.suffix, **kwargs)
    loaded_scores = score_prompts(loaded, tokenizer, prompts.prefix, prompts.suffix, **kwargs)
    np.testing.assert_allclose(loaded_scores, tuned_scores, rtol=1e-5, atol=1e-5)
    base_only, _ = load_causal_lm(tiny_llm_dir)
    untuned = score_prompts(base_only, tokenizer, prompts.prefix, prompts.suffix, **kwargs)
    assert not np.allclose(untuned, tuned_scores, atol=1e-4)


def test_micro_batches_are_deterministic_length_sorted_and_whole_accumulation_groups():
    lengths = np.random.default_rng(1).integers(10, 200, 203)
    backend = LocalBackend()
    first = train_micro_batches(lengths, backend, 8, 3, seed=4, epoch=2)
    again = train_micro_batches(lengths, backend, 8, 3, seed=4, epoch=2)
    other_epoch = train_micro_batches(lengths, backend, 8, 3, seed=4, epoch=3)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    assert [b.tolist() for b in first] != [b.tolist() for b in other_epoch]
    assert len(first) % 3 == 0 and len(first) == 24  # 26 micro-batches, tail of 2 dropped
    rows = np.concatenate(first)
    assert len(np.unique(rows)) == len(rows)
    padding = sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in first)
    sizes = np.cumsum([len(b) for b in first])[:-1]
    shuffled = np.split(np.random.default_rng(0).permutation(203)[: len(rows)], sizes)
    unsorted = sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in shuffled)
    assert padding < unsorted / 4


def test_tuning_without_validation_rows_names_the_problem(planted, tiny_llm_dir):
    examples, items, user_codes, item_codes = planted
    train_only = examples.filter(pc.equal(examples.column("split"), "train"))
    model, tokenizer = load_causal_lm(tiny_llm_dir)
    with pytest.raises(ValueError, match="valid rows"):
        cfg = load_config(None, TUNE_SETTINGS)
        tune_lora(train_only, items, user_codes, item_codes, tune=cfg.tune, prompt=cfg.prompt, llm=cfg.llm,
                  seed=cfg.run.seed, model=model, tokenizer=tokenizer)


def test_token_budget_micro_batches_fit_the_budget_and_split_evenly_over_ranks():
    lengths = np.random.default_rng(2).integers(20, 300, 1000)
    one = train_micro_batches(lengths, LocalBackend(), 8, 1, seed=1, epoch=0, micro_batch_tokens=2048)
    assert all(len(b) * int(lengths[b].max()) <= 2048 for b in one)
    rows = np.concatenate(one)
    assert len(np.unique(rows)) == len(rows) == 1000  # grad_accum 1, one rank: nothing dropped
    assert np.mean([len(b) for b in one]) > 2048 / 300  # batches are filled, not one row each

    class Rank(LocalBackend):
        def __init__(self, rank):
            super().__init__()
            self.rank, self.world_size = rank, 2

    ranks = [train_micro_batches(lengths, Rank(r), 8, 3, seed=1, epoch=0, micro_batch_tokens=2048) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and len(ranks[0]) % 3 == 0  # same steps, whole accumulation groups
    both = np.concatenate(ranks[0] + ranks[1])
    assert len(np.unique(both)) == len(both)
    assert stage_steps(1000, 2, StageConfig(micro_batch_tokens=2048, grad_accum=3), lengths, seed=1)[0] == \
        len(ranks[0]) // 3


def test_tuning_with_a_token_budget_matches_its_planned_steps(planted, tiny_llm_dir):
    result, _, _ = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "tune.stage2.micro_batch_tokens=1200",
                         "tune.stage2.eval_every=0")
    (stage,) = result.stages
    assert stage.steps > 0 and stage.history[-1]["step"] == stage.steps
    assert stage.padded_tokens <= 1200 * stage.steps


def test_shared_prefix_tuning_learns_the_planted_signal_and_computes_fewer_tokens(planted, tiny_llm_dir):
    result, cfg, tokenizer = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "tune.stage2.epochs=3",
                                   "tune.stage2.eval_every=20", "tune.shared_prefix=true")
    (stage,) = result.stages
    assert stage.history[-1]["loss"] < stage.history[0]["loss"] / 2
    assert result.best_auc > 0.9  # as the full-prompt run (test_intuitive_tuning_learns_the_planted_signal)

    examples, items, user_codes, item_codes = planted
    train, _ = tokenize_rows(split_rows(examples, "train", 320, cfg.run.seed), items, user_codes, item_codes,
                             cfg.prompt, "full", tokenizer)
    plan = [batch for epoch in range(3) for batch in shared_prefix_micro_batches(
        train.prefix_of_row, train.prefix_lengths, train.lengths, 1, cfg.run.seed, epoch, micro_batch_size=16)]
    assert stage.steps == len(plan) and [h["step"] for h in stage.history][-1] == stage.steps
    prompt_tokens = sum(int(train.lengths[batch].sum()) for batch in plan)
    computed = sum(sum(map(len, e.prefix_ids)) + sum(map(len, e.suffix_ids)) for e in map(train.encoded, plan))
    assert stage.train_tokens == computed < 0.9 * prompt_tokens  # each prefix once per micro-batch

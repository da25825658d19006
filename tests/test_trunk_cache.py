"""Frozen-trunk caching: what is tuned on cached trunk states is what the full model scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from binllm.config import ConfigError, load_config
from binllm.llm import answer_token_id, apply_lora, collate_prompts, encode_prompts, load_causal_lm, yes_logits
from binllm.llm import build_tiny_llm
from binllm.llm.trunk import TrunkCache, first_adapted_layer
from test_llm_scoring import make_prompts
from test_tune import _tune, planted  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def four_layer_llm_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm_4"), num_layers=4, seed=1)


def _adapted(folder, top_layers, seed=0):
    model, tokenizer = load_causal_lm(folder, dtype="float32")
    torch.manual_seed(seed)
    model = apply_lora(model, target_modules=["q_proj", "v_proj", "o_proj"], top_layers=top_layers, dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero; give it weights so the adapted layers differ from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model, tokenizer, answer_token_id(tokenizer, 'Answer with "Yes" or "No".\n#Answer:')


@pytest.mark.parametrize("top_layers", [1, 3])
def test_trunk_scores_and_lora_gradients_equal_the_full_forward(four_layer_llm_dir, top_layers):
    model, tokenizer, answer = _adapted(four_layer_llm_dir, top_layers)
    sequences = encode_prompts(tokenizer, *make_prompts([3, 1, 4], seed=2))
    assert len({len(s) for s in sequences}) > 1  # left padding differs between the two paths' batches
    rows = np.array([5, 0, 7, 2, 3])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    input_ids, mask = collate_prompts([sequences[r] for r in rows.tolist()], tokenizer.pad_token_id)
    full = yes_logits(model, input_ids, mask, answer)
    torch.nn.functional.binary_cross_entropy_with_logits(full, labels).backward()
    full_grads = {n: p.grad.clone() for n, p in lora.items()}
    model.zero_grad(set_to_none=True)

    cache = TrunkCache(model, sequences, tokenizer.pad_token_id)
    assert cache.split == 4 - top_layers
    cache.batch(np.arange(len(sequences)))  # every prompt's trunk in one batch (other padding than `rows`)
    cached = cache.scores(model, rows, answer)
    torch.nn.functional.binary_cross_entropy_with_logits(cached, labels).backward()

    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    for name, param in lora.items():
        torch.testing.assert_close(param.grad, full_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert cache.computed_tokens == sum(len(s) for s in sequences)


def test_trunk_is_computed_once_per_prompt_and_a_changed_trunk_would_show(four_layer_llm_dir):
    model, tokenizer, answer = _adapted(four_layer_llm_dir, 2)
    sequences = encode_prompts(tokenizer, *make_prompts([2, 2], seed=3))
    cache = TrunkCache(model, sequences, tokenizer.pad_token_id)
    first = cache.scores(model, np.array([0, 1]), answer).detach()
    cache.scores(model, np.array([1, 2, 3]), answer)
    assert cache.computed_tokens == sum(len(s) for s in sequences)  # row 1 came from the cache
    # Control: the check can fail. Perturb a frozen trunk layer: the cache keeps the old states, so its
    # scores now differ from the full forward's.
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.down_proj.weight.mul_(3.0)
    input_ids, mask = collate_prompts(sequences[:2], tokenizer.pad_token_id)
    with torch.no_grad():
        assert not torch.allclose(yes_logits(model, input_ids, mask, answer), first, atol=1e-3)
    torch.testing.assert_close(cache.scores(model, np.array([0, 1]), answer).detach(), first)


def test_a_model_without_frozen_layers_or_with_trainable_embeddings_is_refused(four_layer_llm_dir):
    model, _, _ = _adapted(four_layer_llm_dir, 0)
    assert first_adapted_layer(model) == 0
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="every trainable parameter inside the decoder layers"):
        first_adapted_layer(model)


def test_tuning_on_the_cached_trunk_learns_the_planted_signal(planted, tiny_llm_dir):  # noqa: F811
    result, _, _ = _tune(planted, tiny_llm_dir, "tune.mode=intuitive", "tune.stage2.epochs=3",
                         "tune.stage2.eval_every=20", "tune.lora.top_layers=1", "tune.cache_trunk=true")
    (stage,) = result.stages
    assert stage.steps == 60
    assert result.best_auc > 0.9
    assert all(".layers.1." in name for name in result.adapter_state)


@pytest.mark.parametrize("overrides, message", [
    (["tune.cache_trunk=true"], "'tune.cache_trunk' needs 'tune.lora.top_layers' > 0"),
    (["tune.cache_trunk=true", "tune.lora.top_layers=2", "tune.shared_prefix=true"], "exclude each other"),
    (["tune.cache_trunk=true", "tune.lora.top_layers=2", "distributed.zero_stage=3"], "zero_stage' 3"),
])
def test_cache_trunk_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)

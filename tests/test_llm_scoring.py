"""Scoring: the shared-prefix path gives the full-prompt scores, which equal the model's own logits."""
import numpy as np
import pytest
import torch

from binllm.llm import (
    answer_token_id,
    apply_lora,
    collate_prompts,
    encode_prompts,
    load_adapter,
    load_causal_lm,
    save_adapter,
    score_prompts,
    yes_logits,
)
from binllm.llm.batching import plan_shared_prefix

TITLES = ['"Heat (1995)"', '"Titanic (1997)"', '"Fargo (1996)"', '"Alien (1979)"', '"The Matrix (1999)"',
          '"Schindler\'s List (1993)"', '"Back to the Future (1985)"']


def make_prompts(candidates_per_user, seed=0):
    """Users with histories of different lengths (so prefixes of different lengths), candidates with codes of
    different lengths, shuffled so that one user's pairs are not adjacent."""
    rng = np.random.default_rng(seed)
    prefixes, suffixes = [], []
    for user, count in enumerate(candidates_per_user):
        history = ", ".join(rng.choice(TITLES, size=user % 6, replace=False)) or "No history available"
        prefix = (
            f"#Question: A user has given high ratings to the following movies: {history}. Additionally, we have "
            f"information about the user's preferences encoded in the feature {user}.{rng.integers(256)}.7.9. Using "
            "all available information, make a prediction about whether the user would enjoy the movie titled"
        )
        for _ in range(count):
            code = "".join(rng.choice(list("01"), size=int(rng.integers(1, 33))))
            suffixes.append(f' {rng.choice(TITLES)} with the feature {code}? Answer with "Yes" or "No".\n#Answer:')
            prefixes.append(prefix)
    order = rng.permutation(len(prefixes))
    return [prefixes[i] for i in order], [suffixes[i] for i in order]


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def llm(request, tiny_llm_dir, tiny_sentencepiece_llm_dir):
    folder = tiny_llm_dir if request.param == "bytelevel" else tiny_sentencepiece_llm_dir
    model, tokenizer = load_causal_lm(folder, dtype="float32")
    return model, tokenizer, answer_token_id(tokenizer, 'Answer with "Yes" or "No".\n#Answer:')


def reference_logits(model, tokenizer, prefixes, suffixes, answer_id):
    """Each prompt alone, unpadded, through the model's ordinary forward with full-vocabulary logits."""
    with torch.no_grad():
        return np.array([
            model(torch.tensor([ids])).logits[0, -1, answer_id].item()
            for ids in encode_prompts(tokenizer, prefixes, suffixes)
        ])


@pytest.fixture(scope="module")
def mixed_users(llm):
    """Six users, 1 to 14 candidates each, with their reference logits."""
    model, tokenizer, answer_id = llm
    prefixes, suffixes = make_prompts([1, 3, 14, 2, 1, 5])
    return prefixes, suffixes, reference_logits(model, tokenizer, prefixes, suffixes, answer_id)


# (max_batch_tokens, max_row_tokens): defaults; caps far below one user's candidates; one pair per forward.
CAPS = [(8192, 512), (200, 60), (1, 1)]


@pytest.mark.parametrize("max_batch_tokens,max_row_tokens", CAPS)
def test_shared_prefix_matches_full_prompt_and_reference(llm, mixed_users, max_batch_tokens, max_row_tokens):
    model, tokenizer, answer_id = llm
    prefixes, suffixes, reference = mixed_users
    caps = dict(max_batch_tokens=max_batch_tokens, max_row_tokens=max_row_tokens)
    shared = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, **caps)
    full = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, shared_prefix=False, **caps)
    assert shared.dtype == np.float32 and shared.shape == (len(prefixes),)
    assert reference.std() > 0.05  # scores differ enough between prompts for the comparison to mean something
    np.testing.assert_allclose(full, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(shared, reference, atol=1e-4, rtol=0)


def test_one_candidate_per_user(llm):
    model, tokenizer, answer_id = llm
    prefixes, suffixes = make_prompts([1] * 6, seed=1)
    shared = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, max_batch_tokens=300)
    np.testing.assert_allclose(shared, reference_logits(model, tokenizer, prefixes, suffixes, answer_id), atol=1e-4)


def test_scores_follow_input_order(llm):
    model, tokenizer, answer_id = llm
    prefixes, suffixes = make_prompts([4, 9, 2], seed=2)
    scores = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, max_row_tokens=80)
    order = np.random.default_rng(3).permutation(len(prefixes))
    permuted = score_prompts(
        model, tokenizer, [prefixes[i] for i in order], [suffixes[i] for i in order], answer_id=answer_id,
        max_row_tokens=80,
    )
    np.testing.assert_allclose(permuted, scores[order], atol=1e-5)
    assert len(np.unique(np.round(scores, 4))) > len(scores) // 2


def test_empty_input_and_eager_attention(llm):
    model, tokenizer, answer_id = llm
    assert score_prompts(model, tokenizer, [], [], answer_id=answer_id).shape == (0,)
    prefixes, suffixes = make_prompts([5, 2], seed=4)
    sdpa = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, max_row_tokens=100)
    model.set_attn_implementation("eager")
    try:
        eager = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, max_row_tokens=100)
    finally:
        model.set_attn_implementation("sdpa")
    np.testing.assert_allclose(eager, sdpa, atol=1e-4)


def test_plan_splits_large_candidate_sets_into_rows_that_reuse_the_prefix():
    prefix_lengths = np.array([50, 10, 30])
    suffix_lengths = np.array([10] * 23 + [12, 12])
    pair_prefix = np.array([0] * 20 + [1] * 3 + [2] * 2)
    groups = plan_shared_prefix(prefix_lengths, suffix_lengths, pair_prefix, max_batch_tokens=60, max_row_tokens=30)
    assert [g.users.tolist() for g in groups] == [[0], [2, 1]]  # longest prefixes first, users x longest <= 60
    rows = [row for g in groups for batch in g.row_batches for row in batch]
    assert sorted(np.concatenate([row.pairs for row in rows]).tolist()) == list(range(25))
    assert all(row.width(suffix_lengths) <= 30 for row in rows)
    assert all(set(pair_prefix[row.pairs].tolist()) == {row.user} for row in rows)
    user0_batches = groups[0].row_batches
    assert len(user0_batches) > 1  # C = 20 exceeds one forward's budget: several forwards reuse one prefix pass
    assert all(len(batch) * max(r.width(suffix_lengths) for r in batch) <= 60 for batch in user0_batches)


def test_yes_logits_equals_full_vocabulary_logit_at_last_position(llm):
    model, tokenizer, answer_id = llm
    prefixes, suffixes = make_prompts([3, 2], seed=5)
    sequences = encode_prompts(tokenizer, prefixes, suffixes)
    input_ids, attention_mask = collate_prompts(sequences, tokenizer.pad_token_id)
    assert (attention_mask[:, 0] == 0).any()  # the batch really is left-padded
    with torch.no_grad():
        got = yes_logits(model, input_ids, attention_mask, answer_id)
    reference = reference_logits(model, tokenizer, prefixes, suffixes, answer_id)
    np.testing.assert_allclose(got.numpy(), reference, atol=1e-4)
    with pytest.raises(ValueError, match="left-padded"):
        yes_logits(model, input_ids.flip(1), attention_mask.flip(1), answer_id)


def test_answer_head_stays_float32_under_bf16_autocast(llm):
    model, tokenizer, answer_id = llm
    prefixes, suffixes = make_prompts([3, 2], seed=5)
    input_ids, attention_mask = collate_prompts(encode_prompts(tokenizer, prefixes, suffixes), tokenizer.pad_token_id)
    with torch.no_grad():
        reference = yes_logits(model, input_ids, attention_mask, answer_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = yes_logits(model, input_ids, attention_mask, answer_id)
    assert mixed.dtype == torch.float32
    assert not torch.equal(mixed, reference)  # the body did run in bf16
    torch.testing.assert_close(mixed, reference, atol=0.05, rtol=0.0)


def test_collate_pads_on_the_left():
    input_ids, attention_mask = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def randomise_lora(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_lora_adapter_round_trip_and_training_forward(tiny_llm_dir, tmp_path):
    base, tokenizer = load_causal_lm(tiny_llm_dir)
    answer_id = answer_token_id(tokenizer, 'Answer with "Yes" or "No".\n#Answer:')
    prefixes, suffixes = make_prompts([6, 3], seed=6)
    base_scores = score_prompts(base, tokenizer, prefixes, suffixes, answer_id=answer_id)

    tuned = apply_lora(base)
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in tuned.named_parameters() if p.requires_grad
    )
    randomise_lora(tuned, seed=0)
    tuned.train()
    tuned_scores = score_prompts(tuned, tokenizer, prefixes, suffixes, answer_id=answer_id)
    assert tuned.training  # scoring restores the caller's mode
    assert np.abs(tuned_scores - base_scores).max() > 1e-2
    np.testing.assert_allclose(
        tuned_scores, score_prompts(tuned, tokenizer, prefixes, suffixes, answer_id=answer_id, shared_prefix=False),
        atol=1e-4,
    )

    input_ids, attention_mask = collate_prompts(encode_prompts(tokenizer, prefixes, suffixes), tokenizer.pad_token_id)
    tuned.eval()
    logits = yes_logits(tuned, input_ids, attention_mask, answer_id)
    np.testing.assert_allclose(logits.detach().numpy(), tuned_scores, atol=1e-4)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in tuned.named_parameters() if "lora_A" in n)

    folder = save_adapter(tuned, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").is_file()
    fresh, _ = load_causal_lm(tiny_llm_dir)
    loaded = load_adapter(fresh, folder)
    np.testing.assert_array_equal(
        score_prompts(loaded, tokenizer, prefixes, suffixes, answer_id=answer_id), tuned_scores
    )
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh, tmp_path)


def test_adapters_load_from_safetensors_only(tiny_llm_dir, tmp_path):
    base, _ = load_causal_lm(tiny_llm_dir)
    folder = save_adapter(apply_lora(base), tmp_path / "adapter")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")  # a pickle would run code
    fresh, _ = load_causal_lm(tiny_llm_dir)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing; adapters load from safetensors"):
        load_adapter(fresh, folder)


def test_scoring_under_bf16_autocast_ranks_like_float32(llm, mixed_users):
    model, tokenizer, answer_id = llm
    prefixes, suffixes, reference = mixed_users
    exact = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id)
    mixed = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=answer_id, autocast=torch.bfloat16)
    assert mixed.dtype == np.float32 and not np.array_equal(mixed, exact)  # the body did run in bf16
    np.testing.assert_allclose(exact, reference, atol=1e-4)
    np.testing.assert_allclose(mixed, reference, atol=0.05)
    assert np.corrcoef(np.argsort(np.argsort(mixed)), np.argsort(np.argsort(exact)))[0, 1] > 0.9
    assert next(model.parameters()).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_autocast_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch, caplog):
    from binllm.llm import loading

    monkeypatch.setattr(loading, "_warned_slow_bf16", False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not loading.native_bf16("cpu")
    assert loading.autocast_dtype("auto", "cpu") is None and loading.autocast_dtype("", "cpu") is None
    assert "emulated" not in caplog.text
    assert loading.autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16  # asked for: kept, with a warning
    assert "no native bf16" in caplog.text and "set autocast to auto" in caplog.text
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert loading.native_bf16("cpu") and loading.autocast_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match=r"autocast must be '' \(off\), 'auto' or 'bfloat16', got 'fp16'"):
        loading.autocast_dtype("fp16", "cpu")

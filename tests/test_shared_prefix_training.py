"""Shared-prefix training: each distinct prefix runs once, and the loss, its LoRA gradients and the scores
equal the full prompts' (yes_logits); micro-batches that keep a prefix's rows together."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from binllm.config import StageConfig, load_config
from binllm.data.schema import DataError
from binllm.llm import (
    AnswerTokens,
    EncodedPrompts,
    answer_tokens,
    apply_lora,
    collate_prompts,
    encode_prompt_parts,
    load_causal_lm,
    score_encoded,
    yes_logits,
)
from binllm.llm.shared_prefix_logits import shared_prefix_yes_logits
from binllm.train.micro_batches import shared_prefix_micro_batches, stage_steps
from binllm.tune import PromptSet, StageTask, split_rows, tokenize_rows
from synthetic import make_planted_examples
from test_llm_scoring import make_prompts

ANSWER = AnswerTokens(7, 8)
PAD = 0

# (prefix lengths, [(prefix index, suffix length), ...]): rows interleave their prefixes.
CASES = {
    "prefixes and suffixes of different lengths": ((3, 9, 17), [(1, 1), (0, 4), (2, 7), (1, 2), (2, 5), (0, 3),
                                                               (1, 6), (2, 2)]),
    "no padding anywhere": ((6, 6), [(0, 4), (1, 4), (0, 4), (1, 4)]),
    "right-padded prefixes only": ((2, 11), [(1, 3), (0, 3), (1, 3), (0, 3)]),
    "left-padded suffixes only": ((8,), [(0, 1), (0, 9), (0, 4)]),
}


def make_rows(case: str, vocab: int, seed: int = 0) -> EncodedPrompts:
    prefix_lengths, rows = CASES[case]
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(10, vocab, n).tolist() for n in prefix_lengths]
    suffixes = [rng.integers(10, vocab, n).tolist() for _, n in rows]
    return EncodedPrompts(prefixes, suffixes, np.asarray([p for p, _ in rows], dtype=np.int64))


def lora_model(folder, attention="sdpa"):
    """The tiny LLaMA with LoRA on every projection, no dropout, and random (nonzero) LoRA weights, so that
    every LoRA tensor gets a gradient."""
    model, _ = load_causal_lm(folder, dtype="float32")
    model.set_attn_implementation(attention)
    torch.manual_seed(0)
    peft = apply_lora(model, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    for _, parameter in peft.named_parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.2)
    return peft.train()


def loss_and_gradients(model, scores, labels):
    names, parameters = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    loss = F.binary_cross_entropy_with_logits(scores, labels)
    return loss, dict(zip(names, torch.autograd.grad(loss, parameters)))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_shared_prefix_loss_and_lora_gradients_equal_the_full_prompts(tiny_llm_dir, case, attention):
    model = lora_model(tiny_llm_dir, attention)
    encoded = make_rows(case, model.config.vocab_size)
    labels = torch.from_numpy(np.arange(len(encoded)) % 2).float()

    input_ids, mask = collate_prompts(encoded.sequences(), PAD)  # full prompts, left-padded
    full_loss, full_grads = loss_and_gradients(model, yes_logits(model, input_ids, mask, ANSWER), labels)
    shared_scores = shared_prefix_yes_logits(model, encoded, ANSWER, PAD)
    shared_loss, shared_grads = loss_and_gradients(model, shared_scores, labels)

    assert shared_scores.dtype == torch.float32 and shared_scores.shape == (len(encoded),)
    torch.testing.assert_close(shared_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == shared_grads.keys() and len(full_grads) == 2 * 2 * 7  # 2 layers x 7 modules x A, B
    for name, gradient in full_grads.items():
        assert gradient.abs().max() > 1e-3, name
        torch.testing.assert_close(shared_grads[name], gradient, rtol=1e-4, atol=1e-5, msg=name)


def test_the_prefix_pass_carries_gradient(tiny_llm_dir, monkeypatch):
    """Cutting the graph at the cached prefix keys/values changes the LoRA gradients: the test above
    compares gradients that flow through both passes."""
    import binllm.llm.shared_prefix_logits as module

    model = lora_model(tiny_llm_dir)
    encoded = make_rows("prefixes and suffixes of different lengths", model.config.vocab_size)
    labels = torch.ones(len(encoded))
    _, through = loss_and_gradients(model, shared_prefix_yes_logits(model, encoded, ANSWER, PAD), labels)
    run_prefixes = module.run_prefixes
    monkeypatch.setattr(module, "run_prefixes", lambda *args, **kwargs: [
        (keys.detach(), values.detach()) for keys, values in run_prefixes(*args, **kwargs)])
    _, cut = loss_and_gradients(model, shared_prefix_yes_logits(model, encoded, ANSWER, PAD), labels)
    assert max(float((through[name] - cut[name]).abs().max()) for name in through) > 1e-2


@pytest.mark.parametrize("style", ["bytelevel", "sentencepiece"])
def test_shared_prefix_scores_of_real_prompts_match_yes_logits_and_the_scorer(
        style, tiny_llm_dir, tiny_sentencepiece_llm_dir):
    model, tokenizer = load_causal_lm(tiny_llm_dir if style == "bytelevel" else tiny_sentencepiece_llm_dir,
                                      dtype="float32")
    prefixes, suffixes = make_prompts([3, 1, 4, 2])
    encoded = encode_prompt_parts(tokenizer, prefixes, suffixes)
    answer = answer_tokens(tokenizer, prefixes[0] + suffixes[0])
    with torch.no_grad():
        shared = shared_prefix_yes_logits(model, encoded, answer, tokenizer.pad_token_id).numpy()
        full = yes_logits(model, *collate_prompts(encoded.sequences(), tokenizer.pad_token_id), answer).numpy()
    scorer = score_encoded(model, encoded, answer_id=answer, pad_id=tokenizer.pad_token_id, shared_prefix=False)
    assert len(set(encoded.pair_prefix.tolist())) == 4 and len(shared) == 10
    np.testing.assert_allclose(shared, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared, scorer, rtol=1e-5, atol=1e-5)


def test_shared_prefix_forward_needs_a_prompt(tiny_llm_dir):
    model, _ = load_causal_lm(tiny_llm_dir, dtype="float32")
    with pytest.raises(ValueError, match="shared_prefix_yes_logits needs at least one prompt"):
        shared_prefix_yes_logits(model, EncodedPrompts([], [], np.zeros(0, dtype=np.int64)), ANSWER, PAD)


def test_prompt_set_rows_split_into_their_shared_prefix_and_suffix_tokens(tiny_llm_dir):
    examples, items = make_planted_examples(6, 10, 200, seed=0, history_len=2)
    cfg = load_config(None, ["prompt.kind=text"])
    _, tokenizer = load_causal_lm(tiny_llm_dir)
    rows = split_rows(examples, "train", 0, 0)
    prompts, _ = tokenize_rows(rows, items, None, None, cfg.prompt, "text", tokenizer)
    histories = [tuple(h) for h in rows.column("history").to_pylist()]  # text prompts: the prefix is the history
    assert len(np.unique(prompts.prefix_of_row)) == len(set(histories)) < len(prompts)  # one prefix per history
    picked = np.asarray([5, 0, 17, 5, 33, 101, 17])
    encoded = prompts.encoded(picked)
    assert encoded.sequences() == [prompts.token_ids[r] for r in picked.tolist()]
    assert len(encoded.prefix_ids) == len(np.unique(prompts.prefix_of_row[picked]))
    assert [len(encoded.prefix_ids[p]) for p in encoded.pair_prefix] == prompts.prefix_lengths[picked].tolist()


def grouped_rows(seed=0, n_prefixes=300):
    """Rows of prefixes with 1 to 6 rows each (shuffled), prefixes of 20-200 tokens, suffixes of 5-40."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, n_prefixes)
    prefix_of_row = rng.permutation(np.repeat(np.arange(n_prefixes), counts))
    prefix_lengths = rng.integers(20, 200, n_prefixes)[prefix_of_row]
    return prefix_of_row, prefix_lengths, prefix_lengths + rng.integers(5, 40, len(prefix_of_row))


def computed_tokens(batch, prefix_of_row, prefix_lengths, lengths):
    """(tokens the shared-prefix forward computes, the same with padding) for one micro-batch."""
    _, first = np.unique(prefix_of_row[batch], return_index=True)
    prefixes, suffixes = prefix_lengths[batch][first], (lengths - prefix_lengths)[batch]
    return int(prefixes.sum() + suffixes.sum()), int(prefixes.max() * len(prefixes) + suffixes.max() * len(batch))


@pytest.mark.parametrize("sizing", [{"micro_batch_tokens": 1500}, {"micro_batch_size": 8}])
def test_shared_prefix_micro_batches_keep_prefixes_together_within_the_cap(sizing):
    prefix_of_row, prefix_lengths, lengths = grouped_rows()
    plan = shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, seed=3, epoch=0, **sizing)
    again = shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, seed=3, epoch=0, **sizing)
    other_epoch = shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, seed=3, epoch=1, **sizing)
    assert [b.tolist() for b in plan] == [b.tolist() for b in again]
    assert [b.tolist() for b in plan] != [b.tolist() for b in other_epoch]
    rows = np.concatenate(plan)
    assert np.array_equal(np.sort(rows), np.arange(len(lengths)))  # one rank, grad_accum 1: every row once

    batch_of_row = np.empty(len(lengths), dtype=np.int64)
    for k, batch in enumerate(plan):
        batch_of_row[batch] = k
    for prefix in np.unique(prefix_of_row):
        assert len(np.unique(batch_of_row[prefix_of_row == prefix])) == 1  # no group exceeds these caps
    if "micro_batch_tokens" in sizing:
        costs = np.asarray([computed_tokens(b, prefix_of_row, prefix_lengths, lengths) for b in plan])
        assert (costs[:, 1] <= 1500).all() and costs[:, 1].mean() > 1000  # within the budget and well filled
        assert costs[:, 0].sum() < 0.5 * lengths.sum()  # each prefix once: under half the prompts' tokens
    else:
        assert max(len(b) for b in plan) <= 8 and np.mean([len(b) for b in plan]) > 6


def test_a_prefix_group_over_the_cap_is_cut_into_pieces_that_fit():
    prefix_of_row = np.asarray([0] * 10 + [1, 2])
    prefix_lengths = np.asarray([100] * 10 + [30, 40])
    lengths = prefix_lengths + 20
    plan = shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, 0, 0, micro_batch_tokens=200)
    pieces = sorted(b.tolist() for b in plan if (prefix_of_row[b] == 0).any())
    assert [len(p) for p in pieces] == [5, 5] and sorted(sum(pieces, [])) == list(range(10))  # 100 + 5 x 20
    assert all(computed_tokens(b, prefix_of_row, prefix_lengths, lengths)[1] <= 200 for b in plan)
    rows = shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, 0, 0, micro_batch_size=4)
    assert sorted(len(b) for b in rows if (prefix_of_row[b] == 0).any()) == [2, 4, 4]


def test_shared_prefix_micro_batches_split_evenly_over_ranks_in_whole_accumulation_groups():
    prefix_of_row, prefix_lengths, lengths = grouped_rows(seed=1)
    ranks = [shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 3, 1, 0, micro_batch_tokens=1500,
                                         rank=r, world_size=2) for r in (0, 1)]
    alone = shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, 1, 0, micro_batch_tokens=1500)
    assert len(ranks[0]) == len(ranks[1]) and len(ranks[0]) % 3 == 0
    assert len(alone) - 6 < 2 * len(ranks[0]) <= len(alone)  # only the tail short of 2 x 3 batches is dropped
    both = np.concatenate(ranks[0] + ranks[1])
    assert len(np.unique(both)) == len(both)
    settings = StageConfig(micro_batch_tokens=1500, grad_accum=3, epochs=2)
    assert stage_steps(len(lengths), 2, settings, lengths, seed=1, prefixes=(prefix_of_row, prefix_lengths)) == (
        len(ranks[0]) // 3, len(ranks[0]) // 3 + len(shared_prefix_micro_batches(
            prefix_of_row, prefix_lengths, lengths, 3, 1, 1, micro_batch_tokens=1500, world_size=2)) // 3)


@pytest.mark.reliability(kind="bad input", what="shared-prefix stage too small for one optimizer step",
                         outcome="DataError naming the sizes")
def test_a_shared_prefix_stage_without_a_whole_step_names_its_sizes():
    prefix_of_row, prefix_lengths, lengths = grouped_rows(n_prefixes=4)
    message = (r"^\d+ training rows make no optimizer step with shared-prefix micro-batches of micro_batch_size=64, "
               r"grad_accum=4 on 2 rank\(s\); lower them or add rows$")
    with pytest.raises(DataError, match=message):
        stage_steps(len(lengths), 2, StageConfig(micro_batch_size=64, grad_accum=4), lengths,
                    prefixes=(prefix_of_row, prefix_lengths))
    with pytest.raises(ValueError, match="need micro_batch_tokens or micro_batch_size >= 1, got 0 and 0"):
        shared_prefix_micro_batches(prefix_of_row, prefix_lengths, lengths, 1, 0, 0)


def test_shared_prefix_validation_gives_every_rank_as_many_forwards_as_the_busiest(tiny_llm_dir):
    """ZeRO-3 forwards are collective: a rank with fewer shared-prefix batches repeats its first one."""
    from binllm.train.backend import LocalBackend

    class FirstOfTwoRanks(LocalBackend):
        rank, world_size = 0, 2

        def gather(self, arrays):  # the other rank planned two batches more
            return {key: np.concatenate([value, value + 2]) for key, value in arrays.items()}

    prefix_of_row, prefix_lengths, lengths = grouped_rows(n_prefixes=20)
    valid = PromptSet([[1] * n for n in lengths.tolist()], np.zeros(len(lengths), dtype=np.float32), prefix_of_row,
                      prefix_lengths)
    task = StageTask(FirstOfTwoRanks(), valid, valid, StageConfig(micro_batch_size=4), ANSWER, PAD, 0,
                      shared_prefix=True)
    mine = np.arange(len(lengths))
    plan = task._shared_plan(valid, mine, 1, 0, scale=2)
    batches = task._shared_eval_batches(mine)
    assert len(batches) == len(plan) + 2 and max(len(b) for b in plan) <= 8
    assert [b.tolist() for b in batches] == [b.tolist() for b in plan + plan[:1] * 2]


@pytest.mark.reliability(kind="bad input", what="shared-prefix training on a model without 4D-mask attention",
                         outcome="ValueError naming the attention implementation")
def test_shared_prefix_training_refuses_an_attention_without_custom_masks(tiny_llm_dir):
    model, _ = load_causal_lm(tiny_llm_dir, dtype="float32")
    model.config._attn_implementation = "flash_attention_2"
    encoded = make_rows("no padding anywhere", model.config.vocab_size)
    with pytest.raises(ValueError, match="this model uses 'flash_attention_2' .*or turn shared_prefix off"):
        shared_prefix_yes_logits(model, encoded, ANSWER, PAD)

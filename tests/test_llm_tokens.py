"""Tiny model building, loading, canonical prompt tokens and the answer token."""
import json

import pytest

from binllm.llm import (answer_token_id, build_tiny_llm, encode_prompt_parts, encode_prompts, load_causal_lm,
                        prompt_token_counts)

PREFIX = (
    "#Question: A user has given high ratings to the following movies: \"Heat (1995)\", \"Fargo (1996)\". "
    "Additionally, we have information about the user's preferences encoded in the feature 178.112.245.45. "
    "Using all available information, make a prediction about whether the user would enjoy the movie titled"
)
SUFFIX = ' "Alien (1979)" with the feature 10110010011100001111010100101101? Answer with "Yes" or "No".\n#Answer:'


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def tokenizer(request, tiny_llm_dir, tiny_sentencepiece_llm_dir):
    folder = tiny_llm_dir if request.param == "bytelevel" else tiny_sentencepiece_llm_dir
    return load_causal_lm(folder)[1]


def test_tokenizer_pads_left_with_a_pad_token(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None


def test_bos_only_in_sentencepiece_style(tiny_llm_dir, tiny_sentencepiece_llm_dir):
    gpt2_style = load_causal_lm(tiny_llm_dir)[1]
    llama_style = load_causal_lm(tiny_sentencepiece_llm_dir)[1]
    assert gpt2_style("Yes")["input_ids"][0] != gpt2_style.bos_token_id
    assert llama_style("Yes")["input_ids"][0] == llama_style.bos_token_id


def test_digits_tokenize_one_per_token(tokenizer):
    binary = tokenizer(" 10110010011100001111010100101101", add_special_tokens=False)["input_ids"]
    dotted = tokenizer(" 178.112.245.45", add_special_tokens=False)["input_ids"]
    assert len(binary) == 33
    assert len(dotted) == 15
    assert tokenizer.convert_ids_to_tokens(binary[1:4]) == ["1", "0", "1"]


def test_canonical_encoding_is_prefix_tokens_then_suffix_tokens(tokenizer):
    other_suffix = SUFFIX.replace("Alien (1979)", "Heat (1995)")
    encoded = encode_prompt_parts(tokenizer, [PREFIX, PREFIX, "A user"], [SUFFIX, other_suffix, SUFFIX])
    assert len(encoded.prefix_ids) == 2
    assert encoded.pair_prefix.tolist() == [0, 0, 1]
    prefix_ids = tokenizer(PREFIX)["input_ids"]
    suffix_ids = tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
    assert encode_prompts(tokenizer, [PREFIX], [SUFFIX]) == [prefix_ids + suffix_ids]
    assert encoded.sequences()[0] == prefix_ids + suffix_ids
    # The boundary falls on a space, so the split encoding is also the whole prompt's encoding.
    assert prefix_ids + suffix_ids == tokenizer(PREFIX + SUFFIX)["input_ids"]


def test_token_counts_are_the_lengths_of_the_canonical_tokens(tokenizer):
    prefixes, suffixes = [PREFIX, PREFIX, "A user"], [SUFFIX, " No?", SUFFIX]
    counts = prompt_token_counts(tokenizer, prefixes, suffixes)
    assert counts.tolist() == [len(ids) for ids in encode_prompts(tokenizer, prefixes, suffixes)]
    assert counts[0] == len(tokenizer(PREFIX)["input_ids"]) + len(tokenizer(SUFFIX, add_special_tokens=False)["input_ids"])
    assert prompt_token_counts(tokenizer, [], []).tolist() == []


def test_encoding_rejects_mismatched_and_empty_inputs(tokenizer):
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        encode_prompt_parts(tokenizer, [PREFIX, PREFIX], [SUFFIX])
    with pytest.raises(ValueError, match="suffix 1"):
        encode_prompt_parts(tokenizer, [PREFIX, PREFIX], [SUFFIX, ""])


def test_answer_token_is_the_token_after_the_prompt(tokenizer):
    yes = answer_token_id(tokenizer, PREFIX + SUFFIX, " Yes")
    no = answer_token_id(tokenizer, PREFIX + SUFFIX, " No")
    assert yes != no
    assert tokenizer.decode([yes]).strip() == "Yes"
    full = tokenizer(PREFIX + SUFFIX + " Yes", add_special_tokens=False)["input_ids"]
    assert full[-1] == yes


def test_answer_token_differs_from_the_bare_answer_in_gpt2_style(tiny_llm_dir):
    tokenizer = load_causal_lm(tiny_llm_dir)[1]
    # " Yes" after the prompt is one token, "Yes" on its own another: the reason to derive it in context.
    assert tokenizer("Yes", add_special_tokens=False)["input_ids"][0] != answer_token_id(tokenizer, PREFIX + SUFFIX)


def test_answer_token_rejects_an_answer_that_merges_with_the_prompt(tokenizer):
    with pytest.raises(ValueError, match="not a prefix"):
        answer_token_id(tokenizer, PREFIX + SUFFIX + " Ye", "s")


def test_build_is_deterministic_per_seed(tmp_path, tiny_llm_dir):
    again = build_tiny_llm(tmp_path / "again", style="bytelevel", seed=0)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (tiny_llm_dir / name).read_bytes()
    config = json.loads((again / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2


def test_load_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"{tmp_path}.*config.json is missing"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model weights"):
        load_causal_lm(tmp_path)


def test_model_folder_code_runs_only_with_trust_remote_code(tiny_llm_dir, tmp_path):
    """A folder whose config points at its own Python code (auto_map) does not get that code run by default."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llm_dir, folder)
    marker = tmp_path / "code_ran"
    (folder / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        load_causal_lm(folder)
    except ValueError as err:  # transformers may refuse the folder outright instead of ignoring auto_map
        assert "trust_remote_code" in str(err)
    assert not marker.exists()

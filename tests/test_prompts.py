import numpy as np
import pyarrow as pa
import pytest

from binllm.codes import code_table, parse_code_text
from binllm.config import PromptConfig
from binllm.prompts import build_prompts

ITEMS = pa.table({"item_id": ["1", "2", "3"], "title": ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"]})
USER = code_table(["u1"], parse_code_text(["10110010011100001111010100101101"], "binary"))
ITEM = code_table(["3"], parse_code_text(["01001101110000101011001011110001"], "binary"))
ROWS = pa.table({"user_id": ["u1"], "item_id": ["3"], "history": [["1", "2"]]})


def test_full_prompt_matches_the_template_character_for_character():
    batch = build_prompts(ROWS, ITEMS, USER, ITEM, PromptConfig())
    assert batch.texts[0] == (
        '#Question: A user has given high ratings to the following movies: "Toy Story (1995)", "Heat (1995)". '
        "Additionally, we have information about the user's preferences encoded in the feature 178.112.245.45. "
        "Using all available information, make a prediction about whether the user would enjoy the movie titled "
        '"Fargo (1996)" with the feature 77.194.178.241? Answer with "Yes" or "No".\n#Answer:')
    assert batch.prefix[0].endswith("would enjoy the movie titled")
    assert not batch.fallback[0]


def test_binary_codes_text_only_codes_only_and_domain():
    cfg = PromptConfig(code_format="binary", domain="book")
    full = build_prompts(ROWS, ITEMS, USER, ITEM, cfg).texts[0]
    assert "encoded in the feature 10110010011100001111010100101101." in full
    assert "the following books:" in full and "enjoy the book titled" in full
    text = build_prompts(ROWS, ITEMS, USER, ITEM, PromptConfig(), kind="text").texts[0]
    assert text == ('#Question: A user has given high ratings to the following movies: "Toy Story (1995)", '
                    '"Heat (1995)". Leverage the information to predict whether the user would enjoy the movie titled '
                    '"Fargo (1996)"? Answer with "Yes" or "No".\n#Answer:')
    codes = build_prompts(ROWS, ITEMS, USER, ITEM, PromptConfig(), kind="codes").texts[0]
    assert "Toy Story" not in codes and "Fargo" not in codes
    assert "feature 178.112.245.45" in codes and "feature 77.194.178.241?" in codes


def test_missing_codes_fall_back_to_text_only_and_are_marked():
    rows = pa.table({"user_id": ["u1", "u2", "u1"], "item_id": ["3", "3", "1"], "history": [[], ["3"], []]})
    batch = build_prompts(rows, ITEMS, USER, ITEM, PromptConfig())
    np.testing.assert_array_equal(batch.fallback, [False, True, True])
    assert "feature" not in batch.texts[1] and "feature" not in batch.texts[2]
    assert "following movies: nothing yet." in batch.texts[0]
    assert len(batch) == 3  # no row dropped


def test_prefix_depends_only_on_the_user_and_rows_are_built_in_order():
    rows = pa.table({"user_id": ["u1"] * 3, "item_id": ["3", "2", "1"], "history": [["1"]] * 3})
    items_codes = code_table(["1", "2", "3"], np.arange(12, dtype=np.uint8).reshape(3, 4))
    batch = build_prompts(rows, ITEMS, USER, items_codes, PromptConfig())
    assert len(set(batch.prefix)) == 1
    assert [s.split('"')[1] for s in batch.suffix] == ["Fargo (1996)", "Heat (1995)", "Toy Story (1995)"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="prompt rows: missing column"):
        build_prompts(pa.table({"user_id": ["u1"]}), ITEMS, USER, ITEM, PromptConfig())
    with pytest.raises(ValueError, match="needs user and item code tables"):
        build_prompts(ROWS, ITEMS, None, None, PromptConfig())
    with pytest.raises(ValueError, match="unknown prompt kind"):
        build_prompts(ROWS, ITEMS, USER, ITEM, PromptConfig(), kind="nope")

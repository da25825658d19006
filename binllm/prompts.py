"""BinLLM prompts, built column-wise with Arrow compute (no per-row Python).

Every prompt is returned as two strings, prefix + suffix. The prefix depends on the user alone
(history titles, user code) and ends with "...would enjoy the movie titled"; the suffix carries
the target item. Scoring shares one prefix computation across all of a user's candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm.config import PromptConfig
from binllm.data.schema import DataError

# The paper's templates (BINLLM_METHOD.md, section 3), cut into the pieces that the columns fill in.
# A prompt is a user prefix (history titles, user code) and an item suffix (target title, item code).
HISTORY_HEAD = "#Question: A user has given high ratings to the following {plural}: "
TEXT_PREFIX_TAIL = ". Leverage the information to predict whether the user would enjoy the {noun} titled"
USER_CODE_HEAD = ". Additionally, we have information about the user's preferences encoded in the feature "
FULL_PREFIX_TAIL = ". Using all available information, make a prediction about whether the user would enjoy the {noun} titled"
CODES_PREFIX_HEAD = "#Question: We have information about the user's preferences encoded in the feature "
CODES_PREFIX_TAIL = ". Using all available information, make a prediction about whether the user would enjoy the {noun}"
ITEM_CODE_HEAD = " with the feature "
ANSWER_TAIL = '? Answer with "Yes" or "No".\n#Answer:'


@dataclass
class PromptBatch:
    prefix: list[str]
    suffix: list[str]
    fallback: np.ndarray  # True where a missing user or item code forced the text-only prompt
    missing_titles: int  # history or target items absent from the catalog (their id stands in)

    @property
    def texts(self) -> list[str]:
        return [p + s for p, s in zip(self.prefix, self.suffix)]

    def __len__(self) -> int:
        return len(self.prefix)


def _concat(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _require(table: pa.Table, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; has {table.column_names}")


def _lookup(keys: pa.Array, ids: pa.Array, values: pa.Array) -> pa.Array:
    """values[position of key in ids], null where the key is absent."""
    return pc.take(values, pc.index_in(keys, value_set=ids))


def _titles(item_ids: pa.Array, items: pa.Table) -> tuple[pa.Array, int]:
    titles = _lookup(item_ids, items.column("item_id").combine_chunks().cast(pa.string()),
                     items.column("title").combine_chunks().cast(pa.string()))
    missing = titles.null_count
    return pc.if_else(pc.is_null(titles), item_ids, titles), missing


def _quoted(values: pa.Array) -> pa.Array:
    return _concat('"', values, '"')


def build_prompts(
    rows: pa.Table,
    items: pa.Table,
    user_codes: pa.Table | None,
    item_codes: pa.Table | None,
    cfg: PromptConfig,
    kind: str | None = None,
) -> PromptBatch:
    """Prompts for rows (user_id, item_id, history) with titles from `items` and codes from the code tables.

    kind: "full" (titles + codes), "text" (titles only, the TALLRec prompt), "codes" (codes only);
    defaults to cfg.kind. Rows whose user or item has no code get the text-only prompt and fallback=True.
    """
    kind = kind or cfg.kind
    if kind not in ("full", "text", "codes"):
        raise ValueError(f"unknown prompt kind {kind!r}; expected 'full', 'text' or 'codes'")
    _require(rows, ("user_id", "item_id", "history"), "prompt rows")
    _require(items, ("item_id", "title"), "item catalog")
    n = rows.num_rows
    noun, plural = cfg.domain, cfg.domain_plural or f"{cfg.domain}s"

    history = rows.column("history").combine_chunks()
    if not pa.types.is_list(history.type) and not pa.types.is_large_list(history.type):
        raise DataError(f"prompt rows: column 'history' must be a list of item ids, got {history.type}")
    flat_ids = pc.list_flatten(history).cast(pa.string())
    flat_titles, missing_hist = _titles(flat_ids, items)
    offsets = pc.list_value_length(history).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(offsets)]).astype(np.int32))
    title_lists = pa.ListArray.from_arrays(offsets, _quoted(flat_titles))
    history_text = pc.binary_join(title_lists, ", ")
    history_text = pc.if_else(pc.equal(pc.list_value_length(title_lists), 0), cfg.empty_history, history_text)

    item_ids = rows.column("item_id").combine_chunks().cast(pa.string())
    target, missing_target = _titles(item_ids, items)
    target = _quoted(target)

    fallback = np.zeros(n, dtype=bool)
    if kind != "text":
        if user_codes is None or item_codes is None:
            raise DataError(f"prompt kind {kind!r} needs user and item code tables")
        column = cfg.code_format
        _require(user_codes, ("id", column), "user code table")
        _require(item_codes, ("id", column), "item code table")
        user_code = _lookup(rows.column("user_id").combine_chunks().cast(pa.string()),
                            user_codes.column("id").combine_chunks(), user_codes.column(column).combine_chunks())
        item_code = _lookup(item_ids, item_codes.column("id").combine_chunks(), item_codes.column(column).combine_chunks())
        fallback = (pc.is_null(user_code).to_numpy(zero_copy_only=False)
                    | pc.is_null(item_code).to_numpy(zero_copy_only=False))
        user_code, item_code = user_code.fill_null(""), item_code.fill_null("")

    head = HISTORY_HEAD.format(plural=plural)
    text_prefix = _concat(head, history_text, TEXT_PREFIX_TAIL.format(noun=noun))
    text_suffix = _concat(" ", target, ANSWER_TAIL)
    if kind == "text":
        prefix, suffix = text_prefix, text_suffix
    else:
        if kind == "full":
            prefix = _concat(head, history_text, USER_CODE_HEAD, user_code, FULL_PREFIX_TAIL.format(noun=noun))
            suffix = _concat(" ", target, ITEM_CODE_HEAD, item_code, ANSWER_TAIL)
        else:
            prefix = _concat(CODES_PREFIX_HEAD, user_code, CODES_PREFIX_TAIL.format(noun=noun))
            suffix = _concat(ITEM_CODE_HEAD, item_code, ANSWER_TAIL)
        mask = pa.array(fallback)
        prefix = pc.if_else(mask, text_prefix, prefix)
        suffix = pc.if_else(mask, text_suffix, suffix)
    return PromptBatch(prefix.to_pylist(), suffix.to_pylist(), fallback, missing_hist + missing_target)

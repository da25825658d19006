"""BinLLM prompts, built column-wise with Arrow compute (no per-row Python).

Every prompt is returned as two strings, prefix + suffix. The prefix depends on the user alone
(history titles; the user code too in the paper's layout) and ends with "...would enjoy the movie titled";
the suffix carries the target item. Scoring shares one prefix computation across all of a user's candidates.

Titles are normalised before they enter a prompt (`normalise_titles`). With the tokenizer, two caps
hold, in tokens: a title longer than prompt.max_title_tokens is cut to that many, and a prompt whose
canonical tokens (binllm.llm.tokens) exceed prompt.max_tokens loses its oldest history titles until it
fits. Training and both scorers call `build_prompts` with their tokenizer, so they see the same prompts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm.config import PromptConfig
from binllm.data.schema import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# The paper's templates (BINLLM_METHOD.md, section 3), cut into the pieces that the columns fill in.
# A prompt is a user prefix (history titles, user code) and an item suffix (target title, item code).
HISTORY_HEAD = "#Question: A user has given high ratings to the following {plural}: "
TEXT_PREFIX_TAIL = ". Leverage the information to predict whether the user would enjoy the {noun} titled"
USER_CODE_HEAD = ". Additionally, we have information about the user's preferences encoded in the feature "
FULL_PREFIX_TAIL = ". Using all available information, make a prediction about whether the user would enjoy the {noun} titled"
CODES_PREFIX_HEAD = "#Question: We have information about the user's preferences encoded in the feature "
CODES_PREFIX_TAIL = ". Using all available information, make a prediction about whether the user would enjoy the {noun}"
ITEM_CODE_HEAD = " with the feature "
# prompt.code_layout "adjacent": the user code moves from the prefix to right after the item code, behind this
# fixed text, so that bit k of one code is always the same number of tokens from bit k of the other.
USER_CODE_BESIDE = ", given the user's preferences encoded in the feature "
ANSWER_TAIL = '? Answer with "Yes" or "No".\n#Answer:'

SPACES = r"[\p{Cc}\p{Z}]+"  # control characters (newlines, tabs, NUL, ...) and every Unicode space
MARKERS = r"(?i)#+\s*(question|answer)"  # the template's "#Question" / "#Answer" markers


@dataclass
class PromptBatch:
    prefix: list[str]
    suffix: list[str]
    fallback: np.ndarray  # True where a missing user or item code forced the text-only prompt
    missing_titles: int  # history or target items absent from the catalog, or with an empty title (their id stands in)
    titles_cut: int = 0  # history and target titles cut to prompt.max_title_tokens
    history_dropped: int = 0  # history titles dropped so that prompts fit prompt.max_tokens
    prompts_shortened: int = 0  # prompts that lost history titles

    @property
    def texts(self) -> list[str]:
        return [p + s for p, s in zip(self.prefix, self.suffix)]

    def __len__(self) -> int:
        return len(self.prefix)


def normalise_titles(titles: pa.Array) -> pa.Array:
    """Runs of whitespace and control characters become one space, ends trimmed; "#Question" / "#Answer"
    (any case) lose their "#", so a title cannot open a question or an answer; double quotes, which
    delimit titles in the template, become single quotes."""
    titles = pc.replace_substring_regex(titles, SPACES, " ")
    titles = pc.replace_substring_regex(titles, MARKERS, r"\1")
    titles = pc.replace_substring(titles, '"', "'")
    return pc.utf8_trim(titles, " ")


def _concat(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _require(table: pa.Table, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; has {table.column_names}")


def _quoted(values: pa.Array) -> pa.Array:
    return _concat('"', values, '"')


def _lookup(keys: pa.Array, ids: pa.Array, values: pa.Array) -> pa.Array:
    """values[position of key in ids], null where the key is absent."""
    return pc.take(values, pc.index_in(keys, value_set=ids))


def _titles(item_ids: pa.Array, items: pa.Table) -> tuple[pa.Array, int]:
    """Normalised titles of `item_ids`; the normalised id where the catalog has no (or an empty) title."""
    titles = normalise_titles(_lookup(item_ids, items.column("item_id").combine_chunks().cast(pa.string()),
                                      items.column("title").combine_chunks().cast(pa.string())))
    missing = pc.or_(pc.is_null(titles), pc.equal(titles, "").fill_null(True))
    return pc.if_else(missing, normalise_titles(item_ids), titles), int(pc.sum(missing).as_py() or 0)


def cut_titles(titles: pa.Array, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> tuple[pa.Array, np.ndarray]:
    """Titles longer than `max_tokens` tokens (each encoded alone, without special tokens) cut to their first
    `max_tokens` tokens, and a mask of the titles cut. Each distinct title is tokenised once."""
    distinct = pc.unique(titles).drop_null()
    ids = tokenizer(distinct.to_pylist(), add_special_tokens=False)["input_ids"] if len(distinct) else []
    long = [i for i, t in enumerate(ids) if len(t) > max_tokens]
    if not long:
        return titles, np.zeros(len(titles), dtype=bool)
    values = distinct.to_pylist()
    keep = dict.fromkeys(long, max_tokens)
    while keep:
        # Decoded and re-encoded text can come out a token longer (a split character): then cut one token more.
        pending = list(keep)
        texts = tokenizer.batch_decode([ids[i][:keep[i]] for i in pending], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
        texts = pc.utf8_rtrim(normalise_titles(pa.array(texts, pa.string())), "\ufffd ").to_pylist()
        lengths = [len(t) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for i, text, n in zip(pending, texts, lengths):
            if n <= max_tokens or keep[i] == 1:
                values[i] = text
                del keep[i]
            else:
                keep[i] -= 1
    index = pc.index_in(titles, value_set=distinct)
    cut = np.isin(index.fill_null(-1).to_numpy(zero_copy_only=False), long)
    return pc.take(pa.array(values, pa.string()), index), cut


@dataclass
class _Parts:
    """The column-wise pieces of a batch of prompts; `assemble` joins them, less each row's oldest titles."""

    kind: str
    cfg: PromptConfig
    titles: pa.Array  # quoted history titles of every row, flat, oldest first within a row
    lengths: np.ndarray  # history titles per row
    target: pa.Array  # quoted target titles
    user_code: pa.Array | None
    item_code: pa.Array | None
    fallback: np.ndarray

    def history_text(self, drop: np.ndarray) -> pa.Array:
        kept = self.lengths - np.minimum(drop, self.lengths)
        titles = self.titles
        if drop.any():
            starts = np.repeat(np.concatenate([[0], np.cumsum(self.lengths)[:-1]]), self.lengths)
            position = np.arange(len(titles)) - starts
            titles = titles.filter(pa.array(position >= np.repeat(drop, self.lengths)))
        offsets = pa.array(np.concatenate([[0], np.cumsum(kept)]).astype(np.int32))
        text = pc.binary_join(pa.ListArray.from_arrays(offsets, titles), ", ")
        return pc.if_else(pa.array(kept == 0), self.cfg.empty_history, text)

    def assemble(self, drop: np.ndarray) -> tuple[pa.Array, pa.Array]:
        cfg = self.cfg
        noun, plural = cfg.domain, cfg.domain_plural or f"{cfg.domain}s"
        head = HISTORY_HEAD.format(plural=plural)
        history = self.history_text(drop)
        text_prefix = _concat(head, history, TEXT_PREFIX_TAIL.format(noun=noun))
        text_suffix = _concat(" ", self.target, ANSWER_TAIL)
        if self.kind == "text":
            return text_prefix, text_suffix
        if self.kind == "full" and cfg.code_layout == "adjacent":
            prefix = _concat(head, history, FULL_PREFIX_TAIL.format(noun=noun))
            suffix = _concat(" ", self.target, ITEM_CODE_HEAD, self.item_code, USER_CODE_BESIDE, self.user_code,
                             ANSWER_TAIL)
        elif self.kind == "full":
            prefix = _concat(head, history, USER_CODE_HEAD, self.user_code, FULL_PREFIX_TAIL.format(noun=noun))
            suffix = _concat(" ", self.target, ITEM_CODE_HEAD, self.item_code, ANSWER_TAIL)
        else:
            prefix = _concat(CODES_PREFIX_HEAD, self.user_code, CODES_PREFIX_TAIL.format(noun=noun))
            suffix = _concat(ITEM_CODE_HEAD, self.item_code, ANSWER_TAIL)
        mask = pa.array(self.fallback)
        return pc.if_else(mask, text_prefix, prefix), pc.if_else(mask, text_suffix, suffix)

    def droppable(self) -> np.ndarray:
        """History titles each row's prompt shows (codes-only prompts show none, their text fallbacks do)."""
        return self.lengths if self.kind != "codes" else np.where(self.fallback, self.lengths, 0)


def _fit(parts: _Parts, rows: pa.Table, tokenizer: PreTrainedTokenizerBase,
         max_tokens: int) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Prefixes and suffixes whose canonical tokens fit `max_tokens`, each prompt dropping its oldest history
    titles one at a time (only the prompts still over are re-tokenised); also the titles dropped per row."""
    from binllm.llm.tokens import prompt_token_counts

    drop = np.zeros(len(parts.lengths), dtype=np.int64)
    prefix, suffix = parts.assemble(drop)
    suffixes = suffix.to_pylist()
    counts = prompt_token_counts(tokenizer, prefix.to_pylist(), suffixes)
    droppable = parts.droppable()
    while True:
        grow = (counts > max_tokens) & (drop < droppable)
        if not grow.any():
            break
        drop[grow] += 1
        prefix, _ = parts.assemble(drop)
        rows_grown = np.flatnonzero(grow)
        counts[rows_grown] = prompt_token_counts(tokenizer, prefix.take(pa.array(rows_grown)).to_pylist(),
                                                 [suffixes[i] for i in rows_grown])
    over = np.flatnonzero(counts > max_tokens)
    if over.size:
        first = int(over[0])
        user, item = rows.column("user_id")[first].as_py(), rows.column("item_id")[first].as_py()
        history = "every history title dropped" if droppable[first] else "no history titles"
        raise DataError(
            f"prompt for user {user!r} and item {item!r} has {int(counts[first])} tokens with {history}, over "
            f"prompt.max_tokens={max_tokens} ({over.size} of {len(counts)} prompts): its template, codes and target "
            "title alone do not fit; raise prompt.max_tokens or lower prompt.max_title_tokens")
    return prefix, suffix, drop


def build_prompts(
    rows: pa.Table,
    items: pa.Table,
    user_codes: pa.Table | None,
    item_codes: pa.Table | None,
    cfg: PromptConfig,
    kind: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PromptBatch:
    """Prompts for rows (user_id, item_id, history) with titles from `items` and codes from the code tables.

    kind: "full" (titles + codes), "text" (titles only, the TALLRec prompt), "codes" (codes only);
    defaults to cfg.kind. Rows whose user or item has no code get the text-only prompt and fallback=True.
    tokenizer: the LLM's; required when cfg.max_title_tokens or cfg.max_tokens caps prompts (in tokens).
    """
    kind = kind or cfg.kind
    if kind not in ("full", "text", "codes"):
        raise ValueError(f"unknown prompt kind {kind!r}; expected 'full', 'text' or 'codes'")
    if tokenizer is None and (cfg.max_title_tokens > 0 or cfg.max_tokens > 0):
        raise ValueError(f"prompt.max_title_tokens={cfg.max_title_tokens} and prompt.max_tokens={cfg.max_tokens} "
                         "cap prompts in tokens: build_prompts needs the LLM's tokenizer (tokenizer=...)")
    _require(rows, ("user_id", "item_id", "history"), "prompt rows")
    _require(items, ("item_id", "title"), "item catalog")
    n = rows.num_rows

    history = rows.column("history").combine_chunks()
    if not pa.types.is_list(history.type) and not pa.types.is_large_list(history.type):
        raise DataError(f"prompt rows: column 'history' must be a list of item ids, got {history.type}")
    flat_titles, missing_hist = _titles(pc.list_flatten(history).cast(pa.string()), items)
    lengths = pc.list_value_length(history).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    item_ids = rows.column("item_id").combine_chunks().cast(pa.string())
    target, missing_target = _titles(item_ids, items)
    titles_cut = 0
    if cfg.max_title_tokens > 0:
        both, cut = cut_titles(pa.concat_arrays([flat_titles, target]), tokenizer, cfg.max_title_tokens)
        flat_titles, target, titles_cut = both.slice(0, len(flat_titles)), both.slice(len(flat_titles)), int(cut.sum())

    if kind == "text":
        user_code = item_code = None
        fallback = np.zeros(n, dtype=bool)
    else:
        user_code, item_code, fallback = _codes(rows, item_ids, user_codes, item_codes, cfg.code_format, kind)

    parts = _Parts(kind, cfg, _quoted(flat_titles), lengths, _quoted(target), user_code, item_code, fallback)
    if cfg.max_tokens > 0 and n:
        prefix, suffix, drop = _fit(parts, rows, tokenizer, cfg.max_tokens)
    else:
        drop = np.zeros(n, dtype=np.int64)
        prefix, suffix = parts.assemble(drop)
    batch = PromptBatch(prefix.to_pylist(), suffix.to_pylist(), fallback, missing_hist + missing_target,
                        titles_cut=titles_cut, history_dropped=int(drop.sum()),
                        prompts_shortened=int((drop > 0).sum()))
    if batch.titles_cut or batch.history_dropped:
        log.info("prompts: %d titles cut to prompt.max_title_tokens=%d tokens; %d history titles dropped from %d of "
                 "%d prompts to fit prompt.max_tokens=%d", batch.titles_cut, cfg.max_title_tokens,
                 batch.history_dropped, batch.prompts_shortened, n, cfg.max_tokens)
    return batch


def _codes(rows: pa.Table, item_ids: pa.Array, user_codes: pa.Table | None, item_codes: pa.Table | None, column: str,
           kind: str) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(user code, item code) texts of `rows` in the code format `column` ("" where an id has no code), and
    which rows lack either code (they get the text-only prompt)."""
    if user_codes is None or item_codes is None:
        raise DataError(f"prompt kind {kind!r} needs user and item code tables")
    _require(user_codes, ("id", column), "user code table")
    _require(item_codes, ("id", column), "item code table")
    user_code = _lookup(rows.column("user_id").combine_chunks().cast(pa.string()),
                        user_codes.column("id").combine_chunks(), user_codes.column(column).combine_chunks())
    item_code = _lookup(item_ids, item_codes.column("id").combine_chunks(), item_codes.column(column).combine_chunks())
    fallback = (pc.is_null(user_code).to_numpy(zero_copy_only=False)
                | pc.is_null(item_code).to_numpy(zero_copy_only=False))
    return user_code.fill_null(""), item_code.fill_null(""), fallback

"""The prompt spec an adapter was tuned with: written beside the adapter, checked before it scores.

An adapter scores correctly only the prompts it was tuned on: the same template settings and caps, answer
tokens, history length, base model and code tables. `publish_adapter` writes them as
binllm_prompt_spec.json in the adapter folder; scoring and evaluation compute the spec of their own config
and refuse an adapter whose spec differs, with one line naming every differing field, the adapter's value
and the config's. An adapter folder without the file (published before binllm recorded specs) still
scores, with a logged warning that nothing was checked.
"""
from __future__ import annotations

import logging
from typing import Any

from binllm import sources, storage
from binllm.config import ConfigError, LLMConfig, PromptConfig, RunLayout

log = logging.getLogger(__name__)

SPEC_FILE = "binllm_prompt_spec.json"
SPEC_FORMAT = "binllm-prompt-spec/1"

# Every field of a spec, and what sets it: a config key, or the input whose sha256 it is.
FIELDS = {
    "prompt_kind": "prompt.kind",
    "code_format": "prompt.code_format",
    "code_layout": "prompt.code_layout",
    "domain": "prompt.domain",
    "domain_plural": "prompt.domain_plural",
    "empty_history": "prompt.empty_history",
    "max_title_tokens": "prompt.max_title_tokens",
    "max_tokens": "prompt.max_tokens",
    "answer": "llm.answer",
    "negative_answer": "llm.negative_answer",
    "history_len": "data.history_len",
    "base_model_sha256": "llm.model sha256",
    "user_codes_sha256": "user code table sha256",
    "item_codes_sha256": "item code table sha256",
}
CHECKSUMS = ("base_model_sha256", "user_codes_sha256", "item_codes_sha256")
# Fields added after the spec's first format, with the value every adapter recorded before them had.
ADDED_LATER = {"code_layout": "paper"}


def model_sha256(llm: LLMConfig, layout: RunLayout) -> str:
    """storage.dir_checksum of the base model (the node-local copy of an s3:// model: the same digest)."""
    return storage.dir_checksum(str(sources.model_folder(llm.model, layout.storage)), layout.storage)


def spec_for(prompt: PromptConfig, llm: LLMConfig, history_len: int, layout: RunLayout,
             base_model_sha256: str | None = None) -> dict[str, Any]:
    """The spec of these prompt settings, with the checksums of the base model (unless given) and of the run's
    code tables (empty for text-only prompts, which use no codes)."""
    codes = layout.codes
    uses_codes = prompt.kind != "text"
    return {
        "format": SPEC_FORMAT,
        "prompt_kind": prompt.kind,
        "code_format": prompt.code_format,
        "code_layout": prompt.code_layout,
        "domain": prompt.domain,
        "domain_plural": prompt.domain_plural,
        "empty_history": prompt.empty_history,
        "max_title_tokens": prompt.max_title_tokens,
        "max_tokens": prompt.max_tokens,
        "answer": llm.answer,
        "negative_answer": llm.negative_answer,
        "history_len": history_len,
        "base_model_sha256": base_model_sha256 or model_sha256(llm, layout),
        "user_codes_sha256": storage.file_checksum(storage.join_uri(codes, "users.parquet"), "user code table",
                                                   layout.storage) if uses_codes else "",
        "item_codes_sha256": storage.file_checksum(storage.join_uri(codes, "items.parquet"), "item code table",
                                                   layout.storage) if uses_codes else "",
    }


def _shown(field: str, value: Any) -> str:
    if field in CHECKSUMS and isinstance(value, str) and value:
        return value[:12]
    return "(none)" if value is None else repr(value)


def differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """'<key>: adapter <value>, config <value>' for every field where the two specs differ."""
    recorded = {**ADDED_LATER, **recorded}
    return [f"{key}: adapter {_shown(field, recorded.get(field))}, config {_shown(field, expected[field])}"
            for field, key in FIELDS.items() if recorded.get(field) != expected[field]]


def check_adapter(adapter: str, prompt: PromptConfig, llm: LLMConfig, history_len: int, layout: RunLayout,
                  base_model_sha256: str | None = None) -> None:
    """Refuses (ConfigError) the adapter folder `adapter` when its recorded spec differs from these settings'."""
    uri = storage.join_uri(adapter, SPEC_FILE)
    if not storage.exists(uri, layout.storage):
        log.warning("adapter %s has no %s (published before binllm recorded prompt specs): its prompt settings, "
                    "base model and code tables cannot be checked against this job's config; tune it again to "
                    "have them checked", adapter, SPEC_FILE)
        return
    recorded = storage.read_json(uri, layout.storage)
    if not isinstance(recorded, dict) or recorded.get("format") != SPEC_FORMAT:
        found = recorded.get("format") if isinstance(recorded, dict) else type(recorded).__name__
        raise ConfigError(f"{uri}: expected a prompt spec of format {SPEC_FORMAT!r}, found {found!r}")
    diffs = differences(recorded, spec_for(prompt, llm, history_len, layout, base_model_sha256))
    if diffs:
        raise ConfigError(f"adapter {adapter} was tuned with other prompt settings than this job's config "
                          f"({SPEC_FILE}): {'; '.join(diffs)}; run with the adapter's settings or tune a new adapter")

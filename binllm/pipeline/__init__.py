"""The Ray Data scoring pipeline (jobs/score.py), and the publish protocol of its dated partitions
(binllm.pipeline.publish).

The names below load their module on first use: a reader of published partitions
(`from binllm.pipeline.publish import read_partition`) does not import Ray, torch or the LLM code.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InputError": "binllm.pipeline.inputs",
    "ScoringInputs": "binllm.pipeline.inputs",
    "resolve_inputs": "binllm.pipeline.inputs",
    "ScoringJob": "binllm.pipeline.run",
    "ScoringSummary": "binllm.pipeline.run",
    "run_scoring": "binllm.pipeline.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

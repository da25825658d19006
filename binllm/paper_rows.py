"""The paper table's rows: a method (MethodSpec), its scores and training history (MethodResult), the table, and
the names of the rows beyond the paper (the "<method>+BinMF" blends, the CodeBits teacher)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

BLEND_PARTNER = "BinMF"  # the "<method>+BinMF" rows blend a code method with it
TEACHER = "CodeBits"  # the row of stage 2's code_bits distillation teacher
TEACHER_PAIRS = (("BinLLM", TEACHER), ("IO", TEACHER), ("IT", TEACHER), (TEACHER, "BinMF"))


@dataclass(frozen=True)
class MethodSpec:
    method: str  # one of binllm.config.PAPER_METHODS
    code_format: str | None = None  # binary | dotted for IO, IT, BinLLM

    @property
    def name(self) -> str:
        return f"{self.method} ({self.code_format})" if self.code_format else self.method

    @property
    def slug(self) -> str:
        return f"{self.method}-{self.code_format}" if self.code_format else self.method


@dataclass
class MethodResult:
    spec: MethodSpec
    logits: np.ndarray  # float32, one per test row, in test-row order
    seconds: float
    stages: list[dict] = field(default_factory=list)  # StageResult dicts (LLM methods)
    notes: dict = field(default_factory=dict)
    valid_logits: np.ndarray | None = None  # float32, one per blend validation row (methods in paper.blend)


@dataclass
class PaperTable:
    metrics: pa.Table  # report_table rows, one per method
    results: list[MethodResult]
    test: pa.Table
    text: str
    seconds: float
    skipped: list[str] = field(default_factory=list)  # methods left for a later run by paper.time_budget_s
    device: str = "cpu"
    pairs: pa.Table | None = None  # pairwise_report of PAPER_PAIRS among the methods run
    valid_references: dict[str, float] = field(default_factory=dict)  # drawn across valid_auc.png
    unblended: list[str] = field(default_factory=list)  # methods in paper.blend left without a blend row, and why


def blend_method(method: str) -> str:
    """The name of `method`'s blend row: "<method>+BinMF"."""
    return f"{method}+{BLEND_PARTNER}"


def blend_spec(spec: MethodSpec) -> MethodSpec:
    return MethodSpec(blend_method(spec.method), spec.code_format)


def blend_pairs(methods: list[str]) -> tuple[tuple[str, str], ...]:
    """The blend rows' pairs: each against BinMF and against its method alone."""
    return tuple(pair for m in methods for pair in ((blend_method(m), BLEND_PARTNER), (blend_method(m), m)))

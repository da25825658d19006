"""Benchmark: full-prompt vs shared-prefix scoring at real model shapes with random weights.

    python -m jobs.benchmark_scoring [--device cpu|cuda] [--cases NAME,NAME,...] [--list]

Prints one JSON line per case. Token ids are synthetic, of the lengths a BinLLM prompt has with the
digit-per-token tokenizers (LLaMA, SmolLM2): binary codes cost 33 tokens, dotted codes 15, so a
dotted prompt is 18 tokens shorter in the prefix (user code) and 18 in the suffix (item code).
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from jobs.bench import scoring

    scoring.main(argv, description=__doc__)


if __name__ == "__main__":
    main()

"""Prepare: interactions + catalog -> labelled, time-split examples with histories and warm flags.

    binllm prepare --config ray_config.yaml --set data.format=grouplens --set data.path=ml-1m

Writes examples.parquet, items.parquet and profile.json (the data profile, also printed as a short table)
under <run dir>/examples (or data.examples). A data set that cannot train (an empty split, a split with one
label, an implicit log without data.negatives, ratings outside data.rating_scale, ...) is refused before
anything is written, in one line naming the key, column or file to change.
"""
from __future__ import annotations

import pyarrow as pa

from binllm.config import Config
from binllm.run_steps import prepare_run

SECTIONS = ("run", "storage", "data")


def main(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(examples, items), written under the run's examples location."""
    return prepare_run(cfg.data, cfg.layout())

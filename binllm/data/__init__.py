"""Interaction data: importers, labels, time split, histories, warm/cold flags."""
from binllm.data.importers import read_grouplens, read_recbole, read_table
from binllm.data.prepare import prepare_examples, split_rows
from binllm.data.schema import DataError

__all__ = ["DataError", "prepare_examples", "read_grouplens", "read_recbole", "read_table", "split_rows"]

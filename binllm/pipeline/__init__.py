"""The Ray Data scoring pipeline (jobs/score.py)."""
from binllm.pipeline.inputs import InputError, ScoringInputs, resolve_inputs
from binllm.pipeline.run import ScoringSummary, run_scoring

__all__ = ["InputError", "ScoringInputs", "ScoringSummary", "resolve_inputs", "run_scoring"]

"""LoRA tuning (BinLLM section 4): the stages' data, one stage's task, and the tuning job."""
from binllm.tune.job import StageResult, TuneResult, run_stage, tune_lora
from binllm.tune.stage_data import PromptSet, Stage, split_rows, stage_rows, tokenize_rows, tuning_stages
from binllm.tune.stage_task import StageTask

__all__ = ["PromptSet", "Stage", "StageResult", "StageTask", "TuneResult", "run_stage", "split_rows", "stage_rows",
           "tokenize_rows", "tune_lora", "tuning_stages"]

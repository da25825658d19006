"""One typed configuration for every job: the sections (binllm.config.sections) and their loading from
YAML files and `--set key=value` overrides (binllm.config.loading)."""
from binllm.config.loading import load_config
from binllm.config.sections import (CODE_METHODS, CREDENTIAL_KEYS, ColumnsConfig, Config, ConfigError, DataConfig, DemoConfig, DistributedConfig, EncoderConfig, EvalConfig, LLMConfig, LoraConfig, NegativesConfig, PAPER_METHODS, PaperConfig, PromptConfig, RunConfig, RunLayout, ScoreConfig, SplitConfig, StageConfig, StorageConfig, TuneConfig)

__all__ = ['CODE_METHODS', 'CREDENTIAL_KEYS', 'ColumnsConfig', 'Config', 'ConfigError', 'DataConfig', 'DemoConfig', 'DistributedConfig', 'EncoderConfig', 'EvalConfig', 'LLMConfig', 'LoraConfig', 'NegativesConfig', 'PAPER_METHODS', 'PaperConfig', 'PromptConfig', 'RunConfig', 'RunLayout', 'ScoreConfig', 'SplitConfig', 'StageConfig', 'StorageConfig', 'TuneConfig', 'load_config']

"""Training loops shared by the single-process path and the Ray Train + DeepSpeed workers."""

"""The prepared GPU check: exactness of both scoring paths against a float32 reference, scoring speed at
real shapes, and one-process LoRA tuning speed. One JSON line per figure; sections that fail print an
{"section": ..., "error": ...} line and the others still run.

    python -m jobs.gpu_check --model <HF folder> --examples runs/paper-ml1m        # on one GPU
    python -m jobs.gpu_check --device cpu --model <tiny folder> --sections exactness  # the tool on CPU

exactness: 256 users x 20 candidates (real histories, titles and codes from a prepared run, or synthetic
prompts without --examples), scored by the full-prompt and the shared-prefix path in the model's compute
dtype, against the full path in float32 with TF32 off (the reference). For each variant: max and mean
absolute error, Pearson r, and the mean per-user Spearman rank correlation against the reference.
The "bf16 head" variants reproduce the old scorer, which projected onto the answer row in bf16.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from jobs.bench import gpu_check

    gpu_check.main(argv, description=__doc__)


if __name__ == "__main__":
    main()

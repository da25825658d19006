"""Loading a causal LM and its tokenizer from a local Hugging Face folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DType = Literal["auto", "float32", "bfloat16", "tf32"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "tf32": torch.float32}
AUTOCAST_VALUES = ("", "auto", "bfloat16")

log = logging.getLogger(__name__)
_warned_slow_bf16 = False


def resolve_dtype(dtype: DType, device: str | torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow and imprecise); "tf32" is
    float32 weights with TF32 tensor-core matmuls on CUDA (see load_causal_lm)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'tf32', got {dtype!r}")
    return _DTYPES[dtype]


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU) PyTorch emulates them, about 100x slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def autocast_dtype(name: str, device: str | torch.device) -> torch.dtype | None:
    """The torch dtype of an autocast config value on `device`: "" is off; "bfloat16" is bf16 autocast;
    "auto" is bf16 where the device computes it natively (native_bf16) and off elsewhere."""
    global _warned_slow_bf16
    if name not in AUTOCAST_VALUES:
        raise ValueError(f"autocast must be '' (off), 'auto' or 'bfloat16', got {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if name == "bfloat16" and not native_bf16(device) and not _warned_slow_bf16:
        _warned_slow_bf16 = True
        log.warning("autocast bfloat16 on %s, which has no native bf16 (AVX512-BF16 or AMX on a CPU): its bf16 "
                    "matmuls are emulated, about 100x slower than float32; set autocast to auto", device)
    return torch.bfloat16 if name else None


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"LLM folder {folder} does not exist or is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{folder} is not a Hugging Face model folder: config.json is missing "
            f"(found: {sorted(p.name for p in folder.iterdir())[:10]})"
        )
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        raise ValueError(f"{folder} has a config.json but no model weights (*.safetensors or *.bin)")


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The folder's tokenizer with left padding and a pad token (the EOS token when it has none)."""
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {folder} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path,
    *,
    dtype: DType = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from a local Hugging Face folder, in eval mode, with SDPA attention.
    The folder's own Python code (auto_map) runs only with trust_remote_code (config key llm.trust_remote_code)."""
    folder = Path(path)
    _check_model_folder(folder)
    if torch.device(device).type == "cuda":
        # Measured on an H200 with SmolLM2-135M: TF32 ranks a user's candidates like float32 (per-user
        # Spearman 0.997) where bf16 gets 0.87, at about bf16's speed for a small model (docs/gpu_check.md).
        # The flag is process-wide; "float32" turns it off for a true float32 reference.
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=resolve_dtype(dtype, device), attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer

"""LoRA adapters (PEFT): attach, save as safetensors, load onto a base model."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    top_layers: int = 0,
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters on `target_modules`; only the adapters are trainable.

    top_layers > 0 puts adapters on the last `top_layers` decoder layers only: backward then stops at the
    lowest adapted layer, which makes a step cheaper (measured on 2 CPU cores, SmolLM2-135M: 1.85x with
    the top 10 of 30 layers).
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - names)
    if missing:
        raise ValueError(f"LoRA target modules {missing} are not in {type(model).__name__}")
    n_layers = model.config.num_hidden_layers
    if not 0 <= top_layers <= n_layers:
        raise ValueError(f"LoRA top_layers must be 0 (every layer) to {n_layers} for {type(model).__name__}, "
                         f"got {top_layers}")
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=list(range(n_layers - top_layers, n_layers)) if top_layers else None,
        bias="none",
    )
    return get_peft_model(model, config)


def save_adapter(model: PeftModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter weights (adapter_model.safetensors) and adapter_config.json to `folder`.

    state: full adapter tensors keyed like model.named_parameters() (a TuneResult's adapter_state) to write
    instead of the model's own, which are empty shards when ZeRO-3 partitioned the model.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter expects a PeftModel (see apply_lora), got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    tensors = {name: value.detach().to("cpu") for name, value in state.items()}
    empty = [name for name, value in tensors.items() if value.numel() == 0]
    if empty:
        raise ValueError(f"adapter tensors {empty[:3]} are empty: they must be gathered before saving")
    model.save_pretrained(folder, state_dict=tensors, safe_serialization=True)
    return folder


def load_adapter(base_model: PreTrainedModel, folder: str | Path, *, trainable: bool = False) -> PeftModel:
    """Attach the adapter saved in `folder` to `base_model` (frozen unless trainable=True)."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    if not (folder / ADAPTER_WEIGHTS).is_file():  # never a pickled adapter_model.bin: loading one runs code
        raise FileNotFoundError(f"{folder}: {ADAPTER_WEIGHTS} is missing; adapters load from safetensors only")
    return PeftModel.from_pretrained(base_model, folder, is_trainable=trainable)  # prefers the safetensors file

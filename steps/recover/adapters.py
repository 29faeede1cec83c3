"""What the peft methods share: wrapping a base with an adapter config, and saving the adapter as peft writes it."""

from __future__ import annotations

from steps.artifacts import StageError
from steps.models import ADAPTER_DIR


def wrap(model, config):
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise StageError(f"recover target_modules {config.target_modules} do not fit this model: {err}") from None


def save_adapter(peft_model, out_dir) -> None:
    """`adapter/adapter_model.safetensors` + `adapter/adapter_config.json`, as peft writes them."""
    peft_model.save_pretrained(str(out_dir / ADAPTER_DIR), safe_serialization=True)

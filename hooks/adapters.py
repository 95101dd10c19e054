"""Which models we can attach to, and where their attention layers are."""

from __future__ import annotations

import functools
import sys

from torch import nn

from ..interventions import ModelSpec

# The implementations whose masks and fall-through we reproduce exactly.
WRAPPABLE = ("eager", "sdpa")


class UnsupportedModelError(ValueError):
    """The model cannot be intervened on through transformers' AttentionInterface."""


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; "
            "load one with AutoModelForCausalLM.from_pretrained(...) or intervene.load_model(...)"
        )
    return config.get_text_config()


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The decoder's self-attention modules by layer index, if they dispatch through AttentionInterface."""
    name = type(model).__name__
    if not type(model)._can_set_attn_implementation():
        raise UnsupportedModelError(_unsupported(name))
    layers = {}
    for module in model.get_decoder().modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and type(module).__name__.endswith("Attention") and _dispatches(type(module)):
            layers.setdefault(layer, module)
    expected = text_config(model).num_hidden_layers
    if sorted(layers) != list(range(expected)):
        raise UnsupportedModelError(_unsupported(name))
    return layers


def model_spec(model: nn.Module) -> ModelSpec:
    config = text_config(model)
    heads = config.num_attention_heads
    return ModelSpec(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        name_or_path=getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", ""),
    )


@functools.cache
def _dispatches(cls: type) -> bool:
    """Whether the module defining `cls` computes attention through the AttentionInterface registry."""
    try:
        with open(sys.modules[cls.__module__].__file__) as f:
            return "ALL_ATTENTION_FUNCTIONS.get_interface(" in f.read()
    except (KeyError, OSError, TypeError):
        return False


def _unsupported(name: str) -> str:
    return (
        f"{name} does not compute attention through transformers' AttentionInterface, so intervene cannot "
        "attach to it. Supported: models whose attention calls ALL_ATTENTION_FUNCTIONS (Llama, Mistral, "
        "Qwen2/3, Gemma2/3, GPT-2, Phi-3, SmolLM2, ...). Pick such a model or upgrade transformers."
    )

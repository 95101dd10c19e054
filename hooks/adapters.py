"""Which models we can attach to, and where their attention layers are."""

from __future__ import annotations

import functools
import sys

from torch import nn

from ..interventions import ModelSpec

# The implementations whose masks and fall-through we reproduce exactly.
WRAPPABLE = ("eager", "sdpa")

# Vision-language families (config.model_type) whose image tokens we can locate: each marks every image
# position in `input_ids` with `config.image_token_id`, and runs a causal decoder as its language model.
VISION_LANGUAGE = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")


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


def is_vision_language(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def text_config_key(model: nn.Module) -> str | None:
    """The name of the language model's sub-config of a VLM (None for a text model): the only one we switch."""
    if not is_vision_language(model):
        return None
    config = model.config
    text = config.get_text_config()
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text:
            return key
    raise UnsupportedModelError(f"{type(model).__name__}: cannot tell which sub-config is the language model's")


def image_token_id(model: nn.Module) -> int | None:
    """The id marking image positions in `input_ids` of a supported VLM; None for a text model."""
    if not is_vision_language(model):
        return None
    config = model.config
    token = getattr(config, "image_token_id", None)
    if config.model_type not in VISION_LANGUAGE or token is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({config.model_type!r}) is a vision-language model intervene has no adapter for; "
            f"supported families: {', '.join(VISION_LANGUAGE)}. Use a model of one of those families."
        )
    return int(token)


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
        image_token_id=image_token_id(model),
        model_type=getattr(model.config, "model_type", ""),
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

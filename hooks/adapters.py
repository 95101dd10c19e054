"""Which vision-language models we can attach to, and where their language model and image tokens are."""

from __future__ import annotations

from torch import nn

from .compat import UnsupportedModelError

# Vision-language families (config.model_type) whose image tokens we can locate: each marks every image
# position in `input_ids` with `config.image_token_id`, and runs a causal decoder as its language model.
# Gemma-3's image tokens also see each other both ways: its mask builder gets that from `token_type_ids`, and
# ours hands it the same arguments, so edits see that mask as the model builds it. Qwen3-VL adds deepstack
# features to the image positions' hidden states after its first layers, which the layers' inputs then carry.
VISION_LANGUAGE = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3",
)  # fmt: skip


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

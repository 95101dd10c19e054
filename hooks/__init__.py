"""Where to change: attaching to transformers models and the `Intervention` handle."""

from .compat import UnsupportedModelError
from .dispatch import model_spec, record_attention
from .handle import Intervention, apply, load_config

__all__ = ["Intervention", "UnsupportedModelError", "apply", "load_config", "model_spec", "record_attention"]

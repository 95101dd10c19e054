"""What to change: one module per method, each a frozen config dataclass plus its rule."""

from . import act, causalmm, heads, pai, prune, var, vcd, vhr, zerotuning  # noqa: F401  (registers the built-in methods)
from .base import Forward, LayerCall, LayerInputs, Method, ModelSpec, method_class, overrides, register, registry

__all__ = [
    "Forward", "LayerCall", "LayerInputs", "Method", "ModelSpec", "method_class", "overrides", "register", "registry",
]  # fmt: skip

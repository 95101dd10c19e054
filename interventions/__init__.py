"""What to change: one module per method, each a frozen config dataclass plus its rule."""

from . import act, heads, pai, prune, var, vhr, zerotuning  # noqa: F401  (registers the built-in methods)
from .base import LayerCall, Method, ModelSpec, method_class, register, registry

__all__ = ["LayerCall", "Method", "ModelSpec", "method_class", "register", "registry"]

"""intervene: training-free attention interventions for Hugging Face models.

    import intervene
    with intervene.apply(model, "act", beta=0.4):
        out = model.generate(**inputs)
"""

from .hooks import Intervention, UnsupportedModelError, apply, load_config
from .interventions import Method, register, registry

__version__ = "0.1.0"
__all__ = ["Intervention", "Method", "UnsupportedModelError", "apply", "load_config", "methods", "register"]


def methods() -> dict[str, str]:
    """Registered method names with a one-line description each."""
    return {name: cls.description for name, cls in sorted(registry().items())}

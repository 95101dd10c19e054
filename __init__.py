"""intervene: training-free attention interventions for Hugging Face models.

    import intervene
    model, tokenizer = intervene.load_model("smollm2-135m")
    with intervene.apply(model, "act", beta=0.4):
        out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"))

Names are imported on first use, so that `intervene --help` does not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Intervention": "hooks",
    "UnsupportedModelError": "hooks",
    "apply": "hooks",
    "load_config": "hooks",
    "load_model": "evals.model",
    "model_spec": "hooks",
    "record_attention": "hooks",
    "Method": "interventions",
    "register": "interventions",
}
__all__ = [
    "Intervention",
    "Method",
    "UnsupportedModelError",
    "apply",
    "load_config",
    "load_model",
    "methods",
    "model_spec",
    "record_attention",
    "register",
]


def methods() -> dict[str, str]:
    """Registered method names with a one-line description each."""
    from .interventions import registry

    return {name: cls.description for name, cls in sorted(registry().items())}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'intervene' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

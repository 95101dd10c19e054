"""Static per-head output scaling: multiply chosen heads' outputs before the output projection.

`scales={layer: {head: w}}`; w = 0 ablates a head, w > 1 amplifies it. Heads are query heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..kernels import AttentionEdit
from .base import LayerCall, Method, ModelSpec, check_number, register, resolve_heads, resolve_layers


@register("heads")
@dataclass(frozen=True)
class HeadScale(Method):
    """Static head scaling: multiply selected heads' outputs by fixed weights."""

    scales: Any = None  # {layer: {head: weight}}

    primitives = frozenset({"head_scale"})

    def __post_init__(self):
        if not isinstance(self.scales, Mapping) or not all(isinstance(v, Mapping) for v in self.scales.values()):
            raise ValueError(
                f"heads: scales must be a mapping {{layer: {{head: weight}}}}, got {self.scales!r}; "
                "e.g. scales={3: {0: 0.5, 7: 2.0}}"
            )
        for layer, weights in self.scales.items():
            for head, weight in weights.items():
                if not (str(layer).isdigit() and str(head).isdigit()):  # JSON turns keys into strings
                    raise ValueError(
                        f"heads: scales are keyed by layer and head indices, got scales[{layer!r}][{head!r}]; "
                        "e.g. scales={3: {0: 0.5, 7: 2.0}}"
                    )
                check_number("heads", f"scales[{layer}][{head}]", weight)

    def resolve(self, model: ModelSpec) -> HeadScale:
        scales = {int(layer): {int(h): float(w) for h, w in weights.items()} for layer, weights in self.scales.items()}
        layers = resolve_layers(list(scales), model, method="heads", auto=())
        resolve_heads({layer: list(scales[layer]) for layer in layers}, layers, model, method="heads")
        return replace(self, scales={layer: dict(sorted(scales[layer].items())) for layer in layers})

    def active_layers(self) -> frozenset[int]:
        return frozenset(layer for layer, weights in self.scales.items() if any(w != 1.0 for w in weights.values()))

    def edit(self, call: LayerCall, state: dict) -> AttentionEdit:
        weights = self.scales[call.layer]
        scale = [weights.get(head, 1.0) for head in range(call.query.shape[1])]
        return AttentionEdit(head_scale=torch.tensor([scale], device=call.query.device))  # [1, Hq]

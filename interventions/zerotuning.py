"""ZeroTuning: rescale the attention every head pays to the initial token (Han et al., 2025).

In each selected head the first *real* token's probability is multiplied by `gamma` and the row is
renormalised. That is exactly a `log(gamma)` bias on that key's logit, so it applies unchanged at every
prefill chunk and decode step. Under left padding the initial token is each row's first non-pad token
(the official code scales cache position 0, a pad there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..kernels import AttentionEdit
from .base import LayerCall, Method, ModelSpec, check_number, head_mask, register, resolve_heads, resolve_layers


@register("zerotuning")
@dataclass(frozen=True)
class ZeroTuning(Method):
    """Initial-token scaling: multiply the first real token's attention by gamma, renormalise."""

    gamma: float = 1.0
    layers: Any = "all"
    heads: Any = "all"  # "all" or {layer: [query heads]}

    primitives = frozenset({"key_bias"})

    def __post_init__(self):
        check_number("zerotuning", "gamma", self.gamma, low=0.0, low_open=True)

    def resolve(self, model: ModelSpec) -> ZeroTuning:
        layers = self.layers
        if layers == "all" and isinstance(self.heads, dict):
            layers = sorted(int(layer) for layer in self.heads)
        layers = resolve_layers(layers, model, method="zerotuning", auto=range(model.num_layers))
        return replace(self, layers=layers, heads=resolve_heads(self.heads, layers, model, method="zerotuning"))

    def active_layers(self) -> frozenset[int]:
        if self.gamma == 1.0:
            return frozenset()
        if self.heads == "all":
            return frozenset(self.layers)
        return frozenset(layer for layer, hs in self.heads.items() if hs)

    def edit(self, call: LayerCall, state: dict) -> AttentionEdit:
        batch, num_heads, _, _ = call.query.shape
        num_keys = call.key.shape[2]
        first = call.first_key  # [B], -1 where the cache no longer holds it
        is_first = torch.arange(num_keys, device=first.device)[None, :] == first[:, None]  # [B, Nk]
        heads = head_mask(self.heads, call.layer, num_heads, first.device)  # [Hq]
        bias = (is_first[:, None, :] & heads[None, :, None]) * math.log(self.gamma)  # [B, Hq, Nk]
        return AttentionEdit(key_bias=bias.view(batch, num_heads, 1, num_keys))

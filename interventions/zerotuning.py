"""ZeroTuning: rescale the attention every head pays to the initial token (Han et al., 2025).

In each selected head the first *real* token's probability is multiplied by `gamma` and the row is
renormalised. That is exactly a `log(gamma)` bias on that key's logit, so it applies unchanged at every
prefill chunk and decode step. Under left padding the initial token is each row's first non-pad token
(the official code scales cache position 0, a pad there).

On a model whose attention has learned sinks (gpt-oss's `s_aux`: a logit per head that takes probability
mass and gives no value), the initial token is still the first real token; `target="learned_sink"` scales
the learned sink instead, with the same rule: a `log(gamma)` bias on its logit multiplies its probability by
`gamma` and renormalises the row, which is what the initial token's scaling does on models that learned
their sink in a token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..kernels import AttentionEdit
from .base import LayerCall, Method, ModelSpec, check_number, head_mask, register, resolve_scope, scoped_layers

TARGETS = ("initial", "learned_sink")


@register("zerotuning")
@dataclass(frozen=True)
class ZeroTuning(Method):
    """Initial-token scaling: multiply the first real token's attention by gamma, renormalise."""

    gamma: float
    layers: Any = "all"
    heads: Any = "all"  # "all", [query heads] in every layer of `layers`, or {layer: [query heads]}
    target: str = "initial"  # "initial": the first real token; "learned_sink": the learned sinks (s_aux)

    primitives = frozenset({"key_bias", "sink_bias"})

    def __post_init__(self):
        check_number("zerotuning", "gamma", self.gamma, low=0.0, low_open=True)
        if self.target not in TARGETS:
            raise ValueError(f"zerotuning: target={self.target!r} is not one of {', '.join(map(repr, TARGETS))}")

    @classmethod
    def from_official(cls, setting: tuple) -> ZeroTuning:
        """The official code's `(rate, target_layers, target_heads)`: one gamma, the same head
        indices in every target layer. As in the official code, `None` layers means every layer and
        `None` heads every head; `(rate, None, [0, 1])` is heads 0 and 1 of every layer of any model."""
        rate, layers, heads = setting
        if layers is None:
            return cls(gamma=rate, heads="all" if heads is None else list(heads))
        if heads is None:
            return cls(gamma=rate, layers=list(layers))
        return cls(gamma=rate, heads={layer: list(heads) for layer in layers})

    def resolve(self, model: ModelSpec) -> ZeroTuning:
        if self.target == "learned_sink" and not model.learned_sinks:
            model_name = model.name_or_path or "this model"
            raise ValueError(
                f"zerotuning: target='learned_sink' scales learned attention sinks, and {model_name}'s attention has "
                "none (no `s_aux`, as gpt-oss has); use target='initial'"
            )
        every = range(model.num_layers)
        layers, heads = resolve_scope(self.layers, self.heads, model, method="zerotuning", default="all", auto=every)
        return replace(self, layers=layers, heads=heads)

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.gamma == 1.0 else scoped_layers(self.layers, self.heads)

    def edit(self, call: LayerCall, state: dict) -> AttentionEdit:
        batch, num_heads, _, _ = call.query.shape
        if self.target == "learned_sink":
            heads = head_mask(self.heads, call.layer, num_heads, call.query.device)  # [Hq]
            return AttentionEdit(sink_bias=heads * math.log(self.gamma))
        num_keys = call.key.shape[2]
        first = call.first_key  # [B], -1 where the cache no longer holds it
        is_first = torch.arange(num_keys, device=first.device)[None, :] == first[:, None]  # [B, Nk]
        heads = head_mask(self.heads, call.layer, num_heads, first.device)  # [Hq]
        bias = (is_first[:, None, :] & heads[None, :, None]) * math.log(self.gamma)  # [B, Hq, Nk]
        return AttentionEdit(key_bias=bias.view(batch, num_heads, 1, num_keys))

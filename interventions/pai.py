"""PAI: "Paying More Attention to Image" (Liu, Zheng, Chen, ECCV 2024), the attention amplification.

In each selected layer, the logits of the image keys are moved up by `alpha` times their magnitude,
`z + alpha*|z|`, in the row that predicts the next token: the last prompt row at prefill, then every
decoding row. The prompt's other rows, and hence its KV cache, are untouched, as in the official code.

Unlike the official code, the first generated token is amplified too: with its contrastive decoding on,
the official prefill runs without amplification (LALBJ/PAI#15), which leaves yes/no answers unchanged.
The contrastive "logits refine" half of PAI is a decoding method, not an attention edit; it is not here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..kernels import AttentionEdit, KeyGain
from .base import LayerCall, Method, ModelSpec, check_number, register, require_vision, resolve_layers


@register("pai")
@dataclass(frozen=True)
class PAI(Method):
    """Image attention amplification: z + alpha*|z| on image-key logits of the predicting row."""

    alpha: float = 0.2
    layers: Any = "auto"  # "auto" = 2..L-1, as the official [2, 32) of a 32-layer LLaMA

    primitives = frozenset({"key_gain"})

    def __post_init__(self):
        check_number("pai", "alpha", self.alpha, low=0.0)

    def resolve(self, model: ModelSpec) -> PAI:
        require_vision("pai", model)
        layers = resolve_layers(self.layers, model, method="pai", auto=range(2, model.num_layers))
        return replace(self, layers=layers)

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.alpha == 0.0 else frozenset(self.layers)

    def edit(self, call: LayerCall, state: dict) -> AttentionEdit:
        batch, _, num_queries, _ = call.query.shape
        last_row = torch.zeros(batch, num_queries, dtype=torch.bool, device=call.query.device)  # [B, Nq]
        last_row[:, -1] = True
        return AttentionEdit(key_gain=KeyGain(keys=call.image_keys, alpha=self.alpha, rows=last_row))

"""PAI: "Paying More Attention to Image" (Liu, Zheng, Chen, ECCV 2024).

Attention amplification: in each selected layer, the logits of the image keys are moved up by `alpha` times
their magnitude, `z + alpha*|z|`, in the row that predicts the next token: the last prompt row at prefill, then
every decoding row. The prompt's other rows, and hence its KV cache, are untouched, as in the official code.

Contrastive "logits refine" (`cfg_gamma` other than 1): the prompt also runs without its image tokens, with its
own cache (`TextOnlyBranch`), and each next-token distribution becomes
`cfg_gamma * (log p_image - log p_no_image) + log p_no_image`, where `log p` are log-softmaxed logits and the
tokens whose image-branch probability is below `cfg_cutoff` times the most likely token's are dropped (-inf), as
the official `CFG.py` does. `cfg_gamma = 1` is the image branch alone, and runs nothing (the official code would
still apply the cutoff there).

The official code, with its contrastive half on, runs the prefill without amplification (LALBJ/PAI#15), so the
first generated token (a yes/no answer) is never amplified and only the contrast acts on it. We amplify it;
`official_first_token=True` reproduces the official behaviour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..kernels import AttentionEdit, KeyGain
from .base import Forward, LayerCall, Method, ModelSpec, check_number, register, require_vision, resolve_layers
from .branch import TextOnlyBranch


@register("pai")
@dataclass(frozen=True)
class PAI(Method):
    """Image attention amplification (z + alpha*|z| on image-key logits of the predicting row), and the contrast
    of next-token distributions with and without the image."""

    alpha: float = 0.2
    layers: Any = "auto"  # "auto" = 2..L-1, as the official [2, 32) of a 32-layer LLaMA
    cfg_gamma: float = 1.0  # the contrast's guidance scale (README: 1.1); 1 = off
    cfg_cutoff: float = 0.1  # plausibility: keep tokens at least this share of the most likely one's probability
    official_first_token: bool = False  # run the prompt unamplified when the contrast is on, as the official code

    primitives = frozenset({"key_gain"})
    State = TextOnlyBranch

    def __post_init__(self):
        check_number("pai", "alpha", self.alpha, low=0.0)
        check_number("pai", "cfg_gamma", self.cfg_gamma)
        check_number("pai", "cfg_cutoff", self.cfg_cutoff, low=0.0, high=1.0, low_open=True)
        if not isinstance(self.official_first_token, bool):
            raise ValueError(f"pai: official_first_token must be true or false, got {self.official_first_token!r}")

    def resolve(self, model: ModelSpec) -> PAI:
        require_vision("pai", model)
        layers = resolve_layers(self.layers, model, method="pai", auto=range(2, model.num_layers))
        return replace(self, layers=layers)

    @property
    def contrasts(self) -> bool:
        return self.cfg_gamma != 1.0

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.alpha == 0.0 else frozenset(self.layers)

    def edit(self, call: LayerCall, state: TextOnlyBranch) -> AttentionEdit | None:
        if self.official_first_token and self.contrasts and call.forward.prefill:
            return None
        batch, _, num_queries, _ = call.query.shape
        last_row = torch.zeros(batch, num_queries, dtype=torch.bool, device=call.query.device)  # [B, Nq]
        last_row[:, -1] = True
        return AttentionEdit(key_gain=KeyGain(keys=call.image_keys, alpha=self.alpha, rows=last_row))

    def start(self, forward: Forward, branch: TextOnlyBranch) -> None:
        if self.contrasts:
            branch.advance(forward, "pai")

    def reorder(self, rows: torch.Tensor, branch: TextOnlyBranch) -> None:
        branch.reorder(rows)

    def logits(self, forward: Forward, logits: torch.Tensor, branch: TextOnlyBranch) -> torch.Tensor | None:
        if not self.contrasts or branch.hidden is None:
            return None  # off, or the prompt ran before this intervention was enabled
        no_image = forward.to_logits(branch.hidden[:, -1:])[:, -1]  # [B, V]
        return contrast(logits, no_image, self.cfg_gamma, self.cfg_cutoff)


def contrast(image: torch.Tensor, no_image: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    """`[B, V]` (fp32): `gamma * (log p_image - log p_no_image) + log p_no_image`, -inf on the tokens whose
    image-branch probability is below `cutoff` times the largest."""
    image, no_image = image.float().log_softmax(dim=-1), no_image.float().log_softmax(dim=-1)
    guided = gamma * (image - no_image) + no_image
    implausible = image < math.log(cutoff) + image.max(dim=-1, keepdim=True).values
    return guided.masked_fill(implausible, float("-inf"))

"""VHR: vision-aware head reinforcement ("Cracking the Code of Hallucination in LVLMs with Vision-aware
Head Divergence", He et al., ACL 2025).

The prompt also runs without its image tokens, with its own cache: a branch of the language model that
this file runs at the start of every forward, one step ahead of the main pass, and that follows the main
cache's beam reorders. In each selected layer, for the row that predicts the next token, a head's
vision-aware divergence is the distance between its output with and without the image. Heads whose
divergence surges above the layer's mean + std are set aside (`filter`), and of the rest those above the
median are reinforced: their outputs are multiplied by `alpha` before the output projection. Selection is
redone at every layer and token, and later layers see the reinforced state. The branch is never edited, so
running it ahead of the main pass equals running the two in lockstep.

The official code was not available to us: the distance (Euclidean, on the head output before the output
projection) and the outlier rule are our reading of the paper and of a runner wrapping that code, and the
tests check this file against a transcription of that same reading, not against an official rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .base import Forward, LayerCall, Method, ModelSpec, check_number, register, require_vision, resolve_layers
from .branch import TextOnlyBranch


@dataclass
class VHRState:
    """What VHR keeps of one sequence: its no-image branch and that branch's head outputs."""

    branch: TextOnlyBranch = field(default_factory=TextOnlyBranch)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Hq, D] head outputs, latest token


@register("vhr")
@dataclass(frozen=True)
class VHR(Method):
    """Vision-aware head reinforcement: scale heads whose output depends most on the image by alpha."""

    alpha: float = 2.0
    layers: Any = "auto"  # "auto" = layer 1 and the last 14/32 of the layers, as the official [1, 18..31]
    filter: bool = True  # set aside heads whose divergence exceeds the layer's mean + std

    primitives = frozenset({"head_scale"})
    State = VHRState

    def __post_init__(self):
        check_number("vhr", "alpha", self.alpha, low=0.0)
        if not isinstance(self.filter, bool):
            raise ValueError(f"vhr: filter must be true or false, got {self.filter!r}")

    def resolve(self, model: ModelSpec) -> VHR:
        require_vision("vhr", model)
        last = max(1, round(14 * model.num_layers / 32))
        auto = sorted({1, *range(model.num_layers - last, model.num_layers)} & set(range(model.num_layers)))
        return replace(self, layers=resolve_layers(self.layers, model, method="vhr", auto=auto))

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.alpha == 1.0 else frozenset(self.layers)

    def edit(self, call: LayerCall, state: VHRState) -> None:
        return None  # VHR scales head outputs after attention; the attention itself is plain

    def start(self, forward: Forward, state: VHRState) -> None:
        """Advance the no-image branch by this forward's tokens, keeping its head outputs of the last one."""

        def keep(layer: int, out: torch.Tensor) -> None:
            if layer in self.layers:
                state.outputs[layer] = out[:, -1]  # [B, Hq, D]

        state.outputs.clear()
        state.branch.advance(forward, "vhr", observe=keep)

    def reorder(self, rows: torch.Tensor, state: VHRState) -> None:
        state.branch.reorder(rows)  # the next forward's `start` refreshes the outputs

    def scale_heads(self, call: LayerCall, out: torch.Tensor, state: VHRState) -> torch.Tensor | None:
        no_image = state.outputs.get(call.layer)  # [B, Hq, D]
        if no_image is None:
            return None  # the prompt ran before this intervention was enabled
        divergence = (out[:, -1].float() - no_image.float()).norm(dim=-1)  # [B, Hq]
        candidates = torch.ones_like(divergence, dtype=torch.bool)
        if self.filter:
            mean, std = divergence.mean(dim=-1, keepdim=True), divergence.std(dim=-1, keepdim=True)
            candidates = divergence <= mean + std
        median = divergence.masked_fill(~candidates, math.nan).nanmedian(dim=-1, keepdim=True).values  # [B, 1]
        chosen = candidates & (divergence > median)
        chosen &= call.image_mask.any(dim=1, keepdim=True).to(chosen.device)  # a text-only sample has no divergence
        scale = torch.ones(out.shape[:3], device=out.device)  # [B, Nq, Hq]
        scale[:, -1] = torch.where(chosen, self.alpha, 1.0)
        return scale

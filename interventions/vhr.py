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


@dataclass
class NoImageBranch:
    """The no-image branch of one sequence."""

    cache: Any = None  # its KV cache (None until the prompt ran)
    padding_mask: torch.Tensor | None = None  # [B, tokens so far] of the branch, True = real
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Hq, D] head outputs, latest token


@register("vhr")
@dataclass(frozen=True)
class VHR(Method):
    """Vision-aware head reinforcement: scale heads whose output depends most on the image by alpha."""

    alpha: float = 2.0
    layers: Any = "auto"  # "auto" = layer 1 and the last 14/32 of the layers, as the official [1, 18..31]
    filter: bool = True  # set aside heads whose divergence exceeds the layer's mean + std

    primitives = frozenset({"head_scale"})
    State = NoImageBranch

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

    def edit(self, call: LayerCall, state: NoImageBranch) -> None:
        return None  # VHR scales head outputs after attention; the attention itself is plain

    def start(self, forward: Forward, branch: NoImageBranch) -> None:
        """Advance the no-image branch by this forward's text tokens, keeping its head outputs of the last one."""
        if not forward.prefill and branch.cache is None:
            return  # the prompt ran before this intervention was enabled
        ids = forward.input_ids
        if ids is None or forward.image_mask is None:
            raise ValueError("vhr needs the VLM to be called with `input_ids` (it rebuilds the prompt without image)")
        batch, new = ids.shape
        padding, image = forward.padding_mask, forward.image_mask[:, -new:]  # [B, Nq] of this forward
        real = torch.ones_like(ids, dtype=torch.bool) if padding is None else padding[:, -new:]
        if forward.prefill:
            text = real & ~image  # [B, Nq]
            width = int(text.sum(dim=1).max())
            branch_ids = ids.new_zeros(batch, width)
            mask = torch.zeros(batch, width, dtype=torch.bool, device=ids.device)
            for row in range(batch):  # left-pad each row's text tokens
                tokens = ids[row, text[row]]
                branch_ids[row, width - tokens.numel() :] = tokens
                mask[row, width - tokens.numel() :] = True
        elif image.any():
            raise NotImplementedError("vhr: image tokens after the first prompt chunk are not supported")
        else:
            branch_ids, mask = ids, torch.cat([branch.padding_mask, real], dim=1)
        branch.padding_mask = mask
        start = mask.shape[1] - branch_ids.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:]

        def keep(layer: int, out: torch.Tensor) -> None:
            if layer in self.layers:
                branch.outputs[layer] = out[:, -1]  # [B, Hq, D]

        _, branch.cache = forward.run_branch(
            input_ids=branch_ids, attention_mask=mask.long(), position_ids=positions, cache=branch.cache, observe=keep
        )

    def reorder(self, rows: torch.Tensor, branch: NoImageBranch) -> None:
        """Beam search reorders the main cache's rows: the branch's follow."""
        if branch.cache is not None:
            branch.cache.reorder_cache(rows)
            branch.padding_mask = branch.padding_mask[rows.to(branch.padding_mask.device)]

    def scale_heads(self, call: LayerCall, out: torch.Tensor, branch: NoImageBranch) -> torch.Tensor | None:
        no_image = branch.outputs.get(call.layer)  # [B, Hq, D]
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

"""CausalMM ("Mitigating Modality Prior-Induced Hallucinations in Multimodal Large Language Models via Deciphering
Attention Causality", Zhou et al., ICLR 2025; The-Martyr/CausalMM).

The whole model also runs on the same prompt, with its own cache, under a counterfactual (`counterfactual`:
"uniform", "reverse", "random" or "shuffle") in its language model, its vision tower or both (`where`):
- "llm": in every layer of the language model each row's probabilities over the keys it sees are replaced by
  another map of the same mass (`kernels.Counterfactual`);
- "vision" (LLaVA-style models, as `cf_encoder.py`): the attention map `[H, n, n]` of the vision layer whose output
  becomes the image features is replaced (uniform: its mean; reverse: its maximum minus it; random: uniform draws
  in [0, 2); shuffle: a permutation of each head's n * n entries, the same for every image), resized bilinearly to
  the patch grid as if it were an image, averaged over heads, and multiplies the patch features before the projector.
Each next-token logit vector becomes `(1 + gamma) * logits - gamma * logits_counterfactual`, and the tokens whose
probability is below `epsilon` times the most likely one's are dropped (-inf): the official sampler's step, which
is VCD's.

Against the official code: its language-model maps (the README's snippet for Qwen2-VL) assume a square causal
prompt and leave some rows unnormalised ("uniform" gives prompt row i a mass of (i + 1) / N, "reverse" is not
renormalised, "random" is normalised before the causal mask); here every map keeps each row's mass over the keys
the model lets it see, so "reverse" is the official "reverse_and_normalize", except in a row with nothing to
reverse (the first token sees only itself), which keeps its attention where the snippet divides 0 by 0 and turns
every later state into NaN. The vision maps are the official ones, with the feature layer's own attention (the
official code reads `attentions[select_layer]`, the same layer for its negative indices). Random numbers come from a
generator seeded with `seed` (and, in the language model, the layer and the number of keys), drawn for the whole
batch: "random" gives a sample other draws in another batch, as does "shuffle" in the language model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import AttentionEdit, Counterfactual
from ..kernels.edit import COUNTERFACTUALS
from .base import Forward, LayerCall, Method, ModelSpec, check_number, register, require_vision
from .branch import ModelBranch
from .vcd import contrast

PLACES = ("llm", "vision", "both")


@register("causalmm")
@dataclass(frozen=True)
class CausalMM(Method):
    """Contrast each next-token distribution with the model's under counterfactual attention."""

    counterfactual: str = "shuffle"  # the official code's default map
    where: str = "llm"
    gamma: float = 1.0  # the official POPE script's (the code's own fallback is 0.5)
    epsilon: float = 0.6  # the plausibility cutoff of the POPE script (fallback 0.1)
    seed: int = 55

    State = ModelBranch

    def __post_init__(self):
        if self.counterfactual not in COUNTERFACTUALS:
            raise ValueError(
                f"causalmm: counterfactual={self.counterfactual!r} is not one of {', '.join(COUNTERFACTUALS)}"
            )
        if self.where not in PLACES:
            raise ValueError(f"causalmm: where={self.where!r} is not one of {', '.join(PLACES)}")
        check_number("causalmm", "gamma", self.gamma, low=0.0)
        check_number("causalmm", "epsilon", self.epsilon, low=0.0, high=1.0, low_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"causalmm: seed must be an integer, got {self.seed!r}")

    def resolve(self, model: ModelSpec) -> CausalMM:
        require_vision("causalmm", model)
        if self.where != "llm" and not model.image_feature_map:
            raise ValueError(
                f"causalmm: where={self.where!r} reweights image features by the attention map of the vision layer "
                f"that made them, which needs a LLaVA-style model (a CLIP/SigLIP tower, vision_feature_layer, a "
                f"multi_modal_projector); {model.label} is not one: use where='llm'"
            )
        return self

    def active_layers(self) -> frozenset[int]:
        return frozenset()  # the main pass is not edited: its counterfactual branch is

    def edit(self, call: LayerCall, state: ModelBranch) -> None:
        return None

    def counterfactual_attention(self, call: LayerCall) -> AttentionEdit:
        """The branch's edit of one attention call."""
        seed = (self.seed * 1_000_003 + call.layer) * 1_000_003 + call.key.shape[2]
        return AttentionEdit(counterfactual=Counterfactual(self.counterfactual, seed=seed % 2**63))

    def counterfactual_features(self, attention: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The branch's image features: `features` `[B', P, D]` (P patches on a square grid) weighted by the edited
        attention map `[B', H, n, n]` of the vision layer that made them."""
        side = math.isqrt(features.shape[1])
        if side * side != features.shape[1]:
            raise ValueError(
                f"causalmm: where={self.where!r} weights a square grid of patch features, and this model hands its "
                f"projector {features.shape[1]} features per image: use where='llm'"
            )
        edited = edited_map(attention, self.counterfactual, torch.Generator().manual_seed(self.seed))
        grid = F.interpolate(edited, size=(side, side), mode="bilinear", align_corners=False)  # [B', H, side, side]
        weight = grid.mean(dim=1).reshape(features.shape[0], -1, 1)  # [B', P, 1]
        return features * weight.to(features.dtype)

    def logits(self, forward: Forward, logits: torch.Tensor, branch: ModelBranch) -> torch.Tensor | None:
        if self.gamma == 0.0:
            return None
        attention = None if self.where == "vision" else self.counterfactual_attention
        vision = None if self.where == "llm" else self.counterfactual_features
        counterfactual = branch.advance(forward, "causalmm", attention=attention, vision=vision)  # [B, V]
        return None if counterfactual is None else contrast(logits, counterfactual, self.gamma, self.epsilon)

    def reorder(self, rows: torch.Tensor, branch: ModelBranch) -> None:
        branch.reorder(rows)


def edited_map(attention: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The official vision counterfactual of attention maps `[B, H, n, n]`, per image and head."""
    B, H, n, _ = attention.shape
    if kind == "uniform":
        return attention.mean(dim=(2, 3), keepdim=True).expand_as(attention)
    if kind == "reverse":
        return attention.amax(dim=(2, 3), keepdim=True) - attention
    if kind == "random":
        return (torch.rand(attention.shape, generator=generator) * 2).to(attention.device)
    # "shuffle": one permutation of the n * n entries per head
    order = torch.stack([torch.randperm(n * n, generator=generator) for _ in range(H)]).to(attention.device)  # [H, n²]
    return attention.flatten(2).gather(2, order.expand(B, H, n * n)).view_as(attention)

"""CausalMM ("Mitigating Modality Prior-Induced Hallucinations in Multimodal Large Language Models via Deciphering
Attention Causality", Zhou et al., ICLR 2025; The-Martyr/CausalMM), its language-model counterfactual.

The whole model also runs on the same prompt with counterfactual attention in every layer of its language model,
with its own cache: each row's probabilities over the keys it sees are replaced by another map of the same mass
(`counterfactual`: "uniform", "reverse", "random" or "shuffle"; `kernels.Counterfactual`). Each next-token logit
vector becomes `(1 + gamma) * logits - gamma * logits_counterfactual`, and the tokens whose probability is below
`epsilon` times the most likely one's are dropped (-inf): the official sampler's step, which is VCD's.

Against the official code: its language-model maps (the README's snippet for Qwen2-VL) assume a square causal
prompt and leave some rows unnormalised ("uniform" gives prompt row i a mass of (i + 1) / N, "reverse" is not
renormalised, "random" is normalised before the causal mask); here every map keeps each row's mass over the keys
the model lets it see, so "reverse" is the official "reverse_and_normalize", except in a row with nothing to
reverse (the first token sees only itself), which keeps its attention where the snippet divides 0 by 0 and turns
every later state into NaN. Random numbers come from a generator seeded with `seed`, the layer and the number of
keys, drawn for the whole batch: "random" and "shuffle" give a sample other draws in another batch. The vision
counterfactual (`where="vision"`, the ViT's attention map reweighting the patch features) is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        if self.where != "llm":
            raise ValueError(
                f"causalmm: where={self.where!r} needs the vision counterfactual, which is not implemented yet; "
                "use where='llm' (counterfactual attention in the language model)"
            )
        check_number("causalmm", "gamma", self.gamma, low=0.0)
        check_number("causalmm", "epsilon", self.epsilon, low=0.0, high=1.0, low_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"causalmm: seed must be an integer, got {self.seed!r}")

    def resolve(self, model: ModelSpec) -> CausalMM:
        require_vision("causalmm", model)
        return self

    def active_layers(self) -> frozenset[int]:
        return frozenset()  # the main pass is not edited: its counterfactual branch is

    def edit(self, call: LayerCall, state: ModelBranch) -> None:
        return None

    def counterfactual_attention(self, call: LayerCall) -> AttentionEdit:
        """The branch's edit of one attention call."""
        seed = (self.seed * 1_000_003 + call.layer) * 1_000_003 + call.key.shape[2]
        return AttentionEdit(counterfactual=Counterfactual(self.counterfactual, seed=seed % 2**63))

    def logits(self, forward: Forward, logits: torch.Tensor, branch: ModelBranch) -> torch.Tensor | None:
        if self.gamma == 0.0:
            return None
        counterfactual = branch.advance(forward, "causalmm", attention=self.counterfactual_attention)  # [B, V]
        return None if counterfactual is None else contrast(logits, counterfactual, self.gamma, self.epsilon)

    def reorder(self, rows: torch.Tensor, branch: ModelBranch) -> None:
        branch.reorder(rows)

"""VCD: visual contrastive decoding ("Mitigating Object Hallucinations in Large Vision-Language Models through
Visual Contrastive Decoding", Leng et al., CVPR 2024; DAMO-NLP-SG/VCD).

The whole model also runs on the same prompt with a distorted image, with its own cache: the prompt's pixel values
(as the processor normalised them) after `noise_step` of 1000 steps of forward diffusion, `sqrt(abar_t) * x +
sqrt(1 - abar_t) * noise`, with the official schedule (betas a sigmoid over [-6, 6] scaled into [1e-5, 5e-3]).
Each next-token logit vector becomes `(1 + alpha) * logits - alpha * logits_distorted`, and the tokens whose
probability is below `beta` times the most likely one's are dropped (-inf), as the official sampler does before
`generate`'s processors and warpers.

Deviations: the official code contrasts only when sampling (it patches `sample`); here greedy and beam search get
the same contrast. The noise is drawn from a generator seeded with `seed`, once per prompt, for the batch's pixel
tensor as a whole (the official code draws it from the global generator): the same seed and batch give the same
distortion. `alpha = 0` runs nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .base import Forward, LayerCall, Method, ModelSpec, check_number, register, require_vision
from .branch import ModelBranch

DIFFUSION_STEPS = 1000


@register("vcd")
@dataclass(frozen=True)
class VCD(Method):
    """Contrast each next-token distribution with the model's on a noise-distorted image."""

    alpha: float = 1.0  # the official evaluation scripts' cd_alpha (the code's own fallback is 0.5)
    beta: float = 0.1  # the adaptive plausibility cutoff (cd_beta; the POPE script passes 0.2)
    noise_step: int = 500  # of 1000 diffusion steps
    seed: int = 55  # of the noise (the official POPE script's seed)

    State = ModelBranch

    def __post_init__(self):
        check_number("vcd", "alpha", self.alpha, low=0.0)
        check_number("vcd", "beta", self.beta, low=0.0, high=1.0, low_open=True)
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int):
            raise ValueError(f"vcd: noise_step must be a whole number of diffusion steps, got {self.noise_step!r}")
        check_number("vcd", "noise_step", self.noise_step, low=0, high=DIFFUSION_STEPS - 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"vcd: seed must be an integer, got {self.seed!r}")

    def resolve(self, model: ModelSpec) -> VCD:
        require_vision("vcd", model)
        return self

    def active_layers(self) -> frozenset[int]:
        return frozenset()  # no attention is edited: the contrast acts on the logits

    def edit(self, call: LayerCall, state: ModelBranch) -> None:
        return None

    def logits(self, forward: Forward, logits: torch.Tensor, branch: ModelBranch) -> torch.Tensor | None:
        if self.alpha == 0.0:
            return None
        images = functools.partial(distort, step=self.noise_step, seed=self.seed)
        distorted = branch.advance(forward, "vcd", images=images)  # [B, V]
        return None if distorted is None else contrast(logits, distorted, self.alpha, self.beta)

    def reorder(self, rows: torch.Tensor, branch: ModelBranch) -> None:
        branch.reorder(rows)


def distort(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """`pixels` after `step` steps of the official forward diffusion, with noise from a generator seeded `seed`."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS)) * (5e-3 - 1e-5) + 1e-5  # fp32, as the official
    kept = torch.cumprod(1 - betas, dim=0)[step]  # abar_t
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed)).to(pixels.device)
    noisy = kept.sqrt().to(pixels.device) * pixels.float() + (1 - kept).sqrt().to(pixels.device) * noise
    return noisy.to(pixels.dtype)


def contrast(logits: torch.Tensor, distorted: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """`[B, V]` (fp32): `(1 + alpha) * logits - alpha * distorted`, -inf where `logits` fall below `log(beta)` plus
    their maximum."""
    logits, distorted = logits.float(), distorted.float()
    implausible = logits < math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return ((1 + alpha) * logits - alpha * distorted).masked_fill(implausible, float("-inf"))

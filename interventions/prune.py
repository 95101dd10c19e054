"""Debiased visual-token pruning: FastV-style, with the positional and padding debiasing of "Attention
Debiasing for Token Pruning in Vision-Language Models" (Zhao et al., 2025).

At prefill, layer `layer - 1` scores each image token by the attention it receives from the chosen query
rows (the last prompt token, or every text token after the image), averaged over heads. Before the top-k:
- `debias="position"` divides the score of the i-th of L image tokens by the fitted trend f(i / L)
  (`trend={"mu", "sigma"}` for f(x) = mu * exp(sigma * x), or `{"weights": [...]}` multiplied in, as the
  official code ships them), since attention grows with recency;
- `debias="padding"` zeroes patches that are mostly pad-to-square padding, and caps each sample's k at
  the rest.
The `keep` best image tokens (a count, or a fraction of the image tokens) and every other token go on:
from layer `layer` on, the hidden states, positions, masks and KV cache hold only them, so decoding
attends to the kept tokens only. Positions stay the original ones. `select` gives the kept image tokens
(indices among each sample's image tokens) instead of scoring, which also works at `layer=0`.

Decoding follows FastV's KV-cache implementation: the tokens are chosen once, at prefill, and every later step
attends to that choice (FastV's mask implementation instead re-selects at every step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Forward, LayerCall, LayerInputs, Method, ModelSpec, check_number, register, require_vision

DEBIAS = ("none", "position", "padding", "both")
QUERIES = ("last", "text")
MROPE = "places image tokens with M-RoPE (3D positions), which pruning does not remap yet"
# Families whose image tokens pruning cannot remove exactly yet, and why.
UNPRUNABLE = {
    "qwen2_vl": MROPE,
    "qwen2_5_vl": MROPE,
    "qwen3_vl": f"{MROPE}, and after its first layers adds deepstack visual features at the unpruned sequence's "
    "image positions",
    "gemma3": "has sliding-window layers: their cache holds only the latest tokens, while pruning's decoding mask "
    "spans every kept one (and what a window over a pruned sequence should hold is not defined yet)",
}


@dataclass
class PruneState:
    """What prune keeps of one sequence."""

    scores: torch.Tensor | None = None  # [B, T] each prompt token's score at layer `layer - 1`
    kept: torch.Tensor | None = None  # [B, T'] positions that go on past layer `layer`
    filler: torch.Tensor | None = None  # [B, T'] kept slots no query may see (see `kept_positions`)
    total: int = 0  # the prompt's length before pruning
    step_mask: torch.Tensor | None = None  # the mask of every pruned layer in the current decode step


@register("prune")
@dataclass(frozen=True)
class Prune(Method):
    """Visual-token pruning at a layer (FastV), optionally debiased for position and padding."""

    layer: int = 2
    keep: float = 0.25  # a fraction of the image tokens in (0, 1], or a count >= 1 (an int)
    debias: str = "none"
    queries: str = "last"
    trend: Any = None  # {"mu": m, "sigma": s} or {"weights": [...]}; needed by debias="position"/"both"
    pad_threshold: float = 0.5  # a patch more padded than this is padding
    select: Any = None  # explicit kept image-token indices, instead of scoring

    primitives = frozenset({"prune"})
    changes_sequence = True
    State = PruneState

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or self.keep <= 0:
            raise ValueError(f"prune: keep must be a count >= 1 or a fraction in (0, 1], got {self.keep!r}")
        if isinstance(self.keep, float):
            check_number("prune", "keep", self.keep, low=0.0, high=1.0, low_open=True)
        if self.debias not in DEBIAS:
            raise ValueError(f"prune: debias={self.debias!r} is not one of {', '.join(DEBIAS)}")
        if self.queries not in QUERIES:
            raise ValueError(f"prune: queries={self.queries!r} is not one of {', '.join(QUERIES)}")
        check_number("prune", "pad_threshold", self.pad_threshold, low=0.0, high=1.0)
        if self.debias in ("position", "both") and not _valid_trend(self.trend):
            raise ValueError(
                f"prune: debias={self.debias!r} needs trend={{'mu': ..., 'sigma': ...}} (finite, mu > 0) or "
                f"{{'weights': [...]}} (finite, >= 0, not all 0), "
                f"got {self.trend!r}; fit one with `intervene calibrate --method prune` or fit_trend()"
            )
        if self.select is None and self.layer == 0:
            raise ValueError("prune: layer=0 has no earlier attention to score tokens with; give select=[...]")

    def resolve(self, model: ModelSpec) -> Prune:
        require_vision("prune", model)
        if (reason := UNPRUNABLE.get(model.model_type)) is not None:
            raise ValueError(
                f"prune: {model.model_type} {reason}; use a LLaVA-style model (one raster-order block of image "
                "tokens per image)"
            )
        if model.hybrid:
            raise ValueError(
                f"prune: {model.label} is a hybrid (its attention layers are {list(model.attention_layers)}); "
                "removing tokens would also have to reach its other layers' recurrent and convolution states, which "
                "prune does not do"
            )
        layer = self.layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.num_layers:
            raise ValueError(
                f"prune: layer {self.layer!r} is out of range; this model has layers 0..{model.num_layers - 1}"
            )
        return self

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.select is not None else frozenset({self.layer - 1})

    def edit(self, call: LayerCall, state: PruneState) -> None:
        """At prefill, record each key's score: its attention from the chosen query rows, mean over heads."""
        if call.decode:
            return None
        rows = call.query_valid if call.query_valid is not None else torch.ones_like(call.image_queries)
        if self.queries == "last":
            rows = torch.zeros_like(rows)
            rows[:, -1] = True
        else:
            after = call.image_queries.int().cumsum(dim=1) == call.image_queries.sum(dim=1, keepdim=True)
            rows = rows & after & ~call.image_queries  # text after (the last of) the image
        sums, counts = call.column_stats(rows)  # [B, Hq, Nk], [B, 1|Hq, Nk]
        state.scores = (sums / counts.clamp_min(1.0)).mean(dim=1)  # [B, Nk]
        return None

    def start(self, forward: Forward, state: PruneState) -> None:
        state.step_mask = None  # built by the first pruned layer of a decode step, for all of them

    def layer_input(self, layer: int, inputs: LayerInputs, forward: Forward, state: PruneState) -> LayerInputs | None:
        """From layer `layer` on, the inputs of the kept tokens only: at prefill, the hidden states, positions and
        mask gathered to them (chosen at layer `layer`); decoding, a mask over the kept keys."""
        if layer < self.layer:
            return None
        if forward.prefill:
            if layer == self.layer:  # decide once, from the scores of the layer before
                if forward.image_mask is None:
                    raise ValueError("prune needs the VLM called with `input_ids`, to find the image tokens")
                state.kept, state.filler = self.kept_positions(forward.image_mask, state.scores, self._padding(forward))
                state.total = forward.image_mask.shape[1]
            return self._gathered(inputs, state)
        if state.kept is None:
            return None  # the prompt ran before this intervention was enabled
        if state.step_mask is None:
            held = forward.cached_at(layer)  # the kept prompt and the tokens since
            state.step_mask = self._mask(state, forward, held, inputs.hidden_states, inputs.attention_mask)
        return LayerInputs(inputs.hidden_states, state.step_mask, inputs.position_ids, inputs.position_embeddings)

    def _gathered(self, inputs: LayerInputs, state: PruneState) -> LayerInputs:
        """A prefill layer's inputs at the kept positions `[B, T']` (filler hidden from every query)."""
        kept, hidden = state.kept, inputs.hidden_states
        if hidden.shape[1] != kept.shape[1]:
            hidden = _take(hidden, kept, dim=1)
        embeddings = inputs.position_embeddings
        if embeddings is not None:
            embeddings = tuple(_take(t, kept, dim=1) for t in embeddings)
        positions = None if inputs.position_ids is None else _take(inputs.position_ids, kept, dim=1)
        mask = inputs.attention_mask
        if isinstance(mask, torch.Tensor):
            mask = _take(_take(mask, kept, dim=2), kept, dim=3)  # [B, 1, T', T']
            filler = state.filler[:, None, None, :]
            mask = mask & ~filler if mask.dtype == torch.bool else mask.masked_fill(filler, torch.finfo(mask.dtype).min)
        elif bool(state.filler.any()):  # no mask was needed before; one is now, to hide the filler
            mask = _pruned_mask(state, None, 0, kept.shape[1])
        return LayerInputs(hidden, mask, positions, embeddings)

    def _mask(self, state: PruneState, forward: Forward, held: int, hidden: torch.Tensor, like) -> torch.Tensor:
        """A decode step's mask, boolean or additive as the model's own (`like`)."""
        mask = _pruned_mask(state, forward.padding_mask, held, hidden.shape[1])
        if not isinstance(like, torch.Tensor) or like.dtype == torch.bool:
            return mask
        hidden_key = torch.finfo(like.dtype).min  # an additive mask, as eager's
        return torch.zeros(mask.shape, dtype=like.dtype, device=mask.device).masked_fill(~mask, hidden_key)

    def _padding(self, forward: Forward) -> torch.Tensor | None:
        """[B, L] padded patches of the prompt's images, when the debiasing needs them."""
        pixels = forward.pixel_values
        if self.debias not in ("padding", "both") or pixels is None or pixels.dim() != 4:
            return None
        count = int(forward.image_mask[0].sum())
        grid = round(count**0.5)
        if grid * grid != count:
            raise ValueError(f"prune: padding debias needs a square grid of image tokens per image, got {count}")
        return padding_from_pixels(pixels, grid, self.pad_threshold)

    def reorder(self, rows: torch.Tensor, state: PruneState) -> None:
        if state.kept is not None:
            rows = rows.to(state.kept.device)
            state.kept, state.filler = state.kept[rows], state.filler[rows]

    def kept_positions(
        self, image_mask: torch.Tensor, scores: torch.Tensor | None, padding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(kept [B, T'], filler [B, T'])`: the positions that go on (every non-image token and the chosen
        image tokens, in order), and which of them a sample holds only to keep the batch rectangular.

        With padding debias a sample keeps at most its unpadded patches, so samples may keep different
        counts; the batch keeps the largest, and the rest of a sample's slots are filler, which no query
        may see (then a sample gives what it gives alone).
        `image_mask` [B, T]; `scores` [B, T] (None with `select`); `padding` [B, L] True for padded patches."""
        batch, length = image_mask.shape
        count = image_mask.sum(dim=1)
        if not bool((count == count[0]).all()):
            raise ValueError(f"prune needs the same number of image tokens in every sample, got {count.tolist()}")
        L = int(count[0])
        if L == 0:  # a text-only prompt: nothing to prune
            everything = torch.arange(length, device=image_mask.device).expand(batch, -1)
            return everything, torch.zeros_like(image_mask)
        image = image_mask.nonzero()[:, 1].view(-1, L)  # [B, L] positions of the image tokens
        if self.select is not None:
            chosen = torch.tensor(sorted(set(self.select)), device=image.device)
            if chosen.numel() and not 0 <= int(chosen.min()) <= int(chosen.max()) < L:
                raise ValueError(f"prune: select holds indices outside the {L} image tokens")
            chosen = chosen.expand(batch, -1)
            filler = torch.zeros(chosen.shape, dtype=torch.bool, device=image.device)
        else:
            score = self.debiased(scores.gather(1, image), padding)  # [B, L]
            k = self.keep if isinstance(self.keep, int) else math.ceil(self.keep * L)
            counts = torch.full((batch,), min(k, L), device=image.device)  # [B] image tokens each sample keeps
            if padding is not None and self.debias in ("padding", "both"):
                counts = counts.clamp_max((~padding).sum(dim=1).to(image.device))
            ranked = score.topk(int(counts.max()), dim=1).indices  # [B, k'] best first
            filler = torch.arange(ranked.shape[1], device=image.device) >= counts[:, None]  # [B, k']
            chosen, order = ranked.sort(dim=1)
            filler = filler.gather(1, order)
        keep = ~image_mask
        keep.scatter_(1, image.gather(1, chosen), True)
        kept = keep.nonzero()[:, 1].view(batch, -1)  # [B, T']
        is_filler = torch.zeros_like(image_mask).scatter_(1, image.gather(1, chosen), filler)  # [B, T]
        return kept, is_filler.gather(1, kept)

    def debiased(self, score: torch.Tensor, padding) -> torch.Tensor:
        """The ranking score `[B, L]` of the image tokens after the chosen debiasing."""
        L = score.shape[1]
        if self.debias in ("position", "both"):
            score = score * trend_weights(self.trend, L).to(score.device)
        if self.debias in ("padding", "both"):
            if padding is None:
                raise ValueError("prune: debias='padding' needs the pixel values of pad-to-square images")
            score = score.masked_fill(padding, 0.0)
        return score


def _pruned_mask(state: PruneState, padding: torch.Tensor | None, held: int, new: int) -> torch.Tensor:
    """`[B, 1, new, Nk]` bool: the visible keys of a call after the prompt was pruned, over the kept prompt keys
    (filler hidden), the `held - T'` tokens cached since, and this call's `new` ones (at prefill: nothing held, T'
    new). Built here, since transformers sizes its mask by the first layer's cache (itself pruned when
    `layer=0`)."""
    kept = state.kept
    since = torch.arange(state.total, state.total + held - kept.shape[1] + new, device=kept.device)
    keys = torch.cat([kept, since.expand(kept.shape[0], -1)], dim=1)  # [B, Nk] positions
    visible = torch.cat([~state.filler, torch.ones_like(keys[:, kept.shape[1] :], dtype=torch.bool)], dim=1)
    if padding is not None:
        visible = visible & padding.to(kept.device).gather(1, keys)
    visible = visible[:, None, None, :]  # [B, 1, 1, Nk]
    rows = torch.arange(new, device=kept.device)[:, None] + keys.shape[1] - new  # bottom-right causal
    return visible & (torch.arange(keys.shape[1], device=kept.device)[None, :] <= rows)


def _take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` at positions `index` [B, n] along `dim`, per batch element (`t` may broadcast over batch)."""
    t = t.expand(index.shape[0], *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    return t.gather(dim, index.view(shape).expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1 :]))


def trend_weights(trend: Mapping, length: int) -> torch.Tensor:
    """[L] multipliers that undo the positional trend: 1 / (mu * exp(sigma * i / L)), or given weights."""
    if "weights" in trend:
        weights = torch.tensor(trend["weights"], dtype=torch.float32)
        if weights.numel() != length:
            raise ValueError(f"prune: trend has {weights.numel()} weights for {length} image tokens")
        return weights
    x = torch.arange(length, dtype=torch.float32) / length
    return 1.0 / (trend["mu"] * torch.exp(trend["sigma"] * x))


def fit_trend(mean_attention: torch.Tensor) -> dict:
    """Least-squares fit of f(x) = mu * exp(sigma * x), x = i / L, to the mean attention `[L]` that each
    image position receives (on log values: log f is linear in x). The line's closed form, summed exactly
    (`math.fsum`), so the same values give the same trend to the last bit: LAPACK's solver did not (once, two
    calls on the same values differed in sigma's last digit)."""
    L = mean_attention.numel()
    x = [i / L for i in range(L)]
    y = [math.log(max(value, 1e-30)) for value in mean_attention.double().flatten().tolist()]
    mean_x, mean_y = math.fsum(x) / L, math.fsum(y) / L
    spread = math.fsum((a - mean_x) ** 2 for a in x)
    sigma = math.fsum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True)) / spread if spread else 0.0
    return {"mu": math.exp(mean_y - sigma * mean_x), "sigma": sigma}


def padding_patches(width: int, height: int, grid: int, threshold: float = 0.5) -> torch.Tensor:
    """[grid * grid] True for patches (raster order) of a `width` x `height` image padded to a centred
    square whose padded share exceeds `threshold` (LLaVA-1.5's pad-to-square geometry)."""
    side = max(width, height)
    left, top = (side - width) / 2, (side - height) / 2
    edges = torch.arange(grid + 1, dtype=torch.float64) * side / grid
    cover_x = (edges[1:].clamp(max=left + width) - edges[:-1].clamp(min=left)).clamp_min(0)  # [grid]
    cover_y = (edges[1:].clamp(max=top + height) - edges[:-1].clamp(min=top)).clamp_min(0)
    content = cover_y[:, None] * cover_x[None, :] / (side / grid) ** 2  # [grid, grid] share of real pixels
    return (1.0 - content > threshold).flatten()


def padding_from_pixels(pixel_values: torch.Tensor, grid: int, threshold: float = 0.5, atol: float = 0.02):
    """[B, grid * grid] padded patches read off normalised pixels `[B, C, S, S]`: pad-to-square fills with
    the processor's mean colour, which normalises to 0 in every channel (within `atol`: the colour is
    rounded to 8 bits first, an error below 1 / (255 * std))."""
    blank = (pixel_values.abs() <= atol).all(dim=1).float()  # [B, S, S]
    share = torch.nn.functional.adaptive_avg_pool2d(blank[:, None], grid)[:, 0]  # [B, grid, grid]
    return (share > threshold).flatten(1)


def _valid_trend(trend) -> bool:
    if not isinstance(trend, Mapping):
        return False
    if "weights" in trend:
        weights = trend["weights"]
        return isinstance(weights, (list, tuple)) and any(weights) and all(map(_finite, weights)) and min(weights) >= 0
    return _finite(trend.get("mu")) and _finite(trend.get("sigma")) and trend["mu"] > 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

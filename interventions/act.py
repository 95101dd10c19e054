"""ACT: attention-sink calibration (Yu et al., ICML 2024, "Unveiling and Harnessing Hidden Attention Sinks").

In each selected head, a key is a sink when the mean attention it receives from the queries that can
see it exceeds `threshold`; the first sink found (normally the initial token) is kept as it is. Each
query row then keeps only `beta` of its mass on the other sinks, and the freed `(1 - beta)` goes to all
non-sink keys in proportion to their probabilities. On a prompt this is exactly the official code's
operation, but for every batch element, with padding and KV-cache chunks counted correctly.

Decoding (one new token over a cache) is well defined, unlike the official code, whose decode step overwrites
the attention to token 0 and slices the rows `[1:]`, which skips the only row a decode step has:
- `decode="frozen"`: keep the sinks found on the prompt and calibrate each new row against them;
- `decode="online"`: detect sinks on the new row itself (its probabilities are its column means);
- `decode="off"`: leave generated rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..kernels import AttentionEdit, Redistribute
from .base import LayerCall, Method, ModelSpec, check_number, head_mask, register, resolve_scope, scoped_layers

DECODE_MODES = ("frozen", "online", "off")
# The guess of a layer's sinks (`ACTState.likely`): keys whose column mean reached this share of the threshold in an
# earlier layer, and the last keys, which so few rows see that a few rows' attention makes them sinks. A key guessed
# wrong costs a column; a sink missed costs its head a pass of its own.
_NEAR = 0.7
_FEW_ROWS = 16


@dataclass
class Sinks:
    """The hidden sinks one layer found on the prompt."""

    mask: torch.Tensor  # [B, Hq, Nk] True at a hidden sink
    positions: torch.Tensor  # [Nk] the position of each of those keys


@dataclass
class ColumnStats:
    """The prompt's attention summed per key so far (over its chunks), and how many rows saw each key."""

    sums: torch.Tensor  # [B, Hq, Nk]
    counts: torch.Tensor  # [B, Hq, Nk]
    positions: torch.Tensor  # [Nk]


@dataclass
class ACTState:
    """What ACT keeps of one sequence, by layer."""

    sinks: dict[int, Sinks] = field(default_factory=dict)
    stats: dict[int, ColumnStats] = field(default_factory=dict)
    # [B, positions so far]: keys whose column mean came near the threshold in some head of an earlier layer, the
    # guess of the next layer's sinks, which its statistics hide so that the redistribution can reuse their pass
    # (`LayerCall.column_stats`)
    likely: torch.Tensor | None = None


@register("act")
@dataclass(frozen=True)
class ACT(Method):
    """Attention-sink calibration: move (1 - beta) of the mass on hidden sinks to the other keys."""

    beta: float = 0.4
    threshold: float = 0.1
    layers: Any = "auto"  # "auto" = 2..L-2, "all", or a list
    heads: Any = "all"  # "all", [query heads] in every layer of `layers`, or {layer: [query heads]}
    decode: str = "frozen"

    primitives = frozenset({"redistribute"})
    State = ACTState

    def __post_init__(self):
        check_number("act", "beta", self.beta, low=0.0, high=1.0)
        check_number("act", "threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"act: decode={self.decode!r} is not one of {', '.join(DECODE_MODES)}")

    @classmethod
    def from_official(cls, head_lists: list[list[int]], *, first_layer: int = 2, **params) -> ACT:
        """A head list as GATECH-EIC/ACT publishes it (`models/augment_index.py`): entry i holds the
        query heads calibrated in layer `first_layer + i`."""
        return cls(heads={first_layer + i: list(hs) for i, hs in enumerate(head_lists) if hs}, **params)

    def resolve(self, model: ModelSpec) -> ACT:
        auto = range(2, model.num_layers - 1)  # the official code calibrates layers 2..L-2
        layers, heads = resolve_scope(self.layers, self.heads, model, method="act", default="auto", auto=auto)
        return replace(self, layers=layers, heads=heads)

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.beta == 1.0 else scoped_layers(self.layers, self.heads)

    def edit(self, call: LayerCall, state: ACTState) -> AttentionEdit | None:
        if call.decode and self.decode == "off":
            return None
        heads = head_mask(self.heads, call.layer, call.query.shape[1], call.query.device)  # [Hq]
        if call.decode and self.decode == "frozen":
            if call.layer not in state.sinks:
                return None  # the prompt was run without this intervention: nothing was detected
            sinks = self._frozen(state.sinks[call.layer], call.key_positions)  # [B, Hq, Nk]
        else:
            positions = call.key_positions
            hide = None if call.decode else _likely(state.likely, positions, call.query.shape[0])  # [B, Nk]
            sums, counts = call.column_stats(heads=heads, hide=hide)  # [B, Hq, Nk] each, zero outside `heads`
            if not call.decode:  # prompt chunks accumulate: every query that sees a key counts
                stats = _accumulate(state.stats.get(call.layer), ColumnStats(sums, counts, positions))
                state.stats[call.layer] = stats
                sums, counts = stats.sums, stats.counts
            means = sums / counts.clamp_min(1.0)  # [B, Hq, Nk]
            sinks = hidden_sinks(means, self.threshold)
            if not call.decode:
                state.sinks[call.layer] = Sinks(sinks, positions)
                state.likely = _remembered(state.likely, (means > _NEAR * self.threshold).any(dim=1), positions)
        sinks = sinks & heads[None, :, None]
        return AttentionEdit(redistribute=Redistribute(source=sinks, target=~sinks, p_move=1.0 - self.beta))

    @staticmethod
    def _frozen(detected: Sinks, positions: torch.Tensor) -> torch.Tensor:
        """Prompt sinks re-indexed to this call's keys; keys generated since are never sinks."""
        sinks, sink_positions = detected.mask, detected.positions
        lookup = torch.zeros(*sinks.shape[:2], int(positions[-1]) + 1, dtype=torch.bool, device=sinks.device)
        seen = sink_positions <= positions[-1]
        lookup[:, :, sink_positions[seen]] = sinks[:, :, seen]
        return lookup[:, :, positions]


def hidden_sinks(column_mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """`[..., Nk]` keys whose column mean is above the threshold, except the first one found in each head
    (ACT keeps it as it is). Also what `intervene inspect` reports."""
    detected = column_mean > threshold
    first = detected & (detected.cumsum(dim=-1) == 1)
    return detected & ~first


def _likely(likely: torch.Tensor | None, positions: torch.Tensor, batch: int) -> torch.Tensor:
    """`[B, Nk]` the keys at `positions` likely to be sinks: those an earlier layer came near to finding, and the
    last `_FEW_ROWS`."""
    guess = torch.zeros(batch, positions.numel(), dtype=torch.bool, device=positions.device)
    if likely is not None:
        held = positions < likely.shape[1]
        guess |= likely[:, positions.clamp_max(likely.shape[1] - 1)].to(positions.device) & held
    guess[:, -_FEW_ROWS:] = True
    return guess


def _remembered(likely: torch.Tensor | None, found: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`likely` with the keys `found` `[B, Nk]` at `positions` added, widened to cover them."""
    held = 0 if likely is None else likely.shape[1]
    grown = found.new_zeros(found.shape[0], max(int(positions[-1]) + 1, held))
    if likely is not None:
        grown[:, :held] = likely.to(found.device)
    grown[:, positions] |= found
    return grown


def _accumulate(earlier: ColumnStats | None, chunk: ColumnStats) -> ColumnStats:
    """This prompt chunk's column statistics added to those of the earlier chunks, by key position."""
    if earlier is None:
        return chunk
    positions = chunk.positions
    index = torch.searchsorted(positions, earlier.positions)  # earlier keys still held by the cache
    held = (index < positions.numel()) & (positions[index.clamp_max(positions.numel() - 1)] == earlier.positions)
    sums = chunk.sums.index_add(-1, index[held], earlier.sums[..., held])
    counts = chunk.counts.index_add(-1, index[held], earlier.counts[..., held])
    return ColumnStats(sums, counts, positions)

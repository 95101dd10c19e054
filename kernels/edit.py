"""`AttentionEdit`: the few primitives every intervention reduces to (DESIGN §3).

Shapes broadcast. `B` batch, `Hq` query heads, `Nq` query rows, `Nk` keys. All of them act on one
attention call; an edit with every field `None` is plain attention. Edits act on the logits the model
itself would normalise: after its soft-capping, beside its learned sinks (see `modified_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

import torch


@dataclass(frozen=True)
class Redistribute:
    """Move the fraction `p_move` of each row's mass on `source` keys to `target` keys.

    The moved mass is shared among target keys in proportion to their own probabilities; every other
    key keeps its probability, so rows still sum to 1. A row with no mass on `source` or none on
    `target` is left unchanged, as is a row whose `row_gate` is False or which fails `mass_gate`.
    """

    source: torch.Tensor  # [B, Hq|1, Nk] bool
    target: torch.Tensor  # [B, Hq|1, Nk] bool; keys also in `source` count as source
    p_move: float | torch.Tensor  # scalar or [Hq], each in [0, 1]
    row_gate: torch.Tensor | None = None  # [B, Hq|1, Nq] bool
    mass_gate: MassGate | None = None

    # For kernels that never hold a row's probabilities: the keys' groups, then a per-row bias per group.
    SOURCE, TARGET, GATE = 1, 2, 4  # bits of a key's code

    def __post_init__(self):
        # Outside [0, 1] rows get negative probabilities (reference) or NaN (log1p(-p) in the kernels). A GPU
        # tensor is not checked: reading it would stall every attention call until the GPU catches up.
        p = self.p_move
        if isinstance(p, torch.Tensor):
            inside = p.device.type != "cpu" or bool(((p >= 0) & (p <= 1)).all())
        else:
            inside = 0 <= p <= 1
        if not inside:
            raise ValueError(f"Redistribute: p_move must be in [0, 1], got {p!r}")

    def key_codes(self, batch: int, num_keys: int, device) -> torch.Tensor:
        """[B, Hq|1, Nk] int8: the SOURCE, TARGET and GATE bits of each key."""
        codes = self.source.to(device, torch.int8) * self.SOURCE + self.target.to(device, torch.int8) * self.TARGET
        if self.mass_gate is not None:
            codes = codes + self.mass_gate.keys.to(device, torch.int8)[:, None, :] * self.GATE
        return codes.expand(batch, -1, num_keys).contiguous()

    def row_biases(self, total, source, target, gate, gate_source) -> torch.Tensor:
        """[B, Hq, Nq, 2] natural-log biases on source and target keys that carry out this redistribution,
        from each row's unmodified masses `[B, Hq, Nq]` (any common scale) on all keys, source keys,
        target keys (not source), gate keys and gate-and-source keys.

        Moving `p` of the source mass to the targets in proportion keeps the row's normaliser, so it is
        exactly `log(1 - p)` on source logits and `log(1 + p * m_S / m_T)` on target logits."""
        p_move = torch.as_tensor(self.p_move, dtype=torch.float32, device=total.device).reshape(-1)
        p_move = p_move.expand(total.shape[1])[None, :, None]  # [1, Hq, 1]
        active = (source > 0) & (target > 0)
        if self.row_gate is not None:
            active &= self.row_gate.to(total.device)
        if self.mass_gate is not None:
            share = gate_source / gate.clamp_min(1e-30)
            active &= (gate / total.clamp_min(1e-30) >= self.mass_gate.min_mass) & (gate_source > 0)
            active &= share <= self.mass_gate.max_source_share
        bias_source = torch.where(active, torch.log1p(-p_move), 0.0)
        bias_target = torch.where(active, torch.log1p(p_move * source / target.clamp_min(1e-30)), 0.0)
        return torch.stack([bias_source, bias_target], dim=-1).contiguous()


@dataclass(frozen=True)
class MassGate:
    """A per-row gate read from the row's own unmodified probabilities (VAR's image-centric heads).

    A row passes when its mass on `keys` is at least `min_mass` and the part of that mass lying on
    source keys is positive and at most `max_source_share` of it.
    """

    keys: torch.Tensor  # [B, Nk] bool
    min_mass: float
    max_source_share: float


@dataclass(frozen=True)
class KeyGain:
    """PAI's logit transform `z + alpha*|z|` on the logits of `keys`, in the rows `rows` (all when None)."""

    keys: torch.Tensor  # [B, Nk] bool
    alpha: float
    rows: torch.Tensor | None = None  # [B, Nq] bool


COUNTERFACTUALS = ("uniform", "reverse", "random", "shuffle")


@dataclass(frozen=True)
class Counterfactual:
    """CausalMM's counterfactual attention: each row's probabilities on `keys` (every key when None) replaced by
    another map of the same total mass over the same visible keys:
    - `"uniform"`: equal on each of them;
    - `"reverse"`: in proportion to the largest of them minus each one (where they are all equal: unchanged);
    - `"random"`: in proportion to uniform random numbers;
    - `"shuffle"`: the row's own probabilities on them, in a random order.
    Random numbers come from a generator seeded with `seed`, drawn row chunk by row chunk (the same call gives the
    same numbers)."""

    kind: str
    keys: torch.Tensor | None = None  # [B, Nk] bool
    seed: int = 0

    def __post_init__(self):
        if self.kind not in COUNTERFACTUALS:
            raise ValueError(f"Counterfactual: kind {self.kind!r} is not one of {', '.join(COUNTERFACTUALS)}")


@dataclass(frozen=True)
class AttentionEdit:
    key_bias: torch.Tensor | None = None  # [B|1, Hq|1, Nq|1, Nk] float, added to the logits (natural log)
    key_gain: KeyGain | None = None
    redistribute: Redistribute | None = None
    counterfactual: Counterfactual | None = None  # replaces the probabilities (after any other edit)
    head_scale: torch.Tensor | None = None  # [B|1, Hq] (or [Hq]) multiplies each head's output
    sink_bias: torch.Tensor | None = None  # [B|1, Hq] (or [Hq]) added to the learned sinks' logits (natural log)

    def to(self, device) -> AttentionEdit:
        """This edit with every tensor, nested ones included, on `device`."""
        return _to(self, device)

    def __add__(self, other: AttentionEdit) -> AttentionEdit:
        """Compose two edits of one layer: biases (of keys and of sinks) add, head scales multiply.

        Two redistributions (or two key gains, or two counterfactuals) do not commute, so they are refused.
        """
        for name in ("key_gain", "redistribute", "counterfactual"):
            if getattr(self, name) is not None and getattr(other, name) is not None:
                raise ValueError(
                    f"two edits both set `{name}` on one layer; they do not commute and cannot be composed. "
                    "Apply such interventions to disjoint layers, or remove one first."
                )
        return AttentionEdit(
            key_bias=_combine(self.key_bias, other.key_bias, torch.add),
            key_gain=self.key_gain if self.key_gain is not None else other.key_gain,
            redistribute=self.redistribute if self.redistribute is not None else other.redistribute,
            counterfactual=self.counterfactual if self.counterfactual is not None else other.counterfactual,
            head_scale=_combine(self.head_scale, other.head_scale, torch.mul),
            sink_bias=_combine(self.sink_bias, other.sink_bias, torch.add),
        )


def _to(edit, device):
    """The dataclass `edit` with its tensors, and those of the dataclasses it holds, on `device`: itself when
    they all are already (the usual case, once per attention call), else a copy."""
    changes = {}
    for field in fields(edit):
        value = getattr(edit, field.name)
        if isinstance(value, torch.Tensor) or is_dataclass(value):
            moved = value.to(device) if isinstance(value, torch.Tensor) else _to(value, device)
            if moved is not value:
                changes[field.name] = moved
    return replace(edit, **changes) if changes else edit


def _combine(a, b, op):
    if a is None:
        return b
    if b is None:
        return a
    return op(a, b)

"""FlexAttention backend: the edits that a `score_mod` expresses exactly.

Soft-capping, key bias, PAI's key gain and the masks are a `score_mod` on one call; head scale multiplies the
output, and learned sinks rescale it from the row's log-sum-exp (flex has no sink: the keys' share of a row
whose normaliser also holds `exp(sink)` is `sigmoid(lse - sink)`).
Redistribution takes more calls: one per key group returns that group's log-sum-exp (the other keys
masked out), which gives the row masses its gates and biases need, then a last call adds the per-row
group biases (`Redistribute.row_biases`). Compiled on CUDA; elsewhere flex runs eagerly and materialises
the scores (a check of the semantics, not a fast path). Column statistics are not offered here.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9 returns the lse with return_lse=True
    AuxRequest = None

from .edit import AttentionEdit, Redistribute
from .reference import visible_keys

NEG_INF = float("-inf")


def attention(q, k, v, edit: AttentionEdit, *, attention_mask, scale, causal, return_lse, sinks, softcap):
    B, _, Nq, _ = q.shape
    Nk = k.shape[2]
    visible = _visibility(attention_mask, causal, Nq, Nk, q.device)
    edited = _edited_scores(edit, visible, softcap)
    sinks = None if sinks is None else sinks[..., None]  # [B|1, Hq, 1]
    biases = None
    if edit.redistribute is not None:
        rd = edit.redistribute
        codes = rd.key_codes(B, Nk, q.device)  # [B, Hq|1, Nk]
        groups = (  # all keys, source, target (not source), gate, gate and source
            lambda c: c >= 0,
            lambda c: (c & rd.SOURCE) != 0,
            lambda c: ((c & rd.TARGET) != 0) & ((c & rd.SOURCE) == 0),
            lambda c: (c & rd.GATE) != 0,
            lambda c: (c & (rd.GATE | rd.SOURCE)) == (rd.GATE | rd.SOURCE),
        )
        lses = [_call(q, k, v, _restricted(edited, codes, group), scale)[1] for group in groups]  # [B, Hq, Nq]
        if sinks is not None:  # the row's total holds its sink's mass
            lses[0] = torch.logaddexp(lses[0], sinks)
        pivot = lses[0].clamp_min(-1e30)  # a row that sees no key has no mass anywhere
        biases = rd.row_biases(*(torch.exp(lse - pivot) for lse in lses)).unbind(-1)  # 2 x [B, Hq, Nq]

    def score_mod(score, b, h, qi, ki):
        score = edited(score, b, h, qi, ki)
        if biases is None:
            return score
        code = codes[b, h.clamp_max(codes.shape[1] - 1), ki]
        is_source = (code & Redistribute.SOURCE) != 0
        is_target = ((code & Redistribute.TARGET) != 0) & ~is_source
        source_bias, target_bias = biases  # indexed apart: torch 2.6 cannot trace a constant index here
        bias = torch.where(is_source, source_bias[b, h, qi], torch.where(is_target, target_bias[b, h, qi], 0.0))
        return score + bias

    out, lse = _call(q, k, v, score_mod, scale)
    seen = torch.isfinite(lse)  # flex leaves rows that see no key undefined: give them 0
    out = torch.where(seen[..., None], out, 0.0)
    if sinks is not None:
        with_sinks = torch.logaddexp(lse.float(), sinks)  # [B, Hq, Nq]
        out = out * torch.exp(lse - with_sinks)[..., None].to(out.dtype)
        lse = with_sinks
    if edit.head_scale is not None:
        out = out * edit.head_scale.to(out.device, out.dtype)[:, :, None, None]
    out = out.transpose(1, 2).to(q.dtype)  # [B, Nq, Hq, D]
    return (out, lse.float()) if return_lse else out


def column_stats(q, k, **_):
    raise NotImplementedError("the flex backend does not compute column statistics; use 'triton' or 'reference'")


def _edited_scores(edit: AttentionEdit, visible: torch.Tensor, softcap: float | None):
    """The score_mod of the model's cap and the static edits: cap, key gain, then masks, then key bias (the
    reference's order)."""
    gain, bias = edit.key_gain, edit.key_bias

    def edited(score, b, h, qi, ki):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if gain is not None:
            where = gain.keys[b, ki]
            if gain.rows is not None:
                where = where & gain.rows[b, qi]
            score = torch.where(where, score + gain.alpha * score.abs(), score)
        if bias is not None:
            score = score + bias[b.clamp_max(bias.shape[0] - 1), h.clamp_max(bias.shape[1] - 1),
                                 qi.clamp_max(bias.shape[2] - 1), ki]  # fmt: skip
        seen = visible[b.clamp_max(visible.shape[0] - 1), qi.clamp_max(visible.shape[1] - 1), ki]
        return torch.where(seen, score, NEG_INF)

    return edited


def _restricted(edited, codes, group):
    """`edited` on the keys whose code is in `group`, -inf elsewhere: a call then returns that group's lse."""

    def only(score, b, h, qi, ki):
        inside = group(codes[b, h.clamp_max(codes.shape[1] - 1), ki])
        return torch.where(inside, edited(score, b, h, qi, ki), NEG_INF)

    return only


def _visibility(attention_mask, causal, Nq, Nk, device) -> torch.Tensor:
    """[B|1, Nq|1, Nk] bool: the keys each row sees."""
    if attention_mask is not None:
        return visible_keys(attention_mask, "flex")
    if not causal:
        return torch.ones(1, 1, Nk, dtype=torch.bool, device=device)
    return torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(diagonal=Nk - Nq)[None]


def _call(q, k, v, score_mod, scale):
    """(out [B, Hq, Nq, D], natural-log lse [B, Hq, Nq])."""
    kwargs = dict(score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if not q.is_cuda:  # eager flex: materialises the scores, as its warning says; here only to check semantics
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            return _with_lse(flex_attention, q, k, v, kwargs)
    return _with_lse(_compiled(), q, k, v, kwargs)


def _with_lse(flex, q, k, v, kwargs):
    if AuxRequest is None:  # torch < 2.9
        return flex(q, k, v, return_lse=True, **kwargs)
    out, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)

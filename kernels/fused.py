"""Triton backend: FlashAttention-2-style kernels that execute an `AttentionEdit` without materialising
N x N probabilities (design: one online-softmax loop, edits folded into the logits).

- key bias, PAI's key gain, masks and head scale happen inside the forward loop and its epilogue;
- redistribution is a statistics pass (per-row masses of the source, target and gate keys, sharing one
  running max) followed by the forward loop with a per-row bias on each group: moving `p` of the source
  mass to the target in proportion keeps the row's normaliser, so it is exactly `log(1 - p)` on source
  keys and `log(1 + p * l_S / l_T)` on target keys;
- column statistics reuse the statistics pass for each row's log-sum-exp, then sum `exp(s - lse)` per key;
  ACT's take theirs from a forward with its likely sinks hidden, which its redistribution then reuses (the moved
  rows combined from it and the sinks' columns, as on the CPU): a calibrated prompt reads K twice;
- a model's soft-capping is computed in the tile loop (`HAS_SOFTCAP`, so models without it pay nothing), and
  its learned sinks start each row's online softmax: running max the sink's logit, sum 1, no value. Split-KV
  decoding adds them once, when the chunks are combined.

Scores run in base 2 (`exp2`, log2(e) folded into the scale). Rows with no visible key give 0 and a -inf
LSE, never NaN. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors (bf16 is upcast there, since
the interpreter's bf16 `tl.dot` is wrong).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from .edit import AttentionEdit, Redistribute
from .reference import RowPass, visible_keys

LOG2E = math.log2(math.e)  # logits run in base 2 (exp2): natural ones are multiplied by this
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # the same, for the kernels
_LN2: tl.constexpr = tl.constexpr(math.log(2.0))
_SOURCE: tl.constexpr = tl.constexpr(Redistribute.SOURCE)  # the bits of a key's group code
_TARGET: tl.constexpr = tl.constexpr(Redistribute.TARGET)
_GATE: tl.constexpr = tl.constexpr(Redistribute.GATE)
_COUNTERFACTUALS = {None: 0, "uniform": 1, "reverse": 2}  # the counterfactual maps `_forward` computes
_UNIFORM: tl.constexpr = tl.constexpr(_COUNTERFACTUALS["uniform"])
_REVERSE: tl.constexpr = tl.constexpr(_COUNTERFACTUALS["reverse"])
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as kernels/__init__ reads it (triton.knobs is 3.4+)


@triton.jit
def _tanh(x):
    """tanh from exp2 (Triton has no tanh its interpreter runs): odd, with its series near 0, where
    `1 - exp(-2|x|)` would cancel."""
    a = tl.abs(x)
    e = tl.exp2(a * (-2.0 * _LOG2E))  # exp(-2|x|)
    a2 = a * a
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 - a2 * 0.05396825396825397)))
    t = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


# (BLOCK_M, BLOCK_N, warps, stages, the largest BLOCK_D): the tiles autotuning tries on a GPU, each compiled without
# register spills in the shared memory of an A100 and an H100 (`bench/kernel_resources.py`)
_TILES = [
    (128, 64, 8, 3, 128), (64, 64, 4, 3, 128), (128, 32, 8, 3, 128), (64, 32, 4, 3, 256),
    (128, 64, 8, 2, 128), (64, 32, 4, 2, 256),  # for a bias that differs by row: a bias tile per stage
]  # fmt: skip
# the interpreter runs one tile: its cost grows with programs x iterations, not with tile size (and Triton 3.2's
# autotuner asks for a GPU driver as soon as it decorates a kernel)
_FIXED_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4} if INTERPRET else {}


def _fitting(configs, named_args, **kwargs) -> list:
    """The configs whose tiles hold this head size, with 2 stages when the bias differs by row (a bias tile per
    stage: an A100's shared memory) and 3 otherwise."""
    return [
        config for config, (*_, largest) in zip(configs, _TILES, strict=True)
        if kwargs["BLOCK_D"] <= largest and (config.num_stages == 2) == bool(kwargs.get("BIAS_ROWS"))
    ]  # fmt: skip


def _autotuned(*features: str):
    """`triton.autotune` over `_TILES`, keyed on the head size, the length bucket and the kernel's `features`;
    nothing under the interpreter, whose launches pass `_FIXED_TILE`."""
    if INTERPRET:
        return lambda kernel: kernel
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st, _ in _TILES],
        key=["BLOCK_D", "length_bucket", *features],
        prune_configs_by={"early_config_prune": _fitting},
    )


@triton.jit
def _groups(code):
    """A key's group code as (source, target, gate) booleans; a key in both counts as a source."""
    code = code.to(tl.int32)
    return (code & _SOURCE) != 0, ((code & _TARGET) != 0) & ((code & _SOURCE) == 0), (code & _GATE) != 0


@triton.jit
def _narrowed(Extent, seb, b, offs, count, lo, hi, HAS_EXTENT: tl.constexpr, BLOCK: tl.constexpr):
    """`[lo, hi)` narrowed to what the rows (or keys) `offs` can see: `Extent[b, i]` holds each one's first
    visible index and one past its last (a mask's extent: causal, padded, windowed), the start aligned down
    to a tile."""
    if HAS_EXTENT:
        at = Extent + b * seb + offs * 2
        first = tl.min(tl.load(at, mask=offs < count, other=hi), axis=0)
        end = tl.max(tl.load(at + 1, mask=offs < count, other=0), axis=0)
        lo = tl.maximum(lo, first // BLOCK * BLOCK)
        hi = tl.minimum(hi, end)
    return lo, hi


@triton.jit
def _scores(
    q,
    K,
    k_offsets,
    k_mask,
    offs_m,
    offs_n,
    Nq,
    Nk,
    qk_scale,
    softcap,
    b,
    h,
    Mask,
    smb,
    smm,
    smn,
    Bias,
    sbb,
    sbh,
    sbm,
    sbn,
    GainKeys,
    sgkb,
    sgkn,
    GainRows,
    sgrb,
    sgrm,
    gain,
    Codes,
    scb,
    sch,
    scn,
    GroupBias,
    sgb_b,
    sgb_h,
    sgb_m,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    GAIN_ROWS: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Edited base-2 logits of one [BLOCK_M, BLOCK_N] tile, -inf where a key is not visible. `softcap` is the
    model's cap in base 2 (c * log2(e)): the cap of natural logits, carried over."""
    k = tl.load(K + k_offsets, mask=k_mask, other=0.0)  # [BLOCK_N, BLOCK_D], zero past Nk and D
    if UPCAST:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    elif IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * qk_scale  # [BLOCK_M, BLOCK_N]
    if HAS_SOFTCAP:
        qk = softcap * _tanh(qk / softcap)
    if HAS_GAIN:  # PAI: z + gain * |z| on the chosen keys (of the chosen rows)
        where = tl.load(GainKeys + b * sgkb + offs_n * sgkn, mask=offs_n < Nk, other=0)[None, :] != 0
        if GAIN_ROWS:
            rows = tl.load(GainRows + b * sgrb + offs_m * sgrm, mask=offs_m < Nq, other=0)
            where = where & (rows[:, None] != 0)
        qk = tl.where(where, qk + gain * tl.abs(qk), qk)
    visible = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    if CAUSAL:  # bottom-right aligned: row i sees keys up to i + Nk - Nq
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (Nk - Nq))
    # row and head offsets into the mask and bias are 64-bit, as the batch's: a mask's Nq * Nk passes 2**31
    # at 46k tokens, a per-row bias's Hq * Nq * Nk sooner
    rows = offs_m.to(tl.int64)
    if HAS_MASK:
        keep = tl.load(Mask + b * smb + rows[:, None] * smm + offs_n[None, :] * smn, mask=visible, other=0)
        visible = visible & (keep != 0)
    # a bias that is the same on every row of the tile loads as one [1, BLOCK_N] row: a full tile of
    # 64-bit addresses costs registers the loop needs (spills, seen in ptxas's report)
    if HAS_BIAS:
        bias_at = Bias + b * sbb + h.to(tl.int64) * sbh + offs_n[None, :] * sbn
        if BIAS_ROWS:
            bias = tl.load(bias_at + rows[:, None] * sbm, mask=visible, other=0.0)  # [BLOCK_M, BLOCK_N]
        else:
            bias = tl.load(bias_at, mask=offs_n[None, :] < Nk, other=0.0)  # [1, BLOCK_N]
        qk = qk + bias.to(tl.float32) * _LOG2E
    if HAS_GROUPS:
        code_at = Codes + b * scb + h * sch + offs_n[None, :] * scn
        code = tl.load(code_at, mask=offs_n[None, :] < Nk, other=0)  # [1, BLOCK_N]
        row = GroupBias + b * sgb_b + h * sgb_h + offs_m * sgb_m
        bias_source = tl.load(row, mask=offs_m < Nq, other=0.0)
        bias_target = tl.load(row + 1, mask=offs_m < Nq, other=0.0)
        is_source, is_target, _ = _groups(code)
        group = tl.where(is_target, bias_target[:, None], 0.0)
        group = tl.where(is_source, bias_source[:, None], group)
        qk = qk + group * _LOG2E
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _start(Sinks, offset, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """A row's online softmax before any key: nothing (max -inf, sum 0), or its learned sink (max the sink's
    base-2 logit, sum 1), which then stays in the normaliser and adds no value."""
    if HAS_SINKS:
        return tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + offset), tl.full([BLOCK_M], 1.0, tl.float32)
    return tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)


@triton.jit
def _softmax_step(qk, m_i):
    """One online-softmax step: the tile's weights against the new running max, the factor that brings
    earlier sums to that max, and the max. A row with nothing visible yet keeps a finite pivot of 0."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp2(qk - pivot[:, None]), tl.exp2(m_i - pivot), m_new


@triton.jit
def _weighted_values(p, v, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """`p @ v` for one tile: fp32 under the interpreter's bf16 and for fp32 inputs, else in v's dtype."""
    if UPCAST:
        return tl.dot(p, v.to(tl.float32))
    if IEEE:
        return tl.dot(p, v, input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)


@_autotuned("HAS_MASK", "HAS_BIAS", "BIAS_ROWS", "HAS_GAIN", "HAS_GROUPS", "HAS_SOFTCAP", "COUNTERFACTUAL")
@triton.jit
def _forward(
    Q,
    K,
    V,
    Out,
    Lse,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    som,
    soh,
    sod,
    Mask,
    smb,
    smm,
    smn,
    Extent,
    seb,
    Bias,
    sbb,
    sbh,
    sbm,
    sbn,
    GainKeys,
    sgkb,
    sgkn,
    GainRows,
    sgrb,
    sgrm,
    gain,
    Codes,
    scb,
    sch,
    scn,
    GroupBias,
    sgb_b,
    sgb_h,
    sgb_m,
    HeadScale,
    shb,
    shh,
    Sinks,
    ssb,
    ssh,
    Hq,
    G,
    Nq,
    Nk,
    qk_scale,
    softcap,
    length_bucket,
    CAUSAL: tl.constexpr,
    HAS_EXTENT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    GAIN_ROWS: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_HEAD_SCALE: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr,
    COUNTERFACTUAL: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
):
    """Each row's attention over its visible keys, or with COUNTERFACTUAL (`_COUNTERFACTUALS`) CausalMM's
    counterfactual of it: uniform (the mean of the visible values, summed in the same pass) or reversed (weights
    `max_j p_j - p_i`, that is `1 - exp(s_i - max_j s_j)` once the row's max is known: a second pass over the keys;
    a row whose keys all weigh the same keeps its attention)."""
    start_m = tl.program_id(0)
    b = (tl.program_id(1) // Hq).to(tl.int64)  # batch offsets pass 2**31 elements at 32k tokens and B >= 16
    h = tl.program_id(1) % Hq
    kv = h // G  # GQA: the key/value head this query head reads
    keys = K + b * skb + kv * skh  # this batch row's key head: per-tile offsets stay int32
    values = V + b * svb + kv * svh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0,
    )  # fmt: skip
    m_i, l_i = _start(Sinks, b * ssb + h * ssh, HAS_SINKS, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen_count = tl.zeros([BLOCK_M], tl.float32)  # uniform: visible keys and the sum of their values
    seen_values = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = Nk
    if CAUSAL:
        end = tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq)
    start, end = _narrowed(Extent, seb, b, offs_m, Nq, 0, end, HAS_EXTENT, BLOCK_N)  # a mask's extent
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_offsets = offs_n[:, None] * skn + offs_d[None, :] * skd
        k_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
        qk = _scores(
            q, keys, k_offsets, k_mask, offs_m, offs_n, Nq, Nk, qk_scale, softcap, b, h,
            Mask, smb, smm, smn, Bias, sbb, sbh, sbm, sbn, GainKeys, sgkb, sgkn, GainRows, sgrb, sgrm, gain,
            Codes, scb, sch, scn, GroupBias, sgb_b, sgb_h, sgb_m,
            CAUSAL, HAS_MASK, HAS_BIAS, BIAS_ROWS, HAS_GAIN, GAIN_ROWS, HAS_GROUPS, HAS_SOFTCAP, UPCAST, IEEE,
        )  # fmt: skip
        p, rescale, m_i = _softmax_step(qk, m_i)
        l_i = l_i * rescale + tl.sum(p, 1)
        v = tl.load(values + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=k_mask, other=0.0)
        acc = acc * rescale[:, None] + _weighted_values(p, v, UPCAST, IEEE)
        if COUNTERFACTUAL == _UNIFORM:
            visible = tl.where(qk > float("-inf"), 1.0, 0.0)
            seen_count += tl.sum(visible, 1)
            seen_values += _weighted_values(visible, v, UPCAST, IEEE)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if COUNTERFACTUAL == _UNIFORM:
        out = seen_values / tl.where(seen, seen_count, 1.0)[:, None]
    if COUNTERFACTUAL == _REVERSE:
        top = tl.where(seen, m_i, 0.0)
        weights = tl.zeros([BLOCK_M], tl.float32)
        reversed_values = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_offsets = offs_n[:, None] * skn + offs_d[None, :] * skd
            k_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
            qk = _scores(
                q, keys, k_offsets, k_mask, offs_m, offs_n, Nq, Nk, qk_scale, softcap, b, h,
                Mask, smb, smm, smn, Bias, sbb, sbh, sbm, sbn, GainKeys, sgkb, sgkn, GainRows, sgrb, sgrm, gain,
                Codes, scb, sch, scn, GroupBias, sgb_b, sgb_h, sgb_m,
                CAUSAL, HAS_MASK, HAS_BIAS, BIAS_ROWS, HAS_GAIN, GAIN_ROWS, HAS_GROUPS, HAS_SOFTCAP, UPCAST, IEEE,
            )  # fmt: skip
            w = tl.where(qk > float("-inf"), 1.0 - tl.exp2(qk - top[:, None]), 0.0)  # l * (max_j p_j - p_i)
            weights += tl.sum(w, 1)
            v = tl.load(values + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=k_mask, other=0.0)
            reversed_values += _weighted_values(w, v, UPCAST, IEEE)
        turned = weights > 0
        out = tl.where(turned[:, None], reversed_values / tl.where(turned, weights, 1.0)[:, None], out)
    if HAS_HEAD_SCALE:
        out = out * tl.load(HeadScale + b * shb + h * shh).to(tl.float32)
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D),
    )  # fmt: skip
    if STORE_LSE:
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
        tl.store(Lse + (b * Hq + h) * Nq + offs_m, lse, mask=offs_m < Nq)


@_autotuned("HAS_MASK", "HAS_BIAS", "BIAS_ROWS", "HAS_GAIN", "HAS_CODES", "HAS_SOFTCAP")
@triton.jit
def _statistics(
    Q,
    K,
    Stats,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    Mask,
    smb,
    smm,
    smn,
    Extent,
    seb,
    Bias,
    sbb,
    sbh,
    sbm,
    sbn,
    GainKeys,
    sgkb,
    sgkn,
    GainRows,
    sgrb,
    sgrm,
    gain,
    Codes,
    scb,
    sch,
    scn,
    Sinks,
    ssb,
    ssh,
    Hq,
    G,
    Nq,
    Nk,
    qk_scale,
    softcap,
    length_bucket,
    CAUSAL: tl.constexpr,
    HAS_EXTENT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    GAIN_ROWS: tl.constexpr,
    HAS_CODES: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
):
    """Per row: the running max and the partial sums over all keys (and the learned sink), source, target, gate
    and gate-and-source keys, all against that max. Stats is [6, B, Hq, Nq] fp32 (max in base 2)."""
    start_m = tl.program_id(0)
    b = (tl.program_id(1) // Hq).to(tl.int64)
    h = tl.program_id(1) % Hq
    kv = h // G
    keys = K + b * skb + kv * skh  # this batch row's key head: per-tile offsets stay int32
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0,
    )  # fmt: skip
    m_i, l_all = _start(Sinks, b * ssb + h * ssh, HAS_SINKS, BLOCK_M)
    l_source = tl.zeros([BLOCK_M], tl.float32)
    l_target = tl.zeros([BLOCK_M], tl.float32)
    l_gate = tl.zeros([BLOCK_M], tl.float32)
    l_gate_source = tl.zeros([BLOCK_M], tl.float32)
    end = Nk
    if CAUSAL:
        end = tl.minimum(Nk, (start_m + 1) * BLOCK_M + Nk - Nq)
    start, end = _narrowed(Extent, seb, b, offs_m, Nq, 0, end, HAS_EXTENT, BLOCK_N)  # a mask's extent
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_offsets = offs_n[:, None] * skn + offs_d[None, :] * skd
        k_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
        qk = _scores(
            q, keys, k_offsets, k_mask, offs_m, offs_n, Nq, Nk, qk_scale, softcap, b, h,
            Mask, smb, smm, smn, Bias, sbb, sbh, sbm, sbn, GainKeys, sgkb, sgkn, GainRows, sgrb, sgrm, gain,
            Codes, scb, sch, scn, Codes, 0, 0, 0,
            CAUSAL, HAS_MASK, HAS_BIAS, BIAS_ROWS, HAS_GAIN, GAIN_ROWS, False, HAS_SOFTCAP, UPCAST, IEEE,
        )  # fmt: skip
        p, rescale, m_i = _softmax_step(qk, m_i)
        l_all = l_all * rescale + tl.sum(p, 1)
        if HAS_CODES:
            code = tl.load(Codes + b * scb + h * sch + offs_n * scn, mask=offs_n < Nk, other=0)
            source, target, gate = _groups(code)
            l_source = l_source * rescale + tl.sum(tl.where(source[None, :], p, 0.0), 1)
            l_target = l_target * rescale + tl.sum(tl.where(target[None, :], p, 0.0), 1)
            l_gate = l_gate * rescale + tl.sum(tl.where(gate[None, :], p, 0.0), 1)
            l_gate_source = l_gate_source * rescale + tl.sum(tl.where((gate & source)[None, :], p, 0.0), 1)
    row = Stats + (b * Hq + h) * Nq + offs_m
    plane = tl.num_programs(1) * Nq  # B * Hq * Nq
    valid = offs_m < Nq
    tl.store(row, m_i, mask=valid)
    tl.store(row + plane, l_all, mask=valid)
    tl.store(row + 2 * plane, l_source, mask=valid)
    tl.store(row + 3 * plane, l_target, mask=valid)
    tl.store(row + 4 * plane, l_gate, mask=valid)
    tl.store(row + 5 * plane, l_gate_source, mask=valid)


@_autotuned("HAS_MASK", "HAS_BIAS", "BIAS_ROWS", "HAS_SOFTCAP")
@triton.jit
def _column_sums(
    Q,
    K,
    Lse,
    Sums,
    Counts,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    Rows,
    srb,
    srm,
    Mask,
    smb,
    smm,
    smn,
    Extent,
    seb,
    Bias,
    sbb,
    sbh,
    sbm,
    sbn,
    Hq,
    G,
    Nq,
    Nk,
    qk_scale,
    softcap,
    length_bucket,
    CAUSAL: tl.constexpr,
    HAS_EXTENT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
):
    """For one block of keys: the probability each receives, summed over the selected query rows
    (from the rows' LSE, no N x N), and how many selected rows see it. No atomics."""
    start_n = tl.program_id(0)
    b = (tl.program_id(1) // Hq).to(tl.int64)
    h = tl.program_id(1) % Hq
    kv = h // G
    keys = K + b * skb + kv * skh  # this batch row's key head: per-tile offsets stay int32
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_offsets = offs_n[:, None] * skn + offs_d[None, :] * skd
    k_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    sums = tl.zeros([BLOCK_N], tl.float32)
    counts = tl.zeros([BLOCK_N], tl.float32)
    start = 0
    if CAUSAL:  # rows before start_n - (Nk - Nq) cannot see this block
        start = tl.maximum(0, start_n * BLOCK_N - (Nk - Nq)) // BLOCK_M * BLOCK_M
    start, end = _narrowed(Extent, seb, b, offs_n, Nk, start, Nq, HAS_EXTENT, BLOCK_M)  # rows that see these keys
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0,
        )  # fmt: skip
        qk = _scores(
            q, keys, k_offsets, k_mask, offs_m, offs_n, Nq, Nk, qk_scale, softcap, b, h,
            Mask, smb, smm, smn, Bias, sbb, sbh, sbm, sbn, Mask, 0, 0, Mask, 0, 0, 0.0,
            Mask, 0, 0, 0, Mask, 0, 0, 0,
            CAUSAL, HAS_MASK, HAS_BIAS, BIAS_ROWS, False, False, False, HAS_SOFTCAP, UPCAST, IEEE,
        )  # fmt: skip
        lse = tl.load(Lse + (b * Hq + h) * Nq + offs_m, mask=offs_m < Nq, other=float("-inf")) * _LOG2E
        take = lse > float("-inf")
        if HAS_ROWS:
            take = take & (tl.load(Rows + b * srb + offs_m * srm, mask=offs_m < Nq, other=0) != 0)
        seen = (qk > float("-inf")) & take[:, None]
        p = tl.where(seen, tl.exp2(qk - tl.where(take, lse, 0.0)[:, None]), 0.0)
        sums += tl.sum(p, 0)
        counts += tl.sum(seen.to(tl.float32), 0)
    out = (b * Hq + h) * Nk + offs_n
    tl.store(Sums + out, sums, mask=offs_n < Nk)
    tl.store(Counts + out, counts, mask=offs_n < Nk)


@triton.jit
def _decode_split(
    Q,
    K,
    V,
    PartMax,
    PartSum,
    PartOut,
    sqb,
    sqh,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    Mask,
    smb,
    smn,
    Bias,
    sbb,
    sbh,
    sbn,
    GainKeys,
    sgkb,
    sgkn,
    GainRows,
    sgrb,
    gain,
    Codes,
    scb,
    sch,
    scn,
    Hq,
    G,
    Nk,
    chunk,
    n_splits,
    qk_scale,
    softcap,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    GAIN_ROWS: tl.constexpr,
    GROUP_SUMS: tl.constexpr,
    CODE_ROWS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
):
    """One decoding row against one chunk of the KV cache (flash-decoding). The G query heads sharing a
    key/value head are the rows of the tile, so each chunk of K and V is read once for all of them.
    Writes the chunk's running max, sums and unnormalised outputs; `_decode` merges the chunks.

    With GROUP_SUMS (redistribution) the sums and outputs are kept apart for source, target and other
    keys, and the gate masses are summed too: the group biases depend on the whole row's masses, but
    they scale each group's part of the output by one factor, so `_decode` applies them after merging,
    and the cache is read once (no statistics pass). PartSum then holds 5 sums (source, target, other,
    gate, gate and source) and PartOut 3 outputs (source, target, other) per row and chunk."""
    Hkv = Hq // G
    b = (tl.program_id(0) // Hkv).to(tl.int64)
    kv = tl.program_id(0) % Hkv
    keys = K + b * skb + kv * skh  # this batch row's key head: per-tile offsets stay int32
    values = V + b * svb + kv * svh
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # query heads kv * G + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    first_head = kv * G
    q = tl.load(
        Q + b * sqb + (first_head + offs_m[:, None]) * sqh + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < G) & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # l_i and acc: all keys, or the source keys with GROUP_SUMS
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_target = tl.zeros([BLOCK_M], tl.float32)
    l_other = tl.zeros([BLOCK_M], tl.float32)
    l_gate = tl.zeros([BLOCK_M], tl.float32)
    l_gate_source = tl.zeros([BLOCK_M], tl.float32)
    acc_target = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_other = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * chunk
    end = tl.minimum(Nk, start + chunk)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_offsets = offs_n[:, None] * skn + offs_d[None, :] * skd
        k_mask = (offs_n[:, None] < end) & (offs_d[None, :] < D)
        # rows are heads here: per-row strides are per-head strides, and the one query row is shared
        qk = _scores(
            q, keys, k_offsets, k_mask, offs_m, offs_n, G, end, qk_scale, softcap, b, first_head,
            Mask, smb, 0, smn, Bias, sbb, sbh, sbh, sbn, GainKeys, sgkb, sgkn, GainRows, sgrb, 0, gain,
            Codes, 0, 0, 0, Codes, 0, 0, 0,
            False, HAS_MASK, HAS_BIAS, BIAS_ROWS, HAS_GAIN, GAIN_ROWS, False, HAS_SOFTCAP, UPCAST, IEEE,
        )  # fmt: skip
        p, rescale, m_i = _softmax_step(qk, m_i)
        v = tl.load(values + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=k_mask, other=0.0)
        if GROUP_SUMS:
            code_at = Codes + b * scb + first_head * sch + offs_n[None, :] * scn
            if CODE_ROWS:  # codes per head: differ along the tile's rows
                heads_keys = (offs_m[:, None] < G) & (offs_n[None, :] < end)
                code = tl.load(code_at + offs_m[:, None] * sch, mask=heads_keys, other=0)  # [BLOCK_M, BLOCK_N]
            else:
                code = tl.load(code_at, mask=offs_n[None, :] < end, other=0)  # [1, BLOCK_N]
            source, target, gate = _groups(code)
            p_source = tl.where(source, p, 0.0)
            p_target = tl.where(target, p, 0.0)
            p_other = tl.where(source | target, 0.0, p)
            l_i = l_i * rescale + tl.sum(p_source, 1)
            l_target = l_target * rescale + tl.sum(p_target, 1)
            l_other = l_other * rescale + tl.sum(p_other, 1)
            l_gate = l_gate * rescale + tl.sum(tl.where(gate, p, 0.0), 1)
            l_gate_source = l_gate_source * rescale + tl.sum(tl.where(gate, p_source, 0.0), 1)
            acc = acc * rescale[:, None] + _weighted_values(p_source, v, UPCAST, IEEE)
            acc_target = acc_target * rescale[:, None] + _weighted_values(p_target, v, UPCAST, IEEE)
            acc_other = acc_other * rescale[:, None] + _weighted_values(p_other, v, UPCAST, IEEE)
        else:
            l_i = l_i * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + _weighted_values(p, v, UPCAST, IEEE)
    slot = (b * Hq + first_head + offs_m) * n_splits + split  # [BLOCK_M] in [B, Hq, n_splits]
    valid = offs_m < G
    out_at = PartOut + slot[:, None] * D * (3 if GROUP_SUMS else 1) + offs_d[None, :]
    out_valid = valid[:, None] & (offs_d[None, :] < D)
    tl.store(PartMax + slot, m_i, mask=valid)
    tl.store(out_at, acc, mask=out_valid)
    if GROUP_SUMS:
        sums_at = PartSum + slot * 5
        tl.store(sums_at, l_i, mask=valid)
        tl.store(sums_at + 1, l_target, mask=valid)
        tl.store(sums_at + 2, l_other, mask=valid)
        tl.store(sums_at + 3, l_gate, mask=valid)
        tl.store(sums_at + 4, l_gate_source, mask=valid)
        tl.store(out_at + D, acc_target, mask=out_valid)
        tl.store(out_at + 2 * D, acc_other, mask=out_valid)
    else:
        tl.store(PartSum + slot, l_i, mask=valid)


# --- launchers ----------------------------------------------------------------------------------


class Operand(NamedTuple):
    """A tensor a kernel reads, with its strides (0 along a broadcast dimension): `*operand.args` is what the
    kernel's signature lists for it. Absent, a None pointer and zero strides, behind a compile-time switch."""

    tensor: torch.Tensor | None
    strides: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor | None, dims: int) -> Operand:
        if t is None:
            return cls(None, (0,) * dims)
        strides = tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return cls(t, strides[:dims])  # the leading `dims`: a kernel steps inside the rest itself

    @property
    def args(self) -> tuple:
        return (self.tensor, *self.strides)

    @property
    def given(self) -> bool:
        return self.tensor is not None


@dataclass(frozen=True)
class _Inputs:
    """What every kernel of one call reads besides q, k and v."""

    mask: Operand  # [B|1, Nq, Nk] bool, True = visible
    extent: Operand  # [B|1, Nq, 2] int32: each row's first visible key and one past its last
    bias: Operand  # [B, Hq, Nq, Nk] the edit's key bias (broadcast)
    gain_keys: Operand  # [B, Nk] int8
    gain_rows: Operand  # [B, Nq] int8
    gain: float
    sinks: Operand  # [B, Hq] base 2
    causal: bool  # the causal bound from the shapes (without a mask; a mask brings its extent)
    qk_scale: float  # base 2
    softcap: float  # base 2; 0 without
    upcast: bool  # bf16 under the interpreter: computed in fp32
    ieee: bool  # fp32 inputs: fp32 products

    @property
    def bias_rows(self) -> bool:
        """Whether the bias differs from row to row."""
        return self.bias.given and self.bias.strides[2] != 0


def attention(q, k, v, edit: AttentionEdit, *, attention_mask, scale, causal, return_lse, sinks, softcap, rows=None):
    """`rows`: the pass `column_stats_and_rows` ran on the same q, k, v, which a redistribution from few source keys
    reuses (`reference.moved_from_sources`: the moved rows combined from it and the sources' columns), so that a
    calibrated prompt reads K twice (that pass and the column sums), not four times."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    if v.shape[-1] != D:  # the kernels tile q, k and v with one head size
        raise ValueError(
            f"the triton backend needs value heads of the query/key head size; got q/k head size {D} and v head "
            f"size {v.shape[-1]} (as in MLA models): use backend='reference' (or 'auto', which picks it)"
        )
    head_scale = None
    if edit.head_scale is not None:
        head_scale = edit.head_scale.to(device=q.device, dtype=torch.float32).expand(B, Hq)
    plain_rows = not return_lse and sinks is None and softcap is None and edit.counterfactual is None
    if rows is not None and plain_rows and reference.moves_from_few_keys(edit, q):
        heads = reference.probability_heads(edit, Hq).nonzero().flatten()
        out = reference.moved_from_sources(q, k, v, edit, heads, attention_mask, scale, causal, rows, row_pass)
        return out if head_scale is None else out * head_scale[:, None, :, None].to(out.dtype)
    inputs = _inputs(q, k, edit, attention_mask, scale, causal, sinks, softcap)
    counterfactual = _COUNTERFACTUALS[None if edit.counterfactual is None else edit.counterfactual.kind]
    if Nq == 1 and not counterfactual:  # a counterfactual decodes as a prompt of one row: its map is per row
        out, lse = _decode(q, k, v, inputs, edit.redistribute)
        if head_scale is not None:
            out = out * head_scale[:, None, :, None]
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out
    codes, group_bias = None, None
    if edit.redistribute is not None:
        codes = edit.redistribute.key_codes(B, Nk, q.device)
        _, *masses = _run_statistics(q, k, inputs, codes)
        group_bias = edit.redistribute.row_biases(*masses)  # [B, Hq, Nq, 2]
    out, lse = _run_forward(q, k, v, inputs, codes, group_bias, head_scale, counterfactual, return_lse, q.dtype)
    return (out, lse) if return_lse else out


def _run_forward(q, k, v, inputs: _Inputs, codes, group_bias, head_scale, counterfactual, return_lse, out_dtype):
    """`_forward` over every row and head: `(out [B, Nq, Hq, D] in out_dtype, lse [B, Hq, Nq] or None)`."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty(B, Nq, Hq, v.shape[-1], dtype=out_dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device) if return_lse else out
    codes, group_bias, head_scale = Operand.of(codes, 3), Operand.of(group_bias, 3), Operand.of(head_scale, 2)
    _forward[lambda tile: (triton.cdiv(Nq, tile["BLOCK_M"]), B * Hq)](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *inputs.mask.args, *inputs.extent.args, *inputs.bias.args, *inputs.gain_keys.args, *inputs.gain_rows.args,
        inputs.gain, *codes.args, *group_bias.args, *head_scale.args, *inputs.sinks.args,
        Hq, Hq // Hkv, Nq, Nk, inputs.qk_scale, inputs.softcap, _length_bucket(Nq, Nk),
        CAUSAL=inputs.causal, HAS_EXTENT=inputs.extent.given, HAS_MASK=inputs.mask.given,
        HAS_BIAS=inputs.bias.given, BIAS_ROWS=inputs.bias_rows, HAS_GAIN=inputs.gain_keys.given,
        GAIN_ROWS=inputs.gain_rows.given, HAS_GROUPS=codes.given, HAS_HEAD_SCALE=head_scale.given,
        HAS_SINKS=inputs.sinks.given, HAS_SOFTCAP=inputs.softcap != 0, STORE_LSE=return_lse,
        COUNTERFACTUAL=counterfactual, UPCAST=inputs.upcast, IEEE=inputs.ieee, BLOCK_D=_tile_width(D), D=D,
        **_FIXED_TILE,
    )  # fmt: skip
    return out, (lse if return_lse else None)


def row_pass(q, k, v, heads, hidden, key_bias, attention_mask, scale, causal) -> RowPass:
    """`reference`'s row pass on the fused forward: one launch over every query head, the keys `hidden`
    `[B, h|1, Nk]` hidden on the heads `heads` `[h]` (by the reference's -1e4 bias), output and LSE in fp32; then the
    hidden keys' columns (`reference.hidden_columns`)."""
    B, Hq, _, _ = q.shape
    Nk = k.shape[2]
    heads = heads.to(q.device)
    bias = torch.zeros(B, Hq, 1, Nk, device=q.device)
    bias[:, heads] = torch.where(hidden, -reference.HIDDEN, 0.0).to(q.device)[:, :, None, :]
    if key_bias is not None:
        bias = bias + key_bias.to(q.device, torch.float32)  # [B, Hq, Nq|1, Nk]
    inputs = _inputs(q, k, AttentionEdit(key_bias=bias), attention_mask, scale, causal, None, None)
    out, lse = _run_forward(q, k, v, inputs, None, None, None, 0, True, torch.float32)  # [B, Nq, Hq, D], [B, Hq, Nq]
    return reference.hidden_columns(
        q[:, heads], k, v, heads, hidden, key_bias, attention_mask, scale, causal, out.to(q.dtype), out[:, :, heads],
        lse[:, heads],
    )  # fmt: skip


def column_stats_and_rows(q, k, v, hidden, *, heads, attention_mask, scale, causal, query_mask):
    """`reference.column_stats_and_rows` on the kernels: the row pass over every head with the keys `hidden` `[B, Nk]`
    hidden on the query heads `heads` `[h]` (K and V read once), whose LSE and hidden columns give each row's LSE,
    then the column sums of `heads` from it (K read once more); the pass is kept for the redistribution. None in
    place of the pass where the hidden keys' scores would not fit the reference's chunk budget, or where the values
    have another head size than the keys (which the forward kernel does not run)."""
    B, Hq, Nq, D = q.shape
    kv = heads // (Hq // k.shape[1])
    chosen = q[:, heads.to(q.device)], k[:, kv.to(q.device)]
    geometry = {"attention_mask": attention_mask, "scale": scale, "causal": causal, "query_mask": query_mask}
    too_many = B * heads.numel() * Nq * int(hidden.sum(dim=-1).max()) > reference.CHUNK_SCORES
    if too_many or v.shape[-1] != D:
        return (*column_stats(*chosen, key_bias=None, sinks=None, softcap=None, **geometry), None)
    rows = row_pass(q, k, v, heads, hidden[:, None], None, attention_mask, scale, causal)
    sums, counts = column_stats(*chosen, key_bias=None, sinks=None, softcap=None, lse=rows.row_lse(), **geometry)
    return sums, counts, rows


def _decode(q, k, v, inputs: _Inputs, redistribute: Redistribute | None):
    """Split-KV decoding: `_decode_split` over chunks of the cache, then the chunks combined (fp32), with the
    learned sinks' mass. A redistribution is applied in the combine, from the per-group sums, so the cache is
    read once."""
    B, Hq, _, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BLOCK_N = 16 if INTERPRET else 64
    n_splits = max(1, min(triton.cdiv(Nk, BLOCK_N), triton.cdiv(2 * _processors(q.device), B * Hkv)))
    if INTERPRET:
        n_splits = triton.cdiv(Nk, BLOCK_N)  # exercise the combine on toy sizes
    chunk = triton.cdiv(triton.cdiv(Nk, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(Nk, chunk)
    codes = None if redistribute is None else redistribute.key_codes(B, Nk, q.device)  # [B, Hq|1, Nk]
    sums, outs = (1, 1) if codes is None else (5, 3)  # see _decode_split
    part_max = torch.empty(B, Hq, n_splits, dtype=torch.float32, device=q.device)
    part_sum = torch.empty(B, Hq, n_splits, sums, dtype=torch.float32, device=q.device)
    part_out = torch.empty(B, Hq, n_splits, outs, D, dtype=torch.float32, device=q.device)
    mask, bias, gain_rows = inputs.mask.args, inputs.bias.args, inputs.gain_rows.args
    codes = Operand.of(codes, 3)
    _decode_split[(B * Hkv, n_splits)](
        q, k, v, part_max, part_sum, part_out, q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        mask[0], mask[1], mask[3], bias[0], bias[1], bias[2], bias[4], *inputs.gain_keys.args, gain_rows[0],
        gain_rows[1], inputs.gain, *codes.args, Hq, G, Nk, chunk, n_splits, inputs.qk_scale, inputs.softcap,
        HAS_MASK=inputs.mask.given, HAS_BIAS=inputs.bias.given,
        BIAS_ROWS=bias[2] != 0,  # the tile's rows are the query heads: a per-head bias differs along them
        HAS_GAIN=inputs.gain_keys.given, GAIN_ROWS=inputs.gain_rows.given,
        GROUP_SUMS=codes.given, CODE_ROWS=codes.given and codes.tensor.shape[1] > 1,
        HAS_SOFTCAP=inputs.softcap != 0, UPCAST=inputs.upcast, IEEE=inputs.ieee,
        BLOCK_M=_tile_width(G), BLOCK_N=BLOCK_N, BLOCK_D=_tile_width(D), D=D,
        num_warps=8 if codes.given and D > 128 else 4,  # three [G, 256] accumulators spill on 4 warps
    )  # fmt: skip
    top = part_max.amax(dim=-1, keepdim=True)  # [B, Hq, 1], base 2
    sinks = inputs.sinks.tensor  # [B, Hq] base 2, or None
    if sinks is not None:
        top = torch.maximum(top, sinks[..., None])
    weight = torch.exp2(part_max - torch.where(torch.isinf(top), 0.0, top))  # empty chunks weigh 0
    sums = (part_sum * weight[..., None]).sum(dim=2)  # [B, Hq, 1 | 5]
    outs = (part_out * weight[..., None, None]).sum(dim=2)  # [B, Hq, 1 | 3, D]
    sink_mass = top.new_zeros(()) if sinks is None else torch.exp2(sinks - top[..., 0])  # [B, Hq]: normaliser only
    if not codes.given:
        total, out = sums[..., 0] + sink_mass, outs[:, :, 0]
    else:  # each group's part scaled by its bias; the row's normaliser is unchanged by construction
        source, target, other, gate, gate_source = (m[..., None] for m in sums.unbind(-1))  # [B, Hq, 1]
        biases = redistribute.row_biases(
            source + target + other + sink_mass[..., None], source, target, gate, gate_source
        )
        factors = biases[:, :, 0].exp()  # [B, Hq, 2]: source, target
        total = factors[..., 0] * sums[..., 0] + factors[..., 1] * sums[..., 1] + sums[..., 2] + sink_mass
        out = factors[..., :1] * outs[:, :, 0] + factors[..., 1:] * outs[:, :, 1] + outs[:, :, 2]
    out = out / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, (top[..., 0] + torch.log2(total.clamp_min(1e-38))) / LOG2E, float("-inf"))
    return out[:, None], lse[..., None]  # [B, 1, Hq, D] fp32, [B, Hq, 1]


def column_stats(q, k, *, attention_mask, scale, causal, query_mask, key_bias, sinks, softcap, lse=None):
    """`lse` `[B, Hq, Nq]`: the rows' log-sum-exp when a pass already gave it, which saves the statistics pass."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    inputs = _inputs(q, k, AttentionEdit(key_bias=key_bias), attention_mask, scale, causal, sinks, softcap)
    if lse is None:
        stats = _run_statistics(q, k, inputs, None)
        lse = torch.where(stats[1] > 0, (stats[0] + stats[1].log2()) / LOG2E, float("-inf"))
    lse = lse.contiguous()
    sums = torch.empty(B, Hq, Nk, dtype=torch.float32, device=q.device)
    counts = torch.empty_like(sums)
    rows = None if query_mask is None else query_mask.to(device=q.device, dtype=torch.int8)
    key_extent = None  # [B|1, Nk, 2]: the first row that sees each key and one past the last
    if inputs.mask.given:
        seen = inputs.mask.tensor if rows is None else inputs.mask.tensor & rows.bool()[:, :, None]
        key_extent = _extent(seen.transpose(1, 2))
    rows, key_extent = Operand.of(rows, 2), Operand.of(key_extent, 1)
    _column_sums[lambda tile: (triton.cdiv(Nk, tile["BLOCK_N"]), B * Hq)](
        q, k, lse, sums, counts, *q.stride(), *k.stride(), *rows.args,
        *inputs.mask.args, *key_extent.args, *inputs.bias.args, Hq, Hq // Hkv, Nq, Nk, inputs.qk_scale,
        inputs.softcap, _length_bucket(Nq, Nk), CAUSAL=inputs.causal, HAS_EXTENT=key_extent.given,
        HAS_MASK=inputs.mask.given, HAS_BIAS=inputs.bias.given, BIAS_ROWS=inputs.bias_rows, HAS_ROWS=rows.given,
        HAS_SOFTCAP=inputs.softcap != 0, UPCAST=inputs.upcast, IEEE=inputs.ieee, BLOCK_D=_tile_width(D), D=D,
        **_FIXED_TILE,
    )  # fmt: skip
    return sums, counts


def _inputs(q, k, edit: AttentionEdit, attention_mask, scale, causal, sinks, softcap) -> _Inputs:
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    mask = visible_keys(attention_mask, "triton")
    mask = None if mask is None else mask.expand(mask.shape[0], Nq, Nk)
    bias = None if edit.key_bias is None else edit.key_bias.to(q.device).expand(B, Hq, Nq, Nk)
    gain = edit.key_gain
    gain_keys = None if gain is None else gain.keys.to(device=q.device, dtype=torch.int8)
    gain_rows = None if gain is None or gain.rows is None else gain.rows.to(device=q.device, dtype=torch.int8)
    sinks = None if sinks is None else (sinks * LOG2E).expand(B, Hq)  # base 2, like the logits
    return _Inputs(
        mask=Operand.of(mask, 3), extent=Operand.of(None if mask is None else _extent(mask), 1),
        bias=Operand.of(bias, 4), gain_keys=Operand.of(gain_keys, 2), gain_rows=Operand.of(gain_rows, 2),
        gain=0.0 if gain is None else float(gain.alpha), sinks=Operand.of(sinks, 2),
        causal=bool(causal and attention_mask is None), qk_scale=scale * LOG2E,
        softcap=0.0 if softcap is None else softcap * LOG2E,
        upcast=bool(INTERPRET and q.dtype == torch.bfloat16), ieee=q.dtype == torch.float32,
    )  # fmt: skip


def _extent(visible: torch.Tensor) -> torch.Tensor:
    """`[B, R, 2]` int32 from `[B, R, C]` bool: each row's first visible column and one past its last, so that a
    kernel visits only the tiles a mask shows (causal, padded, windowed alike); `(C, 0)` for a row that sees
    nothing."""
    C = visible.shape[-1]
    any_visible = visible.any(dim=-1)
    first = visible.to(torch.uint8).argmax(dim=-1)  # the first maximum: the first True
    end = C - visible.flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.stack([first.where(any_visible, C), end.where(any_visible, 0)], dim=-1).to(torch.int32).contiguous()


def _run_statistics(q, k, inputs: _Inputs, codes) -> torch.Tensor:
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    stats = torch.empty(6, B, Hq, Nq, dtype=torch.float32, device=q.device)
    codes = Operand.of(codes, 3)
    _statistics[lambda tile: (triton.cdiv(Nq, tile["BLOCK_M"]), B * Hq)](
        q, k, stats, *q.stride(), *k.stride(), *inputs.mask.args, *inputs.extent.args, *inputs.bias.args,
        *inputs.gain_keys.args, *inputs.gain_rows.args, inputs.gain, *codes.args, *inputs.sinks.args,
        Hq, Hq // Hkv, Nq, Nk, inputs.qk_scale, inputs.softcap, _length_bucket(Nq, Nk),
        CAUSAL=inputs.causal, HAS_EXTENT=inputs.extent.given, HAS_MASK=inputs.mask.given,
        HAS_BIAS=inputs.bias.given, BIAS_ROWS=inputs.bias_rows, HAS_GAIN=inputs.gain_keys.given,
        GAIN_ROWS=inputs.gain_rows.given, HAS_CODES=codes.given, HAS_SINKS=inputs.sinks.given,
        HAS_SOFTCAP=inputs.softcap != 0, UPCAST=inputs.upcast, IEEE=inputs.ieee, BLOCK_D=_tile_width(D), D=D,
        **_FIXED_TILE,
    )  # fmt: skip
    return stats


@functools.cache
def _processors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors: split-KV decoding gives each about two programs."""
    if device.type != "cuda":
        return 132  # the interpreter: any count does
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile_width(n: int) -> int:
    """A tile side holding `n` (the head size; decoding's query heads per KV head): a power of 2, at least 16,
    as `tl.dot` wants."""
    return max(16, triton.next_power_of_2(n))


def _length_bucket(Nq: int, Nk: int) -> int:
    """Autotuning's length key: the bit length of the longer side, so that a run of prompts of every length
    tunes once per doubling."""
    return max(Nq, Nk).bit_length()

"""Pure-PyTorch reference backend: the specification, the CPU path and the test oracle.

Attention whose edit needs probabilities (a key gain, a redistribution) is computed explicitly below; heads
whose edit is at most a key bias and a head scale go through torch's SDPA, which computes the same softmax.

Softmax runs in fp32 and rows are processed in chunks, so memory stays bounded by
`CHUNK_SCORES` scores whatever the sequence length. A row sees the keys whose final logit is finite:
masked keys, and keys a -inf `key_bias` hides, get probability exactly 0, and a row that sees no key
yields a zero output and a -inf LSE (never NaN); with learned sinks such a row puts all its mass on the sink
(zero output, the sink's logit as LSE). Logits are capped (`softcap`) before any edit, as models cap them
before their mask; a learned sink joins the softmax as one more logit and is dropped after it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .edit import AttentionEdit, Counterfactual, Redistribute

CHUNK_SCORES = 1 << 24  # fp32 scores held at once: 64 MiB
HIDDEN = 1e4  # a logit bias that leaves exp() exactly 0 beside any score of a real model


def attention(q, k, v, edit: AttentionEdit, *, attention_mask, scale, causal, return_lse, sinks, softcap, rows=None):
    """Heads whose edit is at most a key bias and a head scale run through torch's SDPA with the bias (the same
    softmax, at SDPA's speed: `_sdpa`). A redistribution away from a few source keys (ACT's sinks) is, on the CPU,
    one SDPA pass with those keys hidden, combined with their columns (`moved_from_sources`), or no pass of its own
    where the column statistics of the same call already ran one that hid them (`rows`); the other heads a
    gain or a redistribution touches are computed here, from their probabilities. The LSE, learned sinks and
    soft-capping take the explicit path for every head."""
    if return_lse or sinks is not None or softcap is not None:
        return _explicit(q, k, v, edit, attention_mask, scale, causal, return_lse, sinks, softcap)
    explicit = probability_heads(edit, q.shape[1])  # [Hq] bool
    heads = explicit.nonzero().flatten()
    if heads.numel() and q.device.type == "cpu" and moves_from_few_keys(edit, q):
        out = moved_from_sources(q, k, v, edit, heads, attention_mask, scale, causal, rows)
    elif bool(explicit.all()):
        return _explicit(q, k, v, edit, attention_mask, scale, causal, False, None, None)
    else:
        out = _sdpa(q, k, v, edit.key_bias, attention_mask, scale, causal)  # [B, Nq, Hq, Dv]
        if heads.numel():
            kv = heads // (q.shape[1] // k.shape[1])  # each chosen query head's key/value head
            chosen = _of_heads(replace(edit, head_scale=None), heads)
            out[:, :, heads] = _explicit(q[:, heads], k[:, kv], v[:, kv], chosen, attention_mask, scale, causal,
                                         False, None, None)  # fmt: skip
    if edit.head_scale is not None:
        out = out * edit.head_scale.to(out.dtype)[:, None, :, None]  # [B|1, 1, Hq, 1]
    return out


def _explicit(q, k, v, edit: AttentionEdit, attention_mask, scale, causal, return_lse, sinks, softcap):
    """Attention from its materialised probabilities (fp32), a chunk of rows at a time."""
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    v = v.float()
    outputs, lses = [], []
    for r0, r1, p, lse in _edited_rows(q, k, edit, attention_mask, scale, causal, sinks, softcap, return_lse):
        o = p.reshape(B, Hkv, -1, p.shape[-1]) @ v  # [B, Hkv, G*rows, Dv]: a KV head's queries share its values
        outputs.append(o.view(B, Hq, r1 - r0, -1))
        lses.append(lse)
    out = torch.cat(outputs, dim=2)  # [B, Hq, Nq, Dv]
    if edit.head_scale is not None:
        out = out * edit.head_scale.float()[:, :, None, None]  # [B|1, Hq, 1, 1]
    out = out.transpose(1, 2).to(q.dtype)  # [B, Nq, Hq, Dv]
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def probability_heads(edit: AttentionEdit, num_heads: int) -> torch.Tensor:
    """[Hq] bool: the heads whose edit needs their probabilities (a key gain or a counterfactual: all; a
    redistribution: those with a source key)."""
    if edit.key_gain is not None or edit.counterfactual is not None:
        return torch.ones(num_heads, dtype=torch.bool)
    if edit.redistribute is None:
        return torch.zeros(num_heads, dtype=torch.bool)
    return edit.redistribute.source.any(dim=-1).any(dim=0).cpu().expand(num_heads)  # [Hq]


def _of_heads(edit: AttentionEdit, heads: torch.Tensor) -> AttentionEdit:
    """`edit` restricted to the query heads `heads`: every per-head tensor indexed along its head dimension."""

    def pick(t, dim):
        return t if t is None or t.shape[dim] == 1 else t.index_select(dim, heads.to(t.device))

    rd = edit.redistribute
    if rd is not None:
        p_move = rd.p_move
        if isinstance(p_move, torch.Tensor) and p_move.numel() > 1:
            p_move = p_move.reshape(-1).index_select(0, heads.to(p_move.device))
        rd = replace(rd, source=pick(rd.source, 1), target=pick(rd.target, 1), row_gate=pick(rd.row_gate, 1),
                     p_move=p_move)  # fmt: skip
    return replace(edit, key_bias=pick(edit.key_bias, 1), redistribute=rd, head_scale=pick(edit.head_scale, 1))


def moves_from_few_keys(edit: AttentionEdit, q) -> bool:
    """Whether the edit's redistribution can be carried out from a pass and its source keys' columns alone: without
    a gain or a mass gate, every key a source or a target, and few enough sources that their scores fit the chunk
    budget. (The pass needs the rows' LSE: torch's flash kernel gives it on the CPU, the fused forward on CUDA.)"""
    rd = edit.redistribute
    if edit.key_gain is not None or rd is None or rd.mass_gate is not None:
        return False
    if not bool((rd.source | rd.target).all()):
        return False
    most = int(rd.source.sum(dim=-1).max())
    return q.shape[0] * q.shape[1] * q.shape[2] * most <= CHUNK_SCORES


@dataclass(frozen=True)
class RowPass:
    """One pass of plain attention over every query head of a call, with a few keys hidden on some of the heads,
    and those keys' columns: what column statistics computed it from (`column_stats_and_rows`), kept for the
    redistribution that follows on the same call, which reuses it (the CPU path): the heads outside the pass's
    `heads` take its output as it is, and those whose sources are among the hidden keys are combined from it."""

    heads: torch.Tensor  # [h] the query heads whose keys `hidden` are hidden
    output: torch.Tensor  # [B, Nq, Hq, Dv] in q's dtype: the pass's output, which the redistribution overwrites
    hidden: torch.Tensor  # [B, h, Nk] bool: the keys hidden in the pass
    keys: torch.Tensor  # [B, h, S] the hidden keys' indices, hidden ones first (`real` says which are)
    real: torch.Tensor  # [B, h, 1, S] bool
    out: torch.Tensor  # [B, h, Nq, Dv] fp32: the output over the other keys
    lse: torch.Tensor  # [B, h, Nq]: their log-sum-exp, -inf where a row sees none of them
    scores: torch.Tensor  # [B, h, Nq, S] fp32: the hidden keys' logits, -inf where a row does not see one
    values: torch.Tensor  # [B, h, S, Dv] fp32

    def of(self, chosen: torch.Tensor) -> RowPass:
        """The pass restricted to its heads `chosen` (`[h]` bool)."""
        pick = [t[:, chosen] for t in (self.hidden, self.keys, self.real, self.out, self.lse, self.scores, self.values)]
        return RowPass(self.heads[chosen], self.output, *pick)

    def row_lse(self) -> torch.Tensor:
        """[B, h, Nq]: each row's log-sum-exp over every key it sees."""
        return torch.logaddexp(self.lse, torch.logsumexp(self.scores, dim=-1))


def _row_pass(q, k, v, heads, hidden, key_bias, attention_mask, scale, causal) -> RowPass:
    """SDPA over the query heads `heads` `[h]` of `q` with the keys `hidden` `[B, h|1, Nk]` hidden (a -1e4 logit bias),
    and over the other heads plainly; then the hidden keys' columns."""
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[3]
    group = Hq // k.shape[1]
    h = heads.numel()
    heads = heads.to(q.device)
    if h == Hq:  # `heads` is every head (callers give them sorted)
        q_h, k_h, v_h, bias_h = q, k, v, key_bias
    else:
        q_h, k_h, v_h, bias_h = q[:, heads], k[:, heads // group], v[:, heads // group], _bias_of(key_bias, heads)
    if bool(hidden.any()):
        hide = torch.where(hidden, -HIDDEN, 0.0).to(q.device)[:, :, None, :]  # [B, h|1, 1, Nk]
        bias_h = hide if bias_h is None else bias_h + hide
    passed, lse = _sdpa(q_h, k_h, v_h, bias_h, attention_mask, scale, causal, lse=True)  # [B, Nq, h, Dv], [B, h, Nq]
    output = passed
    if h < Hq:  # the other heads, plainly
        others = torch.ones(Hq, dtype=torch.bool, device=q.device).index_fill_(0, heads, False).nonzero().flatten()
        output = q.new_empty(B, Nq, Hq, Dv)
        output[:, :, heads] = passed
        output[:, :, others] = _sdpa(q[:, others], k[:, others // group], v[:, others // group],
                                     _bias_of(key_bias, others), attention_mask, scale, causal)  # fmt: skip
    return hidden_columns(q_h, k, v, heads, hidden, key_bias, attention_mask, scale, causal, output, passed, lse)


def hidden_columns(q_h, k, v, heads, hidden, key_bias, attention_mask, scale, causal, output, passed, lse) -> RowPass:
    """The `RowPass` of a pass (any backend's) that hid the keys `hidden` `[B, h|1, Nk]` on the query heads `heads`
    `[h]` (`q_h` `[B, h, Nq, D]` theirs): its output `[B, Nq, Hq, Dv]`, theirs `passed` `[B, Nq, h, Dv]` and their
    LSE `[B, h, Nq]`, with the hidden keys' logits and values gathered here."""
    B, h, Nq, D = q_h.shape
    Nk, Dv = k.shape[2], v.shape[3]
    group = output.shape[2] // k.shape[1]
    chosen = hidden.expand(B, h, Nk)
    count = max(1, int(chosen.sum(dim=-1).max()))  # one column at least, unseen when nothing is hidden
    keys = chosen.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :count]  # [B, h, S] hidden first
    real = chosen.gather(-1, keys)[:, :, None, :]  # [B, h, 1, S]: False on the padding of heads with fewer
    kv = heads // group
    k_s = k[:, kv].gather(2, keys[..., None].expand(-1, -1, -1, D)).float()  # [B, h, S, D]
    v_s = v[:, kv].gather(2, keys[..., None].expand(-1, -1, -1, Dv)).float()  # [B, h, S, Dv]
    columns = keys[:, :, None, :].expand(B, h, Nq, count)  # [B, h, Nq, S]
    s = q_h.float() @ (k_s * scale).transpose(-1, -2)  # [B, h, Nq, S]
    if attention_mask is None:  # bottom-right causal, or every key: from the positions, no N x N mask
        keep = columns <= torch.arange(Nq, device=s.device)[:, None] + (Nk - Nq) if causal else torch.ones_like(real)
    else:
        keep, additive = _mask_rows(attention_mask, 0, Nq, Nq, Nk, causal, s.device)  # [B|1, 1, Nq|1, Nk]
        keep = keep.expand(B, h, Nq, Nk).gather(-1, columns)
        if additive is not None:
            s += additive.expand(B, h, Nq, Nk).gather(-1, columns)
    if key_bias is not None:
        s += _bias_of(key_bias, heads).float().expand(B, h, Nq, Nk).gather(-1, columns)
    s.masked_fill_(~(keep & real), float("-inf"))
    return RowPass(heads.cpu(), output, chosen, keys, real, passed.transpose(1, 2).float(), lse, s, v_s)


def _bias_of(key_bias: torch.Tensor | None, heads: torch.Tensor) -> torch.Tensor | None:
    """A key bias `[B|1, Hq|1, Nq|1, Nk]` on the query heads `heads`."""
    return key_bias if key_bias is None or key_bias.shape[1] == 1 else key_bias.index_select(1, heads)


def _moved(rows: RowPass, source: torch.Tensor, p_move: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """`[B, h, Nq, Dv]`: the rows of `rows` with `p_move` `[h]` of their mass on the hidden keys marked `source`
    `[B, h, 1, S]` moved to all their other keys in proportion (where `gate` `[B, h, Nq]` allows).

    With a key's weight `a_j = exp(s_j - lse)` relative to the pass's keys (whose weight is `W = 1`), sources `A = sum
    a_j`, the other hidden keys `a_t`, and `T = W + sum a_t` the targets' mass, the plain row is `(W O + sum a_j v_j)
    / (T + A)`, and the moved one `((1 - p) sum_source a_j v_j + (T + p A) / T (W O + sum_t a_j v_j)) / (T + A)`:
    every term positive, so nothing cancels. (Weights are taken relative to the larger of the pass's LSE and the
    hidden keys' logits, so a row whose other keys the hidden ones dwarf cannot overflow.)"""
    top = torch.maximum(rows.lse, rows.scores.amax(dim=-1))
    top = top.masked_fill(top == float("-inf"), 0.0)  # a row that sees nothing
    weight = torch.exp(rows.lse - top)  # [B, h, Nq]: W relative to the larger; 0 where the row sees no pass key
    a = torch.exp(rows.scores - top[..., None])  # [B, h, Nq, S]
    a_source, a_target = a * source, a * ~source
    mass_source, mass_target = a_source.sum(dim=-1), weight + a_target.sum(dim=-1)  # A, T: [B, h, Nq]
    active = (mass_source > 0) & (mass_target > 0)
    if gate is not None:
        active &= gate
    moved = torch.where(active, p_move[:, None], 0.0)  # [B, h, Nq]
    grow = torch.where(active, (mass_target + moved * mass_source) / mass_target.clamp_min(1e-30), 1.0)
    targets = weight[..., None] * rows.out + a_target @ rows.values  # [B, h, Nq, Dv]
    o = (1.0 - moved)[..., None] * (a_source @ rows.values) + grow[..., None] * targets
    total = mass_target + mass_source
    return o / total.masked_fill(total == 0, 1.0)[..., None]


def moved_from_sources(q, k, v, edit, heads, attention_mask, scale, causal, rows: RowPass | None, row_pass=None):
    """`[B, Nq, Hq, Dv]`: the redistribution of `edit` (every key a source or a target) on the query heads `heads`,
    from `rows` where it covers them (a head whose sources its pass did not all hide takes a pass of its own), else
    from a pass with the sources hidden; either way the moved rows are combined from a pass and the hidden keys'
    columns (`_moved`), and the other heads take the pass's output. `row_pass`: what runs a pass (`_row_pass`'s
    signature; default the SDPA one here)."""
    row_pass = row_pass or _row_pass
    rd = edit.redistribute
    B, Hq, Nq, _ = q.shape
    group = Hq // k.shape[1]
    source = rd.source.expand(B, Hq, k.shape[2])
    if rows is None or edit.key_bias is not None or not bool(torch.isin(heads, rows.heads.cpu()).all()):
        hidden = rd.source if rd.source.shape[1] == 1 else rd.source[:, heads.to(rd.source.device)]  # [B, h|1, Nk]
        rows = row_pass(q, k, v, heads, hidden, edit.key_bias, attention_mask, scale, causal)
        passes = [rows]
    else:
        missed = (source[:, rows.heads] & ~rows.hidden).any(dim=-1).any(dim=0)  # [h]
        passes = [rows]
        if missed.any():
            again = rows.heads[missed]
            own = row_pass(q[:, again], k[:, again // group], v[:, again // group], torch.arange(again.numel()),
                            source[:, again], None, attention_mask, scale, causal)  # fmt: skip
            passes = [rows.of(~missed), replace(own, heads=again)]
    out = rows.output
    p_move = torch.as_tensor(rd.p_move, dtype=torch.float32).reshape(-1).expand(Hq)
    for part in passes:
        moved = source[:, part.heads].gather(-1, part.keys)[:, :, None, :] & part.real  # [B, h, 1, S]
        gate = None if rd.row_gate is None else rd.row_gate.expand(B, Hq, Nq)[:, part.heads]
        o = _moved(part, moved, p_move[part.heads.cpu()].to(q.device), gate)
        out[:, :, part.heads] = o.transpose(1, 2).to(out.dtype)
    return out


def _sdpa(q, k, v, key_bias, attention_mask, scale, causal, lse=False):
    """`[B, Nq, Hq, Dv]`: torch's SDPA on the mask the model gave (bottom-right causal without one), the key bias
    added to the logits; a row that sees no key gives zero, as the explicit path does. With `lse` (CPU only),
    also the rows' log-sum-exp `[B, Hq, Nq]`, -inf on a row that sees nothing.

    On the CPU a bias that raises a few keys, the same on every row (ZeroTuning's initial token), costs no more
    than a plain pass with its LSE: the raised keys' extra weight is added afterwards (`_with_raised_keys`).
    Another finite bias that is the same on every row rides in `q @ k` as one more dimension, a weight in each
    query against `bias / scale` in each key (`v` padded alike), so SDPA keeps the kernel it runs on a plain mask;
    an additive float mask would make it read an `[B, Hq, Nq, Nk]` tensor. One row of biases on some heads is
    weight 1 on those heads and 0 on the others, keys shared as the model shares them; biases that differ by head
    give each query head its own keys. Where the model gave a mask, a bias shared by all heads joins it instead:
    SDPA reads a float mask of that size either way (it converts a boolean one)."""
    raised = _raised_keys(key_bias) if key_bias is not None and q.device.type == "cpu" else None
    if raised is not None:
        out, row_lse = _sdpa(q, k, v, None, attention_mask, scale, causal, lse=True)
        _with_raised_keys(out, row_lse, q, k, v, *raised, attention_mask, scale, causal)
        return (out, row_lse) if lse else out
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    folded = attention_mask is not None and key_bias is not None and key_bias.shape[1] == 1
    if not folded and key_bias is not None and key_bias.shape[2] == 1 and Dv == D and bool(key_bias.isfinite().all()):
        rows = key_bias[:, :, 0].to(q.dtype)  # [B|1, Hq|1, Nk]
        heads = rows.ne(0).any(dim=-1, keepdim=True)  # [B|1, Hq|1, 1]: the heads it biases
        common = (rows * heads).sum(dim=1) / heads.sum(dim=1).clamp_min(1)  # [B|1, Nk]
        kv_heads = k.shape[1]
        if torch.equal(rows, heads * common[:, None]):  # weight [B|1, Hq|1, 1, 1], column [B|1, 1, Nk, 1]
            weight, column = heads.to(q.dtype)[..., None], common[:, None, :, None]
        else:
            weight, column, kv_heads = q.new_ones(1, 1, 1, 1), rows[..., None], Hq  # column [B|1, Hq, Nk, 1]
        q = _with_column(q, B, Hq, weight)
        k = _with_column(k, B, kv_heads, column / scale)
        v = _with_column(v, B, kv_heads, v.new_zeros(1, 1, 1, 1))
        key_bias = None
    mask, blind, is_causal = None, None, False
    if attention_mask is None and key_bias is None and (not causal or Nq == 1):
        pass  # every key visible
    elif attention_mask is None and key_bias is None and Nq == Nk:
        is_causal = True  # SDPA's own causal mask, top-left aligned, is the bottom-right one here
    else:
        mask, blind = _sdpa_mask(attention_mask, Nq, Nk, causal, q.dtype, q.device)  # [B|1, 1, Nq|1, Nk|1]
        if key_bias is not None:
            mask = mask + key_bias.to(q.dtype)  # [B|1, Hq|1, Nq|1, Nk]
            blind = ~(mask > float("-inf")).any(dim=-1, keepdim=True)  # a -inf bias may hide a row's last key
    if lse:
        out, row_lse = _flash(q, k, v, mask, is_causal, scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )  # [B, Hq, Nq, Dv]
    out = out[..., :Dv]
    if blind is not None and blind.shape[1] == 1:  # rows that see nothing, the same on every head: only those written
        rows = blind[:, 0, :, 0].expand(B, Nq).nonzero(as_tuple=True)  # ([R], [R]): indices (a bool one is slower)
        out.transpose(1, 2)[rows] = 0.0  # a fresh tensor
        if lse:
            row_lse.transpose(1, 2)[rows] = float("-inf")
    elif blind is not None:
        out = out.masked_fill_(blind, 0.0)  # [B|1, Hq, Nq, 1]
        row_lse = row_lse.masked_fill(blind[..., 0], float("-inf")) if lse else None
    return (out.transpose(1, 2), row_lse) if lse else out.transpose(1, 2)  # [B, Nq, Hq, Dv]


_MASKS = WeakIdKeyDictionary()  # a model's mask -> (its version, {geometry: what `_sdpa_mask` derived from it})


def _sdpa_mask(attention_mask, Nq, Nk, causal, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The visibility of `_mask_rows` as the additive mask SDPA takes, `[B|1, 1, Nq|1, Nk]` in `dtype` (contiguous:
    torch 2.6's flash kernel misreads a transposed one), and the rows that see no key `[B|1, 1, Nq|1, 1]`. A model
    hands every layer of a forward the same mask, so these are derived once and kept with it while it lives
    (unless it changes in place)."""

    def derive():
        keep, additive = _mask_rows(attention_mask, 0, Nq, Nq, Nk, causal, device)  # [B|1, 1, Nq|1, Nk]
        mask = _additive(keep, dtype) if additive is None else _additive(keep, dtype) + additive.to(dtype)
        return mask.contiguous(), ~keep.any(dim=-1, keepdim=True)

    if attention_mask is None or torch.is_inference(attention_mask):  # no version counter to tell a change
        return derive()
    version, derived = _MASKS.get(attention_mask, (None, None))
    if version != attention_mask._version:
        derived = {}
        _MASKS[attention_mask] = (attention_mask._version, derived)
    geometry = (Nq, Nk, causal, dtype, device)
    if geometry not in derived:
        derived[geometry] = derive()
    return derived[geometry]


_FEW_KEYS = 16  # keys a bias may raise to be added after a plain pass (`_with_raised_keys`); more ride in q @ k


def _raised_keys(key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a key bias `[B|1, Hq|1, 1, Nk]` that raises a few keys (finite, at least 0, non-zero on at most
    `_FEW_KEYS` keys of each batch row): `(keys [B|1, S], extra [B|1, Hq|1, S])`, those keys and the weight each
    adds to its plain weight, `e^bias - 1` times it (0 on the keys that pad a row with fewer). Else None."""
    if key_bias.shape[2] != 1:
        return None
    rows = key_bias[:, :, 0].float()  # [B|1, Hq|1, Nk]
    if not bool(((rows >= 0) & (rows < float("inf"))).all()):
        return None
    raised = rows.ne(0).any(dim=1)  # [B|1, Nk]
    most = int(raised.sum(dim=-1).max())
    if most > _FEW_KEYS:
        return None
    keys = raised.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :most]  # [B|1, S]: raised first
    return keys, torch.expm1(rows.gather(-1, keys[:, None].expand(-1, rows.shape[1], -1)))  # [B|1, Hq|1, S]


def _with_raised_keys(out, lse, q, k, v, keys, extra, attention_mask, scale, causal) -> None:
    """Turns a plain pass's output `[B, Nq, Hq, Dv]` and LSE `[B, Hq, Nq]` (fp32), in place, into those of the
    pass with the keys `keys` `[B|1, S]` weighing `1 + extra` `[B|1, Hq|1, S]` times their plain weight. With each
    key's probability in the pass `a = exp(s - lse)`, a row becomes `(O + sum extra a v) / (1 + sum extra a)`:
    every term positive, so nothing cancels; its LSE grows by `log(1 + sum extra a)`. Head by head, on views: only
    the raised heads' outputs are read and written."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, S = k.shape[1], k.shape[2], keys.shape[-1]
    group = Hq // Hkv
    index = keys[:, None, :, None]  # [B|1, 1, S, 1]
    k_s = k.gather(2, index.expand(B, Hkv, S, D)).float() * scale  # [B, Hkv, S, D]
    v_s = v.gather(2, index.expand(B, Hkv, S, v.shape[3])).float()  # [B, Hkv, S, Dv]
    seen = torch.zeros(1, 1, 1, 1, device=q.device)  # what the mask adds to the raised keys' logits
    if attention_mask is not None:  # the pass's own mask, at the raised keys: 0, -inf or a float mask's bias
        mask, _ = _sdpa_mask(attention_mask, Nq, Nk, causal, q.dtype, q.device)  # [B|1, 1|Hq, Nq|1, Nk]
        seen = mask.expand(B, -1, Nq, Nk).gather(-1, keys[:, None, None, :].expand(B, mask.shape[1], Nq, S)).float()
    elif causal:  # bottom-right
        visible = keys[:, None, None, :] <= torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)  # [B|1, 1, Nq, S]
        seen = torch.zeros(visible.shape, device=q.device).masked_fill_(~visible, float("-inf"))
    for h in extra.ne(0).any(dim=-1).any(dim=0).expand(Hq).nonzero().flatten().tolist():  # the heads it raises
        s = q[:, h].float() @ k_s[:, h // group].transpose(-1, -2) + seen[:, min(h, seen.shape[1] - 1)]  # [B, Nq, S]
        row_lse = lse[:, h]  # [B, Nq], a view
        a = torch.exp(s - row_lse.masked_fill(row_lse == float("-inf"), 0.0)[..., None])  # 0 on rows that see none
        weights = a * extra[:, min(h, extra.shape[1] - 1), None, :]  # [B, Nq, S]
        added = weights.sum(dim=-1)  # [B, Nq]
        o = out[:, :, h]  # [B, Nq, Dv], a view
        o.copy_((o.float() + weights @ v_s[:, h // group]) / (1.0 + added)[..., None])
        row_lse += torch.log1p(added)


def _additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean mask as the additive one SDPA adds to the logits: 0 where visible, -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _with_column(t, batch: int, heads: int, column) -> torch.Tensor:
    """`t` `[B|1, H, N, D]` as `[B, heads, N, D + 1]`, `column` (broadcast to `[B, heads, N, 1]`) the last entry,
    each head of `t` repeated for the `heads // H` heads that share it: one copy, where a repeat and a cat take
    two."""
    _, H, N, D = t.shape
    out = t.new_empty(batch, heads, N, D + 1)
    out.view(batch, H, heads // H, N, D + 1)[..., :D].copy_(t[:, :, None])
    out[..., D:] = column
    return out


def _flash(q, k, v, mask, is_causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention, which returns the rows' LSE: `(out [B, Hq, Nq, Dv], lse [B, Hq, Nq])` (fp32).
    It wants one head size and an additive mask, and as many key as query heads before torch 2.9; `is_causal` is
    top-left aligned."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _flash_groups_heads():
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Dv = v.shape[-1]
    if Dv != q.shape[-1]:  # zeros in the narrower of q, k and v change no score and no output
        width = max(Dv, q.shape[-1])
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    if mask is not None:  # contiguous: torch 2.6's kernel misreads a transposed mask
        mask = (_additive(mask, q.dtype) if mask.dtype == torch.bool else mask.to(q.dtype)).contiguous()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    return out[..., :Dv], lse


@functools.cache
def _flash_groups_heads() -> bool:
    """Whether torch's CPU flash kernel gives each group of query heads its key/value head (torch 2.9 on), where an
    older one reads k and v as if they had q's heads. Asked once, of a key/value head that is the first of two
    (value 0, then 1), so that an older kernel reads the second rather than past the end."""
    kv = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 1, 8).contiguous()  # [1, 2, 1, 8]
    q = torch.zeros(1, 2, 1, 8)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv[:, :1], kv[:, :1], 0.0, False, scale=1.0)
    return bool((out == 0).all())


def probabilities(q, k, edit: AttentionEdit, *, attention_mask, scale, causal, sinks, softcap) -> torch.Tensor:
    """The edited attention probabilities `[B, Hq, Nq, Nk]` (fp32), materialised: for inspection only."""
    rows = _edited_rows(q, k, edit, attention_mask, scale, causal, sinks, softcap, False)
    return torch.cat([p for _, _, p, _ in rows], dim=2)


def _edited_rows(q, k, edit: AttentionEdit, attention_mask, scale, causal, sinks, softcap, lse) -> Iterator:
    """Yield `(r0, r1, probabilities [B, Hq, rows, Nk], lse [B, Hq, rows] | None)` with the edit applied: its logit
    edits (`_probability_rows`), then its redistribution, then its counterfactual."""
    cf = edit.counterfactual
    generator = None if cf is None else torch.Generator(q.device).manual_seed(cf.seed)
    for r0, r1, p, seen, row_lse in _probability_rows(q, k, edit, attention_mask, scale, causal, sinks, softcap, lse):
        if edit.redistribute is not None:
            p = _redistribute(p, edit.redistribute, r0, r1)
        if cf is not None:
            p = _counterfactual(p, seen, cf, generator)
        yield r0, r1, p, row_lse


def column_stats(q, k, *, attention_mask, scale, causal, query_mask, key_bias, sinks, softcap):
    plain = key_bias is None and sinks is None and softcap is None
    if plain and q.device.type == "cpu" and not _has_additive_part(attention_mask):
        return _column_stats_by_flash(q, k, attention_mask, scale, causal, query_mask)
    B, Hq, _, _ = q.shape
    Nk = k.shape[2]
    sums = q.new_zeros(B, Hq, Nk, dtype=torch.float32)
    counts = torch.zeros_like(sums)
    edit = AttentionEdit(key_bias=key_bias)
    for r0, r1, p, seen, _ in _probability_rows(q, k, edit, attention_mask, scale, causal, sinks, softcap):
        seen = seen.expand(*seen.shape[:2], r1 - r0, Nk)  # a mask shared by all rows still counts each row
        if query_mask is not None:
            rows = query_mask[:, None, r0:r1, None]  # [B, 1, rows, 1]
            p, seen = p * rows, seen & rows
        sums += p.sum(dim=2)
        counts += seen.sum(dim=2, dtype=torch.float32)
    return sums, counts


def _column_stats_by_flash(q, k, attention_mask, scale, causal, query_mask, lse=None):
    """`column_stats` from two flash passes, no probabilities held: the first gives each row's LSE; in the second
    the keys ask the rows, `sum_i exp(scale q_i.k_j - lse_i)` being the LSE of key j's row of the transposed
    scores `[k_j, 1] . [scale q_i, -lse_i]` over the rows that see it. Without a mask, nothing N x N is built: a
    row left out gets `-HIDDEN` in that last entry, and reversing both sides makes the transposed causal
    pattern (key j seen by the rows at and after it) torch's own top-left causal one. `lse` `[B, Hq, Nq]`: the rows'
    LSE when already known (a `RowPass`), which saves the first pass."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if k.shape[1] != Hq:
        k = k.repeat_interleave(Hq // k.shape[1], dim=1)  # [B, Hq, Nk, D]
    if lse is None:
        _, lse = _sdpa(q, k, k, None, attention_mask, scale, causal, lse=True)  # [B, Hq, Nq]
    asking = torch.cat([k, k.new_ones(B, Hq, Nk, 1)], dim=-1)  # [B, Hq, Nk, D + 1]
    if attention_mask is None:
        rows = torch.ones(B, Nq, dtype=torch.bool, device=q.device) if query_mask is None else query_mask  # [B, Nq]
        if causal:  # key j is seen by the rows from j - (Nk - Nq) on: a suffix sum of the chosen rows
            after = rows.flip(-1).cumsum(-1, dtype=torch.float32).flip(-1)  # [B, Nq]: chosen rows from i on
            first = (torch.arange(Nk, device=q.device) - (Nk - Nq)).clamp(0, Nq)  # [Nk]
            counts = F.pad(after, (0, 1)).index_select(-1, first)  # [B, Nk] (Nq: none left)
        else:
            counts = rows.sum(-1, dtype=torch.float32)[:, None].expand(B, Nk)
        counts = counts[:, None].expand(B, Hq, Nk)
        answering = torch.cat([q * scale, (-lse).masked_fill(~rows[:, None], -HIDDEN)[..., None].to(q.dtype)], -1)
        answering = answering.flip(2)  # also the values, whose output is not used
        _, column_lse = _flash(asking.flip(2), answering, answering, None, causal, 1.0)
        column_lse = column_lse.flip(2)
    else:
        keep, _ = _mask_rows(attention_mask, 0, Nq, Nq, Nk, causal, q.device)  # [B|1, 1, Nq, Nk]
        rows = keep.any(dim=-1)  # [B|1, 1, Nq]: the rows that see a key
        if query_mask is not None:
            rows = rows & query_mask[:, None, :]
        seen = (keep & rows[..., None]).expand(-1, -1, Nq, -1)  # [B|1, 1, Nq, Nk]: a mask shared by all rows too
        counts = seen.sum(dim=2, dtype=torch.float32).expand(B, Hq, Nk)  # [B, Hq, Nk]
        rows_lse = lse.masked_fill(~rows.expand(B, Hq, Nq), 0.0).to(q.dtype)  # finite: the mask drops those rows
        answering = torch.cat([q * scale, -rows_lse[..., None]], dim=-1)  # [B, Hq, Nq, D + 1]
        _, column_lse = _flash(asking, answering, answering, seen.transpose(-1, -2), False, 1.0)
    sums = torch.exp(column_lse).masked_fill_(counts == 0, 0.0)  # [B, Hq, Nk]
    return sums, counts.contiguous()


def column_stats_and_rows(q, k, v, hidden, *, heads, attention_mask, scale, causal, query_mask):
    """`column_stats` of plain attention on the query heads `heads` `[h]`, and the `RowPass` they were computed from:
    one pass of every head of `q`, with the keys `hidden` `[B, Nk]` hidden on `heads` (None where the CPU path does not
    apply, and the statistics come the usual way)."""
    B, Hq, Nq, _ = q.shape
    kv = heads // (Hq // k.shape[1])
    few = B * heads.numel() * Nq * int(hidden.sum(dim=-1).max()) <= CHUNK_SCORES
    if q.device.type != "cpu" or _has_additive_part(attention_mask) or not few:
        stats = column_stats(q[:, heads], k[:, kv], attention_mask=attention_mask, scale=scale, causal=causal,
                             query_mask=query_mask, key_bias=None, sinks=None, softcap=None)  # fmt: skip
        return (*stats, None)
    rows = _row_pass(q, k, v, heads, hidden[:, None], None, attention_mask, scale, causal)
    sums, counts = _column_stats_by_flash(q[:, heads], k[:, kv], attention_mask, scale, causal, query_mask,
                                          lse=rows.row_lse())  # fmt: skip
    return sums, counts, rows


def _has_additive_part(attention_mask) -> bool:
    """Whether a float mask adds anything but 0 and "masked" (finfo.min) to the logits."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return False
    keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return bool((attention_mask.masked_fill(~keep, 0) != 0).any())


def _probability_rows(q, k, edit, attention_mask, scale, causal, sinks, softcap, lse=False) -> Iterator:
    """Yield `(r0, r1, probabilities [B, Hq, rows, Nk], seen [B|1, 1|Hq, rows, Nk], lse [B, Hq, rows] | None)`,
    `seen` True where a key's final logit is finite; `sinks` `[B|1, Hq]` (fp32) join each row's softmax."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    q_grouped = (q.float() * scale).view(B, Hkv, Hq // Hkv, Nq, D)
    k_t = k.float().transpose(-1, -2)  # [B, Hkv, D, Nk]
    step = max(1, CHUNK_SCORES // (B * Hq * Nk))
    for r0 in range(0, Nq, step):
        r1 = min(Nq, r0 + step)
        rows = q_grouped[:, :, :, r0:r1].reshape(B, Hkv, -1, D)  # GQA: a KV head's query heads stacked as rows
        s = (rows @ k_t).view(B, Hq, r1 - r0, Nk)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if edit.key_gain is not None:
            gain = edit.key_gain
            where = gain.keys[:, None, None, :]  # [B, 1, 1, Nk]
            if gain.rows is not None:
                where = where & gain.rows[:, None, r0:r1, None]  # [B, 1, rows, Nk]
            s = s + gain.alpha * s.abs() * where
        keep, additive = _mask_rows(attention_mask, r0, r1, Nq, Nk, causal, s.device)
        if additive is not None:
            s += additive
        if edit.key_bias is not None:
            s += _rows_of(edit.key_bias, r0, r1).float()
        s.masked_fill_(~keep, float("-inf"))
        # a -inf bias hides a key as the mask does; without a bias the (broadcast, cheaper) mask says it all
        seen = keep if edit.key_bias is None else s > float("-inf")  # [B|1, 1|Hq, rows, Nk]
        if sinks is not None:  # one more logit per row, which carries no value
            s = torch.cat([s, sinks[:, :, None, None].expand(B, Hq, r1 - r0, 1)], dim=-1)  # [B, Hq, rows, Nk + 1]
        row_lse = torch.logsumexp(s, dim=-1) if lse else None  # -inf on a row that sees nothing
        blind = ~seen.any(dim=-1, keepdim=True)  # [B|1, 1|Hq, rows, 1]
        if sinks is not None:  # a finite sink takes all the mass of a row that sees no key
            blind = blind & torch.isneginf(sinks)[:, :, None, None]
        p = torch.softmax(s, dim=-1).masked_fill_(blind, 0.0)  # 0 rather than softmax's NaN on such rows
        yield r0, r1, (p if sinks is None else p[..., :Nk]), seen, row_lse


def visible_keys(attention_mask, backend: str) -> torch.Tensor | None:
    """transformers' mask `[B|1, 1, Nq, Nk]` as bool `[B|1, Nq, Nk]` (True = visible), for the fused
    backends, which take visibility only: a float mask must be 0 / finfo.min, and shared by all heads."""
    if attention_mask is None:
        return None
    if attention_mask.shape[1] != 1:
        raise NotImplementedError(f"the {backend} backend takes masks shared by all heads ([B, 1, Nq, Nk])")
    m = attention_mask[:, 0]
    if m.dtype == torch.bool:
        return m
    if _has_additive_part(m):
        raise NotImplementedError(
            f"the {backend} backend takes boolean masks; this float mask carries an additive bias "
            "(pass it as key_bias, or use backend='reference')"
        )
    return m > torch.finfo(m.dtype).min / 2


def _mask_rows(attention_mask, r0, r1, Nq, Nk, causal, device):
    """The visible keys of rows r0:r1 as a bool `keep`, plus any additive part of a float mask."""
    if attention_mask is None:
        if not causal:
            return torch.ones(1, 1, 1, Nk, dtype=torch.bool, device=device), None
        # bottom-right aligned: with a KV cache, row i is the query at key position i + Nk - Nq
        rows = torch.arange(r0, r1, device=device)[:, None] + (Nk - Nq)
        return (torch.arange(Nk, device=device)[None, :] <= rows)[None, None], None
    m = _rows_of(attention_mask, r0, r1)
    if m.dtype == torch.bool:
        return m, None
    keep = m > torch.finfo(m.dtype).min / 2  # HF eager masks use finfo.min for "masked"
    return keep, m.float().masked_fill(~keep, 0.0)


def _rows_of(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t[..., r0:r1, :] if t.shape[-2] > 1 else t


def _counterfactual(p: torch.Tensor, seen: torch.Tensor, cf: Counterfactual, generator) -> torch.Tensor:
    """`p` `[B, Hq, rows, Nk]` with each row's probabilities on the visible keys of `cf.keys` replaced by the
    counterfactual map of the same total (`Counterfactual`)."""
    member = seen.expand_as(p) if cf.keys is None else seen & cf.keys[:, None, None, :]  # [B, Hq, rows, Nk]
    if cf.kind == "shuffle":  # members in a random order, written back at the members' places in key order
        index = torch.arange(p.shape[-1], device=p.device) / p.shape[-1]  # in [0, 1): sorts after no random number
        random = torch.rand(p.shape, generator=generator, device=p.device)
        drawn = torch.where(member, random, 2 + index).argsort(dim=-1)
        places = torch.where(member, index, 2 + index).argsort(dim=-1)
        return p.scatter(-1, places, p.gather(-1, drawn))
    on = torch.where(member, p, 0.0)
    mass = on.sum(dim=-1, keepdim=True)  # [B, Hq, rows, 1]
    if cf.kind == "uniform":
        weight = member.to(p.dtype)
    elif cf.kind == "random":
        weight = torch.rand(p.shape, generator=generator, device=p.device) * member
    else:  # reverse; rows whose members are all equal (nothing to reverse) keep them
        weight = torch.where(member, on.amax(dim=-1, keepdim=True) - on, 0.0)
        weight = torch.where(weight.sum(dim=-1, keepdim=True) > 0, weight, on)
    total = weight.sum(dim=-1, keepdim=True)
    return torch.where(member, weight * (mass / total.masked_fill(total == 0, 1.0)), p)


def _redistribute(p: torch.Tensor, rd: Redistribute, r0: int, r1: int) -> torch.Tensor:
    source = rd.source[:, :, None, :]  # [B, Hq|1, 1, Nk]
    target = rd.target[:, :, None, :] & ~source
    mass_source = p @ source.transpose(-1, -2).float()  # [B, Hq, rows, 1]
    mass_target = p @ target.transpose(-1, -2).float()
    p_move = torch.as_tensor(rd.p_move, dtype=torch.float32, device=p.device).reshape(1, -1, 1, 1)
    active = (mass_source > 0) & (mass_target > 0)
    if rd.row_gate is not None:
        active = active & rd.row_gate[:, :, r0:r1, None]
    if rd.mass_gate is not None:
        gate = rd.mass_gate
        keys = gate.keys[:, None, None, :]  # [B, 1, 1, Nk]
        mass_keys = p @ keys.transpose(-1, -2).float()  # [B, Hq, rows, 1]
        mass_shared = p @ (keys & source).transpose(-1, -2).float()
        share = mass_shared / mass_keys.clamp_min(1e-30)
        active = active & (mass_keys >= gate.min_mass) & (mass_shared > 0) & (share <= gate.max_source_share)
    keep_source = torch.where(active, 1.0 - p_move, 1.0)
    grow_target = torch.where(active, 1.0 + p_move * mass_source / mass_target.clamp_min(1e-30), 1.0)
    return p.mul_(torch.where(source, keep_source, torch.where(target, grow_target, 1.0)))

"""The reference backend against explicit fp32 probabilities and the identities of methods-llm §1."""

import math

import pytest
import torch

from intervene import kernels
from intervene.kernels import AttentionEdit, KeyGain, MassGate, Redistribute, reference

from oracles import explicit_probabilities


def qkv(batch=2, heads=4, kv_heads=2, n=9, nk=None, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    nk = nk or n
    q = torch.randn(batch, heads, n, d, generator=g) * 2
    k = torch.randn(batch, kv_heads, nk, d, generator=g) * 2
    v = torch.randn(batch, kv_heads, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def explicit(q, k, v, scale, keep=None, transform=None):
    """out [B, Nq, Hq, D] from explicit probabilities, optionally transformed per element."""
    outs = []
    for b in range(q.shape[0]):
        A = explicit_probabilities(q[b], k[b], scale, None if keep is None else keep[b, 0])
        A = torch.nan_to_num(A)  # fully masked rows
        if transform is not None:
            A = transform(A, b)
        vb = v[b].float().repeat_interleave(q.shape[1] // v.shape[1], dim=0)
        outs.append((A @ vb).transpose(0, 1))
    return torch.stack(outs)


def padded_keep(batch, n, pads):
    """Bool [B, 1, n, n] causal mask with `pads[b]` left-padded keys per row."""
    keep = torch.ones(n, n, dtype=torch.bool).tril().repeat(batch, 1, 1, 1)
    for b, p in enumerate(pads):
        keep[b, :, :, :p] = False
    return keep


def test_plain_attention_matches_explicit_softmax_with_gqa():
    q, k, v = qkv()
    out = kernels.modified_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, explicit(q, k, v, 0.3), atol=1e-6, rtol=1e-6)


def test_decode_rows_are_bottom_right_aligned():
    q, k, v = qkv(n=3, nk=10)
    out = kernels.modified_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, explicit(q, k, v, 0.3), atol=1e-6, rtol=1e-6)
    single = kernels.modified_attention(q[:, :, -1:], k, v, scale=0.3)  # a decode step sees every key
    torch.testing.assert_close(single[:, 0], out[:, -1], atol=1e-6, rtol=1e-6)


def test_bool_and_float_masks_agree():
    q, k, v = qkv()
    keep = padded_keep(2, 9, [0, 3])
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    expected = explicit(q, k, v, 0.3, keep)
    for mask in (keep, additive):
        out = kernels.modified_attention(q, k, v, attention_mask=mask, scale=0.3)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_fully_masked_rows_give_zero_not_nan():
    q, k, v = qkv()
    keep = padded_keep(2, 9, [0, 4])  # rows 0..3 of element 1 see nothing
    bias = torch.zeros(2, 4, 1, 9)
    bias[..., 0] = math.log(3.0)
    out, lse = kernels.modified_attention(
        q, k, v, AttentionEdit(key_bias=bias), attention_mask=keep, scale=0.3, return_lse=True
    )
    assert torch.isfinite(out).all()
    assert (out[1, :4] == 0).all()
    assert not torch.isnan(lse).any()


def test_row_sums_stay_one_under_every_edit():
    # With v = identity the output rows are the probability rows themselves.
    q, k, _ = qkv(kv_heads=4)
    eye = torch.eye(9).expand(2, 4, 9, 9)
    g = torch.Generator().manual_seed(1)
    source = torch.rand(2, 4, 9, generator=g) < 0.3
    edit = AttentionEdit(
        key_bias=torch.randn(2, 4, 1, 9, generator=g),
        key_gain=KeyGain(torch.rand(2, 9, generator=g) < 0.5, 0.7, rows=torch.rand(2, 9, generator=g) < 0.5),
        redistribute=Redistribute(source=source, target=~source, p_move=torch.tensor([0.2, 0.5, 0.9, 1.0])),
    )
    probs = kernels.modified_attention(q, k, eye, edit, attention_mask=padded_keep(2, 9, [0, 2]), scale=0.3)
    sums = probs.sum(dim=-1)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]))
    torch.testing.assert_close(sums[1, 2:], torch.ones_like(sums[1, 2:]))
    assert (probs >= 0).all()


def test_attention_probabilities_are_the_rows_the_output_is_made_of():
    q, k, _ = qkv()  # GQA: 4 query heads over 2 key/value heads
    g = torch.Generator().manual_seed(2)
    source = torch.rand(2, 4, 9, generator=g) < 0.3
    edit = AttentionEdit(
        key_bias=torch.randn(2, 1, 9, 9, generator=g),
        key_gain=KeyGain(torch.rand(2, 9, generator=g) < 0.5, 0.4),
        redistribute=Redistribute(source=source, target=~source, p_move=0.6),
    )
    mask = padded_keep(2, 9, [0, 3])
    probs = kernels.attention_probabilities(q, k, edit, attention_mask=mask, scale=0.3)  # [B, Hq, N, N]
    rows = kernels.modified_attention(q, k, torch.eye(9).expand(2, 2, 9, 9), edit, attention_mask=mask, scale=0.3)
    torch.testing.assert_close(probs, rows.transpose(1, 2), atol=1e-6, rtol=0)  # v = identity: output = rows


def test_scale_and_renormalise_equals_log_bias():
    q, k, v = qkv()
    gamma = torch.tensor([0.25, 1.0, 2.0, 4.0])
    keys = torch.zeros(9, dtype=torch.bool)
    keys[[0, 4]] = True
    bias = (keys * gamma.log()[:, None])[None, :, None, :]  # [1, Hq, 1, Nk]
    out = kernels.modified_attention(q, k, v, AttentionEdit(key_bias=bias), scale=0.3)

    def scale_renormalise(A, b):
        A = A.clone()
        A[:, :, keys] *= gamma[:, None, None]
        return A / A.sum(dim=-1, keepdim=True)

    torch.testing.assert_close(out, explicit(q, k, v, 0.3, transform=scale_renormalise), atol=1e-6, rtol=1e-6)


def test_key_gain_is_z_plus_alpha_abs_z():
    q, k, v = qkv(kv_heads=4)
    keys = torch.zeros(2, 9, dtype=torch.bool)
    keys[:, 2:5] = True
    rows = torch.zeros(2, 9, dtype=torch.bool)
    rows[:, 6:] = True
    out = kernels.modified_attention(q, k, v, AttentionEdit(key_gain=KeyGain(keys, 0.5, rows)), scale=0.3)
    logits = q @ k.transpose(-1, -2) * 0.3
    where = rows[:, None, :, None] & keys[:, None, None, :]  # [B, 1, Nq, Nk]
    logits = logits + 0.5 * logits.abs() * where
    logits = logits.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    expected = (logits.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_redistribution_moves_mass_in_proportion_and_respects_the_gate():
    q, k, v = qkv()
    g = torch.Generator().manual_seed(2)
    source = torch.zeros(2, 4, 9, dtype=torch.bool)
    source[:, :, [1, 5]] = True
    target = torch.zeros(2, 4, 9, dtype=torch.bool)
    target[:, :, [2, 3, 7]] = True
    gate = torch.rand(2, 4, 9, generator=g) < 0.6
    edit = AttentionEdit(redistribute=Redistribute(source=source, target=target, p_move=0.3, row_gate=gate))
    out = kernels.modified_attention(q, k, v, edit, scale=0.3)

    def move(A, b):
        A = A.clone()
        m_s = A[:, :, source[b, 0]].sum(-1, keepdim=True)
        m_t = A[:, :, target[b, 0]].sum(-1, keepdim=True)
        on = gate[b][:, :, None] & (m_s > 0) & (m_t > 0)
        moved = A.clone()
        moved[:, :, source[b, 0]] *= 0.7
        moved[:, :, target[b, 0]] *= 1 + 0.3 * m_s / m_t.clamp_min(1e-30)
        return torch.where(on, moved, A)

    torch.testing.assert_close(out, explicit(q, k, v, 0.3, transform=move), atol=1e-6, rtol=1e-6)


def test_mass_gate_reads_each_rows_own_probabilities():
    q, k, v = qkv()
    source = torch.zeros(2, 1, 9, dtype=torch.bool)
    source[:, :, [0, 4]] = True  # 0 is outside the gate keys (a text sink), 4 inside (an image sink)
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[:, 3:7] = True
    gate = MassGate(keys=image, min_mass=0.2, max_source_share=0.5)
    edit = AttentionEdit(redistribute=Redistribute(source=source, target=image[:, None], p_move=0.4, mass_gate=gate))
    out = kernels.modified_attention(q, k, v, edit, scale=0.3)

    def move(A, b):
        m_img = A[:, :, image[b]].sum(-1, keepdim=True)
        m_sink_img = A[:, :, 4:5]
        m_s = A[:, :, [0, 4]].sum(-1, keepdim=True)
        m_t = A[:, :, [3, 5, 6]].sum(-1, keepdim=True)
        on = (m_img >= 0.2) & (m_sink_img > 0) & (m_sink_img / m_img <= 0.5) & (m_t > 0)
        moved = A.clone()
        moved[:, :, [0, 4]] *= 0.6
        moved[:, :, [3, 5, 6]] *= 1 + 0.4 * m_s / m_t.clamp_min(1e-30)
        return torch.where(on, moved, A)

    expected = explicit(q, k, v, 0.3, transform=move)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, kernels.modified_attention(q, k, v, scale=0.3))  # some rows pass the gate


def test_head_scale_multiplies_each_head():
    q, k, v = qkv()
    scale = torch.tensor([[0.0, 1.0, 2.0, -0.5]])
    out = kernels.modified_attention(q, k, v, AttentionEdit(head_scale=scale), scale=0.3)
    plain = kernels.modified_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, plain * scale[:, None, :, None], atol=1e-6, rtol=1e-6)


def test_row_chunking_does_not_change_results(monkeypatch):
    q, k, v = qkv(n=33)
    source = torch.zeros(2, 4, 33, dtype=torch.bool)
    source[:, :, 3] = True
    edit = AttentionEdit(
        key_bias=torch.randn(2, 4, 33, 33), redistribute=Redistribute(source=source, target=~source, p_move=0.6)
    )
    whole, lse = kernels.modified_attention(q, k, v, edit, scale=0.3, return_lse=True)
    sums, counts = kernels.column_stats(q, k, scale=0.3)
    monkeypatch.setattr(reference, "_CHUNK_SCORES", 2 * 4 * 33 * 5)  # 5 rows at a time
    chunked, chunked_lse = kernels.modified_attention(q, k, v, edit, scale=0.3, return_lse=True)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked_lse, lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kernels.column_stats(q, k, scale=0.3), (sums, counts))


def test_lse_is_the_row_logsumexp():
    q, k, v = qkv()
    _, lse = kernels.modified_attention(q, k, v, scale=0.3, return_lse=True)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    logits = logits.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, logits.logsumexp(-1), atol=1e-5, rtol=1e-6)


def test_column_stats_count_the_queries_that_can_see_each_key():
    q, k, _ = qkv(n=7)
    keep = padded_keep(2, 7, [0, 2])
    rows = torch.ones(2, 7, dtype=torch.bool)
    rows[1, :2] = False  # padding queries do not count
    sums, counts = kernels.column_stats(q, k, attention_mask=keep, scale=0.3, query_mask=rows)
    torch.testing.assert_close(counts[0, 0], torch.arange(7, 0, -1).float())  # N - j, as in the official code
    torch.testing.assert_close(counts[1, 0], torch.tensor([0, 0, 5, 4, 3, 2, 1]).float())
    for b in range(2):
        A = torch.nan_to_num(explicit_probabilities(q[b], k[b], 0.3, keep[b, 0]))
        torch.testing.assert_close(sums[b], (A * rows[b][None, :, None]).sum(dim=1), atol=1e-6, rtol=1e-6)


def test_column_stats_under_a_sliding_window():
    q, k, _ = qkv(n=8)
    window = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    _, counts = kernels.column_stats(q, k, attention_mask=window[None, None], scale=0.3)
    torch.testing.assert_close(counts[0, 0], torch.tensor([3, 3, 3, 3, 3, 3, 2, 1]).float())


def test_half_precision_inputs_keep_their_dtype_and_stay_close():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = kernels.modified_attention(q, k, v, scale=0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), explicit(q, k, v, 0.3), atol=2e-2, rtol=2e-2)


def test_bad_backend_and_head_grouping_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'cuda'.*auto, reference"):
        kernels.modified_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"4 query heads cannot be grouped over 3"):
        kernels.modified_attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1))

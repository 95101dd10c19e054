"""The reference backend against explicit fp32 probabilities and the identities of methods-llm §1."""

import itertools
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
    monkeypatch.setattr(reference, "CHUNK_SCORES", 2 * 4 * 33 * 5)  # 5 rows at a time
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


def test_a_bias_that_hides_every_visible_key_of_a_row_gives_zero_and_minus_infinity():
    q, k, v = qkv(n=6)
    bias = torch.zeros(1, 1, 1, 6)
    bias[..., 0] = float("-inf")  # causal row 0 sees only key 0
    edit = AttentionEdit(key_bias=bias)
    out, lse = kernels.modified_attention(q, k, v, edit, scale=0.3, return_lse=True)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert torch.isneginf(lse[:, :, 0]).all()
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    keep[:, 0] = False  # the other rows: key 0 hidden as by the mask
    expected = explicit(q, k, v, 0.3, keep.expand(2, 1, 6, 6))
    torch.testing.assert_close(out[:, 1:], expected[:, 1:], atol=1e-6, rtol=1e-6)
    exact = torch.stack([explicit_probabilities(q[b], k[b], 0.3, keep).nan_to_num() for b in range(2)])
    probs = kernels.attention_probabilities(q, k, edit, scale=0.3)
    torch.testing.assert_close(probs, exact, atol=1e-6, rtol=1e-6)  # row 0 all 0
    sums, _ = kernels.column_stats(q, k, scale=0.3, key_bias=bias)
    torch.testing.assert_close(sums, exact.sum(dim=2), atol=1e-6, rtol=1e-6)


def test_column_stats_do_not_count_a_key_biased_to_minus_infinity():
    q, k, _ = qkv(n=7)
    bias = torch.zeros(2, 4, 1, 7)
    bias[0, 1, 0, 3] = float("-inf")  # head 1 of element 0 never sees key 3
    bias[1, :, 0, 0] = float("-inf")
    _, counts = kernels.column_stats(q, k, scale=0.3, key_bias=bias)
    seen = torch.ones(7, 7).tril().sum(dim=0).expand(2, 4, 7).clone()  # causal: key j seen by 7 - j rows
    seen[0, 1, 3] = 0
    seen[1, :, 0] = 0
    torch.testing.assert_close(counts, seen)


BAD_INPUTS = {  # name: (q, k, v shapes, mask dtype, error, words the message must hold)
    "q 3-D": ((5, 2, 16), (2, 7, 16), (2, 7, 16), None, ValueError, ["4-D", "q (5, 2, 16)"]),
    "k head size": ((2, 4, 5, 16), (2, 2, 7, 8), (2, 2, 7, 16), None, ValueError, ["head size", "k (2, 2, 7, 8)"]),
    "k batch": ((2, 4, 5, 16), (1, 2, 7, 16), (1, 2, 7, 16), None, ValueError, ["batch size", "k (1, 2, 7, 16)"]),
    "v length": ((2, 4, 5, 16), (2, 2, 7, 16), (2, 2, 6, 16), None, ValueError, ["length", "v (2, 2, 6, 16)"]),
    "head grouping": ((2, 4, 5, 16), (2, 3, 7, 16), (2, 3, 7, 16), None, ValueError, ["grouped over 3"]),
    "integer mask": ((2, 4, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16), torch.int64, TypeError, ["int64", "mask.bool()"]),
}


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])  # refused before a backend is chosen
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_inputs_no_backend_runs_are_refused_naming_them(backend, case):
    q_shape, k_shape, v_shape, mask_dtype, error, words = BAD_INPUTS[case]
    q, k, v = torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(v_shape)
    mask = None if mask_dtype is None else torch.ones(2, 1, 5, 7, dtype=mask_dtype)
    calls = [lambda: kernels.modified_attention(q, k, v, attention_mask=mask, backend=backend)]
    if case != "v length":  # the statistics read no values
        calls.append(lambda: kernels.column_stats(q, k, attention_mask=mask, backend=backend))
        calls.append(lambda: kernels.attention_probabilities(q, k, attention_mask=mask))
    for call in calls:
        with pytest.raises(error) as raised:
            call()
        for word in words:
            assert word in str(raised.value)


def test_q_k_and_v_of_different_dtypes_or_devices_are_refused():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q torch.float16, k torch.float32, v torch.float32.*\.to\(q.dtype\)"):
        kernels.modified_attention(q.half(), k, v)
    with pytest.raises(TypeError, match=r"v torch.float16"):
        kernels.modified_attention(q, k, v.half(), backend="flex")
    with pytest.raises(ValueError, match=r"q on meta, k on cpu, v on cpu: move them with \.to\(q.device\)"):
        kernels.modified_attention(q.to("meta"), k, v, backend="triton")


def bad_edits():
    """(edit, error, part of its message) for edit tensors that no backend takes, beside q [2, 4, 9, 8]."""
    keys = torch.ones(2, 9, dtype=torch.bool)
    source = keys[:, None]  # [B, 1, Nk]

    def moving(**fields):
        return AttentionEdit(
            redistribute=Redistribute(**{"source": source, "target": ~source, "p_move": 0.5, **fields})
        )

    shape = "must be [B|1, Hq|1, Nq|1, Nk] with B=2, Hq=4, Nq=9, Nk=9"
    return [
        (AttentionEdit(key_bias=torch.zeros(2, 4, 9)), ValueError, f"key_bias {shape}; got shape (2, 4, 9)"),
        (AttentionEdit(key_bias=torch.zeros(1, 1, 1, 8)), ValueError, f"key_bias {shape}; got shape (1, 1, 1, 8)"),
        (AttentionEdit(key_bias=torch.zeros(1, 1, 1, 9).long()), TypeError, "floating dtype, got torch.int64"),
        (AttentionEdit(head_scale=torch.ones(1, 3)), ValueError, "head_scale must be [B|1, Hq] with B=2, Hq=4; got"),
        (AttentionEdit(key_gain=KeyGain(keys[:1], 0.5)), ValueError, "key_gain.keys must be [B, Nk] with B=2, Nk=9"),
        (moving(source=source.float()), TypeError, "source must be bool, got torch.float32: pass `source.bool()`"),
        (moving(target=~keys), ValueError, "target must be [B, Hq|1, Nk] with B=2, Hq=4, Nk=9; got shape (2, 9)"),
        (moving(row_gate=source[:, :, :5]), ValueError, "row_gate must be [B, Hq|1, Nq] with B=2, Hq=4, Nq=9; got"),
        (moving(mass_gate=MassGate(keys[:, :3], 0.1, 0.5)), ValueError, "mass_gate.keys must be [B, Nk]"),
        (moving(p_move=torch.full((3,), 0.5)), ValueError, "p_move must be a scalar or [Hq] with Hq = 4, got"),
    ]


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_edit_tensors_no_backend_takes_are_refused_with_one_message(backend):
    q, k, v = qkv()
    for edit, error, message in bad_edits():
        with pytest.raises(error) as raised:
            kernels.modified_attention(q, k, v, edit, scale=0.3, backend=backend)
        assert message in str(raised.value)
    with pytest.raises(ValueError, match=r"key_bias must be \[B\|1, Hq\|1, Nq\|1, Nk\]"):
        kernels.attention_probabilities(q, k, AttentionEdit(key_bias=torch.zeros(2, 4, 9)))
    with pytest.raises(ValueError, match=r"key_bias must be .* got shape \(2, 4, 9\)"):
        kernels.column_stats(q, k, key_bias=torch.zeros(2, 4, 9), backend=backend)
    with pytest.raises(ValueError, match=r"query_mask must be \[B, Nq\] with B=2, Nq=9; got shape \(2, 8\)"):
        kernels.column_stats(q, k, query_mask=torch.ones(2, 8, dtype=torch.bool), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_a_head_scale_of_one_dimension_scales_every_batch_row(backend):
    q, k, v = qkv()
    scale = torch.tensor([0.0, 1.0, 2.0, -0.5])
    out = kernels.modified_attention(q, k, v, AttentionEdit(head_scale=scale), scale=0.3, backend=backend)
    torch.testing.assert_close(out, explicit(q, k, v, 0.3) * scale[:, None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("p_move", "named"),
    [(1.5, "1.5"), (-0.5, "-0.5"), (float("nan"), "nan"), (torch.tensor([0.25, 1.5]), "tensor([0.2500, 1.5000])")],
)
def test_a_fraction_to_move_outside_zero_one_is_refused(p_move, named):
    source = torch.zeros(2, 1, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"p_move must be in \[0, 1\], got ") as raised:
        Redistribute(source, ~source, p_move)
    assert str(raised.value).endswith(named)


def test_a_fraction_to_move_off_the_cpu_is_not_read_back():
    source = torch.zeros(2, 1, 9, dtype=torch.bool)
    Redistribute(source, ~source, torch.full((4,), 2.0, device="meta"))  # reading a meta tensor would raise


def test_the_reference_moves_every_edit_tensor_to_qs_device():
    """q, k and v on the meta device, every edit tensor on the CPU: a tensor left behind would raise (as one on
    the CPU does beside CUDA tensors), and so would reading a value back to the host."""
    q, k, v = (t.to("meta") for t in qkv())
    g = torch.Generator().manual_seed(3)
    source = torch.rand(2, 4, 9, generator=g) < 0.3
    keys = torch.rand(2, 9, generator=g) < 0.5
    edit = AttentionEdit(
        key_bias=torch.randn(2, 4, 1, 9, generator=g),
        key_gain=KeyGain(keys, 0.7, rows=torch.rand(2, 9, generator=g) < 0.5),
        redistribute=Redistribute(source, ~source, torch.tensor([0.2, 0.5, 0.9, 1.0]), row_gate=source[:, :1],
                                  mass_gate=MassGate(keys, 0.1, 0.9)),
        head_scale=torch.ones(4),
    )  # fmt: skip
    out, lse = kernels.modified_attention(q, k, v, edit, scale=0.3, return_lse=True, backend="reference")
    assert out.device.type == "meta" and out.shape == (2, 9, 4, 8) and lse.shape == (2, 4, 9)
    assert kernels.attention_probabilities(q, k, edit, scale=0.3).shape == (2, 4, 9, 9)
    sums, counts = kernels.column_stats(q, k, scale=0.3, key_bias=edit.key_bias, query_mask=keys)
    assert sums.device.type == counts.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_reference_runs_cuda_tensors_with_an_edit_made_on_the_cpu():
    q, k, v = qkv()
    source = torch.zeros(2, 4, 9, dtype=torch.bool)
    source[..., 0] = True
    edit = AttentionEdit(key_bias=torch.randn(2, 4, 1, 9), redistribute=Redistribute(source, ~source, 0.5),
                         head_scale=torch.full((1, 4), 2.0))  # fmt: skip
    expected = kernels.modified_attention(q, k, v, edit, scale=0.3, backend="reference")
    out = kernels.modified_attention(q.cuda(), k.cuda(), v.cuda(), edit, scale=0.3, backend="reference")
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def sink_logits(q, k, v, scale, keep, sinks, softcap=None):
    """A transcription of gpt-oss's eager attention (with Gemma-2's cap before the mask): the sink logit appended
    to each row, softmax, the sink's column dropped. Returns (out [B, Nq, Hq, D], probabilities, lse)."""
    group = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * scale  # [B, Hq, Nq, Nk]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:3], 1)], dim=-1)
    probabilities = torch.softmax(logits, dim=-1)[..., : k.shape[2]].nan_to_num()  # a row that sees nothing: 0
    out = probabilities @ v.repeat_interleave(group, dim=1)
    return out.transpose(1, 2), probabilities, logits.logsumexp(-1)


def test_learned_sinks_join_each_rows_normaliser_as_gpt_oss_computes_them():
    q, k, v = qkv()
    keep = padded_keep(2, 9, [0, 3])
    sinks = torch.tensor([-1.0, 0.0, 2.0, 5.0])
    out, lse = kernels.modified_attention(q, k, v, attention_mask=keep, scale=0.3, sinks=sinks, return_lse=True)
    expected, probabilities, expected_lse = sink_logits(q, k, v, 0.3, keep, sinks)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-6)
    rows = kernels.attention_probabilities(q, k, attention_mask=keep, scale=0.3, sinks=sinks)
    torch.testing.assert_close(rows, probabilities, atol=1e-6, rtol=1e-6)
    assert (rows.sum(-1) < 1).all()  # the sink keeps some of every row's mass
    # a row that sees no key gives all its mass to the sink: zero output, the sink's logit as LSE
    assert torch.equal(out[1, :3], torch.zeros_like(out[1, :3]))
    torch.testing.assert_close(lse[1, :, :3], sinks[:, None].expand(4, 3))


def test_soft_capping_caps_the_logits_before_the_mask_and_the_edits():
    q, k, v = qkv()
    keep = padded_keep(2, 9, [0, 3])
    out, lse = kernels.modified_attention(q, k, v, attention_mask=keep, scale=0.3, softcap=2.0, return_lse=True)
    expected, _, expected_lse = sink_logits(q, k, v, 0.3, keep, None, softcap=2.0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse[0], expected_lse[0], atol=1e-6, rtol=1e-6)
    # a key bias lands on the capped logits: it may push a logit past the cap
    bias = torch.zeros(1, 1, 1, 9).index_fill_(-1, torch.tensor([2]), 3.0)
    biased = kernels.modified_attention(
        q, k, v, AttentionEdit(key_bias=bias), attention_mask=keep, scale=0.3, softcap=2.0
    )
    logits = torch.tanh(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3 / 2.0) * 2.0 + bias
    probabilities = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num()
    torch.testing.assert_close(
        biased, (probabilities @ v.repeat_interleave(2, dim=1)).transpose(1, 2), atol=1e-6, rtol=1e-6
    )


def test_a_sink_bias_of_log_gamma_scales_the_sinks_probability_and_renormalises():
    q, k, v = qkv()
    sinks = torch.tensor([-1.0, 0.0, 2.0, 5.0])
    gamma = torch.tensor([0.25, 1.0, 2.0, 4.0])
    edit = AttentionEdit(sink_bias=gamma.log())
    out = kernels.modified_attention(q, k, v, edit, scale=0.3, sinks=sinks)
    keep = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
    _, probabilities, _ = sink_logits(q, k, v, 0.3, keep, sinks)
    sink = 1 - probabilities.sum(-1, keepdim=True)  # [B, Hq, Nq, 1]
    scaled = probabilities / (1 - sink + gamma[:, None, None] * sink)  # the sink's mass times gamma, renormalised
    torch.testing.assert_close(out, (scaled @ v.repeat_interleave(2, dim=1)).transpose(1, 2), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="sink_bias scales learned attention sinks, and this attention has none"):
        kernels.modified_attention(q, k, v, edit, scale=0.3)


def test_column_stats_with_learned_sinks_are_the_models_probabilities():
    q, k, _ = qkv(n=7)
    keep = padded_keep(2, 7, [0, 2])
    sinks = torch.tensor([-1.0, 0.0, 2.0, 5.0])
    sums, counts = kernels.column_stats(q, k, attention_mask=keep, scale=0.3, sinks=sinks)
    _, probabilities, _ = sink_logits(q, k, q[:, :2], 0.3, keep, sinks)
    torch.testing.assert_close(sums, probabilities.sum(dim=2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(counts, kernels.column_stats(q, k, attention_mask=keep, scale=0.3)[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sinks": torch.zeros(3)}, r"sinks must be \[Hq\] with Hq=4; got shape \(3,\)"),
        ({"sinks": torch.zeros(4, dtype=torch.int64)}, "sinks must have a floating dtype"),
        ({"softcap": 0.0}, "softcap must be a positive number"),
        ({"softcap": "50"}, "softcap must be a positive number"),
    ],
)
def test_bad_sinks_and_caps_are_refused_naming_them(kwargs, message):
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.modified_attention(q, k, v, scale=0.3, **kwargs)


@pytest.mark.parametrize("n, nk, masked", [(9, 9, False), (9, 9, True), (4, 9, True), (4, 9, False), (1, 9, False)])
def test_the_sdpa_path_of_a_key_bias_equals_the_explicit_softmax(n, nk, masked):
    """A key bias (and a head scale) run through torch's SDPA; the LSE asks for the explicit path, so the two are
    compared call for call: one row of biases on some heads (ZeroTuning's, folded into q @ k), biases that
    differ by head (each query head its own keys), a bias per row (a float mask), a -inf bias (hides a key).
    SDPA sums in another order than the explicit fp32 softmax: over 200 seeds the two differ by up to 2.6e-6
    (also without any bias), so they are compared as the Triton kernels are, to 1e-5."""
    q, k, v = qkv(n=n, nk=nk)
    g = torch.Generator().manual_seed(n)
    mask = padded_keep(2, nk, [0, 3])[:, :, nk - n :] if masked else None
    shared = torch.zeros(2, 4, 1, nk)
    shared[:, [0, 2], 0, torch.tensor([0, 3])] = 1.5  # [B, Hq, 1, Nk]: row b's key b*3, on heads 0 and 2
    biases = {
        "one row on some heads": shared,
        "per head": torch.randn(1, 4, 1, nk, generator=g),
        "per row": torch.randn(2, 1, n, nk, generator=g),
        "hiding a key": torch.zeros(1, 1, 1, nk).index_fill_(-1, torch.tensor([2]), float("-inf")),
    }
    for name, bias in biases.items():
        edit = AttentionEdit(key_bias=bias, head_scale=torch.tensor([1.0, 0.5, 2.0, 1.0]))
        fast = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3)
        explicit, _ = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3, return_lse=True)
        torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n, nk", [(19, 19), (7, 19), (1, 19)])
def test_a_bias_raising_few_keys_is_added_to_a_plain_pass(n, nk, monkeypatch):
    """A bias that raises a few keys (ZeroTuning's initial token) runs on the CPU as a plain SDPA pass with its LSE,
    the raised keys' extra weight added afterwards, never through the one-more-dimension path. Its output and its
    LSE equal the explicit softmax's: per-head amounts (some heads none), a bias shared by the heads, a raised key
    that some rows cannot see, large factors (gamma 1000), peaked scores so the raised key holds most of a row, every
    mask (padded rows that see nothing among them), and values of another size than the keys."""
    monkeypatch.setattr(reference, "_with_column", lambda *args: pytest.fail("a raised key took the column path"))
    for seed in range(4):
        q, k, v = qkv(n=n, nk=nk, seed=seed)
        v = torch.cat([v, v[..., :3] * 2], dim=-1) if seed % 2 else v  # Dv = 11 on odd seeds
        g = torch.Generator().manual_seed(seed)
        per_head = torch.zeros(2, 4, 1, nk)
        per_head[0, :3, 0, 0] = torch.tensor([0.5, 0.0, math.log(1000.0)])  # row 0: its first key
        per_head[1, 1:, 0, 3] = torch.rand(3, generator=g) * 2  # row 1: key 3, its first real one under padding
        per_head[1, 1:, 0, nk - 1] = 0.7  # and the last key, which only the last query sees
        shared = torch.zeros(2, 1, 1, nk)
        shared[:, 0, 0, 0] = math.log(2.0)
        for mask_name, mask in _masks(n, nk).items():
            for bias_name, bias in [("per head", per_head), ("shared", shared)]:
                edit = AttentionEdit(key_bias=bias)
                fast = kernels.modified_attention(q * 1.5, k * 1.5, v, edit, attention_mask=mask, scale=0.3)
                fast_out, fast_lse = reference._sdpa(q * 1.5, k * 1.5, v, bias, mask, 0.3, True, lse=True)
                explicit, lse = kernels.modified_attention(
                    q * 1.5, k * 1.5, v, edit, attention_mask=mask, scale=0.3, return_lse=True
                )
                case = f"{bias_name}, {mask_name} mask, seed {seed}"
                torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5, msg=lambda m, c=case: f"{c}: {m}")
                torch.testing.assert_close(fast_out, explicit, atol=1e-5, rtol=1e-5, msg=lambda m, c=case: f"{c}: {m}")
                torch.testing.assert_close(fast_lse, lse, atol=1e-5, rtol=1e-5, msg=lambda m, c=case: f"{c}: {m}")


def test_what_is_derived_from_a_mask_follows_it_when_it_changes_in_place():
    """The CPU path derives SDPA's float mask once per mask tensor (a model hands every layer the same one); a mask
    changed in place between calls, or a new one in the same memory, is derived again."""
    q, k, v = qkv()
    mask = padded_keep(2, 9, [0, 3])
    bias = torch.zeros(1, 4, 1, 9)
    bias[0, 1, 0, 4] = 1.0
    for pads in ([0, 3], [2, 0], [5, 1]):
        mask.copy_(padded_keep(2, 9, pads))
        for edit in (AttentionEdit(), AttentionEdit(key_bias=bias)):
            fast = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3)
            explicit, _ = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3, return_lse=True)
            torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5, msg=lambda m, p=pads: f"pads {p}: {m}")
    for pads in ([0, 3], [4, 4]):  # a fresh mask each time: freed ones' memory is reused
        mask = padded_keep(2, 9, pads)
        fast = kernels.modified_attention(q, k, v, attention_mask=mask, scale=0.3)
        explicit, _ = kernels.modified_attention(q, k, v, attention_mask=mask, scale=0.3, return_lse=True)
        torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def _masks(n, nk):
    """The masks the fast paths must honour, as rows `nk - n:` of a causal `nk x nk` layout: none (bottom-right
    causal), left padding (row 1 of the batch sees keys 3.. only), a sliding window of 3 keys (late rows see no
    key before a source), and left padding as a float mask (0 / finfo.min, as eager models build it)."""
    pad = padded_keep(2, nk, [0, 3])[:, :, nk - n :]
    window = pad & ~torch.ones(nk, nk, dtype=torch.bool).tril(-3)[nk - n :]
    as_float = torch.zeros(pad.shape).masked_fill(~pad, torch.finfo(torch.float32).min)
    return {"none": None, "padding": pad, "window": window, "float padding": as_float}


@pytest.mark.parametrize("n, nk", [(19, 19), (7, 19), (1, 19)])
def test_the_sdpa_path_of_a_redistribution_equals_its_probabilities(n, nk):
    """A redistribution whose every key is a source or a target (ACT's) runs on the CPU as one SDPA pass with the
    sources hidden, combined with the source keys' columns: it equals the materialised redistributed
    probabilities times v, with a key bias beside it (one hiding a key), row gates, per-head amounts, rows that
    see only sources; peaked scores (q and k scaled by 2) so that sources hold most of some rows. 100 seeds gave
    up to 2.8e-6, SDPA's own rounding."""
    for seed in range(8):
        q, k, v = qkv(n=n, nk=nk, seed=seed)
        g = torch.Generator().manual_seed(seed)
        source = torch.rand(2, 4, nk, generator=g) < 0.3
        source[:, 0] = False  # a head without sources keeps its plain attention
        bias = torch.randn(1, 4, 1, nk, generator=g)
        bias[0, 1, 0, 5] = float("-inf")
        for mask_name, mask in _masks(n, nk).items():
            for p_move, row_gate, key_bias in [
                (0.6, None, None),
                (torch.tensor([0.1, 0.5, 0.9, 1.0]), torch.rand(2, 1, n, generator=g) < 0.7, None),
                (1.0, None, bias),
            ]:
                rd = Redistribute(source=source, target=~source, p_move=p_move, row_gate=row_gate)
                edit = AttentionEdit(key_bias=key_bias, redistribute=rd)
                fast = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3)
                p = kernels.attention_probabilities(q, k, edit, attention_mask=mask, scale=0.3)  # [B, Hq, Nq, Nk]
                expected = (p @ v.repeat_interleave(2, dim=1)).transpose(1, 2)
                torch.testing.assert_close(
                    fast, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=mask_name: f"{name}: {m}"
                )


@pytest.mark.parametrize("n, nk", [(19, 19), (7, 19)])
def test_a_redistribution_reusing_the_statistics_pass_equals_its_probabilities(n, nk, monkeypatch):
    """Column statistics taken with some keys hidden (ACT hides the keys earlier layers found to be sinks) equal the
    plain ones, and give the pass they came from (`rows`, keys hidden on some query heads) to the redistribution that
    follows: a head whose sources are among the hidden keys reuses that pass, whatever else was hidden (the other
    hidden keys stay targets), a head the pass did not hide keys on takes its plain output, and a head with a source
    the pass did not hide takes a pass of its own. Either way it equals the materialised redistributed probabilities
    times v."""
    own_passes = []  # the query heads of each pass the redistribution runs itself
    row_pass = reference._row_pass
    monkeypatch.setattr(reference, "_row_pass", lambda q, *args: own_passes.append(q.shape[1]) or row_pass(q, *args))
    for seed in range(6):
        q, k, v = qkv(n=n, nk=nk, seed=seed)
        g = torch.Generator().manual_seed(seed)
        hidden = torch.rand(2, nk, generator=g) < 0.4  # [B, Nk]
        heads = torch.tensor([1, 2, 3])  # the pass covers these query heads
        for mask_name, mask in _masks(n, nk).items():
            sums, counts, rows = kernels.column_stats_and_rows(
                q, k, v, hidden, heads=heads, attention_mask=mask, scale=0.3
            )
            plain = kernels.column_stats(q[:, heads], k[:, heads // 2], attention_mask=mask, scale=0.3)
            torch.testing.assert_close((sums, counts), plain, atol=1e-5, rtol=1e-5)
            for sources_hidden in (True, False):
                source = hidden[:, None, :] & (torch.rand(2, 4, nk, generator=g) < 0.6)  # [B, Hq, Nk]
                source[:, 0] = False  # a head outside the pass has no source
                if not sources_hidden:
                    source[1, 2, int((~hidden[1]).nonzero()[0])] = True  # one source the pass did not hide
                rd = Redistribute(source=source, target=~source, p_move=torch.tensor([0.0, 0.3, 0.6, 1.0]),
                                  row_gate=torch.rand(2, 1, n, generator=g) < 0.8)  # fmt: skip
                edit = AttentionEdit(redistribute=rd)
                own_passes.clear()
                fast = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3, rows=rows)
                assert own_passes == ([] if sources_hidden else [1])  # only the head with an unhidden source
                p = kernels.attention_probabilities(q, k, edit, attention_mask=mask, scale=0.3)  # [B, Hq, Nq, Nk]
                expected = (p @ v.repeat_interleave(2, dim=1)).transpose(1, 2)
                torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5,
                                           msg=lambda m, name=mask_name: f"{name}: {m}")  # fmt: skip


@pytest.mark.parametrize("n, nk, causal", [(19, 19, True), (7, 19, True), (1, 19, True), (19, 19, False)])
def test_column_stats_from_two_flash_passes_equal_the_summed_probabilities(n, nk, causal):
    """Column statistics run on the CPU as two flash passes (the rows' LSE, then the keys asking the rows): they
    equal the materialised probabilities summed over the chosen rows, and the counts of rows that see each key.
    (At 19 keys, more than one of the flash kernel's blocks: torch 2.6's misread a transposed mask there.)"""
    q, k, _ = qkv(n=n, nk=nk)
    masks = _masks(n, nk) if causal else {"none": None}
    for mask_name, mask in masks.items():
        for rows in (None, torch.tensor([[True] * (n - 1) + [True], [False] + [True] * (n - 1)])):
            sums, counts = kernels.column_stats(q, k, attention_mask=mask, scale=0.3, causal=causal, query_mask=rows)
            p = kernels.attention_probabilities(q, k, attention_mask=mask, scale=0.3, causal=causal)
            chosen = torch.ones(2, n, dtype=torch.bool) if rows is None else rows
            if mask is not None:
                seen = reference.visible_keys(mask, "test")[:, None]  # [B, 1, Nq, Nk]
            else:
                seen = torch.ones(nk, nk, dtype=torch.bool).tril(nk - n if causal else nk)[:n]
            seen = seen & chosen[:, None, :, None]
            torch.testing.assert_close(sums, (p * chosen[:, None, :, None]).sum(dim=2), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, name=mask_name: f"{name}: {m}")  # fmt: skip
            assert torch.equal(counts, seen.sum(dim=2, dtype=torch.float32).expand_as(counts)), mask_name


@pytest.mark.parametrize("kind", ["uniform", "reverse", "random", "shuffle"])
@pytest.mark.parametrize("n, nk", [(19, 19), (1, 19)])
def test_counterfactual_attention_equals_its_definition_on_explicit_probabilities(kind, n, nk):
    """CausalMM's counterfactual maps, on every key or on a key set: keys outside the set (and masked keys) keep their
    probabilities, the set keeps its mass, and within it the map is uniform / proportional to (the largest - each) /
    positive / a permutation of the row's own; the attention output is those probabilities times v."""
    q, k, v = qkv(n=n, nk=nk)
    some = torch.rand(2, nk, generator=torch.Generator().manual_seed(1)) < 0.5  # [B, Nk]
    for mask_name, mask in _masks(n, nk).items():
        seen = reference.visible_keys(mask, "test")[:, None] if mask is not None else None
        if seen is None:
            seen = torch.ones(nk, nk, dtype=torch.bool).tril()[nk - n :][None, None]
        plain = kernels.attention_probabilities(q, k, attention_mask=mask, scale=0.3)  # [B, Hq, Nq, Nk]
        for keys in (None, some):
            edit = AttentionEdit(counterfactual=kernels.Counterfactual(kind, keys=keys, seed=3))
            edited = kernels.attention_probabilities(q, k, edit, attention_mask=mask, scale=0.3)
            member = (seen if keys is None else seen & keys[:, None, None, :]).expand_as(plain)
            where = f"{mask_name}, keys {'all' if keys is None else 'some'}"
            assert torch.equal(edited[~member], plain[~member]), where
            mass = (plain * member).sum(-1)
            torch.testing.assert_close((edited * member).sum(-1), mass, atol=1e-6, rtol=1e-5, msg=where)
            for b, h, i in itertools.product(range(2), range(4), range(n)):
                on = member[b, h, i]
                before, after = plain[b, h, i][on], edited[b, h, i][on]
                if kind == "uniform":
                    torch.testing.assert_close(after, torch.full_like(after, float(mass[b, h, i]) / on.sum()))
                elif kind == "reverse" and before.numel() > 1 and before.max() > before.min():
                    reversed_ = before.max() - before
                    torch.testing.assert_close(after, reversed_ * mass[b, h, i] / reversed_.sum())
                elif kind == "random":
                    assert (after > 0).all(), where
                elif kind == "shuffle":
                    assert torch.equal(after.sort().values, before.sort().values), where
            fast = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3)
            torch.testing.assert_close(fast, (edited @ v.repeat_interleave(2, dim=1)).transpose(1, 2), atol=1e-6,
                                       rtol=1e-5)  # fmt: skip
    with pytest.raises(NotImplementedError, match="'flex' backend does not run counterfactual attention"):
        kernels.modified_attention(q, k, v, edit, scale=0.3, backend="flex")

"""The Triton backend (and the FlexAttention one, run eagerly) against the reference backend (the spec), at
toy sizes in Triton's interpreter on CPU: odd lengths, Nq != Nk (cache, split-KV decode), GQA ratios,
padding, every edit alone and composed, fp32 to 1e-5 and fp16/bf16 by flash-attention's rule (our error
at most twice that of an eager low-precision attention, both against fp32)."""

from dataclasses import replace

import pytest
import torch

from intervene import kernels
from intervene.kernels import AttentionEdit, Counterfactual, KeyGain, MassGate, Redistribute

from conftest import build, left_padded, positions, prompt

pytest.importorskip("triton")

SHAPES = {  # (Nq, Nk, Hq, Hkv, D)
    "prefill": (19, 19, 4, 2, 16),
    "chunk after a cache": (11, 30, 4, 1, 32),
    "decode": (1, 45, 4, 4, 16),  # split-KV: the cache in chunks, then combined
    "decode, grouped heads": (1, 40, 4, 2, 32),
}


def tensors(nq, nk, hq, hkv, d, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, nq, d, generator=g) * 2
    k = torch.randn(batch, hkv, nk, d, generator=g) * 2
    v = torch.randn(batch, hkv, nk, d, generator=g)
    return q, k, v, g


def padded_mask(batch, nq, nk, pads):
    """Bool [B, 1, Nq, Nk]: bottom-right causal, with `pads[b]` left-padded keys."""
    keep = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq).expand(batch, 1, nq, nk).clone()
    for b, pad in enumerate(pads):
        keep[b, :, :, :pad] = False
    return keep


def edits(batch, hq, nq, nk, g):
    def mask(*shape, p=0.4):
        return torch.rand(*shape, generator=g) < p

    source, target = mask(batch, 1, nk, p=0.2), mask(batch, hq, nk, p=0.5)
    return {
        "plain": AttentionEdit(),
        "key bias per row": AttentionEdit(key_bias=torch.randn(batch, hq, nq, nk, generator=g)),
        "key gain on chosen rows": AttentionEdit(key_gain=KeyGain(mask(batch, nk), 0.7, rows=mask(batch, nq))),
        "head scale": AttentionEdit(head_scale=torch.tensor([[0.0, 1.0, 2.5, -1.0]])[:, :hq]),
        "redistribution, gated rows": AttentionEdit(
            redistribute=Redistribute(
                source, target, p_move=torch.tensor([0.2, 0.5, 0.9, 1.0])[:hq], row_gate=mask(batch, 1, nq, p=0.7)
            )
        ),
        "redistribution, mass gate": AttentionEdit(
            redistribute=Redistribute(
                source,
                target[:, :1],
                p_move=0.4,
                mass_gate=MassGate(mask(batch, nk, p=0.6), min_mass=0.2, max_source_share=0.6),
            )
        ),
        "all composed": AttentionEdit(
            key_bias=torch.randn(batch, 1, 1, nk, generator=g),
            key_gain=KeyGain(mask(batch, nk), 0.3),
            redistribute=Redistribute(source, ~source, 0.6),
            head_scale=torch.full((1, hq), 1.5),
        ),
    }


@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("padded", [False, True])
def test_every_edit_matches_the_reference_in_fp32(backend, shape, padded):
    nq, nk, hq, hkv, d = SHAPES[shape]
    q, k, v, g = tensors(nq, nk, hq, hkv, d)
    mask = padded_mask(2, nq, nk, [0, 3]) if padded else None
    for name, edit in edits(2, hq, nq, nk, g).items():
        expected, expected_lse = kernels.modified_attention(
            q, k, v, edit, attention_mask=mask, scale=0.3, return_lse=True, backend="reference"
        )
        out, lse = kernels.modified_attention(
            q, k, v, edit, attention_mask=mask, scale=0.3, return_lse=True, backend=backend
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("padded", [False, True])
def test_counterfactual_maps_match_the_reference_in_fp32(shape, padded):
    # The uniform and reversed maps over every visible key, alone and after a key gain and with a head scale;
    # a decoding row runs as a prompt of one row. Rows that see one key have nothing to reverse.
    nq, nk, hq, hkv, d = SHAPES[shape]
    q, k, v, g = tensors(nq, nk, hq, hkv, d)
    mask = padded_mask(2, nq, nk, [0, 3]) if padded else None
    gain = KeyGain(torch.rand(2, nk, generator=g) < 0.4, 0.7)
    counterfactuals = {
        "uniform": AttentionEdit(counterfactual=Counterfactual("uniform")),
        "reverse": AttentionEdit(counterfactual=Counterfactual("reverse")),
        "reverse after a key gain, head scale": AttentionEdit(
            key_gain=gain, counterfactual=Counterfactual("reverse"), head_scale=torch.tensor([[0.5, 1.0, 2.0, -1.0]])
        ),
    }
    plain = kernels.modified_attention(q, k, v, attention_mask=mask, scale=0.3, backend="triton")
    for name, edit in counterfactuals.items():
        expected, expected_lse = kernels.modified_attention(
            q, k, v, edit, attention_mask=mask, scale=0.3, return_lse=True, backend="reference"
        )
        out, lse = kernels.modified_attention(
            q, k, v, edit, attention_mask=mask, scale=0.3, return_lse=True, backend="triton"
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.allclose(out, plain, atol=1e-3), name


def test_counterfactual_maps_the_kernels_do_not_fuse_are_refused_by_name():
    q, k, v, _ = tensors(7, 7, 4, 2, 16)
    refused = {
        "a 'shuffle' map": AttentionEdit(counterfactual=Counterfactual("shuffle")),
        "a key set": AttentionEdit(counterfactual=Counterfactual("uniform", keys=torch.ones(2, 7, dtype=torch.bool))),
        "a key bias": AttentionEdit(key_bias=torch.zeros(2, 4, 7, 7), counterfactual=Counterfactual("reverse")),
    }
    for reason, edit in refused.items():
        with pytest.raises(NotImplementedError, match=f"'triton' backend does not run counterfactual .* {reason}"):
            kernels.modified_attention(q, k, v, edit, scale=0.3, backend="triton")
    with pytest.raises(NotImplementedError, match="'flex' backend does not run counterfactual attention with any"):
        kernels.modified_attention(q, k, v, refused["a key bias"], scale=0.3, backend="flex")


def test_the_edits_do_something_and_redistribution_keeps_the_lse():
    nq, nk, hq, hkv, d = SHAPES["prefill"]
    q, k, v, g = tensors(nq, nk, hq, hkv, d)
    plain, plain_lse = kernels.modified_attention(q, k, v, scale=0.3, return_lse=True, backend="triton")
    for name, edit in edits(2, hq, nq, nk, g).items():
        out, lse = kernels.modified_attention(q, k, v, edit, scale=0.3, return_lse=True, backend="triton")
        assert (name == "plain") == torch.equal(out, plain), name
        if name.startswith("redistribution"):  # mass moves within a row: its normaliser is unchanged
            torch.testing.assert_close(lse, plain_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_fully_masked_rows_give_zero_and_minus_infinity(backend):
    q, k, v, _ = tensors(5, 5, 2, 2, 16)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, 2] = False  # row 2 of element 1 sees nothing
    out, lse = kernels.modified_attention(q, k, v, attention_mask=mask, scale=0.3, return_lse=True, backend=backend)
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))
    assert torch.isneginf(lse[1, :, 2]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("nq", [13, 1])  # prefill, split-KV decode
def test_a_head_size_below_the_block_reads_nothing_past_it(nq):
    """D = 24 runs in 32-wide tiles. q, k and v are views into buffers whose lanes 24..31 hold NaN, as a
    slice of a fused projection or a larger cache would: a lane read past D would turn the output into NaN."""
    nk, hq, hkv, d = 21, 4, 2, 24
    q, k, v, g = tensors(nq, nk, hq, hkv, d)

    def beside_nan(t):
        buffer = torch.full((*t.shape[:-1], 32), float("nan"))
        buffer[..., :d] = t
        return buffer[..., :d]

    q, k, v = beside_nan(q), beside_nan(k), beside_nan(v)
    for name, edit in edits(2, hq, nq, nk, g).items():
        expected = kernels.modified_attention(q, k, v, edit, scale=0.3, backend="reference")
        out = kernels.modified_attention(q, k, v, edit, scale=0.3, backend="triton")
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    sums, counts = kernels.column_stats(q, k, scale=0.3, backend="triton")
    ref_sums, ref_counts = kernels.column_stats(q, k, scale=0.3, backend="reference")
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(counts, ref_counts.expand_as(counts))


def eager_low_precision(q, k, v, mask, scale):
    """transformers' eager attention: low-precision matmuls, softmax in fp32."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.float().softmax(dim=-1).to(q.dtype) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_flash_attentions_rule(dtype):
    nq, nk, hq, hkv, d = SHAPES["chunk after a cache"]
    q, k, v, _ = tensors(nq, nk, hq, hkv, d)
    mask = padded_mask(2, nq, nk, [0, 4])
    exact = kernels.modified_attention(q, k, v, attention_mask=mask, scale=0.3, backend="reference")
    low = [t.to(dtype) for t in (q, k, v)]
    ours = kernels.modified_attention(*low, attention_mask=mask, scale=0.3, backend="triton")
    eager = eager_low_precision(*low, mask, 0.3)
    assert ours.dtype == dtype
    our_error = (ours.float() - exact).abs().max()
    assert our_error <= 2 * (eager.float() - exact).abs().max() + 1e-6


def test_an_eager_float_mask_is_read_as_visibility_and_a_real_bias_is_refused():
    q, k, v, _ = tensors(7, 7, 2, 1, 16)
    keep = padded_mask(2, 7, 7, [0, 2])
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~keep, torch.finfo(torch.float32).min)
    expected = kernels.modified_attention(q, k, v, attention_mask=keep, scale=0.3, backend="reference")
    out = kernels.modified_attention(q, k, v, attention_mask=additive, scale=0.3, backend="triton")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="pass it as key_bias, or use backend='reference'"):
        kernels.modified_attention(q, k, v, attention_mask=additive + 0.5, scale=0.3, backend="triton")


@pytest.mark.parametrize("shape", ["prefill", "chunk after a cache"])
def test_column_statistics_match_the_reference(shape):
    nq, nk, hq, hkv, d = SHAPES[shape]
    q, k, _, g = tensors(nq, nk, hq, hkv, d)
    rows = torch.rand(2, nq, generator=g) < 0.6
    hidden = torch.randn(2, hq, 1, nk, generator=g).masked_fill(torch.rand(2, hq, 1, nk, generator=g) < 0.3, -torch.inf)
    for kwargs in ({}, {"query_mask": rows}, {"key_bias": torch.randn(2, hq, 1, nk, generator=g)},
                   {"key_bias": hidden},  # keys biased to -inf are not seen, so not counted
                   {"attention_mask": padded_mask(2, nq, nk, [0, 3])}, {"causal": False}):  # fmt: skip
        sums, counts = kernels.column_stats(q, k, scale=0.3, backend="triton", **kwargs)
        ref_sums, ref_counts = kernels.column_stats(q, k, scale=0.3, backend="reference", **kwargs)
        torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(counts, ref_counts.expand_as(counts))
        seen_rows = (rows if "query_mask" in kwargs else torch.ones(2, nq, dtype=torch.bool)).sum(-1)
        if "attention_mask" not in kwargs and kwargs.get("key_bias") is not hidden:  # every selected row sums to one
            torch.testing.assert_close(sums.sum(-1), seen_rows[:, None].float().expand(2, hq), atol=1e-4, rtol=1e-5)
    _, counts = kernels.column_stats(q, k, scale=0.3, causal=False, backend="triton")
    assert torch.equal(counts, torch.full((2, hq, nk), float(nq)))  # every row sees every key


class Launches:
    """A kernel whose launches (`kernel[grid](...)`) are counted."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("padded", [False, True])
def test_a_calibrated_prompt_reads_the_keys_twice(padded, monkeypatch):
    """ACT's prefill on the kernels: the column statistics' pass (every head, the likely sinks hidden on the calibrated
    ones: K and V read once) and the column sums from its LSE (K once more) are all that is launched when the sinks
    are among the hidden keys; the redistribution combines its rows from that pass and the sinks' columns, with no
    statistics pass and no second forward. Statistics and output equal the reference's; a head with a source the
    pass did not hide takes one pass of its own, and the output is still the reference's."""
    from intervene.kernels import fused

    nq, nk, hq, hkv, d = SHAPES["prefill"]
    q, k, v, g = tensors(nq, nk, hq, hkv, d)
    mask = padded_mask(2, nq, nk, [0, 3]) if padded else None
    hidden = torch.zeros(2, nk, dtype=torch.bool)
    hidden[0, 0], hidden[1, 3], hidden[:, 5], hidden[:, -2:] = True, True, True, True  # first real keys, key 5, last 2
    heads = torch.tensor([1, 2, 3])  # the calibrated heads
    launches = {name: Launches(getattr(fused, name)) for name in ("_forward", "_statistics", "_column_sums")}
    for name, counted in launches.items():
        monkeypatch.setattr(fused, name, counted)
    geometry = {"attention_mask": mask, "scale": 0.3}
    sums, counts, rows = kernels.column_stats_and_rows(q, k, v, hidden, heads=heads, backend="triton", **geometry)
    expected_sums, expected_counts, _ = kernels.column_stats_and_rows(
        q, k, v, hidden, heads=heads, backend="reference", **geometry
    )
    torch.testing.assert_close(sums, expected_sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(counts, expected_counts)
    source = torch.zeros(2, hq, nk, dtype=torch.bool)
    source[:, 1:] = hidden[:, None] & (torch.rand(2, 3, nk, generator=g) < 0.7)  # sinks among the hidden keys
    source[:, 1:, 5] = True
    p_move = torch.tensor([0.0, 0.3, 0.6, 1.0])
    for missed in (False, True):
        if missed:
            source[:, 2, 8] = True  # head 2: a source the pass did not hide
        edit = AttentionEdit(redistribute=Redistribute(source, ~source, p_move), head_scale=torch.full((1, hq), 1.5))
        out = kernels.modified_attention(q, k, v, edit, rows=rows, backend="triton", **geometry)
        expected = kernels.modified_attention(q, k, v, edit, backend="reference", **geometry)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        counted = {name: launches[name].count for name in launches}
        assert counted == {"_forward": 2 if missed else 1, "_statistics": 0, "_column_sums": 1}, counted


def test_a_model_gives_the_same_logits_through_either_backend(monkeypatch):
    import intervene

    model = build("llama")
    ids, mask = left_padded([prompt(9, 1), prompt(5, 2)])

    def run():  # the prompt's logits, then 3 greedy steps decoded one row at a time against the cache
        act = intervene.apply(model, "act", beta=0.3, layers="all")
        zerotuning = intervene.apply(model, "zerotuning", gamma=2.0)
        with act, zerotuning, torch.no_grad():
            prompt_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            steps = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        return prompt_logits, torch.stack(steps.logits, dim=1)

    expected = run()
    from intervene.kernels import fused

    monkeypatch.setattr(kernels, "_backend", lambda q, v, backend: fused)
    torch.testing.assert_close(run(), expected, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_errors():
    q, k, v, _ = tensors(4, 4, 2, 2, 16)
    assert kernels._backend(q, v, "auto") is kernels.reference  # CPU tensors: the reference
    with pytest.raises(NotImplementedError, match="flex backend does not compute column statistics"):
        kernels.column_stats(q, k, backend="flex")
    with pytest.raises(
        ValueError, match="unknown attention backend 'cuda'; choose one of: auto, reference, triton, flex"
    ):
        kernels.modified_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="4 query heads cannot be grouped over 3 key/value heads"):
        kernels.modified_attention(torch.zeros(1, 4, 2, 16), torch.zeros(1, 3, 2, 16), torch.zeros(1, 3, 2, 16))


@pytest.mark.parametrize("nq", [5, 1])  # prefill, split-KV decode
def test_value_heads_of_another_size_go_to_the_reference_or_flex_not_triton(nq):
    q, k, _, g = tensors(nq, 9, 4, 2, 16)
    v = torch.randn(2, 2, 9, 32, generator=g)  # as in MLA models: value heads larger than query/key heads
    with pytest.raises(ValueError, match=r"q/k head size 16 and v head size 32 .*backend='reference'"):
        kernels.modified_attention(q, k, v, scale=0.3, backend="triton")
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    logits = logits.masked_fill(~torch.ones(nq, 9, dtype=torch.bool).tril(diagonal=9 - nq), float("-inf"))
    expected = (logits.softmax(-1) @ v.repeat_interleave(2, dim=1)).transpose(1, 2)  # [B, Nq, Hq, 32]
    for backend in ("reference", "flex"):
        out = kernels.modified_attention(q, k, v, scale=0.3, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enough for the backend choice, which runs nothing."""

    @property
    def is_cuda(self):
        return True


def test_auto_on_cuda_runs_value_heads_of_another_size_on_the_reference():
    from intervene.kernels import fused

    q, _, v, _ = tensors(5, 9, 4, 2, 16)
    q = q.as_subclass(OnCuda)
    assert kernels._backend(q, v, "auto") is fused
    assert kernels._backend(q, torch.zeros(2, 2, 9, 32), "auto") is kernels.reference
    assert kernels._backend(q, None, "auto") is fused  # column statistics read no values


WRAP = 3 * 2**29  # entries this many elements apart: a 32-bit offset to the third (2**31 + 2**30) wraps


def far_apart(values: torch.Tensor, dim: int) -> torch.Tensor:
    """`values` (1-byte dtype, 3 entries along `dim`, 1 along the others but the last) with its entries WRAP
    elements apart, in a buffer that holds other values where a wrapped 32-bit offset to the third entry lands
    (2**32 elements before it): a kernel that wraps reads those. 4 GiB of address space, of which only the
    pages written are touched."""
    n = values.shape[-1]
    try:
        buffer = torch.empty(2**32 + n, dtype=values.dtype)
    except RuntimeError:
        pytest.skip("needs 4 GiB of address space")
    strides = [0] * values.dim()
    strides[dim], strides[-1] = WRAP, 1
    spread = buffer.as_strided(values.shape, strides, storage_offset=2**30)  # third entry at 2**32
    spread.copy_(values)
    buffer[:n] = values.select(dim, 2).flatten().view(torch.uint8).flip(0).view(values.dtype)  # reversed
    return spread


@pytest.mark.parametrize(
    ("case", "nq"), [("mask per row", 3), ("bias per head", 3), ("bias per head", 1), ("bias per row", 3)]
)
def test_mask_and_bias_offsets_past_two_to_the_31_do_not_wrap(case, nq):
    """A [B, 1, Nq, Nk] mask passes 2**31 elements at 46k tokens, a per-row bias at Hq * Nq * Nk >= 2**31."""
    q, k, v, g = tensors(nq, 8, 3, 1, 16, batch=1)
    mask, bias = None, None
    if case == "mask per row":
        mask = torch.rand(1, 1, nq, 8, generator=g) < 0.6
        mask[..., 0] = True
    else:  # fp8: one byte an element keeps the buffer at 4 GiB
        shape = (1, 3, 1, 8) if case == "bias per head" else (1, 1, 3, 8)
        bias = (torch.randn(shape, generator=g) * 2).to(torch.float8_e5m2)
    edit = AttentionEdit(key_bias=bias)
    expected = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3, backend="reference")
    dim = 1 if case == "bias per head" else 2
    spread_mask = None if mask is None else far_apart(mask, dim)
    spread = AttentionEdit(key_bias=None if bias is None else far_apart(bias, dim))
    out = kernels.modified_attention(q, k, v, spread, attention_mask=spread_mask, scale=0.3, backend="triton")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if nq > 1:  # the statistics and column sums read the mask and bias as the forward does
        sums, _ = kernels.column_stats(q, k, attention_mask=mask, key_bias=bias, scale=0.3, backend="reference")
        spread_sums, _ = kernels.column_stats(
            q, k, attention_mask=spread_mask, key_bias=spread.key_bias, scale=0.3, backend="triton"
        )
        torch.testing.assert_close(spread_sums, sums, atol=1e-5, rtol=1e-4)


def test_an_interpreter_that_cannot_run_says_what_to_install(monkeypatch):
    import numpy
    import triton

    q, k, v, _ = tensors(4, 4, 2, 2, 16)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match=r"Triton 3.6.0's CPU interpreter cannot run with NumPy 2.4.6 .*'numpy<2.4'"):
        kernels.modified_attention(q, k, v, backend="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    kernels.modified_attention(q, k, v, backend="triton")


GPU_LENGTHS = [4096, 16384, 32768]
ROWS = 256  # rows checked against the fp32 reference (an eager comparator over all rows would not fit at 32k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the same cases at real sizes")
@pytest.mark.parametrize("n", GPU_LENGTHS)
def test_real_sizes_in_bf16_on_the_gpu(n):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, D = 1, 32, 8, 128
    q, k, v = (torch.randn(B, h, n, D, generator=g, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    source = torch.zeros(B, 1, n, dtype=torch.bool, device="cuda")
    source[:, :, :4] = True
    target = torch.zeros_like(source)
    target[:, :, 100:1100] = True
    bias = torch.randn(B, Hq, 1, n, generator=g, device="cuda")
    tail = q[:, :, -ROWS:]  # the last rows, each seeing up to n keys
    for name, edit in {"plain": AttentionEdit(), "key bias": AttentionEdit(key_bias=bias)}.items():
        ours = kernels.modified_attention(q, k, v, edit, backend="triton")[:, -ROWS:]
        exact = kernels.modified_attention(tail.float(), k.float(), v.float(), edit, backend="reference")
        scores = (tail @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * D**-0.5 + bias * (name != "plain")
        keep = torch.ones(ROWS, n, dtype=torch.bool, device="cuda").tril(diagonal=n - ROWS)
        probs = scores.float().masked_fill(~keep, float("-inf")).softmax(-1).to(q.dtype)  # eager, as transformers
        eager = (probs @ v.repeat_interleave(Hq // Hkv, 1)).transpose(1, 2)
        assert (ours.float() - exact).abs().max() <= 2 * (eager.float() - exact).abs().max() + 1e-6, name
    edit = AttentionEdit(redistribute=Redistribute(source, target, 0.4))
    ours = kernels.modified_attention(q, k, v, edit, backend="triton")[:, -ROWS:].float()
    exact = kernels.modified_attention(tail.float(), k.float(), v.float(), edit, backend="reference")
    assert (ours - exact).norm() / exact.norm() < 5e-3  # RMS-relative, as flash-linear-attention checks
    decode = kernels.modified_attention(q[:, :, -1:], k, v, edit, backend="triton").float()  # one pass, no statistics
    torch.testing.assert_close(decode, ours[:, -1:], atol=2e-2, rtol=0)
    prefill = kernels.modified_attention(q, k, v, AttentionEdit(key_bias=bias), backend="triton")
    decode = kernels.modified_attention(q[:, :, -1:], k, v, AttentionEdit(key_bias=bias), backend="triton")
    torch.testing.assert_close(decode, prefill[:, -1:], atol=2e-2, rtol=0)


def gpu_edits(n: int, Hq: int, g, sinks: bool) -> dict:
    """Every edit at real size on the GPU: 4 sink keys, an image span of 1000 keys, biases per key; the fused
    counterfactual maps where the model has no learned sinks."""
    source = torch.zeros(1, 1, n, dtype=torch.bool, device="cuda")
    source[:, :, :4] = True
    image = torch.zeros_like(source)
    image[:, :, 100:1100] = True
    rows = torch.rand(1, 1, n, generator=g, device="cuda") < 0.7
    return {
        "key bias": AttentionEdit(key_bias=torch.randn(1, Hq, 1, n, generator=g, device="cuda")),
        "key gain (PAI)": AttentionEdit(key_gain=KeyGain(image[:, 0], 0.5)),
        "redistribution (ACT)": AttentionEdit(redistribute=Redistribute(source, ~source, 0.6)),
        "redistribution, gated rows": AttentionEdit(redistribute=Redistribute(source, image, 0.4, row_gate=rows)),
        "redistribution, mass gate (VAR)": AttentionEdit(
            redistribute=Redistribute(source, image, 0.5, mass_gate=MassGate(image[:, 0], 0.05, 0.9))
        ),
        "head scale": AttentionEdit(head_scale=torch.linspace(0.5, 2.0, Hq, device="cuda")[None]),
    } | ({} if sinks else {
        "counterfactual uniform (CausalMM)": AttentionEdit(counterfactual=Counterfactual("uniform")),
        "counterfactual reverse (CausalMM)": AttentionEdit(counterfactual=Counterfactual("reverse")),
    })  # fmt: skip


def last_rows(edit: AttentionEdit, rows: int) -> AttentionEdit:
    """`edit` for the last `rows` query rows only: its row gate sliced (the other GPU edits hold no rows)."""
    rd = edit.redistribute
    if rd is None or rd.row_gate is None:
        return edit
    return replace(edit, redistribute=replace(rd, row_gate=rd.row_gate[..., -rows:]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the same cases at real sizes")
@pytest.mark.parametrize("n", GPU_LENGTHS)
@pytest.mark.parametrize("model", ["plain", "padding mask", "learned sinks and soft-capping"])
def test_every_edit_at_real_sizes_in_bf16_on_the_gpu(n, model):
    """Each edit, prefill and decode, in bf16 at real sizes, against the fp32 reference on the last rows (RMS-
    relative 5e-3, as flash-linear-attention checks), with a left-padded mask or a model's own sinks and cap;
    column statistics against the reference's."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, D = 1, 32, 8, 128
    q, k, v = (torch.randn(B, h, n, D, generator=g, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    kwargs = {}
    if model == "padding mask":
        kwargs["attention_mask"] = padded_mask(B, n, n, [37]).cuda()
    if model == "learned sinks and soft-capping":
        kwargs.update(sinks=torch.linspace(-2.0, 4.0, Hq, device="cuda"), softcap=30.0)

    def last(rows: int):  # the model's arguments and the edit for the last `rows` query rows
        mask = kwargs.get("attention_mask")
        return {**kwargs, "attention_mask": mask[:, :, -rows:]} if mask is not None else kwargs

    for name, edit in gpu_edits(n, Hq, g, sinks="sinks" in kwargs).items():
        ours = kernels.modified_attention(q, k, v, edit, backend="triton", **kwargs)[:, -ROWS:].float()
        tail = q[:, :, -ROWS:].float()
        exact = kernels.modified_attention(
            tail, k.float(), v.float(), last_rows(edit, ROWS), backend="reference", **last(ROWS)
        )
        assert (ours - exact).norm() / exact.norm() < 5e-3, (name, model)
        decode = kernels.modified_attention(q[:, :, -1:], k, v, last_rows(edit, 1), backend="triton", **last(1))
        assert (decode.float() - exact[:, -1:]).norm() / exact[:, -1:].norm() < 5e-3, (name, model, "decode")
    sums, counts = kernels.column_stats(q, k, backend="triton", **kwargs)
    ref_sums, ref_counts = kernels.column_stats(q.float(), k.float(), backend="reference", **kwargs)
    assert (sums - ref_sums).norm() / ref_sums.norm() < 5e-3, model
    assert torch.equal(counts, ref_counts.expand_as(counts)), model
    if "sinks" not in kwargs:  # ACT's prefill: the statistics' pass, reused by the redistribution (K read twice)
        edit = gpu_edits(n, Hq, g, sinks=False)["redistribution (ACT)"]
        hidden = edit.redistribute.source[:, 0]  # [B, Nk]: the sinks, as the guess of them
        sums, _, rows = kernels.column_stats_and_rows(q, k, v, hidden, backend="triton", **kwargs)
        assert rows is not None and (sums - ref_sums).norm() / ref_sums.norm() < 5e-3, model
        ours = kernels.modified_attention(q, k, v, edit, rows=rows, backend="triton", **kwargs)[:, -ROWS:].float()
        exact = kernels.modified_attention(
            q[:, :, -ROWS:].float(), k.float(), v.float(), edit, backend="reference", **last(ROWS)
        )
        assert (ours - exact).norm() / exact.norm() < 5e-3, (model, "reusing the statistics' pass")


MODELS = {  # a model's own attention around the edits: learned sinks (gpt-oss), soft-capping (Gemma-2), both
    "learned sinks": {"sinks": torch.tensor([-1.0, 0.5, 2.0, 4.0])},
    "soft-capping": {"softcap": 3.0},
    "both": {"sinks": torch.tensor([3.0, -2.0, 0.0, 1.0]), "softcap": 2.0},
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(  # eager flex is slow under a cap: it checks both at once
    "backend, model", [*(("triton", model) for model in MODELS), ("flex", "both")]
)
def test_learned_sinks_and_soft_capping_match_the_reference_under_every_edit(backend, shape, model):
    nq, nk, hq, hkv, d = SHAPES[shape]
    q, k, v, g = tensors(nq, nk, hq, hkv, d)
    mask = padded_mask(2, nq, nk, [0, 3])
    cases = edits(2, hq, nq, nk, g)
    if "sinks" in MODELS[model]:
        cases["sink bias"] = AttentionEdit(sink_bias=torch.randn(2, hq, generator=g))
        cases["sink bias and redistribution"] = replace(
            cases["redistribution, mass gate"], sink_bias=cases["sink bias"].sink_bias
        )
    for name, edit in cases.items():
        kwargs = dict(attention_mask=mask, scale=0.3, return_lse=True, **MODELS[model])
        expected, expected_lse = kernels.modified_attention(q, k, v, edit, backend="reference", **kwargs)
        out, lse = kernels.modified_attention(q, k, v, edit, backend=backend, **kwargs)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("model", list(MODELS))
def test_column_statistics_with_sinks_and_caps_match_the_reference(model):
    nq, nk, hq, hkv, d = SHAPES["chunk after a cache"]
    q, k, _, g = tensors(nq, nk, hq, hkv, d)
    kwargs = dict(attention_mask=padded_mask(2, nq, nk, [0, 3]), query_mask=torch.rand(2, nq, generator=g) < 0.6)
    sums, counts = kernels.column_stats(q, k, scale=0.3, backend="triton", **kwargs, **MODELS[model])
    ref_sums, ref_counts = kernels.column_stats(q, k, scale=0.3, backend="reference", **kwargs, **MODELS[model])
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(counts, ref_counts.expand_as(counts))


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned rows' own statistics, by design
def test_a_masked_prefill_visits_no_key_tile_its_rows_cannot_see():
    """A mask (padding, a window) bounds the key loop by what it shows, as the causal bound does without one: the
    interpreter's tiles are 32 x 32, so NaN keys and values in a tile that no row of a block can see would turn
    that block's rows into NaN if the kernels visited it (0 * NaN is NaN). The first row block never reaches
    the keys past 32 under a padded causal mask; under a window of 4 keys the third never reaches keys 0-31.
    Column statistics: the key block past 32 never reaches the rows before it (NaN queries there)."""
    q, k, v, g = tensors(96, 96, 4, 2, 16)
    padded = padded_mask(2, 96, 96, [0, 5])
    windowed = padded & ~torch.ones(96, 96, dtype=torch.bool).tril(-4)
    source = torch.rand(2, 1, 96, generator=g) < 0.2
    cases = {
        "plain": AttentionEdit(),
        "key bias": AttentionEdit(key_bias=torch.randn(1, 4, 1, 96, generator=g)),
        "redistribution (statistics pass)": AttentionEdit(redistribute=Redistribute(source, ~source, 0.5)),
    }
    for mask, unseen, rows in ((padded, slice(32, 96), slice(0, 32)), (windowed, slice(0, 32), slice(64, 96))):
        poisoned_k, poisoned_v = k.clone(), v.clone()
        poisoned_k[:, :, unseen], poisoned_v[:, :, unseen] = float("nan"), float("nan")
        for name, edit in cases.items():
            clean = kernels.modified_attention(q, k, v, edit, attention_mask=mask, scale=0.3, backend="triton")
            out = kernels.modified_attention(
                q, poisoned_k, poisoned_v, edit, attention_mask=mask, scale=0.3, backend="triton"
            )
            torch.testing.assert_close(out[:, rows], clean[:, rows], msg=lambda m, name=name: f"{name}: {m}")
    poisoned_q = q.clone()
    poisoned_q[:, :, :32] = float("nan")
    sums, counts = kernels.column_stats(poisoned_q, k, attention_mask=padded, scale=0.3, backend="triton")
    clean_sums, clean_counts = kernels.column_stats(q, k, attention_mask=padded, scale=0.3, backend="triton")
    torch.testing.assert_close(sums[..., 32:], clean_sums[..., 32:])
    torch.testing.assert_close(counts[..., 32:], clean_counts[..., 32:])

"""How an `AttentionEdit` is executed.

Layouts follow transformers: q `[B, Hq, Nq, D]`, k/v `[B, Hkv, Nk, D]` (GQA when Hq > Hkv), output
`[B, Nq, Hq, D]`. `attention_mask` is what transformers' mask functions produce: `None`, a bool
`[B|1, 1, Nq, Nk]` (True = visible) or an additive float mask of that shape. With no mask and
`causal=True`, causality is bottom-right aligned (the last query row sees every key), which is what a
KV-cache decode step needs.

Backends: `reference` (pure PyTorch, the specification; `auto` on CPU), `triton` (`fused.py`, the fused
kernels; `auto` on CUDA) and `flex` (`flex.py`, FlexAttention; opt-in). A combination a backend cannot
run exactly raises rather than changing semantics. `auto` never raises for that reason: value heads of
another size than the query/key heads (MLA models), which the Triton kernels do not run, go to the
reference on CUDA too.

Two properties of a model's own attention, not edits, are arguments of every entry point, as transformers
passes them to attention functions: `softcap` (Gemma-2: logits become `c * tanh(logits / c)` before the mask;
edits then act on the capped logits) and `sinks` (`s_aux` of gpt-oss: a learned logit per head that joins
each row's normaliser and carries no value, so the row's probabilities over real keys sum to less than one).
An edit's `sink_bias` adds to those logits (a `log(gamma)` on the sink scales its probability by gamma before
the row is renormalised); the backends see the sum.

Every entry point checks its inputs once, for all backends (`_checked`): q/k/v shapes, dtypes and device,
the mask's dtype and each edit tensor's shape, so that every backend refuses the same inputs with the
same message. Edit tensors then move to q's device.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import replace

import torch

from . import reference
from .edit import AttentionEdit, Counterfactual, KeyGain, MassGate, Redistribute
from .reference import RowPass

__all__ = [
    "BACKENDS",
    "AttentionEdit",
    "Counterfactual",
    "KeyGain",
    "MassGate",
    "Redistribute",
    "RowPass",
    "attention_probabilities",
    "column_stats",
    "column_stats_and_rows",
    "modified_attention",
]

BACKENDS = ("auto", "reference", "triton", "flex")


def modified_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edit: AttentionEdit | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    return_lse: bool = False,
    backend: str = "auto",
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    rows: reference.RowPass | None = None,
):
    """Attention with `edit` applied: `[B, Nq, Hq, D]` in q's dtype, plus the fp32 row log-sum-exp
    `[B, Hq, Nq]` of the unredistributed logits (the learned sinks' included) when `return_lse`. `sinks` `[Hq]`
    are learned sink logits, `softcap` the cap of the logits (see the module's docstring). `rows`: what
    `column_stats_and_rows` computed on the same q, k, v, which the CPU path reuses where it can."""
    edit, sinks = _checked(q, k, v, edit or AttentionEdit(), attention_mask, sinks, softcap)
    unfused = None if edit.counterfactual is None else _unfused_counterfactual(edit, sinks)
    if unfused is not None and backend == "auto":
        backend = "reference"  # the one backend that runs every counterfactual map
    chosen = _backend(q, v, backend)
    if edit.counterfactual is not None and chosen is not reference:
        unfused = "any map" if backend == "flex" else unfused
        if unfused is not None:
            raise NotImplementedError(
                f"the {backend!r} backend does not run counterfactual attention with {unfused}: use "
                "backend='reference' (or 'auto', which picks it)"
            )
    reused = {"rows": rows} if backend != "flex" else {}  # flex runs no pass of its own to reuse
    return chosen.attention(
        q,
        k,
        v,
        edit,
        attention_mask=attention_mask,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        causal=causal,
        return_lse=return_lse,
        sinks=sinks,
        softcap=softcap,
        **reused,
    )


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    edit: AttentionEdit | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The probabilities `[B, Hq, Nq, Nk]` (fp32) of attention with `edit` applied, materialised by the
    reference backend: N² memory, meant for looking at short prompts (`intervene inspect`), not for runs. With
    learned `sinks` a row sums to one minus its sink's probability."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    edit, sinks = _checked(q, k, None, edit or AttentionEdit(), attention_mask, sinks, softcap)
    return reference.probabilities(
        q, k, edit, attention_mask=attention_mask, scale=scale, causal=causal, sinks=sinks, softcap=softcap
    )


def column_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    query_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    backend: str = "auto",
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability each key receives, summed over the query rows selected by `query_mask` `[B, Nq]`
    (all rows when None), and how many of those rows can see it.

    A row sees a key when the key's final logit is finite: the mask shows it to the row and `key_bias`
    `[B|1, Hq|1, Nq|1, Nk]` does not set it to -inf. Returns `(sums [B, Hq, Nk], counts [B, Hq, Nk])`,
    both fp32; `sums / counts` is the mean attention a key receives from the queries that really see it.
    With learned `sinks` the probabilities are the model's, normalised with the sinks (which are no keys).
    """
    edit, sinks = _checked(q, k, None, AttentionEdit(key_bias=key_bias), attention_mask, sinks, softcap)
    if query_mask is not None:
        _check_edit_tensor("query_mask", query_mask, "B, Nq", _sizes(q, k))
        query_mask = query_mask.to(q.device)
    chosen = _backend(q, None, backend)
    return chosen.column_stats(
        q,
        k,
        attention_mask=attention_mask,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        causal=causal,
        query_mask=query_mask,
        key_bias=edit.key_bias,
        sinks=sinks,
        softcap=softcap,
    )


def column_stats_and_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor,
    *,
    heads: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    query_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, reference.RowPass | None]:
    """`column_stats` of plain attention on the query heads `heads` (`[h]` indices, default all), `[B, h, Nk]` each,
    plus what they were computed from when the backend keeps it: one pass of every head of `q` (torch's flash kernel
    on the CPU, the fused forward on CUDA), with the keys `hidden` `[B, Nk]` hidden on `heads`, which
    `modified_attention(..., rows=)` on the same q, k, v reuses for a redistribution whose sources are among those
    keys (ACT hides the keys likely to be its sinks) and for the other heads, instead of passes of its own. Elsewhere
    (FlexAttention, the reference on CUDA) the third value is None."""
    _checked(q, k, v, AttentionEdit(), attention_mask, None, None)
    _check_edit_tensor("hidden", hidden, "B, Nk", _sizes(q, k))
    if query_mask is not None:
        _check_edit_tensor("query_mask", query_mask, "B, Nq", _sizes(q, k))
        query_mask = query_mask.to(q.device)
    heads = torch.arange(q.shape[1]) if heads is None else heads.cpu()
    if heads.dim() != 1 or not bool(((heads >= 0) & (heads < q.shape[1])).all()):
        raise ValueError(f"heads must be [h] indices of query heads below Hq = {q.shape[1]}, got {heads.tolist()}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "flex":
        kv = (heads // (q.shape[1] // k.shape[1])).to(q.device)
        stats = column_stats(q[:, heads.to(q.device)], k[:, kv], attention_mask=attention_mask, scale=scale,
                             causal=causal, query_mask=query_mask, backend=backend)  # fmt: skip
        return (*stats, None)
    return _backend(q, None, backend).column_stats_and_rows(
        q, k, v, hidden.to(q.device), heads=heads, attention_mask=attention_mask, scale=scale, causal=causal,
        query_mask=query_mask,
    )  # fmt: skip


def _checked(q, k, v, edit: AttentionEdit, attention_mask, sinks, softcap) -> tuple[AttentionEdit, torch.Tensor | None]:
    """`edit` on q's device with `head_scale` as `[B|1, Hq]`, and the sink logits the backends run (`sinks` plus
    the edit's `sink_bias`, fp32 `[B|1, Hq]`, or None), once q, k, v (None for the statistics), the mask, the
    model's sinks and cap and the edit are known to be what every backend runs; else a ValueError or TypeError
    that names the offending shapes or dtypes and the fix."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named.items())
    if any(t.dim() != 4 for t in named.values()):
        raise ValueError(f"q must be [B, Hq, Nq, D] and k, v [B, Hkv, Nk, D] (4-D); got {shapes}")
    if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's batch size and head size ([B, Hkv, Nk, D]); got {shapes}")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have k's batch size, heads and length ([B, Hkv, Nk, Dv]); got {shapes}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} key/value heads: Hq must be a multiple "
            f"of Hkv; got {shapes}"
        )
    if len({t.device for t in named.values()}) > 1:
        devices = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"q, k and v must be on one device; got {devices}: move them with .to(q.device)")
    if len({t.dtype for t in named.values()}) > 1:
        dtypes = ", ".join(f"{name} {t.dtype}" for name, t in named.items())
        raise TypeError(f"q, k and v must have one dtype; got {dtypes}: cast them with .to(q.dtype)")
    if attention_mask is not None and not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
        raise TypeError(
            f"attention_mask must be bool (True = visible) or an additive float mask, got {attention_mask.dtype}: "
            "pass `mask.bool()` for a 0/1 mask"
        )
    if softcap is not None and not (isinstance(softcap, int | float) and softcap > 0):
        raise ValueError(f"softcap must be a positive number (the cap of the logits), got {softcap!r}")
    if edit.head_scale is not None and edit.head_scale.dim() == 1:  # [Hq]: the same for every batch row
        edit = replace(edit, head_scale=edit.head_scale[None])
    if edit.sink_bias is not None and edit.sink_bias.dim() == 1:
        edit = replace(edit, sink_bias=edit.sink_bias[None])
    sizes = _sizes(q, k)
    if sinks is not None:
        _check_edit_tensor("sinks", sinks, "Hq", sizes)
    elif edit.sink_bias is not None:
        raise ValueError(
            "sink_bias scales learned attention sinks, and this attention has none (sinks=None): it applies to "
            "models whose attention takes `s_aux` (gpt-oss)"
        )
    for name, t, layout in _edit_tensors(edit):
        _check_edit_tensor(name, t, layout, sizes)
    p_move = None if edit.redistribute is None else edit.redistribute.p_move
    if isinstance(p_move, torch.Tensor) and (p_move.dim() > 1 or p_move.numel() not in (1, q.shape[1])):
        raise ValueError(
            f"redistribute.p_move must be a scalar or [Hq] with Hq = {q.shape[1]}, got shape {tuple(p_move.shape)}"
        )
    edit = edit.to(q.device)
    if sinks is not None:
        sinks = sinks.to(q.device, torch.float32)[None]  # [1, Hq]
        sinks = sinks if edit.sink_bias is None else sinks + edit.sink_bias.float()
    return edit, sinks


def _sizes(q, k) -> dict[str, int]:
    return {"B": q.shape[0], "Hq": q.shape[1], "Nq": q.shape[2], "Nk": k.shape[2]}


def _edit_tensors(edit: AttentionEdit) -> list[tuple[str, torch.Tensor, str]]:
    """(name, tensor, layout) of each tensor `edit` holds; a layout lists the sizes each dimension may take."""
    gain, rd = edit.key_gain, edit.redistribute
    named = [("key_bias", edit.key_bias, "B|1, Hq|1, Nq|1, Nk"), ("head_scale", edit.head_scale, "B|1, Hq"),
             ("sink_bias", edit.sink_bias, "B|1, Hq|1")]  # fmt: skip
    if gain is not None:
        named += [("key_gain.keys", gain.keys, "B, Nk"), ("key_gain.rows", gain.rows, "B, Nq")]
    if edit.counterfactual is not None and edit.counterfactual.keys is not None:
        named.append(("counterfactual.keys", edit.counterfactual.keys, "B, Nk"))
    if rd is not None:
        named += [("redistribute.source", rd.source, "B, Hq|1, Nk"), ("redistribute.target", rd.target, "B, Hq|1, Nk"),
                  ("redistribute.row_gate", rd.row_gate, "B, Hq|1, Nq")]  # fmt: skip
        if rd.mass_gate is not None:
            named.append(("redistribute.mass_gate.keys", rd.mass_gate.keys, "B, Nk"))
    return [entry for entry in named if entry[1] is not None]


_FLOATING = ("key_bias", "head_scale", "sink_bias", "sinks")  # every other edit tensor is a bool set of keys or rows


def _check_edit_tensor(name: str, t: torch.Tensor, layout: str, sizes: dict[str, int]) -> None:
    """Refuse `t` unless each dimension has a size its `layout` allows and its dtype is the field's."""
    dims = [dim.split("|") for dim in layout.split(", ")]  # e.g. [["B", "1"], ["Nk"]]
    allowed = [{1 if size == "1" else sizes[size] for size in dim} for dim in dims]
    if t.dim() != len(dims) or any(size not in ok for size, ok in zip(t.shape, allowed, strict=True)):
        here = ", ".join(f"{dim[0]}={sizes[dim[0]]}" for dim in dims)
        raise ValueError(f"{name} must be [{layout}] with {here}; got shape {tuple(t.shape)}")
    if name in _FLOATING and not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if name not in _FLOATING and t.dtype != torch.bool:
        raise TypeError(f"{name} must be bool, got {t.dtype}: pass `{name.rsplit('.', 1)[-1]}.bool()`")


def _unfused_counterfactual(edit: AttentionEdit, sinks) -> str | None:
    """Why the Triton backend cannot run `edit`'s counterfactual exactly (None when it can): it fuses the uniform and
    reversed maps over every visible key, alone or after a key gain, a soft cap or a head scale; a key bias could
    hide a visible key, learned sinks hold mass outside the keys, a redistribution needs its probabilities."""
    cf = edit.counterfactual
    reasons = {
        f"a {cf.kind!r} map (random numbers per probability)": cf.kind not in ("uniform", "reverse"),
        "a key set (counterfactual.keys)": cf.keys is not None,
        "a key bias": edit.key_bias is not None,
        "a redistribution": edit.redistribute is not None,
        "learned sinks": sinks is not None,
    }
    return next((reason for reason, present in reasons.items() if present), None)


def _backend(q: torch.Tensor, v: torch.Tensor | None, backend: str):
    """The module running this call: Triton for CUDA tensors (`auto`) it can run, else the reference. `v` is
    None for the statistics, which read no values."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        same_head_size = v is None or v.shape[-1] == q.shape[-1]  # the Triton kernels' limit (MLA has Dv != D)
        backend = "triton" if q.is_cuda and triton_available() and same_head_size else "reference"
    if backend == "reference":
        return reference
    if backend == "flex":
        from . import flex

        return flex
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package: pip install 'intervene[kernels]'")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' runs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before importing intervene "
            "(Triton's interpreter, slow: for tests) or use backend='reference'"
        )
    if not q.is_cuda:
        _check_interpreter()
    from . import fused

    return fused


def _check_interpreter() -> None:
    """Triton's interpreter before 3.7 turns a loop bound into an int with `int(array)`, which NumPy 2.4
    refuses for the 1-element arrays it holds: every kernel would fail with an InterpreterError."""
    import numpy
    import triton
    from packaging.version import Version

    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        raise RuntimeError(
            f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy {numpy.__version__} "
            "(fixed in Triton 3.7): pip install 'numpy<2.4' or 'triton>=3.7'"
        )


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None

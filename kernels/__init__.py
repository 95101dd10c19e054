"""How an `AttentionEdit` is executed.

Layouts follow transformers: q `[B, Hq, Nq, D]`, k/v `[B, Hkv, Nk, D]` (GQA when Hq > Hkv), output
`[B, Nq, Hq, D]`. `attention_mask` is what transformers' mask functions produce: `None`, a bool
`[B|1, 1, Nq, Nk]` (True = visible) or an additive float mask of that shape. With no mask and
`causal=True`, causality is bottom-right aligned (the last query row sees every key), which is what a
KV-cache decode step needs.

Backends: `reference` (pure PyTorch, the specification; `auto` on CPU), `triton` (`fused.py`, the fused
kernels; `auto` on CUDA) and `flex` (`flex.py`, FlexAttention; opt-in). A combination a backend cannot
run exactly raises rather than changing semantics.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import reference
from .edit import AttentionEdit, KeyGain, MassGate, Redistribute

__all__ = [
    "BACKENDS",
    "AttentionEdit",
    "KeyGain",
    "MassGate",
    "Redistribute",
    "attention_probabilities",
    "column_stats",
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
):
    """Attention with `edit` applied: `[B, Nq, Hq, D]` in q's dtype, plus the fp32 row log-sum-exp
    `[B, Hq, Nq]` of the unredistributed logits when `return_lse`."""
    chosen = _backend(q, k, backend)
    return chosen.attention(
        q,
        k,
        v,
        edit or AttentionEdit(),
        attention_mask=attention_mask,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        causal=causal,
        return_lse=return_lse,
    )


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    edit: AttentionEdit | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """The probabilities `[B, Hq, Nq, Nk]` (fp32) of attention with `edit` applied, materialised by the
    reference backend: N² memory, meant for looking at short prompts (`intervene inspect`), not for runs."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _backend(q, k, "reference").probabilities(
        q, k, edit or AttentionEdit(), attention_mask=attention_mask, scale=scale, causal=causal
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability each key receives, summed over the query rows selected by `query_mask` `[B, Nq]`
    (all rows when None), and how many of those rows can see it.

    Returns `(sums [B, Hq, Nk], counts [B, 1|Hq, Nk])`, both fp32; `sums / counts` is the mean
    attention a key receives from the queries that can really see it.
    """
    chosen = _backend(q, k, backend)
    return chosen.column_stats(
        q,
        k,
        attention_mask=attention_mask,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        causal=causal,
        query_mask=query_mask,
        key_bias=key_bias,
    )


def _backend(q: torch.Tensor, k: torch.Tensor, backend: str):
    """The module running this call: Triton for CUDA tensors (`auto`), else the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} key/value heads")
    if backend == "reference" or (backend == "auto" and not (q.is_cuda and triton_available())):
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

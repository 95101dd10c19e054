"""Independent implementations the tests compare against.

They work the way the papers' official code does: on explicit fp32 probability matrices, one batch
element at a time, with the padding cut off first. They share nothing with intervene's kernels.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask


def explicit_probabilities(q, k, scale, mask=None):
    """[H, N, Nk] softmax of one unpadded element (q [H, N, D], k [Hkv, Nk, D]), bottom-right causal."""
    k = k.float().repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = q.float() @ k.transpose(-1, -2) * scale
    n, nk = logits.shape[-2:]
    if mask is None:
        mask = torch.ones(n, nk, dtype=torch.bool).tril(diagonal=nk - n)
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def official_act(A, beta, threshold):
    """GATECH-EIC/ACT `atten_process_eval` transcribed step by step on one element's [H, N, N] probabilities."""
    A = A.clone()
    n = A.shape[-1]
    for h in range(A.shape[0]):
        a = A[h]
        column_mean = a.sum(dim=0) / torch.arange(n, 0, -1, dtype=a.dtype)  # queries that can see key j
        indices = torch.nonzero(column_mean > threshold).flatten()[1:]  # drop the first sink found
        if len(indices) == 0:
            continue
        copied = a.clone()
        copied[1:, indices] = 0
        avail = (1 - beta) * a[:, indices].sum(dim=-1)
        a[:, indices] = a[:, indices] * beta
        ratios = copied / copied.sum(dim=-1, keepdim=True)
        a = a + avail[:, None] * ratios
        a[0, 0] = 1.0
        A[h] = a
    return A


def zerotuning(A, gamma, heads):
    """Multiply the first key's probability by gamma in `heads`, then renormalise each row."""
    A = A.clone()
    A[heads, :, 0] *= gamma
    return A / A.sum(dim=-1, keepdim=True)


def register_oracle(name: str, transform):
    """Register an attention implementation that applies `transform(A [H, N, N], layer)` to each batch
    element's explicit probabilities, after cutting off its left padding. Prefill only (no cache)."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        batch, heads, n, _ = query.shape
        out = torch.zeros(batch, n, heads, value.shape[-1], dtype=query.dtype)
        for b in range(batch):
            valid = torch.ones(n, dtype=torch.bool) if attention_mask is None else attention_mask[b, 0].any(dim=0)
            rows = valid.nonzero().flatten()
            window = None
            if attention_mask is not None:
                window = attention_mask[b, 0][rows][:, rows]  # sliding windows and causality, unpadded
            A = explicit_probabilities(query[b][:, rows], key[b][:, rows], scaling, window)
            A = transform(A, module.layer_idx)
            v = value[b][:, rows].float().repeat_interleave(heads // value.shape[1], dim=0)
            out[b, rows] = (A @ v).transpose(0, 1).to(query.dtype)
        return out, None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name

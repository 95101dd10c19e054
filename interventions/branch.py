"""Second branches: the model run again beside the main pass, on a changed input or with its own attention edits,
no intervention acting, and with a KV cache of its own that follows the main one through `generate` (each decoded
token, beam reorders). Methods that compare the two keep one in their state and advance it once per forward: in
`start` for the language model alone (VHR compares head outputs, PAI's contrast next-token distributions), in
`logits` for the whole VLM (VCD, CausalMM)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import Forward


@dataclass
class TextOnlyBranch:
    """The prompt without its image tokens (each row's text tokens, left-padded), then every token the main pass
    decodes."""

    cache: Any = None  # its KV cache (None until the prompt ran)
    padding_mask: torch.Tensor | None = None  # [B, tokens so far] of the branch, True = real
    hidden: torch.Tensor | None = None  # [B, n, hidden] its output hidden states for the latest forward's tokens

    def advance(self, forward: Forward, method: str, observe: Callable | None = None) -> None:
        """Run this forward's tokens through the branch (on the prompt, its text tokens), handing `observe(layer,
        head outputs [B, n, Hq, D])` each attention layer's outputs. Nothing runs when the main pass's prompt ran
        before the intervention was enabled: there is nothing to follow (`hidden` stays None)."""
        self.hidden = None
        if not forward.prefill and self.cache is None:
            return
        ids = forward.input_ids
        if ids is None or forward.image_mask is None:
            raise ValueError(
                f"{method} needs the VLM to be called with `input_ids` (it rebuilds the prompt without its image)"
            )
        batch, new = ids.shape
        padding, image = forward.padding_mask, forward.image_mask[:, -new:]  # [B, Nq] of this forward
        real = torch.ones_like(ids, dtype=torch.bool) if padding is None else padding[:, -new:]
        if forward.prefill:
            text = real & ~image  # [B, Nq]
            width = int(text.sum(dim=1).max())
            branch_ids = ids.new_zeros(batch, width)
            mask = torch.zeros(batch, width, dtype=torch.bool, device=ids.device)
            for row in range(batch):  # left-pad each row's text tokens
                tokens = ids[row, text[row]]
                branch_ids[row, width - tokens.numel() :] = tokens
                mask[row, width - tokens.numel() :] = True
        elif image.any():
            raise NotImplementedError(f"{method}: image tokens after the first prompt chunk are not supported")
        else:
            branch_ids, mask = ids, torch.cat([self.padding_mask, real], dim=1)
        self.padding_mask = mask
        start = mask.shape[1] - branch_ids.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
        self.hidden, self.cache = forward.run_branch(
            input_ids=branch_ids, attention_mask=mask.long(), position_ids=positions, cache=self.cache, observe=observe
        )

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search reordered the main cache's rows: the branch's follow (`hidden` is the next forward's)."""
        if self.cache is not None:
            self.cache.reorder_cache(rows)
            self.padding_mask = self.padding_mask[rows.to(self.padding_mask.device)]


@dataclass
class ModelBranch:
    """The whole VLM again on each forward's own call, changed (other images, its own attention edits), in step
    with the main pass."""

    cache: Any = None  # its KV cache (None until the prompt ran)
    ran: bool = False  # whether the prompt ran through it

    def advance(
        self, forward: Forward, method: str, images: Callable | None = None, attention: Callable | None = None,
        vision: Callable | None = None,
    ) -> torch.Tensor | None:  # fmt: skip
        """The branch's next-token logits `[B, V]` for this forward, `images(pixel_values)` replacing the prompt's
        images, `vision(map, features)` its image features (`Forward.run_model`) and `attention(call)` editing its
        language model's attention calls; None when the main pass's prompt ran before the intervention was enabled
        (there is nothing to follow)."""
        if forward.run_model is None:
            raise ValueError(f"{method} needs the VLM itself to be called (it runs the whole model again)")
        if forward.prefill:
            self.cache, self.ran = None, True
        elif not self.ran:
            return None
        prompt = {"images": images, "vision": vision} if forward.prefill else {}
        logits, self.cache = forward.run_model(cache=self.cache, attention=attention, **prompt)
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search reordered the main cache's rows: the branch's follow."""
        if self.cache is not None:
            self.cache.reorder_cache(rows)

"""Where edits happen: one attention function registered with transformers, dispatching per layer.

`intervene` is registered once in `AttentionInterface` and, under the same name, in
`AttentionMaskInterface` (without the latter transformers hands custom functions no mask at all).
The mask function builds exactly the mask the model's previous implementation would have had, and
layers that no active intervention edits fall through to that implementation, so neutral parameters
give the unwrapped model's logits bit for bit.

A forward pre-hook on the decoder records what a layer cannot see: how long the cache was before the
call and which tokens are padding.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import kernels
from ..interventions import LayerCall
from .adapters import WRAPPABLE, UnsupportedModelError, attention_layers, text_config

NAME = "intervene"  # no "flash", "sdpa", "flex_attention" or "/": transformers reads those substrings

# id(text config) -> the dispatcher attached to that model. Weak: the decoder's hooks keep a dispatcher
# alive exactly as long as its model, and a collected model leaves no entry behind (nor a reused id).
_ATTACHED: weakref.WeakValueDictionary[int, Dispatcher] = weakref.WeakValueDictionary()


@dataclass
class CallContext:
    past_length: int
    padding_mask: torch.Tensor | None  # [B, past + new] bool


class Dispatcher:
    """The attachment of intervene to one model, shared by all interventions active on it."""

    def __init__(self, model: nn.Module):
        config = text_config(model)
        self.previous = config._attn_implementation
        if self.previous not in WRAPPABLE:
            raise UnsupportedModelError(
                f"this model runs {self.previous!r} attention; intervene wraps models running "
                f"{' or '.join(map(repr, WRAPPABLE))}. Call model.set_attn_implementation('sdpa') first "
                "(or load it with attn_implementation='sdpa')."
            )
        self.layers = frozenset(attention_layers(model))
        self.handles: list = []  # active Intervention handles, in order of application
        self.context: CallContext | None = None
        self._model = weakref.ref(model)
        self._config_id = id(config)
        decoder = model.get_decoder()
        self._signature = inspect.signature(decoder.forward)
        self._hooks = [
            decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            decoder.register_forward_hook(self._after_forward, always_call=True),
        ]
        model.set_attn_implementation(NAME)
        if config._attn_implementation != NAME:
            self._detach(model)
            raise UnsupportedModelError(f"{type(model).__name__} refused the attention implementation {NAME!r}")
        _ATTACHED[self._config_id] = self

    @staticmethod
    def of(model: nn.Module) -> Dispatcher:
        return _ATTACHED.get(id(text_config(model))) or Dispatcher(model)

    def add(self, handle) -> None:
        for other in self.handles:
            clash = (handle.config.primitives & other.config.primitives) - {"key_bias", "head_scale"}
            shared = handle.active_layers & other.active_layers
            if clash and shared:
                raise ValueError(
                    f"cannot apply {handle.config.name!r}: the active {other.config.name!r} also sets "
                    f"{', '.join(sorted(clash))} on layers {sorted(shared)}, and those edits do not compose. "
                    "Remove the other intervention first, or give the two disjoint `layers`."
                )
        self.handles.append(handle)

    def discard(self, handle) -> None:
        self.handles.remove(handle)
        if not self.handles:
            model = self._model()
            if model is not None:
                self._detach(model)

    def _detach(self, model: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        model.set_attn_implementation(self.previous)
        _ATTACHED.pop(self._config_id, None)

    # -- per forward ------------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        given = self._signature.bind_partial(*args, **kwargs).arguments
        cache = given.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = given.get("attention_mask")
        padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.context = CallContext(past_length=int(past), padding_mask=padding)
        if past == 0:  # a new sequence: state kept from the previous one (e.g. ACT's sinks) is stale
            for handle in self.handles:
                handle.state.clear()

    def _after_forward(self, module, args, output):
        self.context = None

    # -- per layer --------------------------------------------------------------------------------

    def edit_for(self, layer: int, query, key, attention_mask, scale, causal):
        call, edit = None, None
        for handle in self.handles:
            if not handle.enabled or layer not in handle.active_layers:
                continue
            if call is None:
                context = self.context or CallContext(key.shape[2] - query.shape[2], None)
                call = LayerCall(layer, query, key, attention_mask, scale, causal, **vars(context))
            step = handle.config.edit(call, handle.state.setdefault(layer, {}))
            if step is not None:
                edit = step if edit is None else edit + step
        return edit

    def fall_through(self, module):
        if self.previous == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sys.modules[type(module).__module__].eager_attention_forward


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for every attention layer of an intervened model."""
    dispatcher = _ATTACHED.get(id(getattr(module, "config", None)))
    layer = getattr(module, "layer_idx", None)
    if dispatcher is None or layer not in dispatcher.layers:  # e.g. a deep copy of an intervened model
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    edit = dispatcher.edit_for(layer, query, key, attention_mask, scale, causal)
    if edit is None:
        return dispatcher.fall_through(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"layer {layer} of {type(module).__name__} uses `{unsupported}`, which intervene's attention "
                "does not implement yet; leave this layer out of `layers`"
            )
    if dropout and module.training:
        raise RuntimeError("intervene edits attention at inference only; call model.eval() first")
    out = kernels.modified_attention(query, key, value, edit, attention_mask=attention_mask, scale=scale, causal=causal)
    return out, None


def _mask(*args, config=None, **kwargs):
    """The mask the model's previous implementation would have built (bool for sdpa, float for eager)."""
    dispatcher = _ATTACHED.get(id(config))
    build = eager_mask if dispatcher is not None and dispatcher.previous == "eager" else sdpa_mask
    return build(*args, config=config, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)

"""Where edits happen: one attention function registered with transformers, dispatching per layer.

`intervene` is registered once in `AttentionInterface` and, under the same name, in
`AttentionMaskInterface` (without the latter transformers hands custom functions no mask at all).
The mask function builds exactly the mask the model's previous implementation would have had, and
layers that no active intervention edits fall through to that implementation, so neutral parameters
give the unwrapped model's logits bit for bit. Every name of transformers we touch is in `compat`.

A forward pre-hook on the decoder records what a layer cannot see: how long the cache was before the
call and which tokens are padding. On a vision-language model only the language model's attention is
switched; a pre-hook on the model itself reads `input_ids` to find the image tokens, pre-hooks on the
decoder layers hand their input hidden states to the methods, and when a method asks for it (VHR) the
prompt is also run without its image, with its own cache, just before the main pass.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..interventions import LayerCall, ModelSpec
from . import compat
from .adapters import image_token_id, text_config, text_config_key
from .compat import UnsupportedModelError

NAME = "intervene"  # no "flash", "sdpa", "flex_attention" or "/": transformers reads those substrings

# id(text config) -> the dispatcher attached to that model. Weak: the decoder's hooks keep a dispatcher
# alive exactly as long as its model, and a collected model leaves no entry behind (nor a reused id).
_ATTACHED: weakref.WeakValueDictionary[int, Dispatcher] = weakref.WeakValueDictionary()


@dataclass
class CallContext:
    past_length: int
    padding_mask: torch.Tensor | None  # [B, past + new] bool
    image_mask: torch.Tensor | None = None  # [B, past + new] bool
    layer_input: tuple[int, torch.Tensor] | None = None  # (layer, its input hidden states)
    pruned_mask: torch.Tensor | None = None  # after pruning: the mask over the kept keys


@dataclass
class NoImageBranch:
    """The prompt without its image tokens, run through the decoder with its own cache (VHR)."""

    cache: compat.DynamicCache
    padding_mask: torch.Tensor  # [B, tokens so far] of the branch
    outputs: dict  # layer -> [B, Hq, D] head outputs of the latest token


def model_spec(model: nn.Module) -> ModelSpec:
    """The geometry of `model`'s editable attention layers (probed once when nothing is attached yet)."""
    return Dispatcher.of(model).spec


class Dispatcher:
    """The attachment of intervene to one model, shared by all interventions active on it.

    Built, the model is only probed (`compat.probe`: which layers, heads and keywords its attention has, and
    whether it can be left exact), so a refusal leaves no trace; `attach` switches its attention and hooks it."""

    def __init__(self, model: nn.Module):
        config = text_config(model)
        self._text_key = text_config_key(model)
        self.image_token = image_token_id(model)
        self.probe = compat.probe(model, NAME, self._text_key)
        self.previous = compat.implementation(config)
        self.spec = ModelSpec(
            num_layers=self.probe.num_layers,
            num_heads=self.probe.num_heads,
            num_kv_heads=self.probe.num_kv_heads,
            name_or_path=compat.name_or_path(model),
            image_token_id=self.image_token,
            model_type=getattr(model.config, "model_type", ""),
            attention_layers=tuple(sorted(self.probe.layers)),
            layer_kinds=self.probe.layer_kinds,
            model_class=type(model).__name__,
            learned_sinks=self.probe.learned_sinks,
        )
        # id(attention module) -> its layer. By module, not by config: models may share one config object.
        self.layers = {id(module): layer for layer, module in self.probe.layers.items()}
        self.handles: list = []  # active Intervention handles, in order of application
        self.context: CallContext | None = None
        self._image_mask: torch.Tensor | None = None  # [B, tokens so far] of the current sequence (VLMs)
        self._input_ids: torch.Tensor | None = None  # handed from the model's pre-hook to the decoder's
        self.branch: NoImageBranch | None = None
        self.in_branch = False
        self._real: torch.Tensor | None = None  # [B, tokens so far] True at real tokens; None: no padding
        self._pixels: torch.Tensor | None = None  # the prompt's pixel values (pruning's padding debias)
        self.kept: torch.Tensor | None = None  # [B, T'] positions that go on past the pruning layer
        self.filler: torch.Tensor | None = None  # [B, T'] kept slots no query may see (see `kept_positions`)
        self.kept_total = 0
        self.recorded: dict[int, torch.Tensor] | None = None  # layer -> probabilities, while recording
        self._model = weakref.ref(model)
        self._config_id = id(config)
        self._decoder = weakref.ref(decoder := model.get_decoder())
        self._signature = inspect.signature(decoder.forward)
        self._hooks: list = []

    @staticmethod
    def of(model: nn.Module) -> Dispatcher:
        return _ATTACHED.get(id(text_config(model))) or Dispatcher(model)

    def __deepcopy__(self, memo):
        raise TypeError(
            "cannot deep-copy a model while an intervention is attached to it (the copy would run without it): "
            "remove the intervention first (handle.remove()), copy the model, then apply it to each copy"
        )

    def attach(self) -> None:
        """Switch the language model to our attention function and hook its forwards. Idempotent."""
        if self._hooks:
            return
        model, decoder = self._model(), self._decoder()
        self._hooks = [
            decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            decoder.register_forward_hook(self._after_forward, always_call=True),
        ]
        if self.image_token is not None:
            self._hooks.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
            if isinstance(tower := getattr(model.base_model, "vision_tower", None), nn.Module):
                self._hooks.append(tower.register_forward_pre_hook(self._before_vision, with_kwargs=True))
            for index, layer in enumerate(decoder.layers):
                self._hooks.append(layer.register_forward_pre_hook(self._layer_input(index), with_kwargs=True))
        compat.set_implementation(model, NAME, self._text_key)
        _ATTACHED[self._config_id] = self

    def add(self, handle) -> None:
        if self.handles and (handle.config.prunes or any(other.config.prunes for other in self.handles)):
            raise ValueError("prune changes the sequence itself and cannot be combined with other interventions yet")
        for other in self.handles:
            clash = (handle.config.primitives & other.config.primitives) - {"key_bias", "head_scale", "sink_bias"}
            shared = handle.active_layers & other.active_layers
            if clash and shared:
                raise ValueError(
                    f"cannot apply {handle.config.name!r}: the active {other.config.name!r} also sets "
                    f"{', '.join(sorted(clash))} on layers {sorted(shared)}, and those edits do not compose. "
                    "Remove the other intervention first, or give the two disjoint `layers`."
                )
        self.attach()
        self.handles.append(handle)

    def discard(self, handle) -> None:
        self.handles.remove(handle)
        if not self.handles and self.recorded is None:
            self.detach()

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if (model := self._model()) is not None:
            compat.set_implementation(model, self.previous, self._text_key)
        _ATTACHED.pop(self._config_id, None)

    # -- per forward ------------------------------------------------------------------------------

    def _before_model(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, torch.Tensor) else None
        if kwargs.get("mm_encoder_outputs") is None:  # else `generate` encoded the images just before
            self._pixels = kwargs.get("pixel_values")

    def _before_vision(self, module, args, kwargs):
        self._pixels = args[0] if args else kwargs.get("pixel_values")

    def _layer_input(self, index: int):
        def before_layer(module, args, kwargs):
            if self.context is None or self.in_branch:
                return None
            pruner = next((h for h in self.handles if h.enabled and h.config.prunes), None)
            changed = None
            if pruner is not None and index >= pruner.config.layer:
                args, kwargs = self._prune(pruner, index, args, kwargs)
                changed = (args, kwargs)
            self.context.layer_input = (index, args[0] if args else kwargs["hidden_states"])
            return changed

        return before_layer

    def _prune(self, handle, index: int, args, kwargs):
        """This layer's inputs restricted to the kept tokens (and, decoding, its mask to their keys)."""
        if self.context.past_length == 0:
            if index == handle.config.layer:  # decide once, from the scores of the layer before
                if self._image_mask is None:
                    raise ValueError("prune needs the VLM called with `input_ids`, to find the image tokens")
                scores = handle.state.get(index - 1, {}).get("scores")
                padding = self._padding(handle)
                self.kept, self.filler = handle.config.kept_positions(self._image_mask, scores, padding)
                self.kept_total = self._image_mask.shape[1]  # the prompt's length before pruning
            kept = self.kept  # [B, T']
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if hidden.shape[1] != kept.shape[1]:
                hidden = _take(hidden, kept, dim=1)
            args = (hidden, *args[1:])
            if kwargs.get("position_embeddings") is not None:
                kwargs["position_embeddings"] = tuple(_take(t, kept, dim=1) for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = _take(kwargs["position_ids"], kept, dim=1)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                mask = _take(_take(mask, kept, dim=2), kept, dim=3)  # [B, 1, T', T']
                filler = self.filler[:, None, None, :]
                if mask.dtype == torch.bool:
                    kwargs["attention_mask"] = mask & ~filler
                else:
                    kwargs["attention_mask"] = mask.masked_fill(filler, torch.finfo(mask.dtype).min)
            elif bool(self.filler.any()):  # no mask was needed before; one is now, to hide the filler
                kwargs["attention_mask"] = self._pruned_mask(0, kept.shape[1], hidden.dtype)
        elif self.kept is not None:
            if self.context.pruned_mask is None:  # one mask serves every later layer of this call
                hidden = args[0] if args else kwargs["hidden_states"]
                held = compat.past_length(compat.find_cache(kwargs), index)  # kept prompt + tokens since
                self.context.pruned_mask = self._pruned_mask(held, hidden.shape[1], hidden.dtype)
            kwargs["attention_mask"] = self.context.pruned_mask
        return args, kwargs

    def _pruned_mask(self, held: int, new: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask of a call after the prompt was pruned: over the kept prompt keys (filler hidden), the
        `held - T'` tokens cached since, and this call's `new` ones (at prefill: nothing held, T' new).
        Built here, since transformers sizes its mask by the first layer's cache (itself pruned when
        `layer=0`)."""
        device = self.kept.device
        since = torch.arange(self.kept_total, self.kept_total + held - self.kept.shape[1] + new, device=device)
        keys = torch.cat([self.kept, since.expand(self.kept.shape[0], -1)], dim=1)  # [B, Nk] positions
        visible = torch.cat([~self.filler, torch.ones_like(keys[:, self.kept.shape[1] :], dtype=torch.bool)], dim=1)
        if self.context.padding_mask is not None:
            visible = visible & self.context.padding_mask.gather(1, keys)
        visible = visible[:, None, None, :]  # [B, 1, 1, Nk]
        rows = torch.arange(new, device=device)[:, None] + keys.shape[1] - new  # bottom-right causal
        visible = visible & (torch.arange(keys.shape[1], device=device)[None, :] <= rows)
        if self.previous == "sdpa":
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )

    def _padding(self, handle):
        """[B, L] padded patches of the prompt's images, when the pruner's debiasing needs them."""
        if handle.config.debias not in ("padding", "both") or self._pixels is None or self._pixels.dim() != 4:
            return None
        from ..interventions.prune import padding_from_pixels

        count = int(self._image_mask[0].sum())
        grid = round(count**0.5)
        if grid * grid != count:
            raise ValueError(f"prune: padding debias needs a square grid of image tokens per image, got {count}")
        return padding_from_pixels(self._pixels, grid, handle.config.pad_threshold)

    def _before_forward(self, module, args, kwargs):
        if self.in_branch:
            return
        # Keywords as given (a deprecated spelling of the cache is renamed only inside the forward), positional
        # arguments by name.
        given = {**kwargs, **self._signature.bind_partial(*args).arguments}
        cache = compat.find_cache(given)
        past = compat.past_length(cache)
        if past == 0:  # a new sequence: state kept from the previous one (e.g. ACT's sinks) is stale
            for handle in self.handles:
                handle.state.clear()
            self._image_mask, self._real, self.branch, self.kept = None, None, None, None
        padding = self._real = compat.real_tokens(given.get("attention_mask"), past, self._real)
        ids, self._input_ids = self._input_ids, None
        if self.image_token is not None:
            self._track_images(ids, past, padding)
        self.context = CallContext(past_length=past, padding_mask=padding, image_mask=self._image_mask)
        if any(h.enabled and h.config.no_image_branch for h in self.handles):
            self._run_no_image_branch(ids, past, padding)
            if past == 0 and cache is not None:
                self._follow_reorders(cache)

    def _after_forward(self, module, args, output):
        if not self.in_branch:
            self.context = None

    def _track_images(self, ids, past: int, padding) -> None:
        """Extend the current sequence's image mask by this call's tokens (generated ones are text)."""
        if ids is None:
            self._image_mask = None  # called with embeddings only: image positions are unknown
            return
        new = ids == self.image_token  # [B, Nq]
        if past == 0:
            self._image_mask = new
        elif self._image_mask is not None and self._image_mask.shape[1] == past:
            self._image_mask = torch.cat([self._image_mask, new], dim=1)
        else:
            self._image_mask = None

    def _run_no_image_branch(self, ids, past: int, padding) -> None:
        """Advance the no-image branch by this call's text tokens, recording its head outputs."""
        if ids is None:
            raise ValueError("vhr needs the VLM to be called with `input_ids` (it rebuilds the prompt without image)")
        batch, new = ids.shape
        real = padding[:, -new:] if padding is not None else torch.ones_like(ids, dtype=torch.bool)
        text = real & (ids != self.image_token)  # [B, Nq]
        if past == 0:
            width = int(text.sum(dim=1).max())
            branch_ids = ids.new_zeros(batch, width)
            branch_mask = torch.zeros(batch, width, dtype=torch.bool, device=ids.device)
            for row in range(batch):  # left-pad each row's text tokens
                tokens = ids[row, text[row]]
                branch_ids[row, width - tokens.numel() :] = tokens
                branch_mask[row, width - tokens.numel() :] = True
            self.branch = NoImageBranch(compat.DynamicCache(), branch_mask, {})
        elif self.branch is None:
            return  # the prompt ran before this intervention was enabled
        elif (ids == self.image_token).any():
            raise NotImplementedError("vhr: image tokens after the first prompt chunk are not supported")
        else:
            branch_ids, branch_mask = ids, torch.cat([self.branch.padding_mask, real], dim=1)
        self.branch.padding_mask = branch_mask
        start = branch_mask.shape[1] - branch_ids.shape[1]
        positions = (branch_mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
        self.in_branch = True
        try:
            self._decoder()(
                input_ids=branch_ids,
                attention_mask=branch_mask.long(),
                position_ids=positions,
                **{self.probe.cache_argument: self.branch.cache},
                use_cache=True,
            )
        finally:
            self.in_branch = False

    def _follow_reorders(self, cache) -> None:
        """Make beam search, which reorders the rows of the main cache between steps, reorder the no-image
        branch's rows alike (the branch is held weakly: the cache may outlive this prompt)."""
        branch, reorder = weakref.ref(self.branch), cache.reorder_cache

        def reorder_both(beam_idx: torch.Tensor) -> None:
            reorder(beam_idx)
            if (followed := branch()) is not None:
                followed.cache.reorder_cache(beam_idx)
                followed.padding_mask = followed.padding_mask[beam_idx.to(followed.padding_mask.device)]

        cache.reorder_cache = reorder_both

    # -- per layer --------------------------------------------------------------------------------

    def active_handles(self, layer: int) -> list:
        return [h for h in self.handles if h.enabled and layer in h.active_layers]

    def layer_call(self, layer: int, query, key, attention_mask, scale, causal, sinks, softcap) -> LayerCall:
        context = self.context or CallContext(key.shape[2] - query.shape[2], None)
        hidden = context.layer_input[1] if context.layer_input and context.layer_input[0] == layer else None
        no_image = self.branch.outputs.get(layer) if self.branch is not None else None
        here = lambda t: None if t is None else t.to(query.device)  # a device map may put layers elsewhere
        return LayerCall(
            layer, query, key, attention_mask, scale, causal,
            past_length=context.past_length, padding_mask=here(context.padding_mask),
            image_mask=here(context.image_mask), layer_input=hidden, no_image=no_image, sinks=sinks, softcap=softcap,
        )  # fmt: skip

    def edit_for(self, handles: list, call: LayerCall):
        edit = None
        for handle in handles:
            step = handle.config.edit(call, handle.state.setdefault(call.layer, {}))
            if step is not None:
                edit = step if edit is None else edit + step
        return edit

    def scale_heads(self, handles: list, call: LayerCall, out: torch.Tensor) -> torch.Tensor:
        """`out` [B, Nq, Hq, D] with the head multipliers of methods that decide after attention (VHR)."""
        for handle in handles:
            scale = handle.config.scale_heads(call, out, handle.state.setdefault(call.layer, {}))
            if scale is not None:
                out = out * scale[..., None].to(out.dtype)
        return out

    def record_no_image(self, layer: int, out: torch.Tensor) -> None:
        """Keep the no-image branch's head outputs `[B, Hq, D]` of its latest token where VHR reads them."""
        if any(layer in h.active_layers for h in self.handles if h.enabled and h.config.no_image_branch):
            self.branch.outputs[layer] = out[:, -1]

    def fall_through(self, module):
        return compat.fall_through(self.previous, module)


@contextlib.contextmanager
def record_attention(model: nn.Module):
    """Within the block, every forward of `model` stores each layer's attention probabilities
    `[B, Hq, Nq, Nk]` (fp32, on the CPU, with the active interventions' edits applied) in the yielded dict,
    keyed by layer; a later forward overwrites them. N² memory per layer: for short prompts."""
    dispatcher = Dispatcher.of(model)
    if dispatcher.kept is not None or any(h.config.prunes for h in dispatcher.handles):
        raise ValueError("attention maps of a pruned sequence are not recorded; remove the prune intervention")
    dispatcher.attach()
    dispatcher.recorded = {}
    try:
        yield dispatcher.recorded
    finally:
        dispatcher.recorded = None
        if not dispatcher.handles:  # attached only to record
            dispatcher.detach()


def _take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` at positions `index` [B, n] along `dim`, per batch element (`t` may broadcast over batch)."""
    t = t.expand(index.shape[0], *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    return t.gather(dim, index.view(shape).expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1 :]))


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for every attention layer of an intervened model."""
    dispatcher = _ATTACHED.get(id(getattr(module, "config", None)))
    layer = dispatcher.layers.get(id(module)) if dispatcher is not None else None
    if dispatcher is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} runs attn_implementation={NAME!r} with no intervention attached: load the model "
            "with 'sdpa' or 'eager' and attach one with intervene.apply(model, ...)"
        )
    if layer is None:  # another model built from the same config object
        fall_through = dispatcher.fall_through(module)
        return fall_through(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    handles = [] if dispatcher.in_branch else dispatcher.active_handles(layer)
    # With no mask, a static cache's empty slots are hidden by SDPA's top-left causal alignment, not by
    # our bottom-right one: edits see the written slots only (the fall-through keeps SDPA's own call).
    filled = dispatcher.context.past_length + query.shape[2] if dispatcher.context else key.shape[2]
    written_key, written_value = (
        (key, value) if attention_mask is not None else (key[:, :, :filled], value[:, :, :filled])
    )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")  # the model's own: learned sinks, a logit cap
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    computed_here = (handles or dispatcher.recorded is not None) and not dispatcher.in_branch
    if computed_here and (unimplemented := compat.unimplemented_keywords(kwargs, dispatcher.probe.allowed)):
        raise NotImplementedError(
            f"layer {layer} of {type(module).__name__} was called with {', '.join(map(repr, unimplemented))}, which "
            "intervene's attention does not implement; it refuses rather than drop them"
        )
    call = None
    if handles:
        call = dispatcher.layer_call(layer, query, written_key, attention_mask, scale, causal, sinks, softcap)
    edit = dispatcher.edit_for(handles, call) if handles else None
    if dispatcher.recorded is not None and not dispatcher.in_branch:
        probabilities = kernels.attention_probabilities(
            query, written_key, edit, attention_mask=attention_mask, scale=scale, causal=causal, sinks=sinks,
            softcap=softcap,
        )  # fmt: skip
        dispatcher.recorded[layer] = probabilities.detach().cpu()  # [B, Hq, Nq, Nk]
    if edit is None:
        out, weights = dispatcher.fall_through(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if dispatcher.in_branch:
            dispatcher.record_no_image(layer, out)
        return dispatcher.scale_heads(handles, call, out), weights
    if dropout and module.training:
        raise RuntimeError("intervene edits attention at inference only; call model.eval() first")
    out = kernels.modified_attention(
        query, written_key, written_value, edit, attention_mask=attention_mask, scale=scale, causal=causal,
        sinks=sinks, softcap=softcap,
    )  # fmt: skip
    # out: [B, Nq, Hq, D] in query's dtype
    return dispatcher.scale_heads(handles, call, out).contiguous(), None  # models `.view()` it


def _mask(*args, config=None, **kwargs):
    """The mask the model's previous implementation would have built (bool for sdpa, float for eager)."""
    dispatcher = _ATTACHED.get(id(config))
    build = compat.mask_function(dispatcher.previous if dispatcher is not None else "sdpa")
    return build(*args, config=config, **kwargs)


compat.register(NAME, _attention, _mask)

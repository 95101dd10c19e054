"""Where edits happen: one attention function registered with transformers, dispatching per layer.

`intervene` is registered once in `AttentionInterface` and, under the same name, in
`AttentionMaskInterface` (without the latter transformers hands custom functions no mask at all).
The mask function builds exactly the mask the model's previous implementation would have had, and
layers that no active intervention edits fall through to that implementation, so neutral parameters
give the unwrapped model's logits bit for bit. Every name of transformers we touch is in `compat`.

Hooks on the language model build one `Forward` per forward (how long the cache was, which tokens are
padding, where the images are) and call the methods' own hooks (`Method`): at its start, on each decoder
layer's input, in each attention call, on its output, and when `generate` reorders the cache. On a
vision-language model only the language model's attention is switched; a pre-hook on the model itself reads
`input_ids` to find the image tokens, and a hook on its output hands the next-token logits to the methods that
replace them. A method may run the language model again on other inputs (`Forward.run_branch`), or the whole
VLM on its call with other images (`Forward.run_model`), with no intervention acting but the branch's own attention
edits, and turn a branch's output into logits (`Forward.to_logits`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .. import kernels
from ..interventions import Forward, LayerCall, ModelSpec, overrides
from . import compat
from .adapters import image_token_id, text_config, text_config_key
from .compat import UnsupportedModelError

NAME = "intervene"  # no "flash", "sdpa", "flex_attention" or "/": transformers reads those substrings

# id(text config) -> the dispatcher attached to that model. Weak: the decoder's hooks keep a dispatcher
# alive exactly as long as its model, and a collected model leaves no entry behind (nor a reused id).
_ATTACHED: weakref.WeakValueDictionary[int, Dispatcher] = weakref.WeakValueDictionary()


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
            image_feature_map=compat.image_feature_source(model) is not None,
        )
        # id(attention module) -> its layer. By module, not by config: models may share one config object.
        self.layers = {id(module): layer for layer, module in self.probe.layers.items()}
        self.handles: list = []  # active Intervention handles, in order of application
        self.forward: Forward | None = None  # the forward in progress
        self._finished: tuple[Forward, torch.Tensor] | None = None  # the last forward, its last output hidden state
        self._logits_checked = False  # whether `Forward.to_logits` was found to be the model's own head
        self._image_mask: torch.Tensor | None = None  # [B, tokens so far] of the current sequence (VLMs)
        self._input_ids: torch.Tensor | None = None  # handed from the model's pre-hook to the decoder's
        self._pixels: torch.Tensor | None = None  # the prompt's pixel values
        self._model_call: tuple | None = None  # (args, kwargs) of the VLM's current call, for `Forward.run_model`
        self._encoding: dict | None = None  # the keywords of the latest call of the VLM's image encoder
        self._real: torch.Tensor | None = None  # [B, tokens so far] True at real tokens; None: no padding
        self.in_branch = False  # running a method's branch: no intervention acts
        self.branch_attention: Callable | None = None  # in a branch, what edits its attention: fn(LayerCall) -> edit
        self._observe: Callable | None = None  # what the branch hands each layer's head outputs to
        self.recorded: dict[int, torch.Tensor] | None = None  # layer -> probabilities, while recording
        self._model = weakref.ref(model)
        self._config_id = id(config)
        self._decoder = weakref.ref(decoder := model.get_decoder())
        self._signature = inspect.signature(decoder.forward)
        self._hooks: list = []
        self._unwatch: Callable[[], None] = lambda: None  # undoes `compat.watch_image_encoding`

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
        self._hooks.append(model.register_forward_hook(self._after_model, with_kwargs=True))
        for index, layer in enumerate(compat.decoder_layers(decoder, self.spec.num_layers)):
            self._hooks.append(layer.register_forward_pre_hook(self._layer_input(index), with_kwargs=True))
        if self.image_token is not None:
            self._hooks.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
            self._unwatch = compat.watch_image_encoding(model, self._encoded)
            if isinstance(tower := getattr(model.base_model, "vision_tower", None), nn.Module):
                self._hooks.append(tower.register_forward_pre_hook(self._before_vision, with_kwargs=True))
        compat.set_implementation(model, NAME, self._text_key)
        _ATTACHED[self._config_id] = self

    def add(self, handle) -> None:
        alone = next((h.config.name for h in (handle, *self.handles) if h.config.changes_sequence), None)
        if self.handles and alone is not None:
            raise ValueError(f"{alone} changes the sequence itself and cannot be combined with other interventions yet")
        for other in self.handles:
            clash = (handle.config.primitives & other.config.primitives) - {"key_bias", "head_scale", "sink_bias"}
            shared = handle.active_layers & other.active_layers
            if clash and shared:
                raise ValueError(
                    f"cannot apply {handle.config.name!r}: the active {other.config.name!r} also sets "
                    f"{', '.join(sorted(clash))} on layers {sorted(shared)}, and those edits do not compose. "
                    "Remove the other intervention first, or give the two disjoint `layers`."
                )
        if overrides(handle.config, "layer_input") and not compat.decoder_layers(self._decoder(), self.spec.num_layers):
            raise UnsupportedModelError(
                f"{handle.config.name} acts on decoder layers' inputs, and {self.spec.label}'s decoder has no list of "
                f"its {self.spec.num_layers} layers to hook"
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
        self._unwatch()
        self._unwatch = lambda: None
        if (model := self._model()) is not None:
            compat.set_implementation(model, self.previous, self._text_key)
        _ATTACHED.pop(self._config_id, None)

    # -- per forward ------------------------------------------------------------------------------

    def _before_model(self, module, args, kwargs):
        if self.in_branch:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, torch.Tensor) else None
        self._model_call = args, kwargs
        if kwargs.get("mm_encoder_outputs") is None:  # else `generate` encoded the images just before
            self._pixels = kwargs.get("pixel_values")

    def _encoded(self, kwargs: dict) -> None:
        if not self.in_branch:
            self._encoding = kwargs

    def _before_vision(self, module, args, kwargs):
        if not self.in_branch:
            self._pixels = args[0] if args else kwargs.get("pixel_values")

    def _before_forward(self, module, args, kwargs):
        if self.in_branch:
            return
        # Keywords as given (a deprecated spelling of the cache is renamed only inside the forward), positional
        # arguments by name.
        given = {**kwargs, **self._signature.bind_partial(*args).arguments}
        cache = compat.find_cache(given)
        past = compat.past_length(cache)
        if past == 0:  # a new sequence: what the methods kept of the previous one is stale
            for handle in self.handles:
                handle.new_sequence()
            self._image_mask, self._real = None, None
        padding = self._real = compat.real_tokens(given.get("attention_mask"), past, self._real)
        ids, self._input_ids = self._input_ids, None
        call, self._model_call = self._model_call, None
        if ids is None and isinstance(given.get("input_ids"), torch.Tensor):
            ids = given["input_ids"]
        if self.image_token is not None:
            self._track_images(ids, past, padding)
        self.forward = Forward(
            past_length=past, padding_mask=padding, image_mask=self._image_mask, input_ids=ids,
            pixel_values=self._pixels, held=lambda layer: compat.past_length(cache, layer), run_branch=self._run_branch,
            to_logits=self._to_logits, run_model=None if call is None else functools.partial(self._run_model, call),
        )  # fmt: skip
        if past == 0 and cache is not None and any(overrides(h.config, "reorder") for h in self.handles):
            reordered = weakref.WeakMethod(self._reordered)  # weak: a cache may outlive the model
            compat.follow_reorders(cache, lambda rows: (follow := reordered()) is not None and follow(rows))
        for handle in self._hooked("start"):
            handle.config.start(self.forward, handle.state)

    def _layer_input(self, index: int):
        def before_layer(module, args, kwargs):
            if self.forward is None or self.in_branch:
                return None
            hooked = self._hooked("layer_input")
            if not hooked:
                return None
            inputs = given = compat.layer_inputs(args, kwargs)
            for handle in hooked:
                inputs = handle.config.layer_input(index, inputs, self.forward, handle.state) or inputs
            return None if inputs is given else compat.with_layer_inputs(args, kwargs, inputs)

        return before_layer

    def _after_forward(self, module, args, output):
        if self.in_branch:
            return None
        forward, self.forward = self.forward, None
        hooked = self._hooked("output") if output is not None and forward is not None else []
        for handle in hooked:
            hidden = handle.config.output(forward, compat.output_hidden(output), handle.state)
            if hidden is not None:
                output = compat.with_output_hidden(output, hidden)
        if forward is not None and output is not None and self._hooked("logits"):
            self._finished = forward, compat.output_hidden(output)[:, -1:]
        return output if hooked else None

    def _after_model(self, module, args, kwargs, output):
        finished, self._finished = self._finished, None
        hooked = self._hooked("logits") if finished is not None and not self.in_branch else []
        logits = compat.output_logits(output, kwargs) if hooked else None
        if logits is None:
            return None
        forward, hidden = finished
        self._check_logits(hidden, logits[:, -1:])
        last = logits[:, -1]  # [B, V]
        for handle in hooked:
            replaced = handle.config.logits(forward, last, handle.state)
            last = last if replaced is None else replaced.to(last.dtype)
        logits[:, -1] = last  # in place: a copy of a prompt's [B, N, V] logits would be large
        return compat.with_output_logits(output, logits, kwargs)

    def _to_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compat.logits_of(self._model(), hidden)

    def _check_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Refuse, once, a model whose logits are not what `Forward.to_logits` makes of its output hidden states:
        a method comparing them with a branch's would compare different things."""
        if self._logits_checked:
            return
        made = self._to_logits(hidden).float()
        if made.shape != logits.shape or not torch.allclose(made, logits.float(), rtol=1e-3, atol=1e-3):
            raise UnsupportedModelError(
                f"{self.spec.label} makes its logits otherwise than its output embeddings applied to its language "
                "model's output: a method that contrasts next-token logits with a second branch cannot run on it"
            )
        self._logits_checked = True

    def _reordered(self, rows: torch.Tensor) -> None:
        for handle in self._hooked("reorder"):
            handle.config.reorder(rows, handle.state)

    def _hooked(self, hook: str) -> list:
        """The enabled handles whose method defines the optional hook `hook`."""
        return [h for h in self.handles if h.enabled and overrides(h.config, hook)]

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

    def _run_branch(self, *, input_ids, attention_mask, position_ids, cache=None, observe=None, attention=None):
        """`Forward.run_branch`: the language model on other inputs, no intervention acting (but `attention(call)`,
        an edit of each attention call, when given); `observe(layer, out)` gets each attention layer's head outputs
        `[B, N, Hq, D]`. Returns `(output hidden states, cache)`."""
        cache = compat.DynamicCache() if cache is None else cache
        self.in_branch, self._observe, self.branch_attention = True, observe, attention
        try:
            outputs = self._decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **{self.probe.cache_argument: cache},
                use_cache=True,
            )
        finally:
            self.in_branch, self._observe, self.branch_attention = False, None, None
        return compat.output_hidden(outputs), cache

    def _run_model(
        self, call: tuple, *, cache=None, images: Callable | None = None, attention: Callable | None = None,
        vision: Callable | None = None,
    ):  # fmt: skip
        """`Forward.run_model`: the VLM's call `call` again, with the branch's `cache` (a new one when the call had a
        cache and this is the branch's first) and, where the call carries images, `images(pixel_values)` in place
        of them and the image features `vision(map, features)` makes, no intervention acting (but
        `attention(call)`, an edit of each attention call of its language model, when given). Returns `(logits
        [B, V] of the last position, cache)`."""
        args, kwargs = call
        kwargs = dict(kwargs)
        hooks = [] if vision is None else self._reweight_image_features(vision)
        self.in_branch, self.branch_attention = True, attention
        try:
            if (images is not None or vision is not None) and kwargs.get("mm_encoder_outputs"):  # encoded by `generate`
                pixels = self._encoding["pixel_values"]
                encoding = {**self._encoding, "pixel_values": pixels if images is None else images(pixels)}
                kwargs["mm_encoder_outputs"] = compat.encode_images_like(
                    self._model(), encoding, kwargs["mm_encoder_outputs"], kwargs["input_ids"]
                )
            elif images is not None and kwargs.get("pixel_values") is not None:
                kwargs["pixel_values"] = images(kwargs["pixel_values"])
            held = next((name for name in compat.CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
            if held is not None:
                cache = kwargs[held] = compat.DynamicCache() if cache is None else cache
            outputs = self._model()(*args, **kwargs)
        finally:
            self.in_branch, self.branch_attention = False, None
            for hook in hooks:
                hook.remove()
        return compat.output_logits(outputs, kwargs)[:, -1], cache

    def _reweight_image_features(self, vision: Callable) -> list:
        """Hooks handing the projector `vision(map, features)` in place of the image features, `map` the
        probabilities of the vision layer that made them."""
        source = compat.image_feature_source(self._model())
        if source is None:
            raise UnsupportedModelError(
                f"{self.spec.label} does not take its image features from one vision layer's output before a "
                "multi_modal_projector (LLaVA-style): its vision attention map cannot reweight them"
            )
        attention, projector = source
        maps = []

        def read(module, args, kwargs, output):
            maps.append(compat.vision_attention(module, args, kwargs, output))  # [B', H, n, n]

        def reweight(module, args):
            return (vision(maps.pop(), args[0]), *args[1:])

        return [attention.register_forward_hook(read, with_kwargs=True), projector.register_forward_pre_hook(reweight)]

    # -- per layer --------------------------------------------------------------------------------

    def active_handles(self, layer: int) -> list:
        return [h for h in self.handles if h.enabled and layer in h.active_layers]

    def layer_call(self, layer: int, query, key, value, attention_mask, scale, causal, sinks, softcap) -> LayerCall:
        forward = self.forward or Forward(key.shape[2] - query.shape[2], None)  # a layer called on its own
        return LayerCall(
            layer, query, key, attention_mask, scale, causal, forward, value=value, sinks=sinks, softcap=softcap
        )

    def edit_for(self, handles: list, call: LayerCall):
        edit = None
        for handle in handles:
            step = handle.config.edit(call, handle.state)
            if step is not None:
                edit = step if edit is None else edit + step
        return edit

    def scale_heads(self, handles: list, call: LayerCall, out: torch.Tensor) -> torch.Tensor:
        """`out` [B, Nq, Hq, D] with the head multipliers of methods that decide after attention."""
        for handle in handles:
            scale = handle.config.scale_heads(call, out, handle.state)
            if scale is not None:
                out = out * scale[..., None].to(out.dtype)
        return out

    def fall_through(self, module):
        return compat.fall_through(self.previous, module)


@contextlib.contextmanager
def record_attention(model: nn.Module):
    """Within the block, every forward of `model` stores each layer's attention probabilities
    `[B, Hq, Nq, Nk]` (fp32, on the CPU, with the active interventions' edits applied) in the yielded dict,
    keyed by layer; a later forward overwrites them. N² memory per layer: for short prompts."""
    dispatcher = Dispatcher.of(model)
    if alone := next((h.config.name for h in dispatcher.handles if h.config.changes_sequence), None):
        raise ValueError(f"attention maps of a sequence that {alone} changes are not recorded; remove {alone} first")
    dispatcher.attach()
    dispatcher.recorded = {}
    try:
        yield dispatcher.recorded
    finally:
        dispatcher.recorded = None
        if not dispatcher.handles:  # attached only to record
            dispatcher.detach()


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
    counterfactual = dispatcher.branch_attention if dispatcher.in_branch else None  # a branch's own attention
    # With no mask, a static cache's empty slots are hidden by SDPA's top-left causal alignment, not by
    # our bottom-right one: edits see the written slots only (the fall-through keeps SDPA's own call).
    filled = dispatcher.forward.past_length + query.shape[2] if dispatcher.forward else key.shape[2]
    written_key, written_value = (
        (key, value) if attention_mask is not None else (key[:, :, :filled], value[:, :, :filled])
    )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")  # the model's own: learned sinks, a logit cap
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    recording = dispatcher.recorded is not None and not dispatcher.in_branch
    computed_here = handles or recording or counterfactual is not None
    if computed_here and (unimplemented := compat.unimplemented_keywords(kwargs, dispatcher.probe.allowed)):
        raise NotImplementedError(
            f"layer {layer} of {type(module).__name__} was called with {', '.join(map(repr, unimplemented))}, which "
            "intervene's attention does not implement; it refuses rather than drop them"
        )
    call = None
    if handles or counterfactual:
        call = dispatcher.layer_call(
            layer, query, written_key, written_value, attention_mask, scale, causal, sinks, softcap
        )
    edit = dispatcher.edit_for(handles, call) if handles else None
    if counterfactual is not None:
        edit = counterfactual(call)
    if recording:
        probabilities = kernels.attention_probabilities(
            query, written_key, edit, attention_mask=attention_mask, scale=scale, causal=causal, sinks=sinks,
            softcap=softcap,
        )  # fmt: skip
        dispatcher.recorded[layer] = probabilities.detach().cpu()  # [B, Hq, Nq, Nk]
    if edit is None:
        out, weights = dispatcher.fall_through(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if dispatcher._observe is not None:
            dispatcher._observe(layer, out)
        return dispatcher.scale_heads(handles, call, out), weights
    if dropout and module.training:
        raise RuntimeError("intervene edits attention at inference only; call model.eval() first")
    out = kernels.modified_attention(
        query, written_key, written_value, edit, attention_mask=attention_mask, scale=scale, causal=causal,
        sinks=sinks, softcap=softcap, rows=call.rows,
    )  # fmt: skip
    # out: [B, Nq, Hq, D] in query's dtype
    return dispatcher.scale_heads(handles, call, out).contiguous(), None  # models `.view()` it


def _mask(*args, config=None, **kwargs):
    """The mask the model's previous implementation would have built (bool for sdpa, float for eager)."""
    dispatcher = _ATTACHED.get(id(config))
    build = compat.mask_function(dispatcher.previous if dispatcher is not None else "sdpa")
    return build(*args, config=config, **kwargs)


compat.register(NAME, _attention, _mask)

"""The seam: every contact with transformers goes through this module.

transformers renames what we touch (5.24 renamed the decoder's `past_key_values` argument to `cache`), so
each fact we rely on is read here, under every spelling a supported release uses, and a release that breaks
one fails here with a clear error instead of giving wrong results elsewhere. Facts come from what a model
declares or does, not from its source: which layers run softmax attention, with how many heads and which
keywords, is observed by running a short prompt through the language model once, at `apply` (`probe`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, Cache, DynamicCache
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils.generic import TransformersKwargs

from ..interventions import LayerInputs

__all__ = [
    "CACHE_ARGUMENTS",
    "WRAPPABLE",
    "Cache",
    "DynamicCache",
    "Probe",
    "UnsupportedModelError",
    "cache_argument",
    "decoder_layers",
    "encode_images_like",
    "fall_through",
    "find_cache",
    "follow_reorders",
    "image_feature_source",
    "implementation",
    "is_image_text_to_text",
    "layer_inputs",
    "logits_of",
    "mask_function",
    "name_or_path",
    "output_cache",
    "output_hidden",
    "output_logits",
    "past_length",
    "probe",
    "real_tokens",
    "register",
    "set_implementation",
    "unimplemented_keywords",
    "vision_attention",
    "watch_image_encoding",
    "with_layer_inputs",
    "with_output_hidden",
    "with_output_logits",
]

# The implementations whose masks and fall-through we reproduce exactly.
WRAPPABLE = ("eager", "sdpa")

# The decoder's cache argument, newest spelling first (`cache` since 5.24, `past_key_values` before).
CACHE_ARGUMENTS = ("cache", "past_key_values")

# Attention keywords the edited path implements as eager does (the mask carries the window): `s_aux`, learned
# attention-sink logits per head (gpt-oss), and `softcap`, logit soft-capping (Gemma-2), are the model's own
# attention, which edits act within.
IMPLEMENTED = frozenset({"dropout", "scaling", "is_causal", "sliding_window", "s_aux", "softcap"})
# Keywords that reach attention functions without being about attention: transformers' own pass-through
# (output flags, what flash kernels need for packed batches, which the mask carries for the others), to which
# `probe` adds the parameters of the model's and the decoder's forward (`use_cache`, `logits_to_keep`, ...).
PASS_THROUGH = frozenset(TransformersKwargs.__annotations__)
# What the keywords some families add mean, for the refusal (none of them is implemented yet).
MEANINGS = {
    "sinks": "learned attention-sink logits",
    "indices": "the keys a sparse indexer selected (DeepSeek-V3.2 sparse attention)",
    "position_bias": "an additive position bias",
}


class UnsupportedModelError(ValueError):
    """The model cannot be intervened on exactly through transformers' AttentionInterface."""


# -- the attention implementation ---------------------------------------------------------------


def implementation(config) -> str | None:
    """The attention implementation a (text) config runs."""
    return config._attn_implementation


def name_or_path(model: nn.Module) -> str:
    """The checkpoint a model was loaded from ("" for one built from a config)."""
    return getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")


def set_implementation(model: nn.Module, name: str, text_key: str | None) -> None:
    """Switch the language model (the sub-config `text_key` of a VLM, else the model) to `name`."""
    model.set_attn_implementation(name if text_key is None else {text_key: name})


def fall_through(previous: str, module: nn.Module) -> Callable:
    """The attention function `module` runs under `previous`: sdpa from the registry, eager the module's own."""
    if previous == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no module-level `eager_attention_forward`, so intervene cannot run its "
            "eager attention for the layers it leaves alone; load the model with attn_implementation='sdpa'"
        )
    return eager


def mask_function(previous: str) -> Callable:
    """The mask builder of `previous` (bool masks for sdpa, additive float masks for eager)."""
    return eager_mask if previous == "eager" else sdpa_mask


def register(name: str, attention: Callable, mask: Callable) -> None:
    """Register `attention` under `name`, and `mask` under the same name: transformers hands an attention
    function it has no mask function for no mask at all."""
    AttentionInterface.register(name, _probed(attention))
    AttentionMaskInterface.register(name, _probed_mask(mask))


def unimplemented_keywords(kwargs: Mapping, allowed: frozenset[str]) -> list[str]:
    """The keywords of an attention call that the edited path would drop: set, and not `allowed` (`Probe.allowed`)."""
    return sorted(k for k, v in kwargs.items() if v is not None and k not in allowed)


def is_image_text_to_text(config) -> bool:
    """Whether transformers loads this (model) config with `AutoModelForImageTextToText`."""
    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


# -- the cache and the masks the decoder is given ---------------------------------------------------------


def cache_argument(forward: Callable) -> str:
    """The name under which `forward` (a decoder's, a decoder layer's, a model's) takes the KV cache."""
    parameters = inspect.signature(forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise UnsupportedModelError(
        f"{getattr(forward, '__qualname__', forward)} takes the KV cache under none of the names intervene knows "
        f"({', '.join(CACHE_ARGUMENTS)}); its parameters are {', '.join(parameters)}. This transformers release "
        "renamed it: upgrade intervene, or install a transformers release it supports (see its README)"
    )


def find_cache(arguments: Mapping) -> Cache | None:
    """The KV cache among a forward's bound arguments, under either name; an error if it came under another."""
    for name in CACHE_ARGUMENTS:
        if (cache := arguments.get(name)) is not None:
            return cache
    for name, value in arguments.items():
        if isinstance(value, Cache):  # read as "no cache", every decoding step would look like a new prompt
            raise UnsupportedModelError(
                f"the KV cache came as `{name}`, a name intervene does not read ({', '.join(CACHE_ARGUMENTS)}): "
                "this transformers release renamed it. Upgrade intervene, or install a release it supports"
            )
    return None


def output_cache(outputs) -> Cache | None:
    """The cache a model's forward returned, under either name."""
    for name in CACHE_ARGUMENTS:
        if (cache := getattr(outputs, name, None)) is not None:
            return cache
    return None


def past_length(cache: Cache | None, layer: int | None = None) -> int:
    """Tokens held by `cache` before this call (by one layer's cache, if `layer`: fewer where a method removed
    tokens)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))


def decoder_layers(decoder: nn.Module, count: int) -> list[nn.Module]:
    """The decoder's `count` layers in order: its module list of that length (`layers` in most families, `h` in
    GPT-2's); empty when it has none."""
    lists = [child for child in decoder.children() if isinstance(child, nn.ModuleList) and len(child) == count]
    return list(lists[0]) if len(lists) == 1 else []


def follow_reorders(cache: Cache, follow: Callable[[torch.Tensor], None]) -> None:
    """Make `follow(rows)` run each time `generate` reorders the rows of `cache` (beam search)."""
    reorder = cache.reorder_cache

    def reorder_and_follow(beam_idx: torch.Tensor) -> None:
        reorder(beam_idx)
        follow(beam_idx)

    cache.reorder_cache = reorder_and_follow


def layer_inputs(args: tuple, kwargs: dict) -> LayerInputs:
    """What a decoder layer was called with, by meaning."""
    return LayerInputs(
        hidden_states=args[0] if args else kwargs["hidden_states"],
        attention_mask=kwargs.get("attention_mask"),
        position_ids=kwargs.get("position_ids"),
        position_embeddings=kwargs.get("position_embeddings"),
    )


def with_layer_inputs(args: tuple, kwargs: dict, inputs: LayerInputs) -> tuple[tuple, dict]:
    """A decoder layer's call arguments carrying `inputs` (each where the model had put it)."""
    if args:
        args = (inputs.hidden_states, *args[1:])
    else:
        kwargs = {**kwargs, "hidden_states": inputs.hidden_states}
    for name in ("attention_mask", "position_ids", "position_embeddings"):
        if (value := getattr(inputs, name)) is not None or name in kwargs:
            kwargs = {**kwargs, name: value}
    return args, kwargs


def output_hidden(outputs) -> torch.Tensor:
    """The language model's output hidden states `[B, N, hidden]` (after its final norm)."""
    return outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state


def with_output_hidden(outputs, hidden: torch.Tensor):
    if isinstance(outputs, tuple):
        return (hidden, *outputs[1:])
    outputs.last_hidden_state = hidden
    return outputs


def output_logits(outputs, kwargs: Mapping) -> torch.Tensor | None:
    """The logits `[B, N, V]` a causal LM or VLM returned (None for an output without them)."""
    if isinstance(outputs, tuple):  # return_dict=False: the loss comes first when labels were given
        return outputs[1 if kwargs.get("labels") is not None else 0]
    return getattr(outputs, "logits", None)


def with_output_logits(outputs, logits: torch.Tensor, kwargs: Mapping):
    if isinstance(outputs, tuple):
        at = 1 if kwargs.get("labels") is not None else 0
        return (*outputs[:at], logits, *outputs[at + 1 :])
    outputs.logits = logits
    return outputs


def logits_of(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits `[B, n, V]` `model` makes of its language model's output hidden states `[B, n, hidden]`: its output
    embeddings, then the soft cap of the final logits where the config has one (Gemma-2 and 3)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def watch_image_encoding(model: nn.Module, record: Callable[[dict], None]) -> Callable[[], None]:
    """Hand `record` the keywords of each call of the VLM's image encoder (`get_image_features`): since 5.24,
    `generate` encodes the images before the first forward and drops the encoder's keywords (the pixels, image sizes,
    patch grids) from the model's, so a branch that encodes other images needs them from here. Returns the undo."""
    base = model.base_model
    encode = getattr(base, "get_image_features", None)
    if encode is None:
        return lambda: None

    @functools.wraps(encode)  # `generate` picks the encoder's keywords from its signature
    def watched(*args, **kwargs):
        record(kwargs)
        return encode(*args, **kwargs)

    base.get_image_features = watched  # an instance attribute, over the class's method
    return lambda: base.__dict__.pop("get_image_features", None)


def encode_images_like(model: nn.Module, encoding: dict, encoded: dict, input_ids: torch.Tensor) -> dict:
    """The VLM's image encoder run on the keywords `encoding`, as `generate` (5.24+) hands encoded images to the model:
    `{"image": output}`, repeated for beam search's rows as it repeated `encoded`, the call's own."""
    output = model.base_model.get_image_features(**encoding)
    repeat = len(encoded["image"].pooler_output) // len(output.pooler_output)
    if repeat == 1:
        return {"image": output}
    return model._expand_multimodal_outputs(input_ids[::repeat], {"image": output}, expand_size=repeat)


def image_feature_source(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """For a LLaVA-style VLM (a CLIP/SigLIP tower whose hidden states at `config.vision_feature_layer` go to a
    `multi_modal_projector`): the attention module of the vision layer that outputs those hidden states, and the
    projector. None for other VLMs."""
    base = model.base_model
    tower, projector = getattr(base, "vision_tower", None), getattr(base, "multi_modal_projector", None)
    chosen = getattr(model.config, "vision_feature_layer", None)
    if not isinstance(tower, nn.Module) or not isinstance(projector, nn.Module) or type(chosen) is not int:
        return None
    layers = getattr(getattr(getattr(tower, "vision_model", tower), "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return None
    index = chosen - 1 if chosen > 0 else len(layers) + chosen  # hidden_states[0] is the embeddings, [i] layer i - 1's
    if not 0 <= index < len(layers):
        return None
    attention = getattr(layers[index], "self_attn", None)
    parts = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")
    return (attention, projector) if all(hasattr(attention, part) for part in parts) else None


def vision_attention(module: nn.Module, args: tuple, kwargs: dict, output) -> torch.Tensor:
    """The probabilities `[B, H, N, N]` (fp32) of a call of a CLIP/SigLIP attention `module` (from a forward hook:
    its inputs and `output`), made from its projections and checked against what it returned."""
    hidden = args[0] if args else kwargs["hidden_states"]  # [B, N, D]
    B, N, _ = hidden.shape

    def heads(projection: nn.Module) -> torch.Tensor:
        return projection(hidden).view(B, N, -1, module.head_dim).transpose(1, 2).float()  # [B, H, N, d]

    q, k, v = heads(module.q_proj), heads(module.k_proj), heads(module.v_proj)
    probabilities = torch.softmax(q @ k.transpose(-1, -2) * module.scale, dim=-1)  # [B, H, N, N]
    made = module.out_proj((probabilities @ v).transpose(1, 2).reshape(B, N, -1).to(hidden.dtype))  # [B, N, D]
    returned = output[0] if isinstance(output, tuple) else output
    tolerance = 1e-4 if hidden.dtype == torch.float32 else 2e-2
    if not torch.allclose(made.float(), returned.float(), rtol=tolerance, atol=tolerance):
        raise UnsupportedModelError(
            f"{type(module).__name__} computes its attention otherwise than a softmax of its own q_proj and k_proj "
            "(a mask, a rotary embedding): its attention map cannot be read from its projections"
        )
    return probabilities


def real_tokens(mask, past: int, earlier: torch.Tensor | None) -> torch.Tensor | None:
    """[B, past + Nq] bool, True at real tokens, from the mask the decoder was given; None: no padding.

    `generate` with a static cache hands the decoder 4-D masks (a dict of them per layer type, for
    sliding-window models), which say which of this call's tokens are real through their diagonal: a real
    token sees itself and a pad sees nothing. Earlier tokens' flags are `earlier`, the previous calls'."""
    if isinstance(mask, Mapping):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask.bool()
    new = mask.shape[-2]
    if mask.dim() != 4 or mask.shape[-1] < past + new:
        return None  # keys not indexed by position (a sliding-window cache): nothing to read
    rows = torch.arange(new, device=mask.device)
    diagonal = mask[:, 0, rows, past + rows]  # [B, Nq]
    real = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min
    if earlier is None or earlier.shape[1] != past:  # no padding so far, or a cache we did not see fill
        earlier = real.new_ones(real.shape[0], past)
    return torch.cat([earlier, real], dim=1)


# -- what a model's attention layers are: observed once, at `apply` -------------------------------------------


# Layer kinds (`config.layer_types`) of softmax attention: a layer declared as one of them must run attention.
SOFTMAX_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


@dataclass(frozen=True)
class Probe:
    """The language model's softmax-attention layers as one forward showed them."""

    layers: dict[int, nn.Module]  # softmax-attention layer index -> its attention module
    num_heads: int  # query heads
    num_kv_heads: int
    cache_argument: str  # the decoder's name for its KV cache
    allowed: frozenset[str]  # keywords we implement, or the callers' own that reach attention (`PASS_THROUGH`)
    num_layers: int  # decoder layers of every kind
    layer_kinds: tuple[str, ...]  # a hybrid's declared kind of every layer (config.layer_types); () otherwise
    learned_sinks: bool  # its attention takes learned sink logits (`s_aux`)


# Set while a probe runs: (the model's own implementation, the calls seen so far as (module, query heads,
# key heads, keywords set)).
_SEEN: contextvars.ContextVar[tuple[str, list] | None] = contextvars.ContextVar("intervene_probe", default=None)


def _probed(attention: Callable) -> Callable:
    """`attention`, except while a probe runs: then record the call and run the model's own implementation."""

    def attention_or_probe(module, query, key, value, attention_mask, **kwargs):
        seen = _SEEN.get()
        if seen is None:
            return attention(module, query, key, value, attention_mask, **kwargs)
        previous, calls = seen
        calls.append((module, query.shape[1], key.shape[1], {k for k, v in kwargs.items() if v is not None}))
        return fall_through(previous, module)(module, query, key, value, attention_mask, **kwargs)

    return attention_or_probe


def _probed_mask(mask: Callable) -> Callable:
    """`mask`, except while a probe runs: then the mask of the model's own implementation."""

    def mask_or_probe(*args, **kwargs):
        seen = _SEEN.get()
        return mask(*args, **kwargs) if seen is None else mask_function(seen[0])(*args, **kwargs)

    return mask_or_probe


def probe(model: nn.Module, name: str, text_key: str | None) -> Probe:
    """Run a short prompt through `model`'s language model under its own implementation and under `name`
    (whose function falls through to that implementation while probing), and read off its attention layers.

    A hybrid's layers of other kinds (linear attention, state-space, convolution) are accepted where its config
    declares them as such, and left alone. Refuses, with the reason, a model with another layer that runs no
    softmax attention through AttentionInterface (falcon, xLSTM), whose attention takes a keyword the edited
    path does not implement (a sparse indexer's keys), or whose output changes
    with the implementation's name alone, so that the layers intervene leaves alone would not be exact."""
    label = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{label} is an encoder-decoder model; intervene edits the causal self-attention of decoder-only language "
            "models (and of vision-language models' language models), not encoder or cross-attention"
        )
    text = config.get_text_config()
    previous = implementation(text)
    if previous not in WRAPPABLE:
        raise UnsupportedModelError(
            f"this model runs {previous!r} attention; intervene wraps models running "
            f"{' or '.join(map(repr, WRAPPABLE))}. Call model.set_attn_implementation('sdpa') first "
            "(or load it with attn_implementation='sdpa')."
        )
    decoder = model.get_decoder()
    embeddings = decoder.get_input_embeddings()
    avoid = {getattr(config, "image_token_id", None), getattr(config, "image_token_index", None)}
    ids = [t for t in range(1, 8) if t not in avoid][:5]
    ids = torch.tensor([ids], device=embeddings.weight.device) % embeddings.num_embeddings
    calls: list = []
    with _eval_mode(model), torch.no_grad():
        try:
            expected = decoder(input_ids=ids, use_cache=False)[0]
        except Exception as error:  # any model's own failure: say where it happened, keep the cause chained
            raise UnsupportedModelError(
                f"{label}: its language model failed on intervene's probe, a {ids.shape[1]}-token prompt run to find "
                f"its attention layers: {type(error).__name__}: {error}"
            ) from error
        set_implementation(model, name, text_key)
        try:
            if implementation(text) != name:
                raise UnsupportedModelError(
                    f"{label} does not compute attention through transformers' AttentionInterface (it refused the "
                    f"implementation {name!r}), so intervene cannot reach it. Supported: models whose attention "
                    "layers call it (Llama, Mistral, Qwen2/3, Gemma, GPT-2, Phi-3, SmolLM2, ...)"
                )
            token = _SEEN.set((previous, calls))
            try:
                got = decoder(input_ids=ids, use_cache=False)[0]
            finally:
                _SEEN.reset(token)
        finally:
            set_implementation(model, previous, text_key)
    callers = (inspect.signature(f).parameters for f in (model.forward, decoder.forward))
    allowed = IMPLEMENTED | PASS_THROUGH.union(*callers)
    layers, layer_kinds = _layers(label, text, calls, allowed)
    if not torch.equal(expected, got):
        raise UnsupportedModelError(
            f"{label} computes differently when its attention implementation is named {name!r} instead of "
            f"{previous!r}, even where intervene runs {previous!r} itself (largest difference "
            f"{(expected.float() - got.float()).abs().max().item():.3g}), so intervene cannot leave it exact"
        )
    heads = {(q, k) for _, q, k, _ in calls}
    if len(heads) != 1:
        raise UnsupportedModelError(
            f"{label}: its attention layers have different (query, key) head counts {sorted(heads)}; intervene's "
            "per-head parameters assume one count for every layer"
        )
    num_heads, num_kv_heads = heads.pop()
    cache = cache_argument(decoder.forward)
    learned_sinks = any("s_aux" in keywords for *_, keywords in calls)
    return Probe(layers, num_heads, num_kv_heads, cache, allowed, text.num_hidden_layers, layer_kinds, learned_sinks)


def _layers(label: str, text, calls: list, allowed: frozenset[str]) -> tuple[dict[int, nn.Module], tuple[str, ...]]:
    """The attention module of each softmax-attention layer and, for a hybrid (whose other layers are linear
    attention, state-space or convolution layers), the declared kind of every layer; or the reason some layer
    cannot be accounted for."""
    if not calls:
        raise UnsupportedModelError(
            f"{label} ran no attention through transformers' AttentionInterface (a model without attention heads, "
            "or one whose attention does not dispatch through it), so intervene has nothing to edit"
        )
    unimplemented = {}
    layers: dict[int, nn.Module] = {}
    for module, _, _, keywords in calls:
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int) or layers.get(index, module) is not module:
            raise UnsupportedModelError(
                f"{label}: {type(module).__name__} is called for more than one layer (or has no `layer_idx`), "
                "so its layers cannot be told apart"
            )
        layers[index] = module
        for keyword in keywords - allowed:
            unimplemented.setdefault(keyword, []).append(index)
    if unimplemented:
        reasons = "; ".join(
            f"`{k}` ({MEANINGS.get(k, 'not implemented by intervene')}) on layers {sorted(set(v))}"
            for k, v in sorted(unimplemented.items())
        )
        raise UnsupportedModelError(
            f"{label} passes its attention keywords that intervene's edited attention does not implement: {reasons}. "
            "Editing those layers would drop them, and leaving them alone is not possible under one implementation"
        )
    missing = sorted(set(range(text.num_hidden_layers)) - set(layers))
    kinds = getattr(text, "layer_types", None)  # every hybrid family we know declares it (some as an alias)
    kinds = list(kinds) if isinstance(kinds, (list, tuple)) and len(kinds) == text.num_hidden_layers else None
    # A layer that ran no attention is another kind only if its config says so, and says it differently from the
    # layers that did run attention: one declared like them, or not at all, is a softmax layer we cannot reach.
    attention_kinds = SOFTMAX_KINDS | {kinds[i] for i in layers} if kinds else SOFTMAX_KINDS
    unexplained = [i for i in missing if kinds is None or kinds[i] in attention_kinds]
    if unexplained:
        declared = f" (config.layer_types declares them {sorted({kinds[i] for i in unexplained})})" if kinds else ""
        raise UnsupportedModelError(
            f"{label}: of the {text.num_hidden_layers} layers its config declares, {unexplained} ran no attention "
            f"through AttentionInterface{declared}, so intervene cannot tell what they are"
        )
    return layers, tuple(kinds) if missing else ()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """`model` in eval mode for the probe (dropout would make its two passes differ), restored after."""
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in training.items():
            module.training = mode

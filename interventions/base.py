"""What every intervention shares: the method base class and its hooks, the registry, the context of a
forward and of one attention call, and the validation of `layers` / `heads` scopes.

A method is a frozen dataclass of its parameters. `resolve(model)` checks them against one model and
fills `"auto"`; `edit(call, state)` turns one attention call of one layer into an `AttentionEdit`. A method
never touches a model: the hooks build a `Forward` and the `LayerCall`s and call the method's hooks (`start`,
`layer_input`, `edit`, `scale_heads`, `output`, `logits`, `reorder`), each with the method's own state of the
sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch

from .. import kernels
from ..kernels import AttentionEdit

_REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class ModelSpec:
    """The geometry of the attention layers a method may target."""

    num_layers: int  # decoder layers, of every kind
    num_heads: int  # query heads
    num_kv_heads: int
    name_or_path: str = ""
    image_token_id: int | None = None  # set for vision-language models
    model_type: str = ""
    attention_layers: tuple[int, ...] | None = None  # the softmax-attention layers; None: every layer
    layer_kinds: tuple[str, ...] = ()  # a hybrid's declared kind of every layer (config.layer_types)
    model_class: str = ""  # for messages
    learned_sinks: bool = False  # its attention takes learned sink logits (`s_aux`: gpt-oss)
    # LLaVA-style VLMs: its image features are one vision layer's output, before a projector, and a branch may reweight
    # them by that layer's attention map (`Forward.run_model(vision=...)`)
    image_feature_map: bool = False

    def __post_init__(self):
        if self.attention_layers is None:
            object.__setattr__(self, "attention_layers", tuple(range(self.num_layers)))

    @property
    def hybrid(self) -> bool:
        """Whether some layers are of another kind than softmax attention (linear attention, state-space, ...)."""
        return len(self.attention_layers) < self.num_layers

    @property
    def label(self) -> str:
        return self.model_class or self.name_or_path or "this model"


@dataclass
class Forward:
    """One forward of the model (a prompt, a chunk of one, or a decode step): what all its layer calls share.
    The hooks build it before the first layer and hand it to every method hook of that forward."""

    past_length: int  # tokens in the cache before this forward
    padding_mask: torch.Tensor | None  # [B, past_length + new] bool, True = real token; None = no padding
    image_mask: torch.Tensor | None = None  # [B, past_length + new] bool, True = image token (VLMs)
    input_ids: torch.Tensor | None = None  # [B, new] this forward's tokens, when the model was given ids
    pixel_values: torch.Tensor | None = None  # the prompt's images as the vision tower got them (VLMs)
    # Tokens the cache holds at a layer before this forward (after a method removed some, fewer than past_length).
    held: Callable[[int], int] | None = None
    # Runs the language model on other inputs, no intervention acting: `run_branch(input_ids=..., attention_mask=...,
    # position_ids=..., cache=None | a branch's cache, observe=None | fn(layer, head outputs [B, N, Hq, D]),
    # attention=None | fn(LayerCall) -> AttentionEdit, the branch's own edit)` returns `(output hidden states
    # [B, N, hidden] (after the final norm), the branch's cache)`.
    run_branch: Callable | None = None
    # The model's logits of output hidden states: `to_logits(hidden [B, n, hidden]) -> [B, n, V]` (its output
    # embeddings, as its own head applies them).
    to_logits: Callable | None = None
    # Runs the whole VLM again on this forward's own call, no intervention acting: `run_model(cache=None | a
    # branch's cache, images=None | fn(pixel values as the processor made them) -> other pixel values,
    # attention=None | fn(LayerCall) -> AttentionEdit, vision=None | fn(attention map [B', H, n, n] of the vision
    # layer whose output the image features are, those features [B', P, D]) -> other features, where the model has
    # `ModelSpec.image_feature_map`)` returns `(logits [B, V] of the last position, the branch's cache)`. None when
    # the VLM itself was not called.
    run_model: Callable | None = None

    @property
    def prefill(self) -> bool:
        """The first forward of a sequence: nothing cached before it."""
        return self.past_length == 0

    def cached_at(self, layer: int) -> int:
        """Tokens the cache of `layer` holds before this forward."""
        return self.past_length if self.held is None else self.held(layer)


@dataclass
class LayerInputs:
    """A decoder layer's inputs, which a method's `layer_input` hook may replace (token removal)."""

    hidden_states: torch.Tensor  # [B, N, hidden]
    attention_mask: torch.Tensor | None  # as the model's mask function built it (None: the layer's own causal)
    position_ids: torch.Tensor | None  # [B|1, N]
    position_embeddings: tuple[torch.Tensor, ...] | None  # RoPE's (cos, sin), [B|1, N, D] each


@dataclass
class LayerCall:
    """One call of one attention layer, as the hooks saw it."""

    layer: int
    query: torch.Tensor  # [B, Hq, Nq, D], after RoPE
    key: torch.Tensor  # [B, Hkv, Nk, D], cache included
    attention_mask: torch.Tensor | None  # as the model's mask function built it
    scale: float
    causal: bool
    forward: Forward  # the forward this call belongs to
    value: torch.Tensor | None = None  # [B, Hkv, Nk, Dv], cache included
    sinks: torch.Tensor | None = None  # [Hq] the layer's learned sink logits (gpt-oss's `s_aux`), None without
    softcap: float | None = None  # the cap of the layer's logits (Gemma-2), None without
    # What `column_stats(hide=...)` computed its statistics from, for the attention of this call to reuse.
    rows: kernels.RowPass | None = field(default=None, init=False)

    @property
    def past_length(self) -> int:
        """Tokens in the cache before this forward."""
        return self.forward.past_length

    @cached_property
    def padding_mask(self) -> torch.Tensor | None:
        """[B, past_length + Nq] bool, True = real token; None = no padding."""
        mask = self.forward.padding_mask
        return None if mask is None else mask.to(self.query.device)  # a device map may put layers elsewhere

    @cached_property
    def image_mask(self) -> torch.Tensor | None:
        """[B, past_length + Nq] bool, True = image token (VLMs)."""
        mask = self.forward.image_mask
        return None if mask is None else mask.to(self.query.device)

    @property
    def decode(self) -> bool:
        """One new token on top of a cache: a generation step rather than a (chunk of a) prompt."""
        return self.query.shape[2] == 1 and self.past_length > 0

    @cached_property
    def key_positions(self) -> torch.Tensor:
        """[Nk] absolute position of each key (a sliding-window cache holds only the latest ones)."""
        total, held = self.past_length + self.query.shape[2], self.key.shape[2]
        offset = total - held if held <= total else 0  # a static cache holds empty slots past `total`
        return torch.arange(held, device=self.key.device) + offset

    @cached_property
    def query_valid(self) -> torch.Tensor | None:
        """[B, Nq] True where the query is a real token, None when nothing is padded."""
        if self.padding_mask is None:
            return None
        return self.padding_mask[:, self.past_length :].bool()

    @cached_property
    def first_key(self) -> torch.Tensor:
        """[B] index among the keys of each row's first real token; -1 where the cache no longer holds it."""
        batch = self.query.shape[0]
        first = torch.zeros(batch, dtype=torch.long, device=self.key.device)
        if self.padding_mask is not None:
            first = self.padding_mask.int().argmax(dim=-1).to(self.key.device)
        index = first - self.key_positions[0]
        return torch.where(index >= 0, index, -1)

    @cached_property
    def image_keys(self) -> torch.Tensor:
        """[B, Nk] True where the key is an image token."""
        if self.image_mask is None:
            raise ValueError(
                "this call has no image-token positions: call the VLM itself with `input_ids` "
                "(not `inputs_embeds`, nor its language model alone)"
            )
        total = self.image_mask.shape[1]
        held = self.key_positions.clamp_max(total - 1)
        return self.image_mask[:, held].to(self.key.device) & (self.key_positions < total)

    @cached_property
    def image_queries(self) -> torch.Tensor:
        """[B, Nq] True where the query is an image token."""
        return self.image_keys[:, self.key.shape[2] - self.query.shape[2] :]

    def column_stats(
        self,
        query_mask: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
        hide: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmodified attention summed per key over the rows of `query_mask` `[B, Nq]` (default: this
        call's real queries), and how many of them see each key, `[B, Hq, Nk]` each. With learned sinks these
        are the model's probabilities, normalised with the sinks, which are no keys. With `heads` `[Hq]` bool,
        only those query heads are computed (the others read zero): a method that edits a few heads pays for
        those. `hide` `[B, Nk]` bool: keys likely to be the sources of this call's redistribution (ACT's sinks);
        where the backend can, the statistics come from a pass with those keys hidden, which this call's
        attention reuses (`rows`) when its sources are among them, instead of a pass of its own."""
        chosen = None if heads is None or bool(heads.all()) else heads.nonzero().flatten()
        query_mask = self.query_valid if query_mask is None else query_mask
        geometry = {"attention_mask": self.attention_mask, "scale": self.scale, "causal": self.causal}
        if hide is not None and self.value is not None and self.sinks is None and self.softcap is None:
            sums, counts, self.rows = kernels.column_stats_and_rows(
                self.query, self.key, self.value, hide, heads=chosen, query_mask=query_mask, **geometry
            )
        else:
            query, key, sinks = self.query, self.key, self.sinks
            if chosen is not None:  # each chosen query head with its own key/value head
                query, key = query[:, chosen], key[:, chosen // (query.shape[1] // key.shape[1])]
                sinks = None if sinks is None else sinks[chosen]
            sums, counts = kernels.column_stats(
                query, key, query_mask=query_mask, sinks=sinks, softcap=self.softcap, **geometry
            )
        if chosen is None:
            return sums, counts
        every = sums.new_zeros(sums.shape[0], self.query.shape[1], sums.shape[2])  # [B, Hq, Nk]
        return every.index_copy(1, chosen, sums), every.index_copy(1, chosen, counts.expand_as(sums))


@dataclass(frozen=True)
class Method:
    """Base of every registered intervention. Subclasses are frozen dataclasses of their parameters.

    `edit` is the one hook most methods need. The others are optional and run only for a method that defines
    them, in this order within a forward of the model:
    - `start(forward, state)`: before the first layer (run a second branch of the model, reset per-forward data);
    - `layer_input(layer, inputs, forward, state)`: a decoder layer's inputs, which it may replace (remove tokens);
    - `edit(call, state)`: an attention call of one of `active_layers()`, turned into an `AttentionEdit`;
    - `scale_heads(call, out, state)`: multipliers for that call's head outputs, decided after attention;
    - `output(forward, hidden, state)`: the language model's output hidden states, which it may replace;
    - `logits(forward, logits, state)`: the model's next-token logits, which it may replace (contrastive decoding);
    - `reorder(rows, state)`: between forwards, when `generate` reorders the cache's rows (beam search).
    `state` is one `State()` per sequence: made fresh when a prompt starts (nothing cached), kept through its
    prompt chunks and decode steps, readable afterwards as `handle.state`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # AttentionEdit fields this method may set; two methods that set a non-composable one
    # (redistribute, key_gain) on a common layer are refused at `apply` time.
    primitives: ClassVar[frozenset[str]] = frozenset()
    # Whether it changes which tokens the layers see (`layer_input` removes some): such a method runs alone, and
    # attention maps of its sequences are not recorded.
    changes_sequence: ClassVar[bool] = False
    # What the method keeps for one sequence (a dataclass of its own; a dict by default).
    State: ClassVar[type] = dict
    # For a config read from a file: the model it was saved or calibrated for ({name_or_path, num_layers,
    # num_heads}); `apply` refuses to use it on a model of another shape. Provenance, not a parameter.
    saved_for: dict | None = field(default=None, kw_only=True, compare=False, repr=False, metadata={"provenance": True})

    def resolve(self, model: ModelSpec) -> Method:
        """This config checked against `model`, with every `"auto"` made explicit."""
        return self

    def active_layers(self) -> frozenset[int]:
        """Layers this (resolved) config really edits; empty when its parameters are neutral."""
        raise NotImplementedError

    def start(self, forward: Forward, state) -> None:
        """At the start of every forward of the model, before its first layer."""

    def layer_input(self, layer: int, inputs: LayerInputs, forward: Forward, state) -> LayerInputs | None:
        """The inputs of decoder layer `layer`; what it returns replaces them (None leaves them)."""
        return None

    def edit(self, call: LayerCall, state) -> AttentionEdit | None:
        """The edit for one call of an active layer."""
        raise NotImplementedError

    def scale_heads(self, call: LayerCall, out: torch.Tensor, state) -> torch.Tensor | None:
        """Multipliers `[B, Nq, Hq]` for this layer's head outputs `out` `[B, Nq, Hq, D]`, decided
        after attention (VHR); None leaves them."""
        return None

    def output(self, forward: Forward, hidden: torch.Tensor, state) -> torch.Tensor | None:
        """The language model's output hidden states `[B, N, hidden]` (after its final norm, so an average of
        them is the average of the logits); what it returns replaces them (None leaves them)."""
        return None

    def logits(self, forward: Forward, logits: torch.Tensor, state) -> torch.Tensor | None:
        """The next-token logits `[B, V]` the model made in this forward (its last position: what `generate` and
        the eval scorers read); what it returns replaces them (None leaves them). Earlier positions stay as made."""
        return None

    def reorder(self, rows: torch.Tensor, state) -> None:
        """`generate` reordered the cache's rows (`rows` [B], beam search): reorder what `state` keeps per row."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in _parameters(self)}

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> Method:
        fields = _parameters(cls)
        known = [f.name for f in fields]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"unknown parameter {unknown[0]!r} for method {cls.name!r}; its parameters are: {', '.join(known)}"
            )
        required = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in params]
        if missing:
            raise ValueError(f"method {cls.name!r} needs the parameter {missing[0]!r} (e.g. {missing[0]}=...)")
        return cls(**params)


def overrides(method: Method, hook: str) -> bool:
    """Whether `method` defines the optional hook `hook` (the hooks call only those)."""
    return getattr(type(method), hook) is not getattr(Method, hook)


def _parameters(method) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(method) if not f.metadata.get("provenance")]


def register(name: str):
    """Class decorator adding a method to the registry under `name` (see `intervene.methods()`)."""

    def add(cls: type[Method]) -> type[Method]:
        # Its own dataclass decorator: a subclass of Method without one would inherit Method's fields only.
        if not (isinstance(cls, type) and issubclass(cls, Method) and "__dataclass_params__" in vars(cls)):
            raise TypeError(f"@register({name!r}) needs a dataclass subclassing intervene.Method, got {cls!r}")
        if not cls.__dataclass_params__.frozen:
            raise TypeError(f"@register({name!r}): {cls.__name__} must be a frozen dataclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        if not cls.description:
            cls.description = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = cls
        return cls

    return add


def registry() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# --- scopes shared by the methods -------------------------------------------------------------


def resolve_layers(layers, model: ModelSpec, *, method: str, auto: Iterable[int]) -> tuple[int, ...]:
    """`"auto"` -> the attention layers among `auto`, `"all"` -> every attention layer, an int or a list -> checked,
    sorted, de-duplicated. On a hybrid the layers of other kinds are never in scope."""
    attention = model.attention_layers
    if layers == "auto":
        auto = tuple(auto)
        chosen = tuple(layer for layer in auto if layer in attention)
        if auto and not chosen:  # only a hybrid gets here
            raise ValueError(
                f"{method}: layers='auto' means layers {list(auto)} of {model.label}, none of which is a softmax "
                f"attention layer; its attention layers are {list(attention)}: give layers=[...] among them"
            )
        return chosen
    if layers == "all":
        return attention
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (int, Iterable)):
        raise ValueError(
            f"{method}: layers must be 'auto', 'all', a layer index or a list of them such as [2, 3] "
            f"(on the command line: --param 'layers=[2,3]'), got {layers!r}"
        )
    values = [layers] if isinstance(layers, int) else list(layers)
    for layer in values:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.num_layers:
            raise ValueError(
                f"{method}: layer {layer!r} is out of range; this model has layers 0..{model.num_layers - 1}"
            )
        _check_attention_layer(method, layer, model)
    return tuple(sorted(set(values)))


def _check_attention_layer(method: str, layer: int, model: ModelSpec) -> None:
    """Refuse a layer of a hybrid that is not a softmax-attention layer, naming what it is."""
    if layer not in model.attention_layers:
        kind = f"{model.layer_kinds[layer]} layer" if model.layer_kinds else "layer"
        raise ValueError(
            f"{method}: layer {layer} of {model.label} is a {kind}, not softmax attention; "
            f"its attention layers are {list(model.attention_layers)}"
        )


def resolve_scope(layers, heads, model: ModelSpec, *, method: str, default: str, auto: Iterable[int]):
    """Checked `(layers, heads)`; when `layers` is left at its `default` and `heads` maps layers to
    head lists, those layers are the scope. `heads` is `"all"`, `{layer: [query heads]}`, or a list of
    query heads (`[0, 1]`) taken in every layer of `layers`, whatever their number on the model."""
    if layers == default and isinstance(heads, Mapping):
        layers = sorted(_heads_layer(method, layer, hs) for layer, hs in heads.items())
    layers = resolve_layers(layers, model, method=method, auto=auto)
    return layers, resolve_heads(heads, layers, model, method=method)


def scoped_layers(layers: tuple[int, ...], heads) -> frozenset[int]:
    """The layers of a resolved scope that have at least one head in it."""
    if heads == "all":
        return frozenset(layers)
    return frozenset(layer for layer, hs in heads.items() if hs)


def resolve_heads(heads, layers: tuple[int, ...], model: ModelSpec, *, method: str):
    """`"all"`, or `{layer: [query heads]}` checked against the model and against `layers`; a list of
    query heads (or one head) means those heads in every layer of `layers`."""
    if heads == "all":
        return "all"
    if isinstance(heads, int) or (isinstance(heads, Iterable) and not isinstance(heads, (str, bytes, Mapping))):
        every = [heads] if isinstance(heads, int) else list(heads)
        heads = {layer: every for layer in layers}
    if not isinstance(heads, Mapping):
        raise ValueError(
            f"{method}: heads must be 'all', a list of query heads taken in every layer such as [0, 5], "
            f"or a mapping {{layer: [heads]}}, got {heads!r}"
        )
    resolved = {}
    for layer, hs in heads.items():
        layer = _heads_layer(method, layer, hs)
        if layer not in layers:
            raise ValueError(
                f"{method}: heads are given for layer {layer}, which is not among layers={list(layers)}; "
                "add it to `layers` or drop it from `heads`"
            )
        hs = [hs] if isinstance(hs, int) else list(hs)
        for h in hs:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < model.num_heads:
                raise ValueError(
                    f"{method}: head {h!r} of layer {layer} is out of range; "
                    f"this model has query heads 0..{model.num_heads - 1}"
                )
        resolved[layer] = tuple(sorted(set(hs)))
    return resolved


def _heads_layer(method: str, layer, hs) -> int:
    """The layer index of one `heads` entry (JSON turns keys into strings), once the entry is well formed."""
    if isinstance(hs, (str, bytes)) or not isinstance(hs, (int, Iterable)) or not str(layer).isdigit():
        raise ValueError(
            f"{method}: heads must map layer indices to lists of query heads such as {{2: [0, 5]}}, "
            f"got {layer!r}: {hs!r}"
        )
    return int(layer)


def head_mask(heads, layer: int, num_heads: int, device) -> torch.Tensor:
    """[Hq] bool: the heads of `layer` in scope."""
    if heads == "all":
        return torch.ones(num_heads, dtype=torch.bool, device=device)
    mask = torch.zeros(num_heads, dtype=torch.bool, device=device)
    mask[list(heads.get(layer, ()))] = True
    return mask


def require_vision(method: str, model: ModelSpec) -> None:
    if model.image_token_id is None:
        raise ValueError(
            f"{method} acts on image tokens, and {model.name_or_path or 'this model'} is a text-only model; "
            "apply it to a vision-language model (LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM)"
        )


def check_number(method: str, name: str, value, *, low=None, high=None, low_open=False) -> float:
    """A finite real parameter within [low, high] (or (low, high] with `low_open`), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{method}: {name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bounds = f"{'(' if low_open else '['}{lo}, {hi}]"
        raise ValueError(f"{method}: {name}={value!r} is out of range; it must lie in {bounds}")
    return float(value)


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value

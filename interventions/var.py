"""VAR: visual attention sink redistribution ("See What You Are Told", Kang et al., ICLR 2025).

At prefill, a token entering layer l is a sink when one of the backbone's sink dimensions carries a
massive activation: `max_{d in sink_dims} |x_d| / RMS(x) > tau`, with an unweighted RMS. Each layer keeps
its prompt sinks for the whole generation; generated tokens are never sinks.

Rows of text after the image (at prefill) and every decoding row are edited, in the heads where that row
is image-centric: its mass on the image is at least `min_image_mass`, and at most `1 - rho` of that mass
lies on image sinks (paper convention; the code's rho is `1 - rho`). There, `p_move` of the row's mass on
all sinks, text sinks such as BOS included, moves to the non-sink image tokens in proportion to their
attention. The official code's p is the fraction kept (`p: 0.6` moves 0.4, our default).

The official code runs batch 1 and, through a shadowed class attribute, edits the last layer as well;
here every batch element is handled with its own sinks and image span, in layers 2..L-2 by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..kernels import AttentionEdit, MassGate, Redistribute
from .base import (
    Forward,
    LayerCall,
    LayerInputs,
    Method,
    ModelSpec,
    check_number,
    register,
    require_vision,
    resolve_layers,
)

# Published sink dimensions (seilk/VisAttnSink `src/logic/constants.py`), by a name fragment of the checkpoint.
PUBLISHED_SINK_DIMS = {
    "llava-1.5-7b": [1415, 2533],
    "llava-v1.5-7b": [1415, 2533],
    "llava-1.5-13b": [2100, 4743],
    "llava-v1.5-13b": [2100, 4743],
    "llava-v1.6-vicuna-13b": [2100, 4743],
}
AUTO_DIMS = 2  # with sink_dims="auto" on other backbones: the two largest |channels| of the first token


@dataclass
class VARState:
    """What VAR keeps of one sequence, by layer."""

    sinks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, prompt so far] sink flags
    dims: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, AUTO_DIMS] with sink_dims="auto"
    layer_input: tuple[int, torch.Tensor] | None = None  # (layer, its input hidden states [B, Nq, hidden]): latest


@register("var")
@dataclass(frozen=True)
class VAR(Method):
    """Visual attention sink redistribution: move sink mass to non-sink image tokens in image-centric heads."""

    p_move: float = 0.4
    tau: float = 20.0
    rho: float = 0.5
    min_image_mass: float = 0.2
    sink_dims: Any = "auto"  # a list of hidden dimensions, or "auto" (published dims, else per layer and prompt)
    layers: Any = "auto"  # "auto" = 2..L-2

    primitives = frozenset({"redistribute"})
    State = VARState

    def __post_init__(self):
        check_number("var", "p_move", self.p_move, low=0.0, high=1.0)
        check_number("var", "tau", self.tau, low=0.0, low_open=True)
        check_number("var", "rho", self.rho, low=0.0, high=1.0)
        check_number("var", "min_image_mass", self.min_image_mass, low=0.0, high=1.0)
        dims = self.sink_dims
        if dims != "auto" and not (
            isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d >= 0 for d in dims)
        ):
            raise ValueError(
                f"var: sink_dims must be 'auto' or a non-empty list of hidden dimensions, got {dims!r}; "
                "find them with intervene.interventions.var.discover_sink_dims(model, **inputs)"
            )

    def resolve(self, model: ModelSpec) -> VAR:
        require_vision("var", model)
        layers = resolve_layers(self.layers, model, method="var", auto=range(2, model.num_layers - 1))
        dims = self.sink_dims
        if dims == "auto":
            name = model.name_or_path.lower()
            dims = next((d for key, d in PUBLISHED_SINK_DIMS.items() if key in name), "auto")
        return replace(self, layers=layers, sink_dims=dims if dims == "auto" else sorted(set(dims)))

    def active_layers(self) -> frozenset[int]:
        return frozenset() if self.p_move == 0.0 else frozenset(self.layers)

    def layer_input(self, layer: int, inputs: LayerInputs, forward: Forward, state: VARState) -> None:
        if layer in self.layers:
            state.layer_input = (layer, inputs.hidden_states)  # prompt sinks are found from these
        return None

    def edit(self, call: LayerCall, state: VARState) -> AttentionEdit | None:
        if not call.decode:
            self._find_sinks(call, state)
        elif call.layer not in state.sinks:
            return None  # the prompt ran without this intervention: no sinks were found
        sinks = _at_keys(state.sinks[call.layer], call.key_positions)  # [B, Nk]
        image = call.image_keys  # [B, Nk]
        rows = _after_image(call)  # [B, Nq]
        if call.query_valid is not None:
            rows = rows & call.query_valid
        return AttentionEdit(
            redistribute=Redistribute(
                source=sinks[:, None],
                target=(image & ~sinks)[:, None],
                p_move=self.p_move,
                row_gate=rows[:, None],
                mass_gate=MassGate(keys=image, min_mass=self.min_image_mass, max_source_share=1.0 - self.rho),
            )
        )

    def _find_sinks(self, call: LayerCall, state: VARState) -> None:
        """Append this prompt chunk's sink flags `[B, Nq]` to the layer's sinks, by position."""
        layer, x = state.layer_input or (None, None)
        if layer != call.layer:
            raise ValueError("var needs the decoder layers' input hidden states; apply it to the VLM itself")
        x = x.float()  # [B, Nq, hidden]
        if self.sink_dims == "auto":
            if call.layer not in state.dims:  # the first chunk holds each row's first real token
                first = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                if call.query_valid is not None:
                    first = call.query_valid.int().argmax(dim=1)
                first_token = x[torch.arange(x.shape[0]), first]  # [B, hidden]
                state.dims[call.layer] = first_token.abs().topk(AUTO_DIMS, dim=-1).indices  # [B, AUTO_DIMS]
            dims = state.dims[call.layer]
        else:
            dims = torch.tensor(self.sink_dims, device=x.device).expand(x.shape[0], -1)
        if int(dims.max()) >= x.shape[-1]:
            raise ValueError(f"var: sink_dims {self.sink_dims} exceed this model's hidden size {x.shape[-1]}")
        rms = x.pow(2).mean(dim=-1).add(1e-6).sqrt()  # [B, Nq]
        peak = x.abs().gather(-1, dims[:, None, :].expand(-1, x.shape[1], -1)).amax(dim=-1)  # [B, Nq]
        sinks = peak / rms > self.tau
        if call.query_valid is not None:
            sinks = sinks & call.query_valid
        held = state.sinks.get(call.layer, sinks[:, :0]) if call.past_length else sinks[:, :0]  # [B, prompt so far]
        # Tokens generated since the last chunk (or cached before VAR was applied) are never sinks.
        unseen = sinks.new_zeros(sinks.shape[0], call.past_length - held.shape[1])
        state.sinks[call.layer] = torch.cat([held, unseen, sinks], dim=1)  # [B, past + Nq]


def _at_keys(sinks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Prompt sink flags `[B, prompt]` at the keys' positions `[Nk]`; later keys are never sinks."""
    held = positions < sinks.shape[1]
    return sinks[:, positions.clamp_max(sinks.shape[1] - 1)] & held


def _after_image(call: LayerCall) -> torch.Tensor:
    """[B, Nq] rows the official code edits: queries after the sample's last image token."""
    image = call.image_mask  # [B, past + Nq]
    position = torch.arange(image.shape[1], device=image.device)
    last_image = torch.where(image, position, -1).amax(dim=1)  # [B], -1 without an image
    queries = position[call.past_length :]  # [Nq]
    return (queries[None, :] > last_image[:, None]) & (last_image[:, None] >= 0)


def discover_sink_dims(model: nn.Module, top: int = 2, **inputs) -> list[int]:
    """The backbone's sink dimensions by the massive-activation rule (Sun et al., 2024): over the
    middle layers, the `top` channels that most often carry the largest |activation| / RMS of each
    prompt's first real token. Run it on a handful of prompts; pin the result as `sink_dims`."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # L + 1 x [B, N, hidden]
    mask = inputs.get("attention_mask")
    first = mask.int().argmax(dim=1) if mask is not None else torch.zeros(hidden[0].shape[0], dtype=torch.long)
    rows = torch.arange(first.numel())
    votes = torch.zeros(hidden[0].shape[-1])
    for x in hidden[2:-2]:  # block inputs of layers 2..L-2
        x = x[rows, first].float()  # [B, hidden]
        ratio = x.abs() / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        votes.index_add_(0, ratio.topk(top, dim=-1).indices.flatten().cpu(), torch.ones(ratio.shape[0] * top))
    return sorted(votes.topk(top).indices.tolist())

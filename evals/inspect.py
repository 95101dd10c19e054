"""`intervene inspect`: what attention does on one prompt, before and after an intervention.

The prompt runs once with the intervention off and once with it on (or once, with no intervention), while
`intervene.record_attention` keeps every layer's probabilities as the model really computed them, edits
included. From them:

- the sink rate of Gu et al. ("When Attention Sink Emerges in Language Models", ICLR 2025): the share of
  (layer, head) pairs whose attention on the first token, averaged over the query rows, exceeds ε = 0.3;
- hidden sinks as ACT finds them: keys after the first sink whose mean attention, over the rows that see
  them, exceeds `threshold` (ACT's rule, read on the attention before the intervention);
- `attention.png`: attention maps of a few layers (averaged over all heads or chosen ones), before, after
  and their difference, on one shared log colour scale (sinks dominate a linear one);
- on a model with learned sinks (gpt-oss's `s_aux`), the mass each row gives its head's learned sink, which is
  no token: its own column in the table and `sinks.json`, and a last column, "learned sink", in the maps;
- `sinks.png`: first-token attention per layer and head, before and after;
- `image_attention.png` (VLMs): the attention the predicting row gives the image tokens, on the patch grid;
- `summary.txt` (also printed) and `sinks.json` with the numbers.

Maps are materialised (N² per layer and head), so this is for prompts of up to a few thousand tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import intervene
from intervene.interventions.act import hidden_sinks

SINK_RATE_EPSILON = 0.3  # Gu et al.'s ε
LABELLED_TOKENS = 48  # up to this many tokens, the heatmap axes name them


def require_matplotlib():
    """matplotlib with the Agg backend (files only), or a clear error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("intervene inspect draws with matplotlib: pip install 'intervene[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def inspect(
    model, processor, prompt: str, *, handle=None, image=None, layers=None, heads=None, threshold=0.1, output: Path
):
    """Record, measure and draw into `output`; return the summary text and the files written. The maps drawn
    are the mean over `heads` (query heads; all when None) of each of `layers`."""
    plt = require_matplotlib()
    spec = intervene.model_spec(model)
    recorded = spec.attention_layers  # a hybrid's other layers have no attention maps
    chosen = sorted(set(layers)) if layers else _default_layers(handle, recorded)
    if bad := [layer for layer in chosen if not 0 <= layer < spec.num_layers]:
        raise ValueError(f"--layers {bad} out of range: this model has layers 0..{spec.num_layers - 1}")
    if bad := [layer for layer in chosen if layer not in recorded]:
        raise ValueError(
            f"--layers {bad}: not softmax-attention layers of {spec.label}, a hybrid; its attention layers "
            f"are {list(recorded)}"
        )
    if bad := [head for head in heads or () if not 0 <= head < spec.num_heads]:
        raise ValueError(f"--heads {bad} out of range: this model has heads 0..{spec.num_heads - 1}")
    inputs, tokens, image_positions = _inputs(model, processor, prompt, image)
    learned = spec.learned_sinks
    before, after = _record(model, inputs, handle)
    stats = {"before": _sink_statistics(before, threshold, learned=learned)}
    if after is not None:
        stats["after"] = _sink_statistics(after, threshold, stats["before"]["hidden_sinks"], learned=learned)
    output.mkdir(parents=True, exist_ok=True)
    which = sorted(set(heads)) if heads else slice(None)
    drawn = {  # per layer [N, N], with learned sinks [N, N + 1]
        name: {layer: _with_learned_sink(maps[recorded.index(layer)], learned)[which].mean(dim=0) for layer in chosen}
        for name, maps in (("before", before), ("after", after))
        if maps is not None
    }
    label = f"heads {', '.join(map(str, which))}" if heads else "mean of all heads"
    _plot_attention(plt, drawn, chosen, tokens, label, output / "attention.png")
    _plot_first_token(plt, stats, recorded, output / "sinks.png")
    if image_positions is not None:
        _plot_image_attention(plt, drawn, chosen, image_positions, image, label, output / "image_attention.png")
    document = {
        "prompt": prompt,
        "tokens": tokens,
        "intervention": handle.to_dict() if handle is not None else None,
        "sink_rate_epsilon": SINK_RATE_EPSILON,
        "hidden_sink_threshold": threshold,
        "layers": list(recorded),  # the layer of each row of the per-layer lists below
        **{variant: _jsonable(s) for variant, s in stats.items()},
    }
    (output / "sinks.json").write_text(json.dumps(document, indent=1) + "\n")
    unchanged = after is not None and all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    text = _summary(prompt, tokens, handle, stats, recorded, threshold, unchanged)
    (output / "summary.txt").write_text(text + "\n")
    pictures = ["attention.png", "sinks.png"] + (["image_attention.png"] if image_positions is not None else [])
    return text, [output / name for name in (*pictures, "summary.txt", "sinks.json")]


def _inputs(model, processor, prompt: str, image):
    """The model's inputs for one prompt, its tokens as text, and the image tokens' positions (VLMs)."""
    from PIL import Image

    from .scorers import input_device, prompt_text

    vision = hasattr(processor, "image_processor")
    if vision != (image is not None):
        raise ValueError(
            "this is a vision-language model: pass --image PATH" if vision else "--image needs a vision-language model"
        )
    if vision:
        try:
            with Image.open(image) as opened:
                picture = opened.convert("RGB")
        except OSError as error:
            raise ValueError(f"--image {image} cannot be read ({error})") from None
        inputs = processor(images=[picture], text=[prompt_text(processor, prompt)], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        tokenizer = processor.tokenizer
        image_token = tokenizer.convert_tokens_to_ids(processor.image_token)
        image_positions = (inputs["input_ids"][0] == image_token).nonzero().flatten()
    else:
        inputs = processor(prompt, return_tensors="pt")
        tokenizer, image_positions = processor, None
    tokens = [tokenizer.decode([t]) for t in inputs["input_ids"][0].tolist()]
    return {k: v.to(input_device(model)) for k, v in inputs.items()}, tokens, image_positions


def _record(model, inputs, handle):
    """`(before, after)`: per layer `[Hq, N, N]` probabilities without and with the intervention."""
    runs = []
    for enabled in (False, True) if handle is not None else (False,):
        if handle is not None:
            handle.enabled = enabled
        with intervene.record_attention(model) as recorded, torch.no_grad():
            model(**inputs)
        runs.append([recorded[layer][0] for layer in sorted(recorded)])
    if handle is not None:
        handle.enabled = True
    return runs[0], runs[1] if len(runs) > 1 else None


def _with_learned_sink(maps: torch.Tensor, learned: bool) -> torch.Tensor:
    """`maps` `[Hq, N, N]`, and with learned sinks a last column: each row's mass on its head's sink."""
    return torch.cat([maps, (1 - maps.sum(dim=-1, keepdim=True)).clamp_min(0)], dim=-1) if learned else maps


def _default_layers(handle, recorded: tuple[int, ...]) -> list[int]:
    """Four layers spread over those the intervention changes (over all attention layers without one)."""
    pool = sorted(handle.active_layers) if handle is not None and handle.active_layers else list(recorded)
    return sorted({pool[round(i * (len(pool) - 1) / 3)] for i in range(4)})


def _sink_statistics(maps: list[torch.Tensor], threshold: float, hidden=None, *, learned: bool = False) -> dict:
    """First-token attention per layer and head, sink rates, ACT's hidden sinks per layer (detected on `maps`
    unless given, as masks `[Hq, N]`) and the attention they receive; with learned sinks, the mass a row gives
    its head's learned sink, per layer and head."""
    if hidden is None:
        hidden = []
        for p in maps:  # [Hq, N, N]
            seen_by = torch.arange(p.shape[-1], 0, -1, dtype=p.dtype)  # causal: key j is seen by N - j rows
            hidden.append(hidden_sinks(p.sum(dim=1) / seen_by, threshold))  # [Hq, N], from column means
    first = torch.stack([p[:, :, 0].mean(dim=1) for p in maps])  # [L, Hq]: mean over query rows
    learned_sink = {"learned_sink_attention": torch.stack([(1 - p.sum(dim=-1)).mean(dim=1) for p in maps])}
    return {
        **(learned_sink if learned else {}),  # [L, Hq]: mean over query rows
        "first_token_attention": first,
        "sink_rate": float((first > SINK_RATE_EPSILON).float().mean()),
        "sink_rate_per_layer": (first > SINK_RATE_EPSILON).float().mean(dim=1),
        "hidden_sinks": hidden,
        # [L]: mass a row puts on its head's hidden sinks, mean over heads and rows
        "hidden_sink_attention": torch.stack(
            [(p * h[:, None, :]).sum(-1).mean() for p, h in zip(maps, hidden, strict=True)]
        ),
    }


def _summary(prompt, tokens, handle, stats, recorded, threshold, unchanged: bool) -> str:
    before, after = stats["before"], stats.get("after")
    lines = [f"prompt: {prompt!r} ({len(tokens)} tokens)"]
    if handle is not None:
        params = json.dumps(handle.to_dict()["params"])
        lines.append(f"intervention: {handle.method} {params if len(params) < 160 else params[:150] + ' ...'}")
    if unchanged:
        lines.append(f"{handle.method} leaves every attention probability as it was on this prompt "
                     "(it acts after attention, e.g. on head outputs, or not on this prompt)")  # fmt: skip
    rate = f"{before['sink_rate']:.3f}" + (f" -> {after['sink_rate']:.3f}" if after else "")
    learned = "learned_sink_attention" in before
    lines += [
        f"sink rate (share of layer-head pairs whose mean first-token attention exceeds {SINK_RATE_EPSILON}): {rate}",
        f"hidden sinks: keys after a head's first sink whose mean attention exceeds {threshold} (ACT's rule, "
        "found before the intervention), as position 'token' xheads, and the mass a row puts on them",
        *(["learned sink: the mass a row gives its head's learned sink (s_aux), no token, mean over heads"] * learned),
        "",
        f"| layer | sink rate | first-token attention | {'learned-sink attention | ' * learned}hidden-sink attention "
        "| hidden sinks |",
        f"|---:|---|---|{'---|' * learned}---|---|",
    ]
    columns = ("sink_rate_per_layer", "first_token_attention", *(["learned_sink_attention"] * learned))
    for row, (layer, masks) in enumerate(zip(recorded, before["hidden_sinks"], strict=True)):
        cells = []
        for name in (*columns, "hidden_sink_attention"):
            values = [s[name][row].mean().item() for s in (before, after) if s]
            cells.append(" -> ".join(f"{v:.3f}" for v in values))
        heads = masks.sum(dim=0)  # [N]: in how many heads each key is a hidden sink
        top = sorted(heads.nonzero().flatten().tolist(), key=lambda i: -heads[i])
        named = ", ".join(f"{i} {tokens[i]!r} x{heads[i]}" for i in top[:4]) + (" ..." if len(top) > 4 else "")
        lines.append(f"| {layer} | {' | '.join(cells)} | {named or '-'} |")
    return "\n".join(lines)


def _plot_attention(plt, drawn, layers, tokens, label: str, path: Path) -> None:
    """The maps of `layers`: before | after | after - before, the first two on one log scale."""
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    maps = {layer: [drawn[name][layer].numpy() for name in drawn] for layer in layers}  # [N, N] each
    positive = np.concatenate([m[m > 0] for pair in maps.values() for m in pair])
    norm = LogNorm(vmin=max(float(positive.min()), 1e-5), vmax=float(positive.max()))
    columns = 3 if "after" in drawn else 1
    figure, axes = plt.subplots(
        len(layers), columns, figsize=(4.6 * columns, 4.4 * len(layers)), squeeze=False, layout="constrained"
    )
    for row, layer in enumerate(layers):
        for column, (name, values) in enumerate(zip(drawn, maps[layer], strict=True)):
            image = axes[row, column].imshow(np.ma.masked_less_equal(values, 0), norm=norm, cmap="viridis")
            _label(axes[row, column], f"layer {layer}, {name}", tokens, values.shape[1] > len(tokens))
        if "after" in drawn:
            change = maps[layer][1] - maps[layer][0]
            bound = max(float(np.abs(change).max()), 1e-12)
            shift = axes[row, 2].imshow(change, norm=TwoSlopeNorm(0.0, -bound, bound), cmap="RdBu_r")
            _label(axes[row, 2], f"layer {layer}, after - before", tokens, change.shape[1] > len(tokens))
            figure.colorbar(shift, ax=axes[row, 2], shrink=0.8)
    figure.colorbar(image, ax=axes[:, : min(2, columns)], location="left", shrink=0.5, label="attention (log scale)")
    figure.suptitle(f"attention, {label}", fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _label(axis, title: str, tokens: list[str], learned_sink: bool) -> None:
    """Title and axes of a map; with `learned_sink`, its last key column is the learned sink."""
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("key" + (" (last column: the learned sink)" if learned_sink else ""), fontsize=8)
    axis.set_ylabel("query", fontsize=8)
    if len(tokens) <= LABELLED_TOKENS:
        names = [t.replace("\n", "\\n") for t in tokens]
        keys = [*names, "learned sink"] if learned_sink else names
        axis.set_xticks(range(len(keys)), keys, rotation=90, fontsize=6)
        axis.set_yticks(range(len(tokens)), names, fontsize=6)


def _plot_first_token(plt, stats, recorded, path: Path) -> None:
    """Attention on the first token per (attention layer, head), before and after, on one 0..1 scale."""
    figure, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 5), squeeze=False, layout="constrained")
    for axis, (name, s) in zip(axes[0], stats.items(), strict=True):
        image = axis.imshow(s["first_token_attention"].numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
        axis.set_title(f"first-token attention, {name} (sink rate {s['sink_rate']:.2f})", fontsize=9)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        if recorded != tuple(range(len(recorded))):  # a hybrid: name the attention layers the rows are
            axis.set_yticks(range(len(recorded)), [str(layer) for layer in recorded])
    figure.colorbar(image, ax=axes[0], shrink=0.8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _plot_image_attention(plt, drawn, layers, positions, image, label: str, path: Path) -> None:
    """The predicting row's attention on the image tokens, on the patch grid (a strip when the image tokens do
    not form a square), before and after, on one log scale; the image on the left."""
    from matplotlib.colors import LogNorm
    from PIL import Image

    count = positions.numel()
    side = round(count**0.5)
    shape = (side, side) if side * side == count else (1, count)
    grids = {(layer, name): maps[layer][-1, positions].reshape(shape).numpy() for name, maps in drawn.items()
             for layer in layers}  # fmt: skip
    values = np.concatenate([g.ravel() for g in grids.values()])
    norm = LogNorm(vmin=max(float(values[values > 0].min(initial=1.0)), 1e-6), vmax=max(float(values.max()), 1e-6))
    columns = 1 + len(drawn)
    figure, axes = plt.subplots(
        len(layers), columns, figsize=(3.6 * columns, 3.4 * len(layers)), squeeze=False, layout="constrained"
    )
    with Image.open(image) as opened:
        picture = np.asarray(opened.convert("RGB"))
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image", fontsize=9)
    for row, layer in enumerate(layers):
        axes[row, 0].axis("off")
        for column, name in enumerate(drawn, start=1):
            grid = grids[layer, name]
            shown = axes[row, column].imshow(grid, norm=norm, cmap="inferno")
            axes[row, column].set_title(f"layer {layer}, {name}: {grid.sum():.2f} on the image", fontsize=9)
            axes[row, column].axis("off")
    figure.colorbar(shown, ax=axes[:, 1:], shrink=0.6, label="attention from the last row (log scale)")
    figure.suptitle(f"image attention, {label}", fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _jsonable(stats: dict) -> dict:
    learned = {name: stats[name].tolist() for name in ("learned_sink_attention",) if name in stats}
    return {
        **learned,  # [layer][head]
        "first_token_attention": stats["first_token_attention"].tolist(),  # [layer][head]
        "sink_rate": stats["sink_rate"],
        "sink_rate_per_layer": stats["sink_rate_per_layer"].tolist(),
        "hidden_sinks": [  # per layer: {position: heads in which it is a hidden sink}
            {str(i): int(n) for i, n in enumerate(masks.sum(dim=0).tolist()) if n} for masks in stats["hidden_sinks"]
        ],
        "hidden_sink_attention": stats["hidden_sink_attention"].tolist(),
    }

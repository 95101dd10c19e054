"""Settings written as the official code writes them: ZeroTuning's `(rate, target_layers, target_heads)`
and the ACT head lists shipped in `configs/published/`, checked against what the official code does."""

import json
from pathlib import Path

import pytest

from intervene.interventions.act import ACT
from intervene.interventions.base import ModelSpec, head_mask
from intervene.interventions.zerotuning import ZeroTuning

PUBLISHED = Path(__file__).parent.parent / "configs" / "published"

MODELS = [
    ModelSpec(num_layers=6, num_heads=4, num_kv_heads=2),
    ModelSpec(num_layers=32, num_heads=32, num_kv_heads=8),
]


def official_zerotuning_scope(model: ModelSpec, target_layers, target_heads) -> set[tuple[int, int]]:
    """The (layer, head) pairs FeijiangHan/ZeroTuning `ZeroTuning_Attention` scales: a layer when
    `target_layers is None or self.layer_idx in target_layers`, then `slice(None)` (every head) when
    `target_heads is None`, else the listed heads."""
    scaled = set()
    for layer in range(model.num_layers):
        if target_layers is None or layer in target_layers:
            heads = range(model.num_heads) if target_heads is None else target_heads
            scaled |= {(layer, head) for head in heads}
    return scaled


def edited(config, model: ModelSpec) -> set[tuple[int, int]]:
    """The (layer, head) pairs a resolved config edits: its active layers, and in each its head mask."""
    return {
        (layer, head)
        for layer in config.active_layers()
        for head in head_mask(config.heads, layer, model.num_heads, "cpu").nonzero().flatten().tolist()
    }


@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"{m.num_layers}x{m.num_heads}")
@pytest.mark.parametrize("target_layers", [None, [0, 3]], ids=["all-layers", "layers-0-3"])
@pytest.mark.parametrize("target_heads", [None, [0, 1]], ids=["all-heads", "heads-0-1"])
def test_a_zerotuning_setting_scales_what_the_official_code_scales(model, target_layers, target_heads):
    config = ZeroTuning.from_official((2.0, target_layers, target_heads))
    expected = official_zerotuning_scope(model, target_layers, target_heads)
    assert edited(config.resolve(model), model) == expected
    saved = ZeroTuning.from_dict(json.loads(json.dumps(config.to_dict())))  # as a config file reads back
    assert edited(saved.resolve(model), model) == expected
    assert config.resolve(model).gamma == 2.0


def test_heads_0_and_1_with_no_layers_are_those_heads_in_every_layer_of_any_model():
    config = ZeroTuning.from_official((2.0, None, [0, 1]))
    for model in MODELS:
        resolved = config.resolve(model)
        assert resolved.layers == tuple(range(model.num_layers))
        assert resolved.heads == {layer: (0, 1) for layer in range(model.num_layers)}


def test_official_heads_the_model_lacks_are_refused_by_name():
    with pytest.raises(ValueError, match=r"head 4 of layer 0 is out of range; this model has query heads 0\.\.3"):
        ZeroTuning.from_official((2.0, None, [1, 4])).resolve(MODELS[0])


def test_a_list_of_heads_is_taken_in_every_layer_of_an_act_scope():
    resolved = ACT(heads=[1, 3]).resolve(MODELS[0])  # layers "auto": 2..L-2
    assert resolved.layers == (2, 3, 4)
    assert resolved.heads == {2: (1, 3), 3: (1, 3), 4: (1, 3)}
    assert ACT(layers=[0, 5], heads=2).resolve(MODELS[0]).heads == {0: (2,), 5: (2,)}


# The layers the official ACT code (GATECH-EIC/ACT@a267af7) edits in a model of L layers:
# models/llama_modelling_aug.py `if signal in range(2, 31)` for the 32-layer Llama-2-7B (2..L-2), and
# models/mistral_modelling_aug.py `if signal in range(2, 32)` for the 32-layer Mistral-7B (2..L-1).
OFFICIAL_ACT_LAYERS = {
    "meta-llama/Llama-2-7b-chat-hf": lambda num_layers: range(2, num_layers - 1),
    "mistralai/Mistral-7B-Instruct-v0.2": lambda num_layers: range(2, num_layers),
}


def test_the_published_act_configs_name_only_layers_the_official_code_calibrates():
    paths = sorted(PUBLISHED.glob("**/config.json"))
    assert len(paths) == 4
    for path in paths:
        document = json.loads(path.read_text())
        model = document["model"]
        official = OFFICIAL_ACT_LAYERS[model["name_or_path"]](model["num_layers"])
        named = {int(layer) for layer, heads in document["params"]["heads"].items() if heads}
        assert named, path
        assert named <= set(official), f"{path}: layers {sorted(named - set(official))} are outside {official}"

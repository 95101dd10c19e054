"""Visual-token pruning on a tiny random LLaVA: the tokens really leave the sequence and the KV cache, the
identities that pin that down, and the debiasing transforms against their formulas."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import intervene
from intervene.hooks.compat import DynamicCache, cache_argument, implementation, output_cache
from intervene.interventions.prune import fit_trend, padding_from_pixels, padding_patches, trend_weights

from conftest import IMAGE_TOKEN, TinyVLM, cache_kwarg, prompt


def batch(vlm):
    return vlm.inputs([vlm.sample(prompt(3, 1), prompt(5, 2)), vlm.sample(prompt(1, 3), prompt(2, 4))])


def test_keeping_every_token_changes_nothing():
    vlm = TinyVLM("llava")
    inputs = batch(vlm)
    with torch.no_grad():
        baseline = vlm.model(**inputs).logits
        with intervene.apply(vlm.model, "prune", keep=1.0):
            assert torch.equal(vlm.model(**inputs).logits, baseline)


def test_pruned_at_layer_0_equals_the_input_without_those_tokens_at_their_positions():
    vlm = TinyVLM("llava")
    inputs = batch(vlm)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    select = [0, 5, 6, 11, 15]  # of the 16 image tokens
    embeds = {}
    hook = vlm.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: embeds.update(x=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        vlm.model(**inputs)
    hook.remove()
    image = ids == IMAGE_TOKEN
    keep = ~image
    keep[image] = torch.isin(torch.arange(16), torch.tensor(select)).repeat(2)
    kept = keep.nonzero()[:, 1].view(2, -1)  # [B, T']
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    rows = torch.arange(2)[:, None]

    def reference(embeds_, mask_, positions_, cache):  # the unpruned language model on the shorter input
        out = vlm.model.get_decoder()(
            inputs_embeds=embeds_,
            attention_mask=mask_,
            position_ids=positions_,
            use_cache=True,
            **{cache_argument(vlm.model.get_decoder().forward): cache},
        )
        return vlm.model.lm_head(out.last_hidden_state)

    with torch.no_grad():
        expected_cache = DynamicCache()
        expected = reference(embeds["x"][rows, kept], mask[rows, kept], positions[rows, kept], expected_cache)
        token = expected[:, -1:].argmax(-1)
        expected_step = reference(
            vlm.model.get_input_embeddings()(token),
            torch.cat([mask[rows, kept], torch.ones(2, 1, dtype=mask.dtype)], dim=1),
            positions[:, -1:] + 1,
            expected_cache,
        )
        with intervene.apply(vlm.model, "prune", layer=0, select=select):
            pruned = vlm.model(**inputs, position_ids=positions, use_cache=True)
            assert output_cache(pruned).get_seq_length(layer_idx=1) == kept.shape[1]  # only kept tokens cached
            step = vlm.model(  # one decoding step over the pruned cache, with the full-length mask
                input_ids=token, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1),
                **cache_kwarg(vlm.model, pruned), position_ids=positions[:, -1:] + 1, use_cache=True,
            )  # fmt: skip
    torch.testing.assert_close(pruned.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits, expected_step, atol=1e-5, rtol=1e-5)


def test_pruning_by_score_shortens_prefill_and_decode():
    vlm = TinyVLM("llava")
    inputs = batch(vlm)
    with torch.no_grad(), intervene.apply(vlm.model, "prune", layer=2, keep=4) as handle:
        out = vlm.model(**inputs, use_cache=True)
        assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 16 + 4
        assert output_cache(out).get_seq_length(layer_idx=1) == inputs["input_ids"].shape[1]  # before layer 2
        assert output_cache(out).get_seq_length(layer_idx=2) == inputs["input_ids"].shape[1] - 12
        scores = handle.state.scores  # layer 1's attention from the last prompt token
        image = inputs["input_ids"] == IMAGE_TOKEN
        top = scores[image].view(2, 16).topk(4).indices.sort().values
        chosen = image.nonzero()[:, 1].view(2, 16).gather(1, top)  # [B, 4] positions of the best-scored
        kept = handle.state.kept
        assert all(torch.isin(chosen[row], kept[row]).all() for row in range(2))
        assert kept.shape[1] == inputs["input_ids"].shape[1] - 12
        generated = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_text_only_prompts_go_through_whole():
    from intervene.interventions import method_class

    prune = method_class("prune")(keep=2)
    kept, filler = prune.kept_positions(torch.zeros(2, 5, dtype=torch.bool), torch.rand(2, 5), None)
    assert kept.tolist() == [list(range(5))] * 2 and not filler.any()


def test_trend_formula_and_fit():
    weights = trend_weights({"mu": 2.0, "sigma": 1.5}, 4)
    torch.testing.assert_close(weights, 1 / (2.0 * torch.exp(1.5 * torch.tensor([0.0, 0.25, 0.5, 0.75]))))
    assert trend_weights({"weights": [1.0, 0.5]}, 2).tolist() == [1.0, 0.5]
    mean_attention = 0.01 * torch.exp(2.0 * torch.arange(576) / 576)
    fitted = fit_trend(mean_attention)
    assert fitted["mu"] == pytest.approx(0.01, rel=1e-6) and fitted["sigma"] == pytest.approx(2.0, rel=1e-6)


def test_debiasing_changes_the_ranking_as_the_formulas_say():
    from intervene.interventions import method_class

    prune = method_class("prune")(keep=2, debias="both", trend={"mu": 1.0, "sigma": 2.0})
    image = torch.tensor([[False, True, True, True, True, False]])
    scores = torch.tensor([[9.0, 0.10, 0.12, 0.30, 0.35, 9.0]])
    padding = torch.tensor([[False, False, False, True]])
    # position: 0.10, 0.12 / e^0.5, 0.30 / e^1, 0.35 / e^1.5 -> 0.1, 0.073, 0.110, 0.078; padding drops the last
    kept, filler = prune.kept_positions(image, scores, padding)
    assert kept.tolist() == [[0, 1, 3, 5]] and not filler.any()
    raw = method_class("prune")(keep=2)
    assert raw.kept_positions(image, scores, None)[0].tolist() == [[0, 3, 4, 5]]
    # a sample keeps at most its unpadded patches; the batch keeps the most any sample keeps, as filler
    padding = torch.tensor([[False, False, False, True], [False, True, True, True]])
    kept, filler = prune.kept_positions(image.expand(2, -1), scores.expand(2, -1), padding)
    assert kept.tolist() == [[0, 1, 3, 5], [0, 1, 3, 5]]
    assert filler.tolist() == [[False] * 4, [False, False, True, False]]  # the second keeps its one real patch


def test_padding_masks_of_non_square_images():
    # 200 x 100 padded to 200 x 200: content rows 50..150; with 4 x 4 patches of 50 px the top and bottom rows pad
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[[0, 3]] = True
    assert torch.equal(padding_patches(200, 100, 4), expected.flatten())
    # 300 x 200 in 3 x 3 patches of 100 px: the outer rows are exactly half padding
    assert not padding_patches(300, 200, 3).any()
    half = torch.zeros(3, 3, dtype=torch.bool)
    half[[0, 2]] = True
    assert torch.equal(padding_patches(300, 200, 3, threshold=0.4), half.flatten())
    assert torch.equal(padding_patches(200, 300, 3, threshold=0.4), half.T.flatten())  # tall: the side columns
    # the processor's own pad-to-square, read back from the pixels, agrees with the geometry
    from transformers import LlavaImageProcessor

    processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray((np.random.default_rng(0).random((40, 80, 3)) * 255).astype("uint8"))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(padding_from_pixels(pixels, 4)[0], padding_patches(80, 40, 4))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"layer": 0}, r"layer=0 has no earlier attention to score tokens with; give select=\[...\]"),
        ({"debias": "position"}, r"needs trend=.*fit one with `intervene calibrate --method prune`"),
        ({"keep": 1.5}, r"prune: keep=1.5 is out of range"),
        ({"keep": 0}, r"keep must be a count >= 1 or a fraction in \(0, 1\]"),
        ({"debias": "bias"}, r"debias='bias' is not one of none, position, padding, both"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        intervene.apply(TinyVLM("llava").model, "prune", **params)


@pytest.mark.parametrize(
    "family, reason",
    [
        ("qwen2_vl", r"qwen2_vl places image tokens with M-RoPE"),
        ("qwen2_5_vl", r"qwen2_5_vl places image tokens with M-RoPE"),
        ("qwen3_vl", r"qwen3_vl places image tokens with M-RoPE.*deepstack"),
        ("gemma3", r"gemma3 has sliding-window layers"),
    ],
)
def test_families_pruning_cannot_treat_exactly_are_refused(family, reason):
    model = TinyVLM(family).model
    with pytest.raises(ValueError, match=rf"prune: {reason}.*use a LLaVA-style model"):
        intervene.apply(model, "prune")
    assert implementation(model.config.get_text_config()) == "sdpa"  # refused before anything was attached


def test_prune_combinations_are_refused():
    model = TinyVLM("llava").model
    with intervene.apply(model, "pai"), pytest.raises(ValueError, match="cannot be combined"):
        intervene.apply(model, "prune")


def test_hybrids_are_refused():
    from intervene.interventions import ModelSpec
    from intervene.interventions.prune import Prune

    spec = ModelSpec(4, 4, 2, image_token_id=IMAGE_TOKEN, attention_layers=(1, 3), model_class="Lfm2VlModel")
    with pytest.raises(ValueError, match=r"prune: Lfm2VlModel is a hybrid \(its attention layers are \[1, 3\]\)"):
        Prune().resolve(spec)


def pruned_logits(vlm: TinyVLM, params: dict, inputs: dict) -> torch.Tensor:
    """The logits `[B, steps, V]` of 3 greedy steps generated with `prune(**params)` applied."""
    with torch.no_grad(), intervene.apply(vlm.model, "prune", **params):
        out = vlm.model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("debias", ["none", "position", "padding", "both"])  # padding: pixels reach generate
def test_a_sample_alone_equals_it_in_a_padded_batch_through_generation(debias):
    vlm = TinyVLM("llava")
    prompts = [vlm.sample(prompt(3, 1), prompt(5, 2)), vlm.sample(prompt(1, 3), prompt(2, 4))]
    params = {"layer": 2, "keep": 0.25, "debias": debias, "trend": {"mu": 1.0, "sigma": 1.5}}

    together = pruned_logits(vlm, params, vlm.inputs(prompts))
    for row, sample in enumerate(prompts):
        alone = pruned_logits(vlm, params, vlm.inputs([sample], image_seeds=[row]))
        torch.testing.assert_close(together[row], alone[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("text_padding", [True, False])  # with and without a mask from transformers
def test_samples_with_different_padding_keep_their_own_counts_in_a_batch(text_padding):
    vlm = TinyVLM("llava")
    prompts = [vlm.sample(prompt(3, 1), prompt(5, 2)), vlm.sample(prompt(3, 3), prompt(2 if text_padding else 5, 4))]
    params = {"layer": 2, "keep": 0.75, "debias": "padding"}

    def padded_image(inputs, row):  # the upper half of sample 0's image is pad-to-square padding
        if row == 0:
            inputs["pixel_values"][0, :, : inputs["pixel_values"].shape[-2] // 2] = 0.0
        return inputs

    batch = vlm.inputs(prompts)
    together = pruned_logits(vlm, params, padded_image(batch, 0))
    assert (batch["attention_mask"] == 0).any() == text_padding
    for row, sample in enumerate(prompts):
        alone = pruned_logits(vlm, params, padded_image(vlm.inputs([sample], image_seeds=[row]), row))
        torch.testing.assert_close(together[row], alone[0], atol=2e-5, rtol=1e-5)


def test_calibration_fits_the_trend_of_the_attention_image_positions_receive(tmp_path):
    from typer.testing import CliRunner

    from intervene.cli import app
    from intervene.evals import scorers
    from intervene.evals.tasks import builtin_tasks

    result = CliRunner().invoke(
        app, ["calibrate", "--method", "prune", "--model", "tiny-llava", "--tasks", "easy-vqa", "--limit", "6",
              "--batch-size", "4", "--output-path", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "positional trend: mu" in result.output and "SMOKE TEST" in result.output
    config = intervene.load_config(tmp_path / "config.json")
    found = json.loads((tmp_path / "config.json").read_text())["calibration"]
    assert config.debias == "position" and config.trend == fit_trend(torch.tensor(found["mean_attention"]))
    # independently: eager attention weights of layer 1, last prompt row, mean over heads and prompts
    model, processor = intervene.load_model("tiny-llava")
    model.set_attn_implementation("eager")
    items = builtin_tasks()["easy-vqa"].items("calib", 6)
    rows = []
    with torch.no_grad():
        for start in (0, 4):
            inputs = scorers._image_inputs(items[start : start + 4], processor, model.dtype)
            weights = model(**inputs, output_attentions=True).attentions[1][:, :, -1]  # [B, H, T]
            image = inputs["input_ids"] == model.config.image_token_id
            rows.append(weights.mean(1)[image].view(image.shape[0], -1))
    torch.testing.assert_close(torch.tensor(found["mean_attention"]), torch.cat(rows).mean(0), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("queries", ["last", "text"])
def test_scores_are_the_attention_image_tokens_receive_from_the_chosen_rows(queries):
    vlm = TinyVLM("llava")
    inputs = batch(vlm)
    with torch.no_grad(), intervene.apply(vlm.model, "prune", keep=1.0, queries=queries) as handle:
        vlm.model(**inputs)
        scores = handle.state.scores  # [B, T]
    vlm.model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = vlm.model(**inputs, output_attentions=True).attentions[1].mean(1)  # [B, T, T], mean over heads
    image = inputs["input_ids"] == IMAGE_TOKEN
    for row in range(2):
        last_image = int(image[row].nonzero().max())
        rows = [len(image[row]) - 1] if queries == "last" else list(range(last_image + 1, len(image[row])))
        expected = weights[row, rows].mean(0)[image[row]]
        torch.testing.assert_close(scores[row, image[row]], expected, atol=1e-6, rtol=1e-5)


def test_decoding_without_a_padding_mask_under_eager_attention():
    # transformers sizes its decoding mask by the unpruned first layers; the pruned layers get their own
    vlm = TinyVLM("llava")
    inputs = vlm.inputs([vlm.sample(prompt(3, 1), prompt(5, 2))])
    del inputs["attention_mask"]

    def steps():
        with torch.no_grad(), intervene.apply(vlm.model, "prune", layer=2, keep=4):
            out = vlm.model.generate(
                **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        return torch.stack(out.logits, dim=1)

    sdpa = steps()
    vlm.model.set_attn_implementation({"text_config": "eager"})
    torch.testing.assert_close(steps(), sdpa, atol=1e-5, rtol=1e-5)

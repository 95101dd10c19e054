"""VAR, PAI and VHR on tiny random LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM
and Gemma-3 models: neutral parameters and removal leave the model bit for bit; each method equals a
transcription of its official operation (batch 1, explicit probabilities, KV cache) on every sample of a
padded batch, at prefill and at every decoding step."""

import copy
import functools
from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessorList

import intervene
from intervene.hooks.compat import implementation
from intervene.interventions.causalmm import edited_map
from intervene.interventions.var import discover_sink_dims

import oracles
from conftest import IMAGE_TOKEN, TinyVLM, build, cache_kwarg, prompt

STEPS = 3  # greedy tokens generated per comparison
TAU = 0.8  # random weights have no massive activations; this makes a few tokens of each prompt sinks


def prompts(vlm: TinyVLM) -> list[list[int]]:
    return [
        vlm.sample(prompt(3, 1), prompt(5, 2)),
        vlm.sample(prompt(1, 3), prompt(2, 4)),
        vlm.sample([], prompt(4, 5)),
    ]


def generate(model, inputs: dict, forced: int | None = None, processor=None, sample_seed: int | None = None):
    """Greedy (or `forced`, or sampled from seed `sample_seed`) tokens `[B, STEPS]` and the logits of each step
    `[B, STEPS, V]` through the KV cache: the model's own, or what `processor` made of them. No end-of-sequence
    token: `generate` neither stops at it nor masks it before the processor (which a minimum length would)."""
    processors = LogitsProcessorList([] if forced is None else [lambda ids, scores: force(scores, forced)])
    processors += [] if processor is None else [processor]
    config = copy.deepcopy(model.generation_config)
    config.update(
        eos_token_id=[], max_new_tokens=STEPS, output_logits=True, output_scores=True, return_dict_in_generate=True
    )
    if sample_seed is not None:
        config.update(do_sample=True, top_k=0)
        torch.manual_seed(sample_seed)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config, logits_processor=processors)
    steps = out.logits if processor is None else out.scores
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(steps, dim=1)


def force(scores: torch.Tensor, token: int) -> torch.Tensor:
    return torch.full_like(scores, -1e9).index_fill(1, torch.tensor([token]), 0.0)


def forward_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def with_implementation(model, name: str, run):
    model.set_attn_implementation({"text_config": name})
    try:
        return run()
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def sink_dims(vlm: TinyVLM) -> list[int]:
    return discover_sink_dims(vlm.model, **vlm.inputs(prompts(vlm)))


NEUTRAL = {
    "var": {"p_move": 0.0}, "pai": {"alpha": 0.0}, "vhr": {"alpha": 1.0}, "vcd": {"alpha": 0.0},
    "causalmm": {"gamma": 0.0},
}  # fmt: skip


@pytest.mark.parametrize("method", list(NEUTRAL))
def test_neutral_parameters_and_remove_leave_the_model_bit_for_bit(vlm_family, method):
    vlm = TinyVLM(vlm_family)
    inputs = vlm.inputs(prompts(vlm))
    baseline = forward_logits(vlm.model, inputs)
    with intervene.apply(vlm.model, method, **NEUTRAL[method]):
        assert torch.equal(forward_logits(vlm.model, inputs), baseline)
    # VAR's defaults find no sink in a random model (its logits then differed only by rounding): the settings
    # under which the official-code test below sees it edit every family
    editing = {"tau": TAU, "sink_dims": sink_dims(vlm), "layers": [2, 3], "rho": 0.1} if method == "var" else {}
    handle = intervene.apply(vlm.model, method, **editing)
    config = vlm.model.config
    assert implementation(config.get_text_config()) == "intervene"
    assert implementation(config.vision_config) == "sdpa"  # the vision tower keeps its backend
    assert not torch.allclose(forward_logits(vlm.model, inputs), baseline, atol=1e-4)  # an edit, not rounding
    handle.remove()
    assert implementation(config.get_text_config()) == "sdpa"
    assert torch.equal(forward_logits(vlm.model, inputs), baseline)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_gemma3_edits_see_its_own_mask_with_the_image_block_both_ways(backend):
    # Gemma-3 builds its masks from token_type_ids: image tokens see each other both ways (within the sliding
    # windows), the rest is causal. Our mask function hands the model's builder the same arguments, so every layer
    # gets the very mask it gets unwrapped, and the edited attention computes with it.
    vlm = TinyVLM("gemma3")
    vlm.model.set_attn_implementation({"text_config": backend})
    inputs = vlm.inputs(prompts(vlm))
    masks = {}
    for index, layer in enumerate(vlm.model.get_decoder().layers):
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: masks.update({index: kwargs["attention_mask"]}), with_kwargs=True
        )
    forward_logits(vlm.model, inputs)
    plain = dict(masks)
    with intervene.apply(vlm.model, "pai", layers="all"), intervene.record_attention(vlm.model) as recorded:
        forward_logits(vlm.model, inputs)
    image = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()  # the first sample has no padding
    first, last = int(image[0]), int(image[-1])
    kinds = vlm.model.config.get_text_config().layer_types
    for layer, mask in plain.items():
        assert torch.equal(masks[layer], mask)
        visible = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # [N, N]
        assert visible[first, last] and not visible[first - 1, first]  # the image block both ways, text causal
        assert visible[-1, 0] == (kinds[layer] == "full_attention")  # 15 tokens: past a sliding window of 6
        assert (recorded[layer][0, :, first, last] > 0).all() and (recorded[layer][0, :, first - 1, first] == 0).all()


def check_against_official(vlm: TinyVLM, official_run, ours_run):
    """Each sample alone under the official transcription equals it inside our padded batch, step by step."""
    batch = prompts(vlm)
    tokens, logits = ours_run(vlm.inputs(batch))
    _, baseline_logits = generate(vlm.model, vlm.inputs(batch))
    assert not torch.allclose(logits, baseline_logits, atol=1e-4)  # the method did something
    for row, sample in enumerate(batch):
        expected_tokens, expected_logits = official_run(vlm.inputs([sample], image_seeds=[row]))
        torch.testing.assert_close(logits[row], expected_logits[0], atol=2e-5, rtol=1e-5)
        assert torch.equal(tokens[row], expected_tokens[0])


def test_pai_equals_the_official_logit_transform(vlm_family):
    vlm = TinyVLM(vlm_family)
    alpha, layers = 0.5, (2, 3)
    oracles.OfficialPAI(vlm.model, f"official_pai_{vlm_family}", IMAGE_TOKEN, alpha, layers)

    def ours(inputs):
        with intervene.apply(vlm.model, "pai", alpha=alpha) as handle:
            assert handle.config.layers == layers  # auto: 2..L-1
            return generate(vlm.model, inputs)

    def official(inputs):
        return with_implementation(vlm.model, f"official_pai_{vlm_family}", lambda: generate(vlm.model, inputs))

    check_against_official(vlm, official, ours)


@pytest.mark.parametrize("first_token", [False, True])
def test_pai_contrast_equals_the_official_logits_refine(vlm_family, first_token):
    # The contrast on top of the amplification: each step's distribution is the official processor's on the
    # amplified logits and those of the prompt without its image (a twin model with its own cache); with
    # `official_first_token` the prompt runs unamplified, as it does officially with the contrast on.
    vlm = TinyVLM(vlm_family)
    alpha, gamma, layers = 0.5, 1.7, (2, 3)
    name = f"official_pai_{vlm_family}_{first_token}"
    oracles.OfficialPAI(vlm.model, name, IMAGE_TOKEN, alpha, layers, amplify_prompt=not first_token)
    twin = TinyVLM(vlm_family).model  # the same weights

    def ours(inputs):
        with intervene.apply(vlm.model, "pai", alpha=alpha, cfg_gamma=gamma, official_first_token=first_token):
            return generate(vlm.model, inputs)

    def official(inputs):
        refine = oracles.OfficialCFG(twin, inputs["input_ids"], IMAGE_TOKEN, gamma=gamma)
        return with_implementation(vlm.model, name, lambda: generate(vlm.model, inputs, processor=refine))

    check_against_official(vlm, official, ours)


def test_pai_contrast_samples_as_the_official_logits_refine():
    # Seeded sampling draws the same tokens from the same distributions (batch 1: a batch draws all rows at once).
    vlm = TinyVLM("llava")
    alpha, gamma = 0.5, 1.1
    oracles.OfficialPAI(vlm.model, "official_pai_sampled", IMAGE_TOKEN, alpha, (2, 3))
    twin = TinyVLM("llava").model
    for row, sample in enumerate(prompts(vlm)):
        inputs = vlm.inputs([sample], image_seeds=[row])
        with intervene.apply(vlm.model, "pai", alpha=alpha, cfg_gamma=gamma):
            tokens, logits = generate(vlm.model, inputs, sample_seed=row)
        refine = oracles.OfficialCFG(twin, inputs["input_ids"], IMAGE_TOKEN, gamma=gamma)
        official = functools.partial(generate, vlm.model, inputs, processor=refine, sample_seed=row)
        expected_tokens, expected = with_implementation(vlm.model, "official_pai_sampled", official)
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
        assert torch.equal(tokens, expected_tokens)


def test_pai_contrast_with_gamma_one_runs_nothing_and_keeps_the_model_bit_for_bit():
    vlm = TinyVLM("llava")
    inputs = vlm.inputs(prompts(vlm))
    baseline = generate(vlm.model, inputs)
    with intervene.apply(vlm.model, "pai", alpha=0.0, cfg_gamma=1.0) as handle:
        assert torch.equal(generate(vlm.model, inputs)[1], baseline[1])
        assert handle.state.cache is None  # no branch ran
    with intervene.apply(vlm.model, "pai", alpha=0.0, cfg_gamma=1.5):
        assert not torch.allclose(generate(vlm.model, inputs)[1], baseline[1], atol=1e-4)


def test_a_contrast_refuses_a_model_whose_logits_are_not_its_head_of_its_hidden_states():
    # The no-image branch's logits are the output embeddings of its hidden states; a model that makes its logits
    # otherwise (here a hook scaling them, as Cohere's logit_scale would) would be contrasted with something else.
    vlm = TinyVLM("llava")
    vlm.model.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * 2))
    with intervene.apply(vlm.model, "pai", cfg_gamma=1.5), pytest.raises(intervene.UnsupportedModelError) as error:
        generate(vlm.model, vlm.inputs(prompts(vlm)))
    assert "makes its logits otherwise than its output embeddings" in str(error.value)


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.1), (0.5, 0.3)])
def test_vcd_equals_the_official_contrastive_step(vlm_family, alpha, beta):
    # Each sample's distorted image is the official diffusion noising of its own pixels with the noise our batch
    # drew for it; the official step then runs on a twin of the model with its own cache.
    vlm = TinyVLM(vlm_family)
    twin = TinyVLM(vlm_family).model
    batch = prompts(vlm)
    pixels = vlm.inputs(batch)["pixel_values"]
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(7)).reshape(len(batch), -1)

    def ours(inputs):
        with intervene.apply(vlm.model, "vcd", alpha=alpha, beta=beta, noise_step=300, seed=7):
            return generate(vlm.model, inputs)

    def official(inputs):
        image = inputs["pixel_values"]
        rows = pixels.reshape(len(batch), -1)
        row = next(b for b in range(len(batch)) if torch.equal(rows[b], image.flatten()))
        distorted = oracles.official_vcd_distortion(image, 300, noise[row].reshape(image.shape))
        step = oracles.OfficialVCD(twin, {**inputs, "pixel_values": distorted}, alpha=alpha, beta=beta)
        return generate(vlm.model, inputs, processor=step)

    check_against_official(vlm, official, ours)


def test_vcd_samples_as_the_official_sampler():
    # The official code contrasts while sampling: seeded, it draws the same tokens from the same distributions.
    vlm = TinyVLM("qwen2_vl")
    twin = TinyVLM("qwen2_vl").model
    for row, sample in enumerate(prompts(vlm)):
        inputs = vlm.inputs([sample], image_seeds=[row])
        with intervene.apply(vlm.model, "vcd", seed=row):
            tokens, logits = generate(vlm.model, inputs, sample_seed=row)
        image = inputs["pixel_values"]
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(row))
        distorted = oracles.official_vcd_distortion(image, 500, noise)
        step = oracles.OfficialVCD(twin, {**inputs, "pixel_values": distorted}, alpha=1.0, beta=0.1)
        expected_tokens, expected = generate(vlm.model, inputs, processor=step, sample_seed=row)
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
        assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_causalmm_equals_the_official_counterfactual_step(family):
    # The branch runs the prompt with every language-model layer's attention reversed and renormalised (the
    # official "reverse_and_normalize"), on a twin of the model with its own cache; the step is the official one.
    vlm = TinyVLM(family)
    twin = TinyVLM(family).model
    name = f"official_causalmm_{family}"
    oracles.OfficialCausalMMAttention(twin, name, IMAGE_TOKEN)
    twin.set_attn_implementation({"text_config": name})

    def ours(inputs):
        with intervene.apply(vlm.model, "causalmm", counterfactual="reverse", gamma=0.7, epsilon=0.05):
            return generate(vlm.model, inputs)

    def official(inputs):
        return generate(vlm.model, inputs, processor=oracles.OfficialCausalMM(twin, inputs, alpha=0.7, beta=0.05))

    check_against_official(vlm, official, ours)


@pytest.mark.parametrize("where", ["llm", "vision"])
def test_causalmm_samples_as_the_official_sampler(where):
    # The official code contrasts while sampling (causalmm_sm.py): seeded, it draws the same tokens from the same
    # distributions, batch 1, with the counterfactual in the language model or in the vision tower.
    vlm = TinyVLM("llava")
    twin = TinyVLM("llava").model
    if where == "llm":
        oracles.OfficialCausalMMAttention(twin, "official_causalmm_sampled", IMAGE_TOKEN)
        twin.set_attn_implementation({"text_config": "official_causalmm_sampled"})
    else:
        twin.set_attn_implementation({"vision_config": "eager"})
    for row, sample in enumerate(prompts(vlm)):
        inputs = vlm.inputs([sample], image_seeds=[row])
        with intervene.apply(vlm.model, "causalmm", where=where, counterfactual="reverse", epsilon=0.01):
            tokens, logits = generate(vlm.model, inputs, sample_seed=row)
        branch = inputs
        if where == "vision":
            branch = oracles.official_causalmm_vision(twin, inputs, IMAGE_TOKEN, "reverse", torch.Generator())
        step = oracles.OfficialCausalMM(twin, branch, alpha=1.0, beta=0.01)
        expected_tokens, expected = generate(vlm.model, inputs, processor=step, sample_seed=row)
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
        assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(
    "where, counterfactual", [("vision", "uniform"), ("vision", "reverse"), ("vision", "shuffle"), ("both", "reverse")]
)
def test_causalmm_vision_equals_the_official_counterfactual_features(where, counterfactual):
    # The branch's image features are cf_encoder.py's, from a twin whose vision tower returns its attention maps;
    # with where="both" the twin's language model also runs the official reversed attention.
    vlm = TinyVLM("llava")
    twin = TinyVLM("llava").model
    twin.set_attn_implementation({"vision_config": "eager"})
    if where == "both":
        oracles.OfficialCausalMMAttention(twin, "official_causalmm_both", IMAGE_TOKEN)
        twin.set_attn_implementation({"text_config": "official_causalmm_both"})
    params = {"where": where, "counterfactual": counterfactual, "gamma": 0.7, "epsilon": 0.05, "seed": 3}

    def ours(inputs):
        with intervene.apply(vlm.model, "causalmm", **params):
            return generate(vlm.model, inputs)

    def official(inputs):
        generator = torch.Generator().manual_seed(3)
        counterfactual_inputs = oracles.official_causalmm_vision(twin, inputs, IMAGE_TOKEN, counterfactual, generator)
        step = oracles.OfficialCausalMM(twin, counterfactual_inputs, alpha=0.7, beta=0.05)
        return generate(vlm.model, inputs, processor=step)

    check_against_official(vlm, official, ours)


def test_causalmm_vision_random_maps_are_the_official_draws():
    # Random maps are drawn for the whole batch at once: one image at a time, the same generator draws the same map.
    vlm = TinyVLM("llava")
    twin = TinyVLM("llava").model
    twin.set_attn_implementation({"vision_config": "eager"})
    for row, sample in enumerate(prompts(vlm)):
        inputs = vlm.inputs([sample], image_seeds=[row])
        with intervene.apply(vlm.model, "causalmm", where="vision", counterfactual="random", seed=row):
            tokens, logits = generate(vlm.model, inputs)
        generator = torch.Generator().manual_seed(row)
        counterfactual_inputs = oracles.official_causalmm_vision(twin, inputs, IMAGE_TOKEN, "random", generator)
        step = oracles.OfficialCausalMM(twin, counterfactual_inputs, alpha=1.0, beta=0.6)
        expected_tokens, expected = generate(vlm.model, inputs, processor=step)
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
        assert torch.equal(tokens, expected_tokens)


def test_causalmm_vision_maps_are_their_definitions():
    attention = torch.rand(2, 3, 5, 5).softmax(dim=-1)  # [B, H, n, n]

    def generator():
        return torch.Generator().manual_seed(0)

    uniform = edited_map(attention, "uniform", generator())
    assert torch.allclose(uniform, torch.full_like(attention, 1 / 5))  # rows sum to 1: the mean is 1 / n
    reverse = edited_map(attention, "reverse", generator())
    assert torch.equal(reverse + attention, attention.amax(dim=(2, 3), keepdim=True).expand_as(attention))
    random = edited_map(attention, "random", generator())
    assert random.shape == attention.shape and random.min() >= 0 and random.max() < 2
    shuffle = edited_map(attention, "shuffle", generator()).flatten(2)  # [B, H, n²]
    assert torch.equal(shuffle.sort(dim=-1).values, attention.flatten(2).sort(dim=-1).values)  # a permutation
    order = (shuffle[..., None] == attention.flatten(2)[..., None, :]).float().argmax(dim=-1)  # where each came from
    assert torch.equal(order[0], order[1])  # the same for every image
    assert not torch.equal(order[0, 0], order[0, 1])  # and its own for each head


def test_causalmm_vision_refuses_an_attention_it_cannot_read():
    # The map is made from the layer's projections and checked against what the layer returned: a layer that
    # computes otherwise (here a hook doubling its output) is refused rather than misread.
    vlm = TinyVLM("llava")
    layer = vlm.model.model.vision_tower.encoder.layers[-1].self_attn  # vision_feature_layer=-1
    layer.register_forward_hook(lambda module, args, output: (output[0] * 2, *output[1:]))
    refused = pytest.raises(intervene.UnsupportedModelError, match="CLIPAttention computes its attention otherwise")
    with intervene.apply(vlm.model, "causalmm", where="vision"), refused:
        generate(vlm.model, vlm.inputs(prompts(vlm)))


def test_causalmm_vision_on_llava_onevision_is_each_sample_run_alone():
    # Any-resolution tiles, SigLIP without a CLS token ("full" features): each tile's map weights its own features,
    # and each sample of a padded batch is what it is alone.
    vlm = TinyVLM("llava_onevision")

    def run(inputs):
        with intervene.apply(vlm.model, "causalmm", where="vision", counterfactual="reverse", epsilon=1e-4):
            return generate(vlm.model, inputs)

    check_against_official(vlm, run, run)


@pytest.mark.parametrize(
    "method, params",
    [
        ("pai", {"alpha": 0.5, "cfg_gamma": 1.5, "cfg_cutoff": 1e-4}),
        ("vcd", {"beta": 1e-4}),
        ("causalmm", {"counterfactual": "reverse", "epsilon": 1e-4}),
        ("causalmm", {"counterfactual": "shuffle", "where": "vision", "epsilon": 1e-4}),
    ],
)
def test_contrast_beam_search_scores_each_beam_as_its_own_run(method, params):
    # The branch follows the beams' reorders: each returned beam's step scores are what the contrast gives that
    # very sequence decoded alone.
    vlm = TinyVLM("llava")
    inputs = vlm.inputs([prompts(vlm)[0]])
    with intervene.apply(vlm.model, method, **params):
        check_beams(vlm, inputs)


@pytest.mark.parametrize("p_move, rho", [(0.4, 0.1), (1.0, 0.2)])  # two gates; each edits every family
def test_var_equals_the_official_redistribution(vlm_family, p_move, rho):
    vlm = TinyVLM(vlm_family)
    dims = sink_dims(vlm)
    name = f"official_var_{vlm_family}_{p_move}_{rho}"
    oracles.OfficialVAR(
        vlm.model, name, IMAGE_TOKEN, dims=dims, tau=TAU, rho_code=1 - rho, summ=0.2, p_keep=1 - p_move, layers=(2, 3)
    )

    def ours(inputs):
        with intervene.apply(vlm.model, "var", p_move=p_move, rho=rho, tau=TAU, sink_dims=dims, layers=[2, 3]):
            return generate(vlm.model, inputs)

    def official(inputs):
        return with_implementation(vlm.model, name, lambda: generate(vlm.model, inputs))

    check_against_official(vlm, official, ours)


def test_vhr_equals_the_described_lockstep_reinforcement(vlm_family):
    vlm = TinyVLM(vlm_family)
    layers = (1, 2, 3)

    def ours(inputs):
        with intervene.apply(vlm.model, "vhr", alpha=2.0) as handle:
            assert handle.config.layers == layers  # auto: layer 1 and the last 14/32 of 4 layers
            return generate(vlm.model, inputs)

    def official(inputs):
        reference = TinyVLM(vlm_family)  # the same weights, with the official hooks
        oracles.DescribedVHR(reference.model, IMAGE_TOKEN, alpha=2.0, layers=layers)
        return generate(reference.model, inputs)

    check_against_official(vlm, official, ours)


def test_vhr_beam_search_scores_each_beam_as_its_own_greedy_run():
    # Beam search reorders the cache's rows between steps; the no-image branch must follow, or a beam is
    # compared with another beam's history. Each returned beam's step scores must be what VHR gives when
    # that very sequence is decoded alone.
    vlm = TinyVLM("llava")
    inputs = vlm.inputs([prompts(vlm)[0]])
    with intervene.apply(vlm.model, "vhr", alpha=2.0):
        check_beams(vlm, inputs)


def check_beams(vlm: TinyVLM, inputs: dict, beams: int = 3):
    """Each beam search result's step scores equal the model (as intervened) run on that sequence alone."""
    with torch.no_grad():
        out = vlm.model.generate(
            **inputs, max_new_tokens=STEPS + 2, min_new_tokens=STEPS + 2, num_beams=beams,
            num_return_sequences=beams, do_sample=False, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        steps = vlm.model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)  # [beams, T]
        for beam, sequence in enumerate(out.sequences[:, inputs["input_ids"].shape[1] :]):
            tokens = iter(sequence.tolist())
            alone = vlm.model.generate(
                **inputs, max_new_tokens=len(sequence), min_new_tokens=len(sequence), do_sample=False,
                output_logits=True, return_dict_in_generate=True,
                logits_processor=LogitsProcessorList([lambda ids, scores, tokens=tokens: force(scores, next(tokens))]),
            )  # fmt: skip
            log_probs = torch.stack(alone.logits, dim=1)[0].log_softmax(-1)  # [T, V]
            torch.testing.assert_close(steps[beam], log_probs.gather(1, sequence[:, None])[:, 0])


def test_var_prefill_and_cached_decode_equal_one_full_forward(vlm_family):
    # Sinks are fixed at prefill and generated tokens are never sinks. When a forward over prompt + generated
    # tokens finds no sink among them either, it edits the same rows with the same sinks as the cached steps.
    vlm = TinyVLM(vlm_family)
    dims = sink_dims(vlm)
    batch = prompts(vlm)
    with intervene.apply(vlm.model, "var", tau=1.5, sink_dims=dims, layers="all") as handle:
        for token in range(3, IMAGE_TOKEN):  # continuations made of one text token that is not a sink here
            _, logits = generate(vlm.model, vlm.inputs(batch), forced=token)
            full_logits = forward_logits(vlm.model, vlm.inputs([p + [token] * (STEPS - 1) for p in batch]))
            if not any(sinks[:, -(STEPS - 1) :].any() for sinks in handle.state.sinks.values()):
                break
        else:
            pytest.fail("every continuation token became a sink")
    torch.testing.assert_close(full_logits[:, -STEPS:], logits, atol=2e-5, rtol=1e-5)
    _, baseline = generate(vlm.model, vlm.inputs(batch), forced=token)
    assert not torch.allclose(logits, baseline, atol=1e-4)  # image sinks were found and redistributed


def test_var_sinks_of_a_prompt_chunk_after_decoding_land_at_its_positions():
    # A follow-up turn on the same cache: the sinks found in it sit after the generated tokens (never sinks),
    # where one forward over the whole sequence finds them.
    vlm = TinyVLM("llava")
    first, generated, follow_up = prompts(vlm)[0], [5, 6], prompt(4, 9)
    with intervene.apply(vlm.model, "var", tau=TAU, sink_dims=sink_dims(vlm), layers="all") as handle:
        with torch.no_grad():
            cache = cache_kwarg(vlm.model, vlm.model(**vlm.inputs([first]), use_cache=True))
            for token in generated:
                vlm.model(input_ids=torch.tensor([[token]]), **cache, use_cache=True)
            vlm.model(input_ids=torch.tensor([follow_up]), **cache, use_cache=True)
            cached = dict(handle.state.sinks)
            forward_logits(vlm.model, vlm.inputs([first + generated + follow_up]))
        whole = dict(handle.state.sinks)
    start, end = len(first), len(first) + len(generated)
    assert any(sinks[:, end:].any() for sinks in cached.values())  # the follow-up has sinks to place
    for layer, sinks in cached.items():
        assert sinks.shape == whole[layer].shape == (1, end + len(follow_up))
        assert not sinks[:, start:end].any()
        assert torch.equal(sinks[:, :start], whole[layer][:, :start])
        assert torch.equal(sinks[:, end:], whole[layer][:, end:])


def test_vlm_methods_refuse_text_models_and_unsupported_vlms():
    for method in ("var", "pai", "vhr"):
        with pytest.raises(ValueError, match=f"{method} acts on image tokens.*text-only model"):
            intervene.apply(build("llama"), method)
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    paligemma = PaliGemmaForConditionalGeneration(
        PaliGemmaConfig(
            text_config=GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16),
            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8),
            image_token_id=90,
        )
    )  # fmt: skip
    with pytest.raises(intervene.UnsupportedModelError, match=r"paligemma.*supported families: llava"):
        intervene.apply(paligemma, "pai")
    qwen2_vl = TinyVLM("qwen2_vl").model
    with pytest.raises(ValueError, match=r"where='vision' reweights .* Qwen2VLForConditionalGeneration is not one"):
        intervene.apply(qwen2_vl, "causalmm", where="vision")


def test_sink_dims_are_discovered_where_massive_activations_live():
    vlm = TinyVLM("llava")
    with torch.no_grad():  # a massive activation on channels 7 and 40 of every token embedding
        vlm.model.get_input_embeddings().weight[:, [7, 40]] = 60.0
    assert discover_sink_dims(vlm.model, **vlm.inputs(prompts(vlm))) == [7, 40]


def test_var_auto_sink_dims_take_the_published_ones_for_llava_1_5():
    from intervene.interventions import ModelSpec, method_class

    var = method_class("var")()
    spec = ModelSpec(num_layers=32, num_heads=32, num_kv_heads=32, image_token_id=32000)
    assert var.resolve(replace(spec, name_or_path="llava-hf/llava-1.5-7b-hf")).sink_dims == [1415, 2533]
    assert var.resolve(replace(spec, name_or_path="liuhaotian/llava-v1.5-13b")).sink_dims == [2100, 4743]
    assert var.resolve(replace(spec, name_or_path="my/other-vlm")).sink_dims == "auto"
    assert var.resolve(spec).layers == tuple(range(2, 31))


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("var", {"p_move": 1.5}, r"var: p_move=1.5 is out of range; it must lie in \[0.0, 1.0\]"),
        ("var", {"sink_dims": [-1]}, r"var: sink_dims must be 'auto' or a non-empty list.*discover_sink_dims"),
        ("var", {"layers": [9]}, r"var: layer 9 is out of range; this model has layers 0..3"),
        ("pai", {"alpha": -0.1}, r"pai: alpha=-0.1 is out of range"),
        ("vhr", {"filter": "yes"}, r"vhr: filter must be true or false, got 'yes'"),
    ],
)
def test_bad_parameters_name_the_value_and_the_range(method, params, message):
    with pytest.raises(ValueError, match=message):
        intervene.apply(TinyVLM("llava").model, method, **params)


def test_image_positions_must_come_from_input_ids():
    vlm = TinyVLM("llava")
    inputs = vlm.inputs(prompts(vlm))
    embeds = vlm.model.get_input_embeddings()(inputs.pop("input_ids").clamp_max(IMAGE_TOKEN - 1))
    with intervene.apply(vlm.model, "pai"), pytest.raises(ValueError, match="call the VLM itself with `input_ids`"):
        vlm.model.get_decoder()(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])

"""Independent implementations the tests compare against.

They work the way the papers' official code does: on explicit fp32 probability matrices, one batch
element at a time, with the padding cut off first. They share nothing with intervene's kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from intervene.hooks.compat import cache_argument, implementation, output_cache


def explicit_probabilities(q, k, scale, mask=None):
    """[H, N, Nk] softmax of one unpadded element (q [H, N, D], k [Hkv, Nk, D]), bottom-right causal."""
    k = k.float().repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = q.float() @ k.transpose(-1, -2) * scale
    n, nk = logits.shape[-2:]
    if mask is None:
        mask = torch.ones(n, nk, dtype=torch.bool).tril(diagonal=nk - n)
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def official_act(A, beta, threshold):
    """GATECH-EIC/ACT `atten_process_eval` transcribed step by step on one element's [H, N, N] probabilities."""
    A = A.clone()
    n = A.shape[-1]
    for h in range(A.shape[0]):
        a = A[h]
        column_mean = a.sum(dim=0) / torch.arange(n, 0, -1, dtype=a.dtype)  # queries that can see key j
        indices = torch.nonzero(column_mean > threshold).flatten()[1:]  # drop the first sink found
        if len(indices) == 0:
            continue
        copied = a.clone()
        copied[1:, indices] = 0
        avail = (1 - beta) * a[:, indices].sum(dim=-1)
        a[:, indices] = a[:, indices] * beta
        ratios = copied / copied.sum(dim=-1, keepdim=True)
        a = a + avail[:, None] * ratios
        a[0, 0] = 1.0
        A[h] = a
    return A


def zerotuning(A, gamma, heads):
    """Multiply the first key's probability by gamma in `heads`, then renormalise each row."""
    A = A.clone()
    A[heads, :, 0] *= gamma
    return A / A.sum(dim=-1, keepdim=True)


def register_oracle(name: str, transform):
    """Register an attention implementation that applies `transform(A [H, N, N], layer)` to each batch
    element's explicit probabilities, after cutting off its left padding. Prefill only (no cache)."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        batch, heads, n, _ = query.shape
        out = torch.zeros(batch, n, heads, value.shape[-1], dtype=query.dtype)
        for b in range(batch):
            valid = torch.ones(n, dtype=torch.bool) if attention_mask is None else attention_mask[b, 0].any(dim=0)
            rows = valid.nonzero().flatten()
            window = None
            if attention_mask is not None:
                window = attention_mask[b, 0][rows][:, rows]  # sliding windows and causality, unpadded
            A = explicit_probabilities(query[b][:, rows], key[b][:, rows], scaling, window)
            A = transform(A, module.layer_idx)
            v = value[b][:, rows].float().repeat_interleave(heads // value.shape[1], dim=0)
            out[b, rows] = (A @ v).transpose(0, 1).to(query.dtype)
        return out, None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


class OfficialVLM:
    """A VLM attention implementation in the official codes' setting: batch 1, no padding, explicit
    fp32 logits and probabilities, with a KV cache; subclasses transcribe one method's rule on them.
    Image positions come from the prompt's `input_ids` (a pre-hook on the model). The official codes run
    causal LLaVA; here the logits are masked as the model masks them (Gemma-3: its image tokens see each
    other, sliding windows), and a sliding-window layer's keys are the latest ones only (`held`)."""

    def __init__(self, model, name: str, image_token: int):
        self.model, self.name, self.image_token = model, name, image_token
        self.image: list[int] = []  # positions of the prompt's image tokens
        self.length = 0  # tokens of the sequence so far, the current call's included
        self.first_key = 0  # position of the current call's first key
        AttentionInterface.register(name, self._attention)
        AttentionMaskInterface.register(name, sdpa_mask)
        model.register_forward_pre_hook(self._read_prompt, with_kwargs=True)

    @property
    def active(self) -> bool:
        return implementation(self.model.config.get_text_config()) == self.name

    def _read_prompt(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None:  # a prompt given as embeddings: its image positions are unknown
            ids = torch.full(kwargs["inputs_embeds"].shape[:2], -1)
        if self.active:
            assert ids.shape[0] == 1, "the official codes run batch 1"
            if ids.shape[1] > 1:  # a prompt
                self.image = (ids[0] == self.image_token).nonzero().flatten().tolist()
                self.length = 0
            self.length += ids.shape[1]

    def held(self, positions: list[int]) -> list[int]:
        """The key indices, in the current call, of the tokens at `positions` its keys still hold."""
        return [p - self.first_key for p in positions if p >= self.first_key]

    def logits(self, z, layer: int, past: int):
        return z

    def probabilities(self, A, layer: int, past: int):
        return A

    def _attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        heads, n, nk = query.shape[1], query.shape[2], key.shape[2]
        self.first_key, past = self.length - nk, self.length - n
        k = key[0].float().repeat_interleave(heads // key.shape[1], dim=0)
        z = query[0].float() @ k.transpose(-1, -2) * scaling  # [H, Nq, Nk]
        z = self.logits(z, module.layer_idx, past)
        visible = torch.ones(n, nk, dtype=torch.bool).tril(diagonal=nk - n)
        if attention_mask is not None:  # the model's own (Gemma-3: image tokens see each other, sliding windows)
            visible = attention_mask[0, 0]
        z = z.masked_fill(~visible, float("-inf"))
        A = self.probabilities(z.softmax(dim=-1), module.layer_idx, past)
        v = value[0].float().repeat_interleave(heads // value.shape[1], dim=0)
        return (A @ v).transpose(0, 1)[None].to(query.dtype), None


class OfficialPAI(OfficialVLM):
    """LALBJ/PAI `attention.py`: in layers [start, end), the last row's image logits become |z|*alpha + z. With
    `amplify_prompt=False`, the prompt runs unamplified, as it does when the official contrast is on (PAI#15)."""

    def __init__(self, model, name, image_token, alpha, layers, amplify_prompt=True):
        super().__init__(model, name, image_token)
        self.alpha, self.layers, self.amplify_prompt = alpha, layers, amplify_prompt

    def logits(self, z, layer, past):
        if past == 0 and not self.amplify_prompt:
            return z
        if layer in self.layers and (image := self.held(self.image)):
            start, end = image[0], image[-1] + 1
            z = z.clone()
            z[:, -1, start:end] = z[:, -1, start:end].abs() * self.alpha + z[:, -1, start:end]
        return z


class OfficialVAR(OfficialVLM):
    """seilk/VisAttnSink: `DimProspector` finds sinks from each layer's input at prefill; `HeadFork` picks
    rows whose image mass is >= summ with a sink portion <= rho (code convention); `attn_redist` keeps
    p of the sink mass and hands the rest to the non-sink image tokens in proportion."""

    def __init__(self, model, name, image_token, *, dims, tau, rho_code, summ, p_keep, layers):
        super().__init__(model, name, image_token)
        self.dims, self.tau, self.rho_code, self.summ = dims, tau, rho_code, summ
        self.p_keep, self.layers = p_keep, layers
        self.sinks: dict[int, list[int]] = {}
        for index, layer in enumerate(model.get_decoder().layers):
            layer.register_forward_pre_hook(self._prospect(index), with_kwargs=True)

    def _prospect(self, index):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"])[0].float()  # [N, hidden]
            if self.active and x.shape[0] > 1 and index >= 2:
                rms = torch.sqrt(x.pow(2).mean(dim=-1) + 1e-6)
                phi = x[:, self.dims].abs().max(dim=-1).values / rms
                self.sinks[index] = (phi > self.tau).nonzero().flatten().tolist()

        return hook

    def probabilities(self, A, layer, past):
        sinks = self.sinks.get(layer, [])
        image_sinks = [j for j in sinks if j in self.image]
        if layer not in self.layers or not image_sinks:
            return A
        others = [j for j in self.image if j not in image_sinks]
        sinks, image_sinks, others, image = (self.held(p) for p in (sinks, image_sinks, others, self.image))
        A = A.clone()
        for h in range(A.shape[0]):
            for i in range(A.shape[1]):
                if past + i <= self.image[-1]:
                    continue  # rows before and inside the image are untouched
                a = A[h, i]
                if a[image_sinks].sum() == 0 or a[others].sum() == 0:
                    continue  # its sliding window holds no image sink to move from, or no image token to move to
                image_mass = a[image].sum()
                if not (a[image_sinks].sum() / image_mass <= self.rho_code and image_mass >= self.summ):
                    continue
                new = a.clone()
                new[sinks] = a[sinks] * self.p_keep
                budget = (1 - self.p_keep) * a[sinks].sum()
                new[others] = a[others] + budget * a[others] / a[others].sum()
                A[h, i] = new
        return A


class DescribedVHR:
    """VHR as we read the paper (its official code was not available, so this is not a transcription of it, and
    it shares `interventions/vhr.py`'s reading: it checks batching, caching and lockstep, not the reading): the
    prompt without its image runs in lockstep with its own cache; at each reinforced layer the heads' outputs
    (the o_proj input) with and without the image give each head's divergence for the latest token; heads above
    the layer's mean + std are dropped, those above the median of the rest are scaled by alpha. Batch 1."""

    def __init__(self, model, image_token, *, alpha, layers):
        from transformers import DynamicCache

        self.model, self.image_token, self.alpha, self.layers = model, image_token, alpha, layers
        self.cache_class, self.no_image, self.capturing = DynamicCache, {}, False
        model.register_forward_pre_hook(self._step, with_kwargs=True)
        for index, layer in enumerate(model.get_decoder().layers):
            layer.self_attn.o_proj.register_forward_pre_hook(self._heads(index))

    def _step(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            self.cache = self.cache_class()
            ids = ids[:, ids[0] != self.image_token]
        self.capturing = True
        try:
            decoder = self.model.get_decoder()
            decoder(input_ids=ids, **{cache_argument(decoder.forward): self.cache}, use_cache=True)
        finally:
            self.capturing = False

    def _heads(self, index):
        def hook(module, args):
            x = args[0]  # [1, T, H * D]
            heads = x.view(*x.shape[:2], -1, self.head_dim)  # [1, T, H, D]
            if self.capturing:
                self.no_image[index] = heads[0, -1].float()
                return None
            if index not in self.layers:
                return None
            vhd = (heads[0, -1].float() - self.no_image[index]).norm(dim=-1)  # [H]
            kept = vhd[vhd <= vhd.mean() + vhd.std()]
            chosen = (vhd <= vhd.mean() + vhd.std()) & (vhd > kept.median())
            scale = torch.ones(heads.shape[1:3])
            scale[-1] = torch.where(chosen, self.alpha, 1.0)
            return ((heads * scale[None, :, :, None].to(x.dtype)).reshape(x.shape),)

        return hook

    @property
    def head_dim(self):
        config = self.model.config.get_text_config()
        return config.hidden_size // config.num_attention_heads


class OfficialCFG:
    """LALBJ/PAI `CFG.py`, the "logits refine" logits processor, batch 1: the prompt without its image tokens runs
    on `model` (a twin of the generating one, unamplified) with its own cache, one step per call; the scores
    become `gamma * (log p - log p_uncond) + log p_uncond`, -inf where `log p < log(cutoff) + max log p`."""

    def __init__(self, model, prompt_ids, image_token, *, gamma, cutoff=0.1):
        self.model, self.gamma, self.cutoff = model, gamma, cutoff
        self.ids = prompt_ids[:, prompt_ids[0] != image_token]
        self.out = None

    def __call__(self, input_ids, scores):
        scores = torch.log_softmax(scores, dim=-1)
        if self.out is None:
            self.out = self.model(input_ids=self.ids, use_cache=True)
        else:
            cache = {cache_argument(self.model.forward): output_cache(self.out)}
            self.out = self.model(input_ids=input_ids[:, -1:], **cache, use_cache=True)
        unconditional = torch.log_softmax(self.out.logits[0][-1:], dim=-1)
        cutoff = torch.log(torch.tensor(self.cutoff)) + scores.max(dim=-1, keepdim=True).values
        out = self.gamma * (scores - unconditional) + unconditional
        return out.masked_fill(scores < cutoff, -float("inf"))


def official_vcd_distortion(image: torch.Tensor, noise_step: int, noise: torch.Tensor) -> torch.Tensor:
    """DAMO-NLP-SG/VCD `vcd_add_noise.py` with its Gaussian noise given: 1000 steps, betas a sigmoid over [-6, 6]
    scaled into [1e-5, 0.5e-2], `q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`."""
    betas = torch.linspace(-6, 6, 1000)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    alphas_prod = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(alphas_prod)[noise_step] * image + torch.sqrt(1 - alphas_prod)[noise_step] * noise


class OfficialVCD:
    """DAMO-NLP-SG/VCD `vcd_sample.py`'s step as a logits processor, batch 1: the model (a twin of the generating
    one) also runs on the prompt with the distorted image, with its own cache, one step per call; the logits become
    `(1 + alpha) * logits - alpha * logits_cd`, -inf where `logits < log(beta) + max logits`."""

    def __init__(self, model, inputs_cd: dict, *, alpha, beta):
        self.model, self.inputs, self.alpha, self.beta = model, inputs_cd, alpha, beta
        self.out = None

    def __call__(self, input_ids, scores):
        if self.out is None:
            self.out = self.model(**self.inputs, use_cache=True)
        else:
            cache = {cache_argument(self.model.forward): output_cache(self.out)}
            self.out = self.model(input_ids=input_ids[:, -1:], **cache, use_cache=True)
        next_token_logits_cd = self.out.logits[:, -1, :]
        cutoff = torch.log(torch.tensor(self.beta)) + scores.max(dim=-1, keepdim=True).values
        diffs = (1 + self.alpha) * scores - self.alpha * next_token_logits_cd
        return diffs.masked_fill(scores < cutoff, -float("inf"))


class OfficialCausalMMAttention(OfficialVLM):
    """The-Martyr/CausalMM's language-model counterfactual (its README's snippet, `reverse_and_normalize`), in every
    layer: post-softmax attention `A` becomes `(max_j A - A)` under a square causal mask, divided by its row sums,
    masked again. Batch 1, with a KV cache (a decode step's single row has nothing above the diagonal). One
    departure: a row with nothing to reverse (the first token sees only itself) keeps its attention, where the
    snippet divides 0 by 0 and every later state becomes NaN."""

    def probabilities(self, A, layer, past):
        seq_len = A.shape[-2]
        attention_mask = torch.triu(torch.ones(seq_len, seq_len), diagonal=1)
        reversed_attention = (A.max(dim=-1, keepdim=True)[0] - A) * (1 - attention_mask)
        total = reversed_attention.sum(dim=-1, keepdim=True)
        normalized = reversed_attention / total * (1 - attention_mask)
        return torch.where(total > 0, normalized, A)


OfficialCausalMM = OfficialVCD  # causalmm_sm.py's step is vcd_sample.py's, with gamma and epsilon for alpha and beta


def official_causalmm_vision(model, inputs: dict, image_token: int, method: str, generator: torch.Generator) -> dict:
    """The-Martyr/CausalMM `cf_encoder.py`'s counterfactual image features for a LLaVA (batch 1, its vision tower
    run with eager attention so that it returns its maps): the attention map of the select layer is edited
    (`edit_attention`, random numbers from `generator`), resized bilinearly to the patch grid, averaged over heads,
    and multiplies the patch features; the projector maps them to the image tokens' embeddings. Returns the model's
    inputs with those embeddings in place of the image (`llava_arch_cf.py`'s counterfactual embeddings)."""
    select = model.config.vision_feature_layer
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        image_features = out.hidden_states[select][:, 1:]
        attention_maps = out.attentions[select]
        batch_size, num_heads, height, width = attention_maps.shape
        if method == "random":
            edited = torch.rand(batch_size, num_heads, height, width, generator=generator) * 2
        elif method == "uniform":
            edited = torch.mean(attention_maps, dim=(2, 3), keepdim=True).expand(batch_size, num_heads, height, width)
        elif method == "reverse":  # the official "reversed"
            max_value_height, _ = torch.max(attention_maps, dim=2, keepdim=True)
            max_value, _ = torch.max(max_value_height, dim=3, keepdim=True)
            edited = max_value - attention_maps
        else:
            edited = attention_maps.clone()
            for i in range(num_heads):
                order = torch.randperm(height * width, generator=generator).expand(batch_size, -1)
                edited[:, i] = edited[:, i].view(batch_size, -1).gather(1, order).view(batch_size, height, width)
        side = int(math.sqrt(image_features.shape[1]))
        resized = F.interpolate(edited, size=(side, side), mode="bilinear", align_corners=False)
        averaged = torch.mean(resized, dim=1).view(batch_size, -1, 1).expand(-1, -1, image_features.shape[-1])
        weighted = model.model.multi_modal_projector(image_features * averaged)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds[inputs["input_ids"] == image_token] = weighted.reshape(-1, embeds.shape[-1])
    return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}

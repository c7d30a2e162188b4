r"""PaliGemma: a SigLIP image encoder, a linear projector and a Gemma decoder, read layer by layer.

PaliGemma (Beyer et al. 2024, sec. 3) turns an image into N "soft tokens" and lets a decoder-only
language model read them as a prefix:

    z = SigLIP(image)                                  (B, N, Dv)  ViT, no class token (Zhai et al. 2023)
    u = W z + b                                        (B, N, D)   linear projector to Gemma's width
    x = [u ; E[prompt] sqrt(D) ; E[answer] sqrt(D)]    (B, T, D)   image tokens first, then the text
    p(answer | image, prompt) = prod_t softmax(Gemma(x)_t E^T)     output layer tied to the embedding E

and trains with a prefix-LM mask: the image and the prompt (the "prefix") see each other in full,
the answer (the "suffix") is causal, and only answer tokens are scored. Drawn for 3 image tokens,
the prompt "<bos> cap \n" and the answer "a cat <eos>" (row = query, column = key, # = may attend):

               img  img  img  bos  cap  \n  |  a   cat  eos
        img     #    #    #    #    #    #  |  .    .    .
        img     #    #    #    #    #    #  |  .    .    .     prefix: full attention,
        img     #    #    #    #    #    #  |  .    .    .     so the image tokens also
        bos     #    #    #    #    #    #  |  .    .    .     read the prompt
        cap     #    #    #    #    #    #  |  .    .    .
        \n      #    #    #    #    #    #  |  .    .    .
        ---------------------------------------------------
        a       #    #    #    #    #    #  |  #    .    .     suffix: causal,
        cat     #    #    #    #    #    #  |  #    #    .     scored by the loss
        eos     #    #    #    #    #    #  |  #    #    #

The Gemma decoder (Gemma Team 2024, sec. 2) is a pre-norm transformer with RMSNorm(x) * (1 + w),
rotary position embeddings (Su et al. 2021) on 1-indexed positions, multi-query attention in the 3B
model (one key/value head for 8 query heads; Shazeer 2019) or grouped-query attention (Ainslie et
al. 2023), a GeGLU MLP down(gelu_tanh(gate x) * up x) (Shazeer 2020), inputs scaled by sqrt(D), and
an output layer tied to the input embedding. PaliGemma 2 (Steiner et al. 2024) swaps in Gemma 2,
which adds sandwich norms, local sliding-window layers and tanh soft-capping of attention scores and
of the final logits, logits <- c tanh(logits / c); both decoders are here and the config decides.
Why image tokens are divided by sqrt(D) on the way in: see PaliGemma.embed_inputs.

Conventions: text is left-padded for generation (positions come from the attention mask, so a padded
row gives the same numbers as the row alone); token_type_ids are 0 for the prefix, 1 for the suffix;
labels are -100 where no loss is taken. Shapes use the repo alphabet (README): B batch, T tokens
(queries), S keys (T, or past + T with the KV cache), N image tokens, D model width, Dv vision width,
H query heads, K key/value heads, d head width, V vocabulary, C channels, I image side, P patch side,
L layers, G dense-connector groups.

The dense connector (connector="dense"; Yao et al. 2024, "Dense Channel Integration") feeds the
projector more than the last vision layer: the vision hidden states h_0 .. h_{L-1} are split into G
groups, averaged per group, and concatenated along channels with the final features,
[z ; mean(group 1) ; ... ; mean(group G)] (B, N, (G + 1) Dv). The trade-off: the decoder sees the
same N image tokens (no extra attention cost, unlike stacking layers along the token axis), the
projector grows (G + 1) times (a 3B model's 1152 -> 2048 map becomes 3456 -> 2048) and earlier layers
bring back texture and position that the last layer has abstracted away; but the decoder was trained
on last-layer features only, so the new inputs are useless until trained. No public pretrained
weights exist for it: from_pretrained(connector="dense") widens a checkpoint's linear projector with
zero columns, so the dense model starts out exactly equal to PaliGemma; vlm_train.py trains it.

Checkpoints: PaliGemma.from_pretrained reads a transformers-format folder (single or sharded
safetensors, the original release's key layout or today's), strictly and straight into the target
dtype and device; load_in_4bit=True stores the linear layers in NF4 through nf4.py, adapter=DIR adds
a peft-format LoRA adapter through lora.py. The tests check it all against transformers 5.23's
PaliGemmaForConditionalGeneration (fp32 logits to 1e-4, bf16 bit for bit on CPU, greedy tokens,
training loss), bitsandbytes and peft. Left out: several images per prompt, position-embedding
interpolation for other resolutions, SigLIP's unused attention-pooling head, training (vlm_train.py).

What training would cost: memory_estimate adds up bf16 weights and gradients, fp32 AdamW moments (NF4
weights for QLoRA) and the activations that one training forward saves for backward, counted on the
meta device, so no weights are needed. `python paligemma.py --memory-report` tabulates full
fine-tuning, LoRA and QLoRA of the 3B model, with and without activation checkpointing, and names
the smallest common GPU that holds each.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image

from clip import ACTIVATIONS, CheckpointError, Encoder, atomic_write, check_finite
from clip import pick_device as clip_pick_device


# ----------------------------------------------------------------------------------------------
# The prefix-LM mask drawn above, first: what makes the decoder read image + prompt as one prefix
# ----------------------------------------------------------------------------------------------

def prefix_lm_mask(groups: torch.Tensor, key_ok: torch.Tensor, query_start: int, window: int | None = None,
                   is_prefix: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which keys each query may attend to; True = attend. Returns (B, 1, T, S) or None if all True.

    groups: (B, S) cumulative sum of the token types (0 prefix, 1 suffix) over the whole sequence,
    as big_vision's make_attn_mask: prefix tokens share group 0, each suffix token opens its own
    group, and query i sees key j iff group[j] <= group[i]. That is full attention inside the prefix
    and causal attention from the suffix on (see the picture in the module docstring). All-suffix
    token types give a plain causal mask.
    key_ok: (B, S) False at padding. The queries are positions query_start .. S-1.
    window: Gemma 2's local layers also drop keys more than `window - 1` positions back, except
    that prefix tokens keep seeing each other (transformers ORs the prefix block back in).
    """
    S = groups.shape[1]
    q_idx = torch.arange(query_start, S, device=groups.device)                         # (T,)
    k_idx = torch.arange(S, device=groups.device)                                      # (S,)
    allowed = (groups[:, None, :] <= groups[:, query_start:, None]) & key_ok[:, None, :]   # (B, T, S)
    if window is not None:
        near = (q_idx[:, None] - k_idx[None, :]) < window                               # (T, S)
        both_prefix = is_prefix[:, query_start:, None] & is_prefix[:, None, :]          # (B, T, S)
        allowed &= near | both_prefix
    # A query always sees itself, so a padding query never has an empty row (softmax of nothing is
    # NaN, and a NaN value vector poisons every later layer through 0 * NaN).
    allowed |= q_idx[:, None] == k_idx[None, :]
    # a meta tensor (memory_estimate) has no values to test; a training batch always has a causal suffix
    if allowed.is_meta or not bool(allowed.all()):
        return allowed[:, None]                                                        # (B, 1, T, S)
    return None


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class VisionConfig:
    """SigLIP So400m/14 at 224 px, as in paligemma-3b-pt-224."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = False   # SigLIP's pooling head; PaliGemma never uses it

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """Gemma 2B as in paligemma-3b-pt-224; the Gemma 2 fields stay None for Gemma 1."""
    model_type: str = "gemma"
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    hidden_act: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    use_bidirectional_attention: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list = 1
    # Gemma 2 only
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.model_type not in ("gemma", "gemma2"):
            raise ValueError(f"text model_type must be 'gemma' or 'gemma2', got {self.model_type!r}")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers


@dataclass
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 257152
    projection_dim: int = 2048
    connector: str = "linear"   # "linear" (PaliGemma) or "dense" (Yao et al. 2024)
    dense_groups: int = 2       # G groups of vision layers averaged by the dense connector

    def __post_init__(self) -> None:
        if self.connector not in ("linear", "dense"):
            raise ValueError(f"connector must be 'linear' or 'dense', got {self.connector!r}")
        if self.projection_dim != self.text.hidden_size:
            raise ValueError(f"projection_dim ({self.projection_dim}) must equal the text width "
                             f"({self.text.hidden_size}): image tokens enter the decoder as-is")
        if self.connector == "dense" and not 1 <= self.dense_groups <= self.vision.num_hidden_layers:
            raise ValueError(f"dense_groups must be in [1, {self.vision.num_hidden_layers}], got {self.dense_groups}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def projector_in_features(self) -> int:
        groups = self.dense_groups if self.connector == "dense" else 0
        return (groups + 1) * self.vision.hidden_size

    @classmethod
    def tiny(cls, **overrides: object) -> PaliGemmaConfig:
        """A seconds-on-CPU model: 28 px images in 7 px patches (16 image tokens), 2 + 2 layers, MQA."""
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=7)
        text = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
        return cls(**{"vision": vision, "text": text, "image_token_index": 299, "projection_dim": 64, **overrides})

    @classmethod
    def from_hf_dict(cls, d: dict) -> PaliGemmaConfig:
        """Read a transformers config.json dict, filling absent keys with transformers' own defaults."""
        return cls(vision=_vision_from_hf(d.get("vision_config")), text=_text_from_hf(d.get("text_config")),
                   image_token_index=d.get("image_token_index", d.get("image_token_id", 256000)),
                   projection_dim=d.get("projection_dim", 2048),
                   connector=d.get("connector", "linear"), dense_groups=d.get("dense_groups", 2))

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' PaliGemmaConfig reads (plus our connector keys)."""
        text = {k: v for k, v in asdict(self.text).items() if v is not None and k != "rope_theta"}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": self.text.rope_theta}
        if text["model_type"] == "gemma2":
            text["hidden_activation"] = text.pop("hidden_act")
        else:
            text.pop("layer_types")
        vision = {"model_type": "siglip_vision_model", "projection_dim": self.projection_dim, **asdict(self.vision)}
        out = {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
               "image_token_index": self.image_token_index, "projection_dim": self.projection_dim,
               "hidden_size": self.projection_dim, "vocab_size": self.text.vocab_size,
               "text_config": text, "vision_config": vision}
        if self.connector == "dense":
            out.update(connector="dense", dense_groups=self.dense_groups)
        return out


# ----------------------------------------------------------------------------------------------
# Core math: small pure functions
# ----------------------------------------------------------------------------------------------

# transformers' activation names -> clip.py's; SigLIP and Gemma both use GELU's tanh approximation
_CLIP_ACTIVATION = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                    "gelu": "gelu", "quick_gelu": "quick_gelu"}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gemma's MLP activation by transformers' name (tanh-approximate GELU in every released config)."""
    if name not in _CLIP_ACTIVATION:
        raise ValueError(f"unsupported activation {name!r}, expected one of {sorted(_CLIP_ACTIVATION)}")
    return ACTIVATIONS[_CLIP_ACTIVATION[name]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), in float32, then back to x's dtype.

    The weight is stored as an offset from 1 (initialised at 0), and Gemma multiplies before the
    cast, (x * w).to(bf16), where Llama casts first: both details change bf16 results.
    """
    x32 = x.float()
    # y = x / sqrt(mean_i x_i^2 + eps) * (1 + w)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE angles: angle(p, i) = p / theta^(2i / d), i < d/2 (Su et al. 2021).

    positions: (B, T) integers, 1-indexed in PaliGemma. Returns two (B, 1, T, d) tensors.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))   # (d/2,)
    angles = positions[..., None].float() * inv_freq                                # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)                                    # (B, T, d)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]         # (B, 1, T, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + d/2}) by its angle: the "rotate half" layout that Gemma's
    checkpoints use (no interleaving, so no permutation of q/k weights is needed)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)                    # (B, H, T, d)
    # x' = x cos(angle) + rot(x) sin(angle)
    return x * cos + rotated * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's soft capping: cap * tanh(x / cap), smooth and bounded by +-cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                      cap: float | None = None) -> torch.Tensor:
    """Softmax attention where K key/value heads serve H query heads, H/K query heads each.

    q: (B, H, T, d); k, v: (B, K, S, d); mask: (B, 1, T, S) bool or None.
    Query head h uses key head h // (H/K). With a mask, the H/K query heads that share a key head are
    folded into the query axis, so the keys are never copied H/K times (transformers' repeat_kv does
    copy them); without one, torch's kernel shares the key heads itself (enable_gqa), as in
    transformers, whose calls we then match exactly.
    """
    B, H, T, d = q.shape
    K = k.shape[1]
    per_kv = H // K                                                   # query heads per key/value head
    if mask is None and cap is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=per_kv > 1)   # (B, H, T, d)
    q = q.reshape(B, K, per_kv * T, d)                                # (B, H, T, d) -> (B, K, (H/K) T, d)
    if mask is not None:
        mask = mask.repeat(1, 1, per_kv, 1)                            # (B, 1, T, S) -> (B, 1, (H/K) T, S)
    if cap is None:
        # softmax(q k^T * scale + mask) v, fused (flash / memory-efficient kernels where available)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        # Gemma 2: scores are soft-capped before the mask and the softmax (no fused kernel does that)
        scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)           # (B, K, (H/K) T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)   # (B, K, (H/K) T, d)
    return out.reshape(B, H, T, d)                                    # (B, K, (H/K) T, d) -> (B, H, T, d)


def suffix_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the suffix only (Beyer et al. 2024, sec. 3: no loss on the prefix).

    labels: (B, T) with -100 wherever no loss is taken (image, prompt, padding).
    L = -(1 / |A|) sum_{t in A} log p(x_{t+1} | x_{<=t}), A = positions whose next label is kept (the answer).
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def suffix_labels(input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for suffix_loss: the input ids where token_type_ids == 1, -100 elsewhere."""
    keep = token_type_ids == 1
    if attention_mask is not None:
        keep &= attention_mask.bool()
    return input_ids.masked_fill(~keep, -100)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, sec. 3.1): keep the smallest set of most likely tokens
    whose probability reaches top_p; the others get -inf. logits: (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)                      # (B, V)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs       # probability of the strictly more likely tokens
    drop_sorted = mass_before >= top_p           # the top token always stays (mass before it is 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0, otherwise sample from softmax(logits / temperature) after top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = top_p_filter(logits.float() / temperature, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def dense_channel_integration(hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...], final: torch.Tensor,
                              groups: int) -> torch.Tensor:
    """Dense connector (Yao et al. 2024, Dense Channel Integration): [z ; mean(group 1) ; ... ; mean(group G)].

    hidden_states: the L vision hidden states h_0 (patch + position embeddings) .. h_{L-1}, each
    (B, N, Dv); final: the post-norm last layer (B, N, Dv). Returns (B, N, (G + 1) Dv).
    """
    chunks = np.array_split(np.arange(len(hidden_states)), groups)
    means = [torch.stack([hidden_states[i] for i in chunk]).mean(0) for chunk in chunks]   # G x (B, N, Dv)
    return torch.cat([final, *means], dim=-1)                                              # (B, N, (G+1) Dv)


# ----------------------------------------------------------------------------------------------
# SigLIP vision tower (Zhai et al. 2023): keys vision_tower.{embeddings, encoder, post_layernorm}
# ----------------------------------------------------------------------------------------------

class SiglipVisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = nn.Module()
        # A P x P convolution with stride P is a linear map of each flattened patch: (C P^2) -> Dv
        self.embeddings.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.embeddings.position_embedding = nn.Embedding(c.num_patches, c.hidden_size)   # learned, no [CLS]
        # the pre-norm blocks are clip.py's (same key names as transformers' CLIP and SigLIP layers)
        self.encoder = Encoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                               _CLIP_ACTIVATION[c.hidden_act], c.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor,
                return_hidden_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values (B, C, I, I) -> features (B, N, Dv) [and the L pre-layer hidden states h_0..h_{L-1}]."""
        emb = self.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))   # (B, Dv, I/P, I/P)
        x = x.flatten(2).transpose(1, 2) + emb.position_embedding.weight               # (B, N, Dv)
        if not return_hidden_states:
            return self.post_layernorm(self.encoder(x))                                # (B, N, Dv)
        hidden = self.encoder(x, output_hidden_states=True)                           # L + 1 x (B, N, Dv)
        return self.post_layernorm(hidden[-1]), hidden[:-1]


class MultiModalProjector(nn.Module):
    """u = W z + b: vision width (times G + 1 for the dense connector) -> Gemma width."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)                                                          # (B, N, .) -> (B, N, D)


# ----------------------------------------------------------------------------------------------
# Gemma decoder (Gemma Team 2024; Gemma 2: Gemma Team 2024b): keys language_model.model.*
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))   # stored as an offset: scale = 1 + weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GemmaAttention(nn.Module):
    def __init__(self, t: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.K, self.d = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        # Gemma 1 scales scores by 1/sqrt(d); Gemma 2 by 1/sqrt(query_pre_attn_scalar)
        self.scale = (t.query_pre_attn_scalar or t.head_dim) ** -0.5
        self.cap = t.attn_logit_softcapping
        D, bias = t.hidden_size, t.attention_bias
        self.q_proj = nn.Linear(D, self.H * self.d, bias=bias)
        self.k_proj = nn.Linear(D, self.K * self.d, bias=bias)   # K = 1 is multi-query attention
        self.v_proj = nn.Linear(D, self.K * self.d, bias=bias)
        self.o_proj = nn.Linear(self.H * self.d, D, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.d).transpose(1, 2)                 # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.K, self.d).transpose(1, 2)                 # (B, K, T, d)
        v = self.v_proj(x).view(B, T, self.K, self.d).transpose(1, 2)                 # (B, K, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                  # (B, K, S, d)
        out = grouped_attention(q, k, v, mask, self.scale, self.cap)                   # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.d))        # (B, T, D)


class GemmaMLP(nn.Module):
    def __init__(self, t: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.up_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)
        self.act = activation(t.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GeGLU: down(gelu_tanh(x W_gate) * (x W_up))   (Shazeer 2020)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))         # (B, T, D)


class GemmaDecoderLayer(nn.Module):
    """Gemma 1: x + attn(norm x), x + mlp(norm x). Gemma 2 also normalises each branch's output
    ("sandwich" norms); its `post_attention_layernorm` is therefore a different norm than Gemma 1's,
    which is the pre-MLP norm: the key names are the checkpoints', not ours."""

    def __init__(self, t: TextConfig, layer_idx: int):
        super().__init__()
        self.sandwich = t.model_type == "gemma2"
        self.sliding = t.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_attn = GemmaAttention(t, layer_idx)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mlp = GemmaMLP(t)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    """The decoder stack. `gradient_checkpointing = True` trades compute for memory in training
    (activation checkpointing, Chen et al. 2016): backward normally needs every layer's intermediate
    tensors (attention scores, MLP hidden states: several (B, T, D)-sized tensors per layer); with it,
    only each layer's input is kept and the layer is run a second time during backward to rebuild the
    rest. One extra forward pass buys activations that no longer grow with the layer's insides. It
    changes no number: the gradients are those of the plain forward (tests/test_paligemma.py)."""

    def __init__(self, t: TextConfig):
        super().__init__()
        self.config = t
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, positions: torch.Tensor, masks: dict[str, torch.Tensor | None],
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, D) input vectors (already scaled); masks: {"full": ..., "sliding": ...}."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            mask = masks["sliding" if layer.sliding else "full"]
            if recompute:   # keep x only; backward re-runs the layer (non-reentrant: works with any autograd op)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)                                    # (B, T, D)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """`language_model`: the decoder plus the output layer, tied to the input embedding by default."""

    def __init__(self, t: TextConfig):
        super().__init__()
        self.model = GemmaModel(t)
        if not t.tie_word_embeddings:
            self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if not hasattr(self, "lm_head") else self.lm_head.weight
        # logits = h E^T, then c tanh(logits / c) if the config caps them (Gemma 2: c = 30)
        return softcap(F.linear(h, weight), self.model.config.final_logit_softcapping)   # (B, T, V)


class KVCache:
    """Keys and values of every layer, allocated once for the whole generation.

    Writing step t costs O(1) (transformers' DynamicCache concatenates, copying the past each step).
    Besides k and v it remembers, per key, what the mask needs: padding, prefix flag and group.
    """

    def __init__(self, t: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (t.num_hidden_layers, batch, t.num_key_value_heads, max_len, t.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # (L, B, K, max_len, d)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0          # keys written so far
        self.groups = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.is_prefix = torch.zeros(batch, 0, dtype=torch.bool, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, K, T, d) keys/values; return all keys/values so far, (B, K, S, d)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class GenerateOutput:
    tokens: torch.Tensor                 # (B, new tokens), at most max_new_tokens; pad_token_id after a row's EOS
    scores: torch.Tensor | None = None   # (B, new tokens, V) logits each token was chosen from


# ----------------------------------------------------------------------------------------------
# PaliGemma
# ----------------------------------------------------------------------------------------------

class PaliGemma(nn.Module):
    """State-dict keys are what transformers 5.23 saves: vision_tower.*, multi_modal_projector.linear.*,
    language_model.model.* (from_pretrained also reads the original release's layout)."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.projector_in_features, config.projection_dim)
        self.language_model = GemmaForCausalLM(config.text)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random weights for demos and training from scratch (N(0, std), zero biases, unit norms)."""
        for name, p in self.named_parameters():
            if name.endswith("bias") or isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                p.zero_()   # RMSNorm stores w with scale 1 + w, so 0 means "scale by one"
            elif "layer_norm" in name or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    # -- image side ---------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, I, I) pixels -> (B, N, D) image tokens, before the 1/sqrt(D) of embed_inputs."""
        v = self.config.vision
        expected = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (B, {v.num_channels}, {v.image_size}, {v.image_size}) "
                             f"(B, C, I, I), got {tuple(pixel_values.shape)}")
        if self.config.connector == "linear":
            return self.multi_modal_projector(self.vision_tower(pixel_values))        # (B, N, D)
        final, hidden = self.vision_tower(pixel_values, return_hidden_states=True)
        dense = dense_channel_integration(hidden, final, self.config.dense_groups)   # (B, N, (G+1) Dv)
        return self.multi_modal_projector(dense)                                        # (B, N, D)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     generated: bool = False) -> torch.Tensor:
        """The decoder's input vectors: image tokens at the <image> positions, text embeddings elsewhere,
        everything times sqrt(D). generated=True (a decoding step after the prompt): an <image> id the
        model wrote is embedded as the text token it is, as transformers does, not taken for a picture.

        Why 1/sqrt(D) on the image: Gemma ties its input embedding E to its output layer (logits =
        h E^T), which keeps the rows of E small, and so it multiplies its inputs by sqrt(D), as the
        original Transformer did (Vaswani et al. 2017, sec. 3.4). The projector was trained to emit
        vectors that are already at the decoder's input scale: big_vision scales the text embeddings
        and then concatenates the image tokens as they are. A decoder that scales every input vector
        must therefore see u / sqrt(D) at an image position, so that the multiplication gives u back.
        That is how older transformers wrote it (image features / sqrt(D), then everything times
        sqrt(D) inside GemmaModel). transformers 5.23 moved the scale into the embedding layer
        (GemmaTextScaledWordEmbedding) and puts the image features in untouched; same numbers.

        The bf16 subtlety: sqrt(D) is rounded to the weights' dtype first (sqrt(2048) = 45.2548 becomes
        45.25 in bf16; transformers and big_vision do the same), and (u / s) * s in bf16 is not u
        (two roundings). So the merge runs in float32 and is cast once: text rows are the same product
        E[id] * s rounded once, and image rows round back to exactly u, which makes the result
        bit-identical to transformers 5.23 in bf16 as well as in fp32.
        """
        c, embed = self.config, self.language_model.model.embed_tokens
        is_image = (input_ids == c.image_token_index) & (not generated)               # (B, T)
        x = embed(input_ids.masked_fill(is_image, 0)).float()                          # (B, T, D)
        s = torch.tensor(c.text.hidden_size ** 0.5, dtype=self.dtype).float()
        # the value checks need values: a meta tensor (memory_estimate) has shapes only
        check = not input_ids.is_meta
        if pixel_values is not None:
            counts = is_image.sum(-1)
            if pixel_values.shape[0] != input_ids.shape[0] or (check and bool((counts != c.num_image_tokens).any())):
                raise ValueError(f"each prompt needs exactly {c.num_image_tokens} <image> tokens (id "
                                 f"{c.image_token_index}) for its one image, got "
                                 f"{counts.tolist() if check else 'an unknown count'} for "
                                 f"{pixel_values.shape[0]} image(s)")
            u = self.image_features(pixel_values).float()                              # (B, N, D)
            # x_img = u / sqrt(D), so that the sqrt(D) below gives back u. masked_scatter fills the
            # <image> positions row by row with u's N vectors, as transformers does; unlike x[is_image] = ...
            # it needs no count of the positions, so it also runs on the meta device
            x = x.masked_scatter(is_image[..., None], u / s)                          # (B, T, D)
        elif check and bool(is_image.any()):
            raise ValueError("the prompt contains <image> tokens but no pixel_values were given")
        # x <- x sqrt(D): Gemma's input scaling (its reference code; transformers' GemmaTextScaledWordEmbedding)
        return (x * s).to(self.dtype)                                                  # (B, T, D)

    # -- the forward pass ---------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None, last_only: bool = False) -> Output:
        """Logits (B, T, V) (or (B, 1, V) with last_only) and, with labels, the suffix loss.

        attention_mask: (B, S) over the cached and the new tokens, 0 at padding.
        token_type_ids: (B, T), 0 prefix / 1 suffix. Absent, all tokens are prefix (full attention),
        which is right for a prompt and what transformers does, but wrong for a training sequence.
        """
        t = self.config.text
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        S = start + T
        if S > t.max_position_embeddings or (cache is not None and S > cache.max_len):
            limit = t.max_position_embeddings if cache is None else min(cache.max_len, t.max_position_embeddings)
            raise ValueError(f"sequence of {S} tokens is longer than the context of {limit}")
        if labels is not None and token_type_ids is None and t.use_bidirectional_attention:
            raise ValueError("labels need token_type_ids (0 prefix, 1 suffix): without them every token sees "
                             "the whole sequence and the answer would be copied, not predicted")
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must cover the cached and new tokens, (B, S) = {(B, S)}, "
                             f"got {tuple(attention_mask.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.full_like(input_ids, 0 if t.use_bidirectional_attention else 1)
        x = self.embed_inputs(input_ids, pixel_values, generated=start > 0)            # (B, T, D)
        masks = self._masks(token_type_ids, attention_mask.bool(), cache)
        # PaliGemma counts positions from 1; left padding does not move them (p = #real tokens so far)
        positions = attention_mask.long().cumsum(-1)[:, start:]                        # (B, T)
        h = self.language_model.model(x, positions, masks, cache)                      # (B, T, D)
        if cache is not None:
            cache.length = S
        logits = self.language_model.logits(h[:, -1:] if last_only else h)           # (B, T, V)
        return Output(logits, None if labels is None else suffix_loss(logits, labels))

    def _masks(self, token_type_ids, key_ok, cache):
        t = self.config.text
        prev_groups = cache.groups if cache is not None else token_type_ids.new_zeros(token_type_ids.shape[0], 0)
        prev_prefix = cache.is_prefix if cache is not None else key_ok.new_zeros(key_ok.shape[0], 0)
        last = prev_groups[:, -1:] if prev_groups.shape[1] else 0
        groups = torch.cat([prev_groups, last + token_type_ids.cumsum(-1)], dim=1)     # (B, S)
        is_prefix = torch.cat([prev_prefix, token_type_ids == 0], dim=1)               # (B, S)
        if cache is not None:
            cache.groups, cache.is_prefix = groups, is_prefix
        start = groups.shape[1] - token_type_ids.shape[1]
        masks = {"full": prefix_lm_mask(groups, key_ok, start)}
        if "sliding_attention" in t.layer_types:
            masks["sliding"] = prefix_lm_mask(groups, key_ok, start, t.sliding_window, is_prefix)
        return masks

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, return_scores: bool = False) -> GenerateOutput:
        """Decode up to max_new_tokens after left-padded prompts, reusing keys/values (KV cache).

        Step 0 (prefill) runs the whole prompt once, with full attention over image + prompt, and
        stores every layer's keys and values; each later step feeds only the newest token, a suffix
        token that attends to everything before it. A row stops at EOS and is padded after it; the
        loop stops when every row has. Greedy at temperature 0, else temperature + top-p sampling.
        """
        t = self.config.text
        B, T = input_ids.shape
        eos = t.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=input_ids.device)
        pad = t.pad_token_id if pad_token_id is None else pad_token_id
        if T + max_new_tokens > t.max_position_embeddings:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens is longer than the context of "
                             f"{t.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = KVCache(t, B, T + max_new_tokens, self.dtype, input_ids.device)
        out = self(input_ids, pixel_values, attention_mask, cache=cache, last_only=True)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens, scores = [], []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1]                                                 # (B, V)
            nxt = sample_next_token(logits, temperature, top_p, generator)             # (B,)
            nxt = nxt.masked_fill(done, pad)
            tokens.append(nxt)
            scores.append(logits)
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = self(nxt[:, None], attention_mask=attention_mask, token_type_ids=torch.ones_like(nxt[:, None]),
                       cache=cache)
        return GenerateOutput(torch.stack(tokens, 1), torch.stack(scores, 1) if return_scores else None)

    # -- checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, connector: str | None = None,
                        dense_groups: int | None = None, load_in_4bit: bool = False,
                        adapter: str | Path | None = None) -> PaliGemma:
        """Load a transformers-format PaliGemma folder: config.json + model.safetensors (or shards
        listed in model.safetensors.index.json), in either key layout found in the wild.

        The model is built on the meta device (shapes, no memory), allocated once in the target dtype
        on the target device, and every tensor is read from disk straight into its parameter, so the
        peak memory is the model plus at most one tensor (when a dtype or device conversion needs a
        staging buffer). dtype=None keeps the checkpoint's dtype. Loading is strict: the tensors in
        the files must be exactly the model's (ignoring a tied lm_head copy and SigLIP's unused head),
        and every mismatch is listed before a single byte of weights is read.

        connector="dense" loads a linear-connector checkpoint into a dense-connector model: the
        projector's weight is widened with zero columns for the G extra vision groups, so the model
        starts equal to the pretrained one (vlm_train.py then trains those columns).
        load_in_4bit=True stores every nn.Linear in NF4 (nf4.py; QLoRA's base model, as transformers'
        BitsAndBytesConfig(load_in_4bit=True) does), quantizing each weight as it is read, so the
        full-precision model never exists; `dtype` is then the compute dtype. adapter=DIR loads a
        LoRA adapter in peft's format through lora.py (module names of transformers' PaliGemma or ours).
        """
        path = Path(path)
        config = read_config(path)
        if connector is not None or dense_groups is not None:
            config = replace(config, connector=connector or config.connector,
                             dense_groups=dense_groups or config.dense_groups)
        files = checkpoint_tensors(path)
        if dtype is None:
            dtype = next(SAFETENSORS_DTYPES[e["dtype"]] for _, e, _ in files.values()
                         if SAFETENSORS_DTYPES.get(e["dtype"], torch.uint8).is_floating_point)
        device = torch.device(device or "cpu")
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype=dtype)
        located, widen = match_checkpoint(model, files)
        if load_in_4bit:
            import nf4
            weights = CheckpointTensors(located, widen, config, dtype, device)
            nf4.quantize_model(model, skip=(), compute_dtype=dtype, weights=weights)
        else:
            model.to_empty(device=device)
            read_checkpoint(model, located, widen)
        if adapter is not None:
            load_adapter(model, adapter)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + model.safetensors in the layout transformers 5.23 saves (tied lm_head omitted),
        each written to a temporary file and renamed, so a crash never leaves half a checkpoint."""
        from safetensors.torch import save_file
        wrapped = sorted({type(m).__name__ for m in self.modules()} & {"LinearNF4", "LoRALinear"})
        if wrapped:
            raise ValueError(f"save_pretrained writes plain full-precision models; this one has {wrapped} layers "
                             f"(save an adapter with lora.save_adapter, or merge it with lora.merge_lora first)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config = {**self.config.to_hf_dict(), "dtype": str(self.dtype).removeprefix("torch.")}
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


# ----------------------------------------------------------------------------------------------
# What fine-tuning costs in memory: weights, gradients, AdamW's moments, activations
# ----------------------------------------------------------------------------------------------

# QLoRA's NF4 (nf4.py; Dettmers et al. 2023, sec. 3): a 4-bit code per weight, an 8-bit absmax per
# 64-weight block, and an fp32 scale per 256 of those absmax constants (double quantization)
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)                     # = 4.127 bits per weight
MODES = ("full", "lora", "qlora")


def memory_estimate(config: PaliGemmaConfig, mode: str, batch_size: int, seq_len: int,
                    grad_checkpointing: bool = False, lora_r: int = 16) -> dict:
    """Bytes a fine-tuning step keeps on the device, for batch_size rows of N image + seq_len text tokens.

        weights     = 2 P                bf16 (QLoRA: 2 (P - P_nf4) + P_nf4 NF4_BITS / 8)
        grads       = 2 P_train          bf16, like the weights they update
        optimizer   = 8 P_train          AdamW's m and v in fp32 (no fp32 master copy of the weights)
        activations = what one training forward leaves for backward, counted (activation_bytes)
        total       = the sum of the four

    The SigLIP tower is frozen in every mode. "full" trains the projector and the Gemma decoder;
    "lora" trains the projector and rank-r adapters (lora.py) on every linear layer of the decoder,
    which stays frozen in bf16; "qlora" is "lora" with those frozen layers in NF4 (nf4.py), the tied
    embedding / output layer kept in bf16 as bitsandbytes keeps it. P counts every parameter of the
    trained model, adapters included, an NF4 weight as its out x in values.

    Activations are counted, not guessed: the model is built on the meta device (shapes, no memory)
    and one forward pass of a batch of meta tensors is watched by saved_tensors_hooks. What that
    finds: QLoRA keeps what LoRA keeps. nf4.NF4Matmul saves only its packed 4-bit weight (a buffer,
    already among the weights) and no input, as W is frozen; the input x is kept by the adapter's
    A x either way. Dequantizing W makes a full-precision copy of it in each layer, forward and
    backward, freed as soon as the layer is done. With grad_checkpointing each decoder layer keeps
    only its inputs, and what remains is mostly the logits: 6 V bytes a token (bf16 logits, their fp32
    log-softmax), 1.5 MiB at Gemma's V = 257,216, against 2 D L = 72 KiB for the 3B decoder's inputs.
    Left out: the transient peaks of backward (the largest is the gradient of the fp32 logits,
    B (N + seq_len) V 4 bytes) and of the optimizer step, the CUDA context and the allocator's
    fragmentation (memory_table keeps a margin for the last two).
    Returns {"mode", "grad_checkpointing", "batch_size", "seq_len", "params", "trainable", "weights",
    "grads", "optimizer", "activations", "total"}: the arguments, parameter counts and bytes.
    """
    import lora
    import nf4
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")
    model = training_model(config, mode, lora_r)
    model.language_model.model.gradient_checkpointing = grad_checkpointing
    p_train, params = lora.count_parameters(model)
    p_nf4 = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, nf4.LinearNF4))
    out = {"mode": mode, "grad_checkpointing": grad_checkpointing, "batch_size": batch_size, "seq_len": seq_len,
           "params": params, "trainable": p_train,
           "weights": round(2 * (params - p_nf4) + p_nf4 * NF4_BITS / 8),
           "grads": 2 * p_train,
           "optimizer": 8 * p_train,
           "activations": activation_bytes(model, meta_batch(config, batch_size, seq_len))}
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    return out


def memory_rows(config: PaliGemmaConfig, batch_size: int, seq_len: int, lora_r: int = 16) -> list[dict]:
    """memory_estimate for every mode, without and with activation checkpointing (memory_table's rows)."""
    return [memory_estimate(config, mode, batch_size, seq_len, checkpointing, lora_r)
            for mode in MODES for checkpointing in (False, True)]


def training_model(config: PaliGemmaConfig, mode: str, lora_r: int = 16) -> PaliGemma:
    """The bf16 model that a `mode` fine-tuning run trains (memory_estimate), on the meta device."""
    import lora
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with torch.device("meta"):
        model = PaliGemma(config).to(torch.bfloat16).train()
    model.vision_tower.requires_grad_(False)
    if mode == "qlora":
        for name, layer in list(model.language_model.named_modules()):
            if isinstance(layer, nn.Linear) and not name.endswith("lm_head"):
                model.language_model.set_submodule(name, nf4_on_meta(layer))
    if mode != "full":
        # every linear layer of the decoder (q, k, v, o, gate, up, down: vlm_train.py's lora_targets);
        # alpha scales the update and changes no memory
        lora.apply_lora(model.language_model, "all-linear", lora_r, alpha=2 * lora_r)
    return model


def activation_bytes(model: PaliGemma, batch: dict[str, torch.Tensor]) -> int:
    """Bytes one training forward of `batch` leaves for backward: every distinct storage that autograd
    saves, plus the logits and the loss the forward returns (at the loss, all of it is alive at once).

    A storage counts once however many ops save it or views of it (a normed input feeds q, k and v),
    and not at all if it is a parameter or a buffer: those are the weights. Real and meta tensors
    are counted alike (the tests hold a CPU model to its meta twin); on meta, attention runs through
    _FusedAttention, so that what is counted is what a device keeps. Non-reentrant checkpointing
    packs what a checkpointed layer saves into placeholders of its own: only the layer's inputs
    reach this count.
    """
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata        # the storage's identity (data_ptr is 0 on the meta device)

    weights = {key(t) for t in [*model.parameters(), *model.buffers()]}
    saved = []                                   # holding them keeps every storage, and so its identity, alive
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), _FusedAttention():
        out = model(**batch)
    returned = [t for t in (out.logits, out.loss) if t is not None]
    kept = {key(t): t.untyped_storage().nbytes() for t in [*saved, *returned]}
    return sum(nbytes for k, nbytes in kept.items() if k not in weights)


# ==============================================================================================
# Plumbing: config.json and its defaults, reading safetensors checkpoints, the processor, the memory
# report, the CLI.
# A reader learning PaliGemma can stop here; PaliGemma.from_pretrained above is the entry point.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# config.json: the defaults transformers fills in for absent keys
# ----------------------------------------------------------------------------------------------

# transformers builds a sub-config given as a dict from the sub-model class's own defaults
# (configuration_utils.SubConfigSpec.create_subconfig), and only an absent one from PaliGemma's
# defaults. The tables below are those defaults (SiglipVisionConfig, GemmaConfig, Gemma2Config,
# and PaliGemmaConfig.sub_configs_defaults in transformers 5.23).
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh", vision_use_head=True)
_PALIGEMMA_VISION = dict(_SIGLIP_DEFAULTS, hidden_size=1152, intermediate_size=4096, num_hidden_layers=27,
                         num_attention_heads=16, patch_size=14, vision_use_head=False)
_GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=16, head_dim=256)
_GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
_PALIGEMMA_TEXT = dict(_GEMMA_DEFAULTS, hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                       num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)


def _vision_from_hf(d):
    merged = {**(_SIGLIP_DEFAULTS if d is not None else _PALIGEMMA_VISION), **(d or {})}
    return VisionConfig(**{k: merged[k] for k in VisionConfig.__dataclass_fields__})


def _text_from_hf(d):
    d = dict(d or {})
    model_type = d.get("model_type", "gemma")
    merged = {**(_GEMMA2_DEFAULTS if model_type == "gemma2" else _GEMMA_DEFAULTS if d else _PALIGEMMA_TEXT), **d}
    merged["model_type"] = model_type
    merged["hidden_act"] = merged.get("hidden_activation") or merged.get("hidden_act") or "gelu_pytorch_tanh"
    if merged["hidden_act"] == "gelu":   # GemmaConfig: legacy configs say "gelu" but mean the tanh form
        merged["hidden_act"] = "gelu_pytorch_tanh"
    merged["rope_theta"] = (merged.get("rope_parameters") or {}).get("rope_theta", merged.get("rope_theta", 10000.0))
    if model_type == "gemma2" and merged.get("layer_types") is None:
        # Gemma 2 alternates local and global layers, starting with a local one (Gemma2Config)
        merged["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                 for i in range(merged["num_hidden_layers"])]
    # PaliGemmaConfig.__post_init__: unset means bidirectional (prefix-LM) for PaliGemma 1 and 2
    if merged.get("use_bidirectional_attention") is None:
        merged["use_bidirectional_attention"] = True
    if merged.get("head_dim") is None:
        merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
    return TextConfig(**{k: merged[k] for k in TextConfig.__dataclass_fields__ if k in merged})


# ----------------------------------------------------------------------------------------------
# Reading checkpoints: safetensors = 8-byte header length, JSON header, raw little-endian bytes
# ----------------------------------------------------------------------------------------------

# CheckpointError (a file or folder that is not a loadable checkpoint, named in the message) and
# check_finite are clip.py's, imported above: one error type and one NaN check across the files.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_config(path: str | Path) -> PaliGemmaConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected a PaliGemma checkpoint folder "
                                f"(config.json + model.safetensors or a sharded index)")
    try:
        return PaliGemmaConfig.from_hf_dict(json.loads(config_file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid UTF-8 JSON ({err}); expected a transformers "
                              f"PaliGemma config.json") from None
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file} is not a PaliGemma config: {type(err).__name__}: {err}") from None


def read_safetensors_header(file: str | Path) -> tuple[dict, int]:
    """{name: {"dtype", "shape", "data_offsets"}} and the byte offset where the tensor data starts."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100_000_000:
            raise CheckpointError(f"{file} is not a safetensors file (header length {n}); truncated or corrupt?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file} is not a safetensors file: its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[Path, dict, int]]:
    """{tensor name: (file, header entry, data start)} over a single file or all shards."""
    path = Path(path)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' "
                                  f"of tensor -> shard file): {type(err).__name__}: {err}") from None
    elif single.is_file():
        shard_names = [single.name]
    else:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json, "
                                f"found {found}")
    tensors = {}
    for name in shard_names:
        if not (path / name).is_file():
            raise FileNotFoundError(f"shard {name} listed in {index.name} is missing from {path}")
        header, start = read_safetensors_header(path / name)
        tensors.update({k: (path / name, entry, start) for k, entry in header.items()})
    return tensors


def canonical_key(name: str) -> str:
    """Map any released key layout to ours (= transformers 5.23's saved layout):

        original release:  vision_tower.vision_model.X      -> vision_tower.X
        transformers 4.5x: model.language_model.X           -> language_model.model.X
                           model.vision_tower.vision_model.X -> vision_tower.X
                           model.multi_modal_projector.X     -> multi_modal_projector.X
                           lm_head.weight                    -> language_model.lm_head.weight
    """
    if name.startswith("model.language_model."):
        name = "language_model.model." + name[len("model.language_model."):]
    elif name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    if name == "lm_head.weight":
        name = "language_model.lm_head.weight"
    return name


def _ignored(name, config):
    """Tensors that some checkpoints carry and the model rightly has no place for."""
    return ((name == "language_model.lm_head.weight" and config.text.tie_word_embeddings)   # a copy of E
            or (name.startswith("vision_tower.head.") and config.vision.vision_use_head)     # unused pooling head
            or name.endswith(".position_ids") or name.endswith("rotary_emb.inv_freq"))      # old saved buffers


def model_folder(files: dict[str, tuple[Path, dict, int]]) -> str:
    """The folder (or folders) a checkpoint's tensors come from, for error messages."""
    return ", ".join(sorted({str(Path(file).parent) for file, _, _ in files.values()}))


def match_checkpoint(model: PaliGemma, files: dict[str, tuple[Path, dict, int]]
                     ) -> tuple[dict[str, tuple[Path, dict, int]], list[str]]:
    """Pair the checkpoint's tensors (any key layout) with the model's, strictly.

    Returns {model key: (file, header entry, data start)} and the keys to widen (a linear projector
    going into a dense-connector model); raises CheckpointError listing every missing, unexpected
    or misshapen tensor.
    """
    config, params = model.config, model.state_dict(keep_vars=True)
    located = {}
    for file_name, where in files.items():
        name = canonical_key(file_name)
        if not _ignored(name, config):
            located[name] = where
    missing = sorted(set(params) - set(located))
    unexpected = sorted(set(located) - set(params))
    widen, wrong_shape = [], []
    for name in sorted(set(params) & set(located)):
        want, have = tuple(params[name].shape), tuple(located[name][1]["shape"])
        if want == have:
            continue
        if name == "multi_modal_projector.linear.weight" and config.connector == "dense" \
                and have == (want[0], config.vision.hidden_size):
            widen.append(name)
        else:
            wrong_shape.append(f"{name}: checkpoint {have}, model {want}")
    if missing or unexpected or wrong_shape:
        problems = [f"missing ({len(missing)}): {', '.join(missing)}" if missing else "",
                    f"unexpected ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "",
                    f"wrong shape: {'; '.join(wrong_shape)}" if wrong_shape else ""]
        raise CheckpointError(f"checkpoint {model_folder(files)} does not match the model: "
                              + " | ".join(p for p in problems if p))
    return located, widen


def read_checkpoint(model: PaliGemma, located: dict[str, tuple[Path, dict, int]], widen: list[str]) -> None:
    """Read every tensor into its (allocated) parameter, file by file in storage order."""
    params, vision_width = model.state_dict(keep_vars=True), model.config.vision.hidden_size
    by_file = {}
    for name, (file, entry, start) in located.items():
        by_file.setdefault(file, []).append((entry["data_offsets"][0], name, entry, start))
    with torch.no_grad():
        for file, items in by_file.items():
            with open(file, "rb") as f:
                for _, name, entry, start in sorted(items):   # sequential reads
                    target = params[name]
                    if name in widen:   # [W, 0, ..., 0]: the extra vision groups start switched off
                        target.zero_()
                        target = target[:, :vision_width]
                    _read_into(f, entry, start, target, file, name)


class CheckpointTensors(Mapping):
    """The matched checkpoint as a lazy {model key: tensor} mapping (dtype and device applied),
    which nf4.quantize_model consumes one layer at a time."""

    def __init__(self, located: dict[str, tuple[Path, dict, int]], widen: list[str], config: PaliGemmaConfig,
                 dtype: torch.dtype, device: torch.device):
        self.located, self.widen, self.config, self.dtype, self.device = located, widen, config, dtype, device

    def __getitem__(self, name: str) -> torch.Tensor:
        file, entry, start = self.located[name]
        tensor = torch.empty(tuple(entry["shape"]), dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        with open(file, "rb") as f:
            _read_into(f, entry, start, tensor, file, name)
        if name in self.widen:
            wide = tensor.new_zeros(tensor.shape[0], self.config.projector_in_features)
            wide[:, :tensor.shape[1]] = tensor
            tensor = wide
        return tensor.to(device=self.device, dtype=self.dtype if tensor.is_floating_point() else tensor.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.located)

    def __len__(self) -> int:
        return len(self.located)


def load_adapter(model: PaliGemma, adapter_dir: str | Path) -> PaliGemma:
    """A peft LoRA adapter through lora.py. Adapters trained on transformers' PaliGemma name modules
    `model.language_model.layers...`; their keys are renamed to ours (canonical_key) first."""
    import tempfile

    import lora
    from safetensors.torch import save_file
    adapter_dir = Path(adapter_dir)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        return lora.load_adapter(model, str(adapter_dir))   # lora.py explains what is missing
    prefix = "base_model.model."
    keys = read_safetensors_header(weights_file)[0]
    renamed = {k: prefix + canonical_key(k.removeprefix(prefix)) for k in keys}
    if all(k == v for k, v in renamed.items()):
        return lora.load_adapter(model, str(adapter_dir))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
        tensors = lora.read_adapter_weights(str(weights_file))   # checked here, so errors name this file
        save_file({renamed[k]: v for k, v in tensors.items()}, str(Path(tmp) / weights_file.name))
        return lora.load_adapter(model, tmp)


def _read_into(f, entry, data_start, target, file, name):
    begin, end = entry["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{name} in {file}: unsupported dtype {entry['dtype']}")
    if end - begin != target.numel() * dtype.itemsize:
        raise CheckpointError(f"{name} in {file}: {end - begin} bytes for shape {entry['shape']} {entry['dtype']}")
    f.seek(data_start + begin)
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buffer = target.detach() if direct else torch.empty(tuple(entry["shape"]), dtype=dtype)
    # read the bytes straight into the tensor's memory (little-endian on disk and on x86 / ARM)
    n = f.readinto(memoryview(buffer.reshape(-1).view(torch.uint8).numpy()))
    if n != end - begin:
        raise CheckpointError(f"{name} in {file}: file is truncated ({n} of {end - begin} bytes)")
    check_finite({name: buffer}, file)     # NaN / inf: a corrupt file or a diverged run, named with the tensor
    if not direct:
        target.copy_(buffer)   # converts dtype and moves to the device; one tensor of staging memory


# ----------------------------------------------------------------------------------------------
# Processor: image -> pixel_values, prompt -> token ids (the checkpoint's own tokenizer)
# ----------------------------------------------------------------------------------------------

class PaliGemmaProcessor:
    """Turns images and prompts into model inputs the way transformers' PaliGemmaProcessor does.

    Image: convert to RGB, resize to I x I with bicubic filtering, scale to [0, 1], normalise with
    mean = std = 0.5, i.e. to [-1, 1]; channels first.
    Prompt: "<image>" * N + "<bos>" + prefix + "\\n" is the prefix (token type 0); for training,
    suffix + "<eos>" follows as the suffix (token type 1) and becomes the labels. The newline ends
    the prompt, as in PaliGemma's pretraining (Beyer et al. 2024, sec. 3). Rows are left-padded.
    """

    IMAGE_TOKEN = "<image>"

    def __init__(self, tokenizer: Any, config: PaliGemmaConfig):
        self.tokenizer, self.config = tokenizer, config
        image_id = tokenizer.convert_tokens_to_ids(self.IMAGE_TOKEN)
        if image_id != config.image_token_index:
            raise ValueError(f"the tokenizer maps {self.IMAGE_TOKEN} to {image_id}, the model expects "
                             f"{config.image_token_index}")

    @classmethod
    def from_pretrained(cls, path: str | Path, config: PaliGemmaConfig | None = None) -> PaliGemmaProcessor:
        path = Path(path)
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise FileNotFoundError(f"no tokenizer in {path} (tokenizer.json / tokenizer.model): copy the "
                                    f"checkpoint's tokenizer files there; PaliGemma's 257k vocabulary with its "
                                    f"<image>, <locXXXX> and <segXXX> tokens cannot be rebuilt from the weights")
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(str(path)), config or read_config(path))

    def preprocess_image(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """PIL image or (height, width, 3) uint8 array -> (3, I, I) float32 in [-1, 1]."""
        v = self.config.vision
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[-1] != v.num_channels:
                raise ValueError(f"expected an image of shape (H, W, {v.num_channels}) (channels last), "
                                 f"got an array of shape {array.shape}")
            image = Image.fromarray(array.astype(np.uint8))
        image = image.convert("RGB").resize((v.image_size, v.image_size), Image.Resampling.BICUBIC)
        x = np.asarray(image, dtype=np.float64) / 255.0                                # (I, I, C) in [0, 1]
        # x <- (x - mean) / std with mean = std = 0.5
        x = (x - 0.5) / 0.5
        return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)                # (C, I, I)

    def __call__(self, images: list[Image.Image | np.ndarray], prompts: list[str],
                 suffixes: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Returns input_ids, attention_mask, token_type_ids, pixel_values (and labels with suffixes)."""
        if len(images) != len(prompts) or (suffixes is not None and len(suffixes) != len(prompts)):
            raise ValueError(f"one image per prompt: got {len(images)} images, {len(prompts)} prompts"
                             + ("" if suffixes is None else f", {len(suffixes)} suffixes"))
        tok = self.tokenizer
        rows = []
        for i, prompt in enumerate(prompts):
            prefix = self.IMAGE_TOKEN * self.config.num_image_tokens + tok.bos_token + prompt + "\n"
            ids = tok(prefix, add_special_tokens=False)["input_ids"]
            suffix = [] if suffixes is None else tok(suffixes[i] + tok.eos_token, add_special_tokens=False)["input_ids"]
            rows.append((ids, suffix))
        width = max(len(p) + len(s) for p, s in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.config.text.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        token_type_ids = torch.zeros_like(input_ids)
        for b, (p, s) in enumerate(rows):
            n = len(p) + len(s)
            input_ids[b, width - n:] = torch.tensor(p + s)                  # left padding
            attention_mask[b, width - n:] = 1
            token_type_ids[b, width - len(s):] = 1 if s else 0
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "pixel_values": torch.stack([self.preprocess_image(im) for im in images])}
        if suffixes is not None:
            batch["labels"] = suffix_labels(input_ids, token_type_ids, attention_mask)
        return batch

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# Memory on the meta device: an NF4 layer and a batch of shapes only, attention as a device runs it
# ----------------------------------------------------------------------------------------------

def nf4_on_meta(linear: nn.Linear, blocksize: int = 64) -> nn.Module:
    """The nf4.LinearNF4 that nf4.quantize_nf4 would make of `linear`, built from empty meta tensors of
    its shapes: quantize_nf4 reads the weight's values (it refuses NaN), which a meta tensor has not."""
    import nf4
    n, meta = linear.weight.numel(), torch.device("meta")
    blocks = -(-n // blocksize)
    state = nf4.NF4State(absmax=torch.empty(blocks, dtype=torch.uint8, device=meta), shape=linear.weight.shape,
                         dtype=linear.weight.dtype, blocksize=blocksize, code=nf4.NF4_CODE.to(meta),
                         offset=torch.empty((), device=meta),
                         nested_absmax=torch.empty(-(-blocks // nf4.NESTED_BLOCKSIZE), device=meta),
                         nested_code=nf4.DYNAMIC_MAP.to(meta))
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=meta)    # two 4-bit codes a byte
    return nf4.LinearNF4(packed, state, linear.bias)


def meta_batch(config: PaliGemmaConfig, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A training batch of shapes only: (B, N + seq_len) token ids, masks and labels, (B, C, I, I) pixels."""
    v, meta = config.vision, torch.device("meta")
    ids = torch.empty(batch_size, config.num_image_tokens + seq_len, dtype=torch.long, device=meta)
    pixels = torch.empty(batch_size, v.num_channels, v.image_size, v.image_size, dtype=torch.bfloat16, device=meta)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.empty_like(ids),
            "token_type_ids": torch.empty_like(ids), "labels": torch.empty_like(ids)}


class _FusedAttention(torch.overrides.TorchFunctionMode):
    """On meta tensors, F.scaled_dot_product_attention takes its math path, which saves the (T, S)
    attention probabilities in fp32 for backward. CPU and CUDA run fused kernels instead, which save
    only q, k, v, the output, each query's log-sum-exp and the mask as an additive bias in q's dtype
    (CPU's flash kernel exactly so; CUDA's kernels that take a mask, memory-efficient or cuDNN, the
    same up to a little padding). So meta calls go to CPU's fused kernel, whose shapes and backward
    torch knows on meta as well."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # grouped_attention's calls: q, k, v by position, the rest by keyword
        if func is not F.scaled_dot_product_attention or len(args) != 3 or not args[0].is_meta \
                or kwargs.get("enable_gqa"):
            return func(*args, **kwargs)
        (q, k, v), mask = args, kwargs.get("attn_mask")
        # the bool mask becomes 0 / -inf in q's dtype, as torch turns it before any fused kernel
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias,
                                                                          scale=kwargs.get("scale"))[0]


# ----------------------------------------------------------------------------------------------
# The memory report: memory_estimate's rows as a table, with the smallest common GPU for each
# ----------------------------------------------------------------------------------------------

# Total memory as nvidia-smi reports it, in MiB, smallest first: a "16 GB" T4 holds 15360 MiB = 15 GiB
GPUS_MIB = (("T4 16 GB", 15360), ("A10 24 GB", 23028), ("L4 24 GB", 23034), ("A100 40 GB", 40960),
            ("H100 80 GB", 81559), ("A100 80 GB", 81920), ("H200 141 GB", 143771))
# Kept free beyond the estimate: the CUDA context (a few hundred MiB) and the allocator's fragmentation
GPU_MARGIN_GIB = 1.0


def smallest_gpu(total_bytes: int) -> str:
    """The first card of GPUS_MIB with more memory than total_bytes + GPU_MARGIN_GIB, or "none"."""
    need = total_bytes + GPU_MARGIN_GIB * 2**30
    return next((name for name, mib in GPUS_MIB if mib * 2**20 > need), "none")


def memory_table(rows: list[dict]) -> str:
    """memory_estimate's rows as a markdown table (GiB = 2^30 bytes), captioned with what it assumes."""
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = ["| mode | trainable | weights GiB | grads GiB | AdamW GiB | activations GiB | total GiB | smallest GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mode = r["mode"] + (" + checkpointing" if r["grad_checkpointing"] else "")
        lines.append(f"| {mode} | {r['trainable'] / 1e6:,.1f} M | {gib(r['weights'])} | {gib(r['grads'])} | "
                     f"{gib(r['optimizer'])} | {gib(r['activations'])} | {gib(r['total'])} | "
                     f"{smallest_gpu(r['total'])} |")
    caption = ("bf16 weights and gradients, fp32 AdamW moments, NF4 at 4.127 bits per weight (QLoRA), "
               "activations counted on the meta device. "
               f"smallest GPU: the first of {', '.join(name for name, _ in GPUS_MIB)} whose memory exceeds "
               f"total + {GPU_MARGIN_GIB:.1f} GiB (CUDA context and allocator), or none.")
    return "\n".join(lines + ["", caption])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N as a torch.device (clip.pick_device checks that a CUDA device exists)."""
    return torch.device(clip_pick_device(name))


def draw_mask(mask: torch.Tensor, labels: list[str]) -> str:
    """ASCII picture of one (T, S) boolean mask: '#' = may attend."""
    width = max(len(s) for s in labels)
    lines = [" " * (width + 1) + " ".join(f"{s[:3]:>3}" for s in labels)]
    for label, row in zip(labels, mask.tolist()):
        lines.append(f"{label:>{width}} " + " ".join(f"{'#' if v else '.':>3}" for v in row))
    return "\n".join(lines)


def demo(args: argparse.Namespace, device: torch.device) -> None:
    """Follow a forward pass of a tiny random PaliGemma, then decode with the KV cache."""
    torch.manual_seed(args.seed)
    config = PaliGemmaConfig.tiny(connector=args.connector)
    model = PaliGemma(config).to(device).eval()
    model.init_weights(std=0.15)   # larger than a training init, so the random model reacts to its input
    v, t = config.vision, config.text
    print(f"tiny random PaliGemma: SigLIP {v.num_hidden_layers} layers x {v.hidden_size}, Gemma "
          f"{t.num_hidden_layers} layers x {t.hidden_size}, H={t.num_attention_heads} K={t.num_key_value_heads}, "
          f"V={t.vocab_size}, connector={config.connector}")
    B, N = 2, config.num_image_tokens
    pixel_values = torch.rand(B, v.num_channels, v.image_size, v.image_size, device=device) * 2 - 1
    prompt = [t.bos_token_id, 10, 11, 12]
    answer = [20, 21, t.eos_token_id]
    input_ids = torch.tensor([[config.image_token_index] * N + prompt + answer] * B, device=device)
    token_type_ids = torch.tensor([[0] * (N + len(prompt)) + [1] * len(answer)] * B, device=device)
    with torch.no_grad():
        patches = model.vision_tower.embeddings.patch_embedding(pixel_values)
        z = model.vision_tower(pixel_values)
        u = model.image_features(pixel_values)
        x = model.embed_inputs(input_ids, pixel_values)
        out = model(input_ids, pixel_values, token_type_ids=token_type_ids,
                    labels=suffix_labels(input_ids, token_type_ids))
    print(f"pixel_values {tuple(pixel_values.shape)} (B, C, I, I) -> patch conv {tuple(patches.shape)} "
          f"-> SigLIP {tuple(z.shape)} (B, N, Dv) -> projector {tuple(u.shape)} (B, N, D)")
    print(f"input_ids {tuple(input_ids.shape)} = {N} <image> + {len(prompt)} prompt + {len(answer)} answer "
          f"-> decoder input {tuple(x.shape)} -> logits {tuple(out.logits.shape)} (B, T, V)")
    E = model.language_model.model.embed_tokens.weight
    print(f"mean |image token| {u[0].norm(dim=-1).mean():.3f} -> {x[0, :N].norm(dim=-1).mean():.3f} (unchanged); "
          f"mean |text token| {E[input_ids[0, N:]].norm(dim=-1).mean():.3f} -> {x[0, N:].norm(dim=-1).mean():.3f} "
          f"(x sqrt(D) = {t.hidden_size ** 0.5:.0f})")
    groups = token_type_ids[:1].cumsum(-1)
    mask = prefix_lm_mask(groups, torch.ones_like(groups, dtype=torch.bool), 0)[0, 0]
    keep = [0, 1, N - 1] + list(range(N, input_ids.shape[1]))   # three of the image columns
    names = ["img"] * 3 + ["bos", "p1", "p2", "p3", "a1", "a2", "eos"]
    print("prefix-LM mask (3 of the image tokens shown; row attends to column where '#'):")
    print(draw_mask(mask[keep][:, keep], names))
    print(f"suffix loss on random weights: {out.loss.item():.4f} (ln V = {math.log(t.vocab_size):.4f})")
    prompt_ids = input_ids[:, :N + len(prompt)]
    gen = model.generate(prompt_ids, pixel_values, max_new_tokens=8, eos_token_id=[], return_scores=True)
    print(f"greedy ids with the KV cache: {gen.tokens[0].tolist()}")
    full_ids = torch.cat([prompt_ids, gen.tokens], 1)
    types = torch.cat([torch.zeros_like(prompt_ids), torch.ones_like(gen.tokens)], 1)
    with torch.no_grad():
        full = model(full_ids, pixel_values, token_type_ids=types).logits[:, prompt_ids.shape[1] - 1:-1]
    print(f"KV cache vs recomputing the whole sequence: max |logit diff| = {(full - gen.scores).abs().max():.2e}")
    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    reloaded = PaliGemma.from_pretrained(out_dir, device=device)
    with torch.no_grad():
        again = reloaded(input_ids, pixel_values, token_type_ids=token_type_ids).logits
    print(f"saved to {out_dir} and reloaded: max |logit diff| = {(again - out.logits).abs().max():.1e}")


def answer(args: argparse.Namespace, device: torch.device) -> None:
    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model = PaliGemma.from_pretrained(args.model, dtype=dtypes[args.dtype], device=device,
                                      load_in_4bit=args.load_in_4bit, adapter=args.adapter)
    processor = PaliGemmaProcessor.from_pretrained(args.model, model.config)
    if not args.image:
        raise ValueError("--image is required with --model")
    batch = processor([Image.open(args.image)], [args.prompt])
    batch = {k: val.to(device) for k, val in batch.items()}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(batch["input_ids"], batch["pixel_values"].to(model.dtype), batch["attention_mask"],
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         generator=generator)
    print(processor.decode(out.tokens)[0])


def memory_report(args: argparse.Namespace) -> None:
    """What fine-tuning PaliGemma-3B takes: full / LoRA / QLoRA, with and without activation checkpointing."""
    config = PaliGemmaConfig()   # paligemma-3b-pt-224: SigLIP So400m/14 at 224 px + Gemma 2B
    rows = memory_rows(config, args.batch_size, args.seq_len)
    print(f"Fine-tuning PaliGemma-3B ({rows[0]['params']:,} parameters; "
          f"LoRA r = 16 on every decoder linear layer), batch of {args.batch_size} x ({config.num_image_tokens} "
          f"image + {args.seq_len} text tokens); activations counted on the meta device:")
    print(memory_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="paligemma.py", description="PaliGemma: answer a prompt about an image, follow a tiny random "
                                         "model's forward pass (no --model), or tabulate what fine-tuning the "
                                         "3B model takes in memory (--memory-report).",
        epilog="No --train, --resume or --tiny: paligemma.py is the forward pass (vlm_train.py trains it), and "
               "its demo always builds the tiny preset.")
    parser.add_argument("--model", type=str, default=None, help="folder with config.json, *.safetensors, tokenizer")
    parser.add_argument("--image", type=str, default=None)
    parser.add_argument("--prompt", type=str, default="caption en")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", type=str, default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto = the checkpoint's dtype")
    parser.add_argument("--load-in-4bit", action="store_true", help="store the linear layers in NF4 (nf4.py)")
    parser.add_argument("--adapter", type=str, default=None, help="a LoRA adapter folder in peft's format (lora.py)")
    parser.add_argument("--connector", type=str, default="linear", choices=["linear", "dense"],
                        help="demo only: the projector's input")
    parser.add_argument("--memory-report", action="store_true",
                        help="print the memory of fine-tuning PaliGemma-3B (full, LoRA, QLoRA; activations "
                             "counted on the meta device, no weights needed) and the smallest GPU for each")
    parser.add_argument("--batch-size", type=int, default=8, help="--memory-report: rows per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="--memory-report: text tokens per row, on top of the 256 image tokens (default 128)")
    # the shared flags, in clip.py's words (tests/test_plumbing.py checks every file's --help says the same)
    parser.add_argument("--out", type=str, default="runs/paligemma/tiny",
                        help="demo: the folder its tiny checkpoint is saved to and reloaded from "
                             "(default runs/paligemma/tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        if args.memory_report:
            memory_report(args)
        elif args.model is None:
            demo(args, device)
        else:
            answer(args, device)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e.args[0]) if isinstance(e, KeyError) else str(e))


if __name__ == "__main__":
    main()

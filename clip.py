"""CLIP: contrastive language-image pre-training, from the lecture's pseudo-code to real checkpoints.

Two encoders map an image and a caption into one E-dimensional space. Training pulls the B matching
pairs of a batch together and pushes the B^2 - B mismatched pairs apart (Radford et al. 2021, Fig. 3):

    I = normalize(image_encoder(images) W_i)        # (B, E) unit vectors
    T = normalize(text_encoder(texts) W_t)          # (B, E)
    logits = exp(t) * I T^T                         # (B, B) scaled cosine similarities
    L = ( CE(logits, diag) + CE(logits^T, diag) ) / 2   # symmetric InfoNCE

The image encoder is a ViT (Dosovitskiy et al. 2021): P x P patches -> linear embedding, a class token,
learned position embeddings, pre-norm transformer blocks; the class token's output is the image. The
text encoder is a causal transformer read out at the end-of-text token (CLIP paper, section 2.4).
The learned scalar t is the LOG of the logit scale, t = ln(1/tau), not the softmax temperature tau
itself (Fig. 3's pseudo-code calls t "learned temperature parameter"): exp(t) = 1/tau multiplies the
cosines, and storing the log keeps it positive. t starts at ln(1/0.07) ~= 2.659 (tau = 0.07) and
training clamps it to [0, ln 100] (`clamp_logit_scale_`), so 1 <= exp(t) <= 100, i.e. 0.01 <= tau <= 1.
qformer.py learns the other parameterisation, tau itself (its `temp`). Zero-shot classification
(section 3.1.2) turns label names into captions ("a photo of a {}"), averages the text embeddings of
several templates (section 3.1.4), and picks the caption nearest the image.

At scale (sections 2.2 and 2.5): 400M (image, text) pairs from the web (WIT, "WebImageText"), 32
epochs, batch 32,768, so every image is told apart from 32,767 wrong captions in each step. Here:
30,000 rendered scenes, batch 128. Why the batch matters so much: see "Why a large batch" below.

Also here: the SigLIP loss (Zhai et al. 2023), which PaliGemma's vision tower is trained with;
gathering features across ranks under torchrun so the loss sees the global batch (as open_clip does);
and the synthetic "shapes" data set (rendered scenes, captions, questions, a held-out split of
colour-shape combinations) that qformer.py and vlm_train.py reuse.

Compositional generalisation. `--train` holds four colour-shape pairs out of training (a red circle
is never seen, though red things and circles are), then classifies scenes of those pairs zero-shot
among all 24 pairs ("a photo of a red circle", ...): right means colour and kind both right. This is
the compositional zero-shot test of Misra et al. (2017, "From red wine to red tomato"). Four choices
make a few-minute CPU run pass it, and the README measures each (and every seed of five,
`benchmarks/bench_clip_seeds.py`):
  1. CLIP's initialisation (`init_weights`). With GPT-2's std 0.02 everywhere the small model
     learns far more slowly (`--init gpt2`).
  2. White outlines (`RIM`). A pure red circle's edge exists only in the R channel, so without an edge
     that looks alike in every colour the ViT learns shape detectors partly per colour, and the kind
     of a red circle, never seen, is read far less reliably (`--no-rim`).
  3. Many distinct scenes (`TrainConfig.n_train`), so that no scene is seen often enough to be
     memorised whole.
  4. Enough steps (`TrainConfig.steps`): each scene is seen about 8 times in 2000.
Prompts that name one attribute show what is left of the binding failure Yuksekgonul et al. (2023,
"When and why vision-language models behave like bags-of-words") measure in real CLIPs. "a photo of a
circle" was only ever written under non-red images, so it leans away from red, and the kind of a red
circle read from that prompt alone is wrong more often than from "a photo of a red circle".

Conventions: module names equal the keys of transformers' `CLIPModel`, so `CLIP.from_pretrained`
loads a checkpoint folder strictly; images are (B, C, I, I) normalised with CLIP's mean and std;
text is right-padded and every row contains the end-of-text token. Left out: dropout, the
ResNet image encoder, interpolation of position embeddings to other image sizes, and BPE (the shapes
data use a word-level tokenizer; real checkpoints use transformers' tokenizer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

# CLIP's image normalisation (openai/CLIP `_transform`; transformers' OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class CLIPConfig:
    """Both towers and the shared space. Defaults are the small model `--train` fits on a CPU."""
    # vision tower: a ViT over (C, I, I) images cut into (I/P)^2 patches
    image_size: int = 48            # I
    patch_size: int = 8             # P
    num_channels: int = 3           # C
    vision_width: int = 64          # D of the ViT
    vision_layers: int = 2          # L
    vision_heads: int = 4           # H
    vision_mlp: int = 256           # F
    vision_act: str = "quick_gelu"
    # text tower: a causal transformer over T tokens
    vocab_size: int | None = None   # V; None = the shapes tokenizer's
    context_length: int = 24        # T, the longest caption plus start and end tokens
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 256
    text_act: str = "quick_gelu"
    eos_token_id: int | None = None  # the end-of-text token the text is read out at; None = the shapes tokenizer's
    # shared space and logit scale
    embed_dim: int = 64             # E, width of the joint embedding space
    layer_norm_eps: float = 1e-5
    # t, the log of the logit scale: t = ln(1/tau) for CLIP's initial temperature tau = 0.07 (section 2.5,
    # after Wu et al. 2018): 1/0.07 = 14.29, ln(14.29) = ln(100/7) = 4.6052 - 1.9459 = 2.6593. The logits
    # start as cosines times exp(t) = 14.3, so a cosine gap of 0.1 is a logit gap of 1.4.
    logit_scale_init: float = math.log(1 / 0.07)
    num_patches: int = field(init=False)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.num_patches = (self.image_size // self.patch_size) ** 2   # N
        if self.vocab_size is None:
            self.vocab_size = ShapesTokenizer.vocab_size
        if self.eos_token_id is None:
            self.eos_token_id = ShapesTokenizer.eos_token_id

    @classmethod
    def tiny(cls, **overrides) -> CLIPConfig:
        """A model of some 55k parameters for tests and the seconds-long demo."""
        small = dict(image_size=32, patch_size=8, vision_width=48, vision_layers=1, vision_heads=2,
                     vision_mlp=96, text_width=48, text_layers=1, text_heads=2, text_mlp=96, embed_dim=32)
        return cls(**{**small, **overrides})


# ----------------------------------------------------------------------------------------------
# The losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid
# ----------------------------------------------------------------------------------------------

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, Fig. 3); `logit_scale` is the multiplier exp(t).

    Row i of the similarity matrix asks "which caption belongs to image i?", column j asks "which
    image belongs to caption j?"; the right answer is always the diagonal.
    """
    image_features = F.normalize(image_features, dim=-1)                 # (B, E), unit length
    text_features = F.normalize(text_features, dim=-1)                   # (B, E)
    # logits_ij = exp(t) cos(I_i, T_j)
    logits = logit_scale * image_features @ text_features.t()            # (B, B)
    return symmetric_cross_entropy(logits)


def symmetric_cross_entropy(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """InfoNCE's second half on any square (B, B) logits matrix whose diagonal holds the matched pairs.
    qformer.py's ITC loss is this on its max-over-queries similarity; BLIP-2 smooths the labels."""
    labels = torch.arange(logits.shape[0], device=logits.device)         # the diagonal is correct
    # L = (CE over rows + CE over columns) / 2
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing)) / 2


# Why a large batch. Each row of the loss is a B-way classification: find the one true caption among B,
# one positive against B - 1 negatives. Features that carry nothing score exactly log B (`python clip.py`
# prints it), and InfoNCE bounds the mutual information it can certify by I(image; text) >= log B - L
# (van den Oord et al. 2018, section 2.3): however good the encoders, a batch of B measures at most log B
# nats, ln 128 = 4.85 here and ln 32,768 = 10.4 for CLIP. More negatives are also harder ones: among
# 32,767 random captions some are near-misses ("a dog on the grass" for a dog on the sand) that force
# fine distinctions, where a batch of 128 rarely holds one. So CLIP gathers the features of all GPUs into one
# batch (`gather_with_grad`), and our small batches are built from hard-negative pairs instead
# (`batch_indices`): each scene comes with a caption that differs in one shape's kind or colour.


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023, eq. 1, Algorithm 1).

    Every (image, caption) pair is its own binary question "do these match?", with label z_ij = +1 on
    the diagonal and -1 elsewhere. No softmax normalises a row or a column, so no term needs the whole
    batch's similarities at once: under data parallelism each device can score its images against
    one chunk of captions at a time, and the loss scales to huge batches. The learned bias b (SigLIP
    starts it at -10, with exp(t) = 10) offsets the prior that almost all pairs are negatives.
    """
    image_features = F.normalize(image_features, dim=-1)                 # (B, E)
    text_features = F.normalize(text_features, dim=-1)                   # (B, E)
    logits = logit_scale * image_features @ text_features.t() + logit_bias   # (B, B)
    z = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1   # +1 diagonal, -1 off
    # L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)); the paper's multiplier t is our exp(t)
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


# ----------------------------------------------------------------------------------------------
# The transformer block both towers share (and paligemma.py's SigLIP tower reuses)
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = {
    # QuickGELU, x * sigmoid(1.702 x): the sigmoid approximation of GELU openai's CLIP was trained with
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    # SigLIP (transformers' "gelu_pytorch_tanh") uses the tanh approximation
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Attention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(d) + mask) V, with CLIP's projection names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.heads, -1).transpose(1, 2)    # (B, T, D) -> (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.heads, -1).transpose(1, 2)    # (B, H, T, d)
        v = self.v_proj(x).view(B, T, self.heads, -1).transpose(1, 2)    # (B, H, T, d)
        # softmax(q k^T / sqrt(d) + mask) v; the mask is additive (0 = attend, very negative = do not)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, D)                           # (B, H, T, d) -> (B, T, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))                           # (B, T, D) -> (B, T, F) -> (B, T, D)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

    Submodule names equal transformers' CLIP and SigLIP keys (`layer_norm1`, `self_attn.q_proj`, ...,
    `mlp.fc1`), so a checkpoint's `encoder.layers.{i}.*` tensors load into it unchanged.
    x is (B, T, D): T text tokens, or the ViT's 1+N tokens (the shape comments of these shared blocks
    write T for both). `attn_mask` is an optional additive float mask broadcastable to (B, H, T, T).
    """

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, activation)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attn_mask)          # (B, T, D)
        return x + self.mlp(self.layer_norm2(x))                         # (B, T, D)


class Encoder(nn.Module):
    """A stack of L blocks, held as `layers` so the keys read `encoder.layers.{i}.*`."""

    def __init__(self, layers: int, width: int, heads: int, mlp_width: int, activation: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, mlp_width, activation, eps)
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> torch.Tensor | list[torch.Tensor]:
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attn_mask)
            hidden.append(x)
        return hidden if output_hidden_states else x


# ----------------------------------------------------------------------------------------------
# Image encoder: a ViT (Dosovitskiy et al. 2021) with CLIP's extra pre-norm
# ----------------------------------------------------------------------------------------------

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        D = cfg.vision_width
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        # a P x P convolution with stride P is a linear map applied to every flattened patch
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)                           # (B, C, I, I) -> (B, D, I/P, I/P)
        x = x.flatten(2).transpose(1, 2)                                 # (B, N, D), patches in raster order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)                                   # (B, 1+N, D)
        return x + self.position_embedding.weight                        # (B, 1+N, D)


class VisionTransformer(nn.Module):
    """Image -> token sequence (B, 1+N, D), and the class token's pooled vector (B, D).

    `forward` returns every token after the last block (transformers' `last_hidden_state`): a frozen
    feature map that qformer.py cross-attends to. `pool` reads the class token, as CLIP does.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.vision_width, eps=cfg.layer_norm_eps)  # sic: the checkpoint key
        self.encoder = Encoder(cfg.vision_layers, cfg.vision_width, cfg.vision_heads, cfg.vision_mlp,
                               cfg.vision_act, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.vision_width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor,
                output_hidden_states: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, I, I) -> (B, 1+N, D); with output_hidden_states, the list of all L+1 such tensors."""
        check_pixel_values(pixel_values, self.cfg)
        x = self.pre_layrnorm(self.embeddings(pixel_values))            # (B, 1+N, D)
        return self.encoder(x, output_hidden_states=output_hidden_states)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(tokens[:, 0])                         # (B, 1+N, D) -> (B, D)


def check_pixel_values(pixel_values: torch.Tensor, cfg: CLIPConfig) -> None:
    expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values must have shape (B, {', '.join(map(str, expected))}) "
                         f"(batch, channels, height, width); got {tuple(pixel_values.shape)}")


# ----------------------------------------------------------------------------------------------
# Text encoder: a causal transformer read out at the end-of-text token (CLIP section 2.4)
# ----------------------------------------------------------------------------------------------

class TextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.text_width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]   # (B, T) -> (B, T, D)


def text_attention_mask(attention_mask: torch.Tensor | None, T: int, dtype: torch.dtype,
                        device: torch.device | str) -> torch.Tensor:
    """Additive mask (B, 1, T, T), or (T, T) without a padding mask: token i sees tokens j <= i that are
    not padding.

    A large negative number instead of -inf keeps a fully masked row (a padding query with left
    padding) finite instead of NaN; the rows that matter are unaffected. The padding mask is applied
    even when it is all ones: asking "is there any padding?" would read a value back from the device,
    a GPU -> CPU sync on every call, to skip work that costs less than the wait.
    """
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()   # (T, T) causal
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]     # (B, 1, T, T): hide padding keys
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def pool_eos(hidden: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Read each row out at its end-of-text token: (B, T, D) -> (B, D).

    transformers' rule: configs with eos_token_id == 2 predate a fix and take the highest token id (in
    CLIP's BPE vocabulary that is end-of-text, 49407); newer configs take the first eos_token_id, which
    stays right when padding uses the same id. A row without that token would be read at position 0;
    `CLIP.encode_text` refuses such rows (`check_input_ids` with values=True), not this function, which
    runs inside every forward pass and so must not read values back from the device.
    """
    if eos_token_id == 2:
        index = input_ids.argmax(dim=-1)                                 # (B,)
    else:
        index = (input_ids == eos_token_id).int().argmax(dim=-1)         # (B, T) -> (B,) first end-of-text
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.text_layers, cfg.text_width, cfg.text_heads, cfg.text_mlp,
                               cfg.text_act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, optional (B, T) 1/0 padding mask -> (B, T, D) after the final LayerNorm."""
        check_input_ids(input_ids, self.cfg)
        x = self.embeddings(input_ids)                                   # (B, T, D)
        mask = text_attention_mask(attention_mask, input_ids.shape[1], x.dtype, x.device)
        return self.final_layer_norm(self.encoder(x, mask))             # (B, T, D)


def check_input_ids(input_ids: torch.Tensor, cfg: CLIPConfig, values: bool = False) -> None:
    """Shape, dtype and length: tensor metadata, free on any device. values=True also checks what the ids
    hold (each in [0, V), an end-of-text token in every row), which reads them back: on an accelerator
    that is a GPU -> CPU sync, so only `CLIP.encode_text`, where ids come in from the user, asks for it."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be an integer tensor of shape (B, T); got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > cfg.context_length:
        raise ValueError(f"text of {input_ids.shape[1]} tokens is longer than the context length "
                         f"{cfg.context_length}")
    if not values or not input_ids.numel():
        return
    if not (0 <= int(input_ids.min()) and int(input_ids.max()) < cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got [{int(input_ids.min())}, "
                         f"{int(input_ids.max())}]")
    has_eos = (input_ids == cfg.eos_token_id).any(dim=-1)                # (B,)
    if cfg.eos_token_id != 2 and not bool(has_eos.all()):               # id 2: read at the highest id (pool_eos)
        missing = (~has_eos).nonzero().flatten().tolist()
        raise ValueError(f"rows {missing} of input_ids have no end-of-text token (id {cfg.eos_token_id}); "
                         "the text encoder reads each row out at that token")


# ----------------------------------------------------------------------------------------------
# The dual encoder
# ----------------------------------------------------------------------------------------------

class CLIP(nn.Module):
    """ViT + text transformer + two projections into one space + a learned logit scale t = ln(1/tau).

    Attribute names equal transformers' `CLIPModel` state-dict keys (`vision_model.*`, `text_model.*`,
    `visual_projection`, `text_projection`, `logit_scale`). `encode_*` return unnormalised
    embeddings, as openai/CLIP does; `forward` returns the scaled cosine-similarity matrices.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg)
        self.text_model = TextTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # t = ln(1/tau), the log of the logit scale (not the temperature tau): exp(t) stays positive;
        # exp(ln(1/0.07)) = 14.3. qformer.py's `temp` stores tau itself: temp = exp(-t).
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        init_weights(self)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_model(pixel_values)                         # (B, 1+N, D)
        return self.visual_projection(self.vision_model.pool(tokens))    # (B, D) -> (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    buckets: int = 4) -> torch.Tensor:
        """(B, T) right-padded ids -> (B, E). Long batches on the CPU run in `buckets` groups of similar length.

        The mask is causal, so no token ever sees a later one: the padding after a caption cannot
        change its end-of-text output, and cutting a group's columns to its own longest caption gives
        the same embeddings for less work (a padded batch of captions of 5 to 39 tokens does about a
        third fewer token-layers). Left padding, or a short batch, runs as one group.

        Ids and lengths are read (value checks, group lengths) only on the CPU and outside torch.compile.
        On an accelerator each read is a GPU -> CPU sync that stalls the host every call, for checks the
        tokenizers here never fail and for padded columns that cost the GPU less than the wait; there,
        hand-made ids are the caller's to check (`check_input_ids(ids, cfg, values=True)`).
        """
        on_host = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
        check_input_ids(input_ids, self.cfg, values=on_host)
        B = input_ids.shape[0]
        if attention_mask is None or B < 8 * buckets or not on_host or attention_mask.device.type != "cpu":
            return self._encode_text(input_ids, attention_mask)
        lengths = attention_mask.sum(1)                                  # (B,)
        right_padded = attention_mask.bool() == (torch.arange(input_ids.shape[1], device=lengths.device) < lengths[:, None])
        if not bool(right_padded.all()):
            return self._encode_text(input_ids, attention_mask)
        order = lengths.argsort()
        pieces = []
        for rows in order.chunk(buckets):                               # shortest captions first
            T = int(lengths[rows].max())
            pieces.append(self._encode_text(input_ids[rows, :T], attention_mask[rows, :T]))
        return torch.cat(pieces)[order.argsort()]                        # back to the input order

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.text_model(input_ids, attention_mask)              # (B, T, D)
        pooled = pool_eos(hidden, input_ids, self.cfg.eos_token_id)      # (B, D)
        return self.text_projection(pooled)                              # (B, E)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))."""
        image = F.normalize(self.encode_image(pixel_values), dim=-1)     # (B_img, E)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)   # (B_txt, E)
        # Not clamped here: training clamps the parameter itself (`clamp_logit_scale_`), and
        # transformers applies exp(t) as loaded, so checkpoints give the same logits in both.
        logits_per_image = self.logit_scale.exp() * image @ text.t()     # (B_img, B_txt)
        return logits_per_image, logits_per_image.t()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIP:
        """Load a transformers CLIPModel checkpoint folder (or one `save_pretrained` wrote), strictly."""
        config, tensors = read_checkpoint(folder)
        model = cls(config_from_hf(config))
        load_strict(model, tensors, folder)
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors in transformers' layout (CLIPModel.from_pretrained reads them)."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config_to_hf(self.cfg), indent=2)))

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp t to [0, ln 100] after each step: 1 <= exp(t) <= 100, i.e. 0.01 <= tau <= 1.

        The upper bound is the paper's (section 2.5: the temperature is "clipped to prevent scaling the
        logits by more than 100", which it found necessary for stability). The lower bound 0 (tau <= 1:
        logits never smaller than the cosines) is not in the paper; it is what open_clip's training loop
        does, and we follow it. qformer.py clamps its tau directly, to [0.001, 0.5], as LAVIS does.
        """
        self.logit_scale.clamp_(0, math.log(100))                        # t in [0, ln 100]


def init_weights(model: CLIP, scheme: str = "clip") -> None:
    """CLIP's initialisation as transformers has it (`CLIPPreTrainedModel._init_weights`, modeling_clip.py).
    In a tower of width w and L blocks:

        token, position and patch embeddings   N(0, 0.02^2)        class token   N(0, 1/w)
        q, k, v projections and mlp.fc2        N(0, 1/(2 L w))     out_proj      N(0, 1/w)
        mlp.fc1                                N(0, 1/(2 w))       projections   N(0, 1/w_tower)
        biases 0, LayerNorm gains 1

    openai/CLIP's `initialize_parameters` (model.py) puts the two attention factors the other way round:
    q, k, v (its in_proj) at 1/w and out_proj at 1/(2 L w); fc1 and fc2 agree. The value path v ->
    out_proj multiplies the same two stds either way; transformers' q and k start smaller, so its
    first attention patterns are flatter. A linear map with std w^-1/2 keeps the size of its input, so
    every block's attention and MLP speak up from the first step (the 1/(2L) shares the residual stream
    among the 2L branches). GPT-2's rule of std 0.02 everywhere (scheme="gpt2", `--init gpt2`) makes a
    width-64, 2-layer tower's matrices 3.1 (q, k, v, fc2), 4.4 (fc1) and 6.25 (out_proj) times smaller
    in std, so each residual branch, two matrices in series, starts about 14 (MLP: 4.4 x 3.1) to 20
    (attention: 3.1 x 6.25) times quieter; README, "Training on shapes", measures what that costs.
    """
    if scheme not in ("clip", "gpt2"):
        raise ValueError(f"init scheme must be 'clip' or 'gpt2', got {scheme!r}")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if scheme == "gpt2":
        return
    for tower in (model.vision_model, model.text_model):
        L = len(tower.encoder.layers)
        for layer in tower.encoder.layers:
            w = layer.layer_norm1.normalized_shape[0]
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc2):
                nn.init.normal_(proj.weight, std=(2 * L * w) ** -0.5)
            nn.init.normal_(attn.out_proj.weight, std=w ** -0.5)
            nn.init.normal_(mlp.fc1.weight, std=(2 * w) ** -0.5)
    nn.init.normal_(model.vision_model.embeddings.class_embedding, std=model.cfg.vision_width ** -0.5)
    nn.init.normal_(model.visual_projection.weight, std=model.cfg.vision_width ** -0.5)
    nn.init.normal_(model.text_projection.weight, std=model.cfg.text_width ** -0.5)


# ----------------------------------------------------------------------------------------------
# The shapes data set: rendered scenes with captions, structured descriptions and questions
# ----------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230),
           "yellow": (235, 205, 30), "purple": (150, 60, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.20, "large": 0.30}          # diameter as a fraction of the image side
SHADE = 30                                        # each RGB channel of a shape varies by up to this
GRID = 3                                          # shapes sit in distinct cells of a 3 x 3 grid
BACKGROUND = (40, 40, 40)
# rim=True, the default, draws every shape with a white outline three quarters of a pixel wide. Without
# it (`--no-rim`) a shape's edge exists only in the channels of its colour (a red circle is a disc in the
# R channel alone), so the ViT learns kind detectors partly per colour and reads the kind of a red
# circle, never seen, far less reliably. The rim looks the same in every colour, like the luminance
# edges that carry shape across object colours in photographs; README, "Training on shapes", measures
# what it changes.
RIM, RIM_WIDTH = (255, 255, 255), 0.75
# Colour-shape pairs that never occur in training scenes: each held-out colour and each held-out shape
# is seen in training with other partners, so recognising them tests compositional generalisation.
HELDOUT = frozenset({("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "diamond")})
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_WORDS = "how many are there what colour size shape object is where relative yes no"
CAPTION_PREFIXES = ("", "a photo of ", "a picture of ", "an image of ")
# Zero-shot prompts for a "colour shape" label (CLIP section 3.1.4 ensembles 80 of these on ImageNet).
TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}",
             "a small {}", "a large {}", "a photo of a small {}", "a photo of a large {}")


@dataclass(frozen=True)
class Shape:
    kind: str        # one of SHAPES
    colour: str      # one of COLOURS
    size: str        # "small" or "large"
    x: float         # centre, fraction of the image width (0 = left)
    y: float         # centre, fraction of the image height (0 = top)
    rgb: tuple | None = None   # the colour drawn, a shade near COLOURS[colour]; None = exactly COLOURS[colour]

    @property
    def col(self) -> int:
        return min(int(self.x * GRID), GRID - 1)

    @property
    def row(self) -> int:
        return min(int(self.y * GRID), GRID - 1)

    def phrase(self, detail: str = "full") -> str:
        """"a large red circle" (full), "a red circle" (no_size), "a red shape" (colour), "a circle" (kind)."""
        words = {"full": (self.size, self.colour, self.kind), "no_size": (self.colour, self.kind),
                 "colour": (self.colour, "shape"), "kind": (self.kind,)}[detail]
        return "a " + " ".join(words)


@dataclass(frozen=True)
class Scene:
    shapes: tuple    # of Shape, in the order the caption names them


def relation(a: Shape, b: Shape) -> str:
    """Where a is relative to b: left/right when their grid columns differ, else above/below."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def shade(colour: str, rng: random.Random, spread: int = SHADE) -> tuple[int, int, int]:
    """A random shade of a named colour: each channel moved by up to `spread`. Shapes are never drawn in
    exactly one RGB value per name, so the encoder cannot tie a shape to one exact colour value."""
    return tuple(min(255, max(0, v + rng.randint(-spread, spread))) for v in COLOURS[colour])


def random_scene(rng: random.Random, split: str = "train", max_shapes: int = 4) -> Scene:
    """Draw a scene: 1..max_shapes shapes in distinct grid cells.

    split "train" / "test": only colour-shape pairs outside HELDOUT; "heldout": one shape (the first
    of one or two; anywhere in a longer, position-sorted list) is a held-out pair, the others anything. Scenes with one or two shapes are the most common, because their
    captions name every attribute and the relation explicitly.
    """
    if split not in ("train", "test", "heldout"):
        raise ValueError(f"split must be 'train', 'test' or 'heldout', got {split!r}")
    n = rng.choices(range(1, max_shapes + 1), weights=[4, 3, 2, 1][:max_shapes])[0]
    cells = rng.sample(range(GRID * GRID), n)
    shapes = []
    for i, cell in enumerate(cells):
        while True:
            colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if split != "heldout" and (colour, kind) not in HELDOUT:
                break
            if split == "heldout" and (i > 0 or (colour, kind) in HELDOUT):
                break
        row, col = divmod(cell, GRID)
        # centre of the cell, jittered a little so positions are not a lattice
        x = (col + 0.5 + rng.uniform(-0.12, 0.12)) / GRID
        y = (row + 0.5 + rng.uniform(-0.12, 0.12)) / GRID
        shapes.append(Shape(kind, colour, rng.choice(list(SIZES)), x, y, shade(colour, rng)))
    if n > 2:   # several shapes are named left to right, top to bottom
        shapes.sort(key=lambda s: (s.col, s.row))
    return Scene(tuple(shapes))


def perturb(scene: Scene, rng: random.Random, split: str = "train", attribute: str = "kind") -> Scene:
    """A hard negative: the same scene with the `attribute` ("kind" or "colour") of one shape changed.

    Positions and sizes stay, so only that attribute tells the two apart (NegCLIP, Yuksekgonul et al.
    2023, builds such negatives from captions). Under "train"/"test" the new pair stays outside HELDOUT.
    """
    i = rng.randrange(len(scene.shapes))
    old = scene.shapes[i]
    options = [(c, k) for c in COLOURS for k in SHAPES
               if (c, k) != (old.colour, old.kind) and (c == old.colour if attribute == "kind" else k == old.kind)
               and (split == "heldout" or (c, k) not in HELDOUT)]
    colour, kind = rng.choice(options)
    new = Shape(kind, colour, old.size, old.x, old.y, shade(colour, rng))
    return Scene(scene.shapes[:i] + (new,) + scene.shapes[i + 1:])


DETAILS = ("full", "no_size", "colour", "kind")
# how often a caption names every attribute, all but the size, only the colour, only the kind
DETAIL_WEIGHTS = (3, 3, 1, 1)


def caption(scene: Scene, prefix: str = "", detail: str = "full") -> str:
    """"a large red circle to the left of a small blue square"; three or more shapes are listed.

    `prefix` opens the caption ("a photo of "); `detail` says which attributes each shape's phrase
    names (see `Shape.phrase`). Captions that name only the colour or only the kind are true but
    partial, like much web alt-text; they make the model keep colour and shape as separate directions.
    """
    p = [x.phrase(detail) for x in scene.shapes]
    if len(p) == 1:
        body = p[0]
    elif len(p) == 2:
        body = f"{p[0]} {relation(*scene.shapes)} {p[1]}"
    else:
        body = f"{COUNT_WORDS[len(p)]} shapes: " + ", ".join(p[:-1]) + f" and {p[-1]}"
    return prefix + body


def render(scene: Scene, image_size: int = 48, supersample: int = 4, rim: bool = True) -> Image.Image:
    """Draw the scene with pillow; drawn `supersample` times larger, then downsized for smooth edges.
    rim=True (the default) outlines every shape in white (RIM), inside its edge; rim=False draws fills only."""
    side = image_size * supersample
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    edge = dict(outline=RIM, width=max(1, round(RIM_WIDTH * supersample))) if rim else {}
    for s in scene.shapes:
        cx, cy, r = s.x * side, s.y * side, SIZES[s.size] * side / 2
        fill = s.rgb or COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, **edge)
        elif s.kind == "square":
            h = r * 0.85   # a slightly smaller square has about a circle's area
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, **edge)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill, **edge)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, **edge)
    return img.resize((image_size, image_size), Image.BOX)


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Question-answer pairs that the scene answers unambiguously (for the VQA files).

    Kinds: count ("how many shapes are there?"), colour of a shape named by kind, shape of an object
    named by colour, size, relative position of two named shapes, and existence of a colour-shape pair.
    """
    s = scene.shapes
    qa = [("how many shapes are there?", COUNT_WORDS[len(s)])]
    for x in s:
        if sum(y.kind == x.kind for y in s) == 1:
            qa.append((f"what colour is the {x.kind}?", x.colour))
            qa.append((f"what size is the {x.kind}?", x.size))
        if sum(y.colour == x.colour for y in s) == 1:
            qa.append((f"what shape is the {x.colour} object?", x.kind))
    named = [x for x in s if sum((y.colour, y.kind) == (x.colour, x.kind) for y in s) == 1]
    for a in named:
        for b in named:
            if a is not b:   # one-word answer: "left", "right", "above" or "below"
                answer = relation(a, b).replace("to the ", "").replace(" of", "")
                qa.append((f"where is the {a.colour} {a.kind} relative to the {b.colour} {b.kind}?", answer))
    present = {(x.colour, x.kind) for x in s}
    colour, kind = next((c, k) for c in COLOURS for k in SHAPES if (c, k) not in present)
    qa.append((f"is there a {s[0].colour} {s[0].kind}?", "yes"))
    qa.append((f"is there a {colour} {kind}?", "no"))
    return qa


def to_pixel_values(images: Sequence[Image.Image], mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """PIL images (all I x I, RGB) -> (B, C, I, I) float tensor normalised with CLIP's mean and std."""
    return normalize(torch.from_numpy(np.stack([np.asarray(im) for im in images])), mean, std)


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(B, I, I, C) uint8 -> (B, C, I, I) float, (x / 255 - mean) / std per channel. `train` keeps its
    scenes as bytes, a quarter of the memory of floats, and normalises one batch at a time."""
    x = images.permute(0, 3, 1, 2).float() / 255.0                       # (B, C, I, I) in [0, 1]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


@dataclass(eq=False)
class ShapesDataset(torch.utils.data.Dataset):
    """`size` scenes of one split; item i is (pixel_values (C, I, I), caption, Scene).

    Item i depends only on (seed, split, i), so any item can be regenerated in any order and on any
    rank. The caption's opening ("a photo of ", ...) and whether it names sizes also vary with i.
    With hard_negatives=True, item 2k+1 is `perturb` of item 2k (keep such pairs in one batch).
    rim=False leaves out the white outlines (see `render`). Batch with `collate`, or render every
    item at once with `render_split`.
    """
    size: int
    split: str = "train"
    seed: int = 0
    image_size: int = 48
    max_shapes: int = 4
    hard_negatives: bool = False
    rim: bool = True

    def __post_init__(self) -> None:
        random_scene(random.Random(0), self.split)       # validates split

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> tuple[Scene, str]:
        """Item i's (Scene, caption), without rendering."""
        base = i - i % 2 if self.hard_negatives else i
        rng = random.Random(f"shapes-{self.seed}-{self.split}-{base}")   # str seeds are stable across runs
        scene = random_scene(rng, self.split, self.max_shapes)
        prefix, detail = rng.choice(CAPTION_PREFIXES), rng.choices(DETAILS, weights=DETAIL_WEIGHTS)[0]
        if base != i:   # change what the caption names, so that the two captions differ
            scene = perturb(scene, rng, self.split, "colour" if detail == "colour" else "kind")
        return scene, caption(scene, prefix, detail)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, Scene]:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a data set of {self.size}")
        scene, text = self.scene(i)
        pixels = to_pixel_values([render(scene, self.image_size, rim=self.rim)])[0]   # (C, I, I)
        return pixels, text, scene


def collate(batch: Sequence[tuple[torch.Tensor, str, Scene]]) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """[(pixels, caption, scene)] -> ((B, C, I, I), list of captions, list of scenes)."""
    pixels, captions, scenes = zip(*batch)
    return torch.stack(pixels), list(captions), list(scenes)


class ShapesTokenizer:
    """Word-level tokenizer for the shapes captions, prompts and questions, with a fixed context length.

    ids: 0 = padding, 1 = unknown word, then the words, then start-of-text and end-of-text. As in CLIP's
    BPE vocabulary, end-of-text is the highest id, so both of transformers' pooling rules (the first
    end-of-text token, or the highest id) find it. Punctuation is dropped.
    """
    WORDS = sorted({w for text in (" ".join(COLOURS), " ".join(SHAPES), " ".join(SIZES), " ".join(COUNT_WORDS),
                                   "shapes and to the left right of above below", " ".join(CAPTION_PREFIXES),
                                   " ".join(TEMPLATES).replace("{}", ""), QUESTION_WORDS)
                    for w in text.split()})
    ITOS = ["<pad>", "<unk>"] + WORDS + ["<start_of_text>", "<end_of_text>"]
    pad_token_id, unk_token_id = 0, 1
    sot_token_id, eos_token_id = len(ITOS) - 2, len(ITOS) - 1
    vocab_size = len(ITOS)

    def __init__(self, context_length: int = 24, words: Iterable[str] | None = None):
        self.context_length = context_length
        if words is not None:              # another vocabulary in the same layout (vlm_train.py: a --data folder's)
            self.ITOS = ["<pad>", "<unk>"] + sorted(set(words) - {"<pad>", "<unk>"}) + ["<start_of_text>", "<end_of_text>"]
            self.sot_token_id, self.eos_token_id, self.vocab_size = len(self.ITOS) - 2, len(self.ITOS) - 1, len(self.ITOS)
        self.stoi = {w: i for i, w in enumerate(self.ITOS)}

    @staticmethod
    def words(text: str) -> list[str]:
        return "".join(c if c.isalnum() else " " for c in text.lower()).split()

    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of str -> (input_ids, attention_mask), both (B, T) with T = context_length."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for b, text in enumerate(texts):
            row = [self.sot_token_id] + [self.stoi.get(w, self.unk_token_id) for w in self.words(text)] + [self.eos_token_id]
            if len(row) > self.context_length:
                raise ValueError(f"text has {len(row)} tokens with start and end, more than the context "
                                 f"length {self.context_length}: {text!r}")
            ids[b, :len(row)] = torch.tensor(row)
        return ids, (ids != self.pad_token_id).long()

    __call__ = encode

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """(T,) ids -> the words between start- and end-of-text."""
        out = []
        for i in ids.tolist() if torch.is_tensor(ids) else ids:
            if i == self.eos_token_id:
                break
            if i not in (self.pad_token_id, self.sot_token_id):
                out.append(self.ITOS[i])
        return " ".join(out)



# ----------------------------------------------------------------------------------------------
# Using a trained CLIP: zero-shot classification and retrieval
# ----------------------------------------------------------------------------------------------

# tokenize(texts) -> (input_ids, attention_mask), both (B, T): a ShapesTokenizer, or `hf_tokenizer`'s function
Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def text_classifier(model: CLIP, tokenize: Tokenize, labels: Sequence[str],
                    templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """One unit vector per label: the mean of its prompts' normalised text embeddings, renormalised.

    CLIP section 3.1.4: averaging "a photo of a {}", "a picture of a {}", ... in embedding space is a
    cheap ensemble that beats any single prompt. tokenize: list of str -> (input_ids, attention_mask).
    """
    labels = list(labels)
    if not labels:
        raise ValueError("zero-shot classification needs at least one label; got an empty list")
    if not templates:
        raise ValueError("need at least one prompt template, e.g. 'a photo of a {}'")
    device = model.logit_scale.device
    rows = []
    for label in labels:
        ids, mask = tokenize([t.format(label) for t in templates])
        e = F.normalize(model.encode_text(ids.to(device), mask.to(device)), dim=-1)   # (len(templates), E)
        rows.append(F.normalize(e.mean(0), dim=-1))                                     # (E,)
    return torch.stack(rows)                                                            # (len(labels), E)


@torch.no_grad()
def zero_shot(model: CLIP, pixel_values: torch.Tensor, classifier: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Index of the most similar label for each image: argmax_k cos(image, label_k)."""
    preds = []
    for s in range(0, len(pixel_values), batch_size):
        image = F.normalize(model.encode_image(pixel_values[s:s + batch_size].to(classifier.device)), dim=-1)
        preds.append((image @ classifier.t()).argmax(-1).cpu())                        # (B,)
    return torch.cat(preds)


def recall_at_k(similarity: torch.Tensor, correct: torch.Tensor | None = None,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval metrics from a (B_img, B_txt) similarity matrix, images by texts.

    correct[i, j] says that text j describes image i (default: the diagonal). For each query the rank is
    1 + the number of wrong candidates scored at or above its best right one (a tie is not a retrieval:
    a model that scores every caption alike ranks each query last, not first); Recall@K is the share of
    queries with rank <= K. Returns {"i2t R@K", "t2i R@K" (in %), "i2t median rank", "t2i median rank"}.
    """
    similarity = torch.as_tensor(similarity, dtype=torch.float64)
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be a (n_images, n_texts) matrix; got shape {tuple(similarity.shape)}")
    if correct is None:
        if similarity.shape[0] != similarity.shape[1]:
            raise ValueError(f"a {tuple(similarity.shape)} matrix needs `correct`; the diagonal default "
                             "needs as many texts as images")
        correct = torch.eye(len(similarity), dtype=torch.bool)
    correct = torch.as_tensor(correct, dtype=torch.bool)
    out = {}
    for name, s, c in (("i2t", similarity, correct), ("t2i", similarity.t(), correct.t())):
        if not bool(c.any(1).all()):
            raise ValueError(f"every {name[0] == 'i' and 'image' or 'text'} needs at least one correct match")
        best_right = s.masked_fill(~c, -math.inf).amax(1, keepdim=True)                   # i2t: (B_img, 1)
        ranks = 1 + (s.masked_fill(c, -math.inf) >= best_right).sum(1)                      # i2t: (B_img,)
        for k in ks:
            out[f"{name} R@{k}"] = 100 * (ranks <= k).double().mean().item()
        out[f"{name} median rank"] = ranks.double().median().item()
    return out


# ----------------------------------------------------------------------------------------------
# Training on the shapes data set, on one process or several (torchrun)
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """`python clip.py --train`: a few minutes on a 2-core CPU."""
    steps: int = 2000              # each of the n_train scenes seen about 8 times (README: why 2000)
    batch_size: int = 128          # global batch: every image is contrasted with 127 captions
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    n_train: int = 30000           # scenes rendered once (as bytes, 200 MB), then drawn in hard-negative pairs
    rim: bool = True               # white outlines (`render`), in training and evaluation; --no-rim: none
    init: str = "clip"             # `init_weights` scheme: "clip", or "gpt2" (std 0.02 everywhere; --init gpt2)
    n_eval: int = 500
    seed: int = 0
    log_every: int = 50
    save_every: int = 250

    @classmethod
    def tiny(cls, **overrides) -> TrainConfig:
        return cls(**{"steps": 150, "batch_size": 16, "n_train": 128, "n_eval": 48, "lr": 3e-3, "warmup": 5,
                      "log_every": 10, "save_every": 50, **overrides})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero (CLIP section 2.5 uses the same schedule). cfg: any
    config with lr, warmup and steps (qformer.py's TrainConfig uses this too)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))    # stays 0 past the end
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: CLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with CLIP's betas; no weight decay on gains, biases, embeddings and the logit scale t."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not under torchrun."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (B / world, E) features, concatenated in rank order -> (B, E), B the global batch; the
    gradient flows to the local part.

    all_gather returns copies without autograd history; putting the local tensor back in its slot keeps
    this rank's path to its own encoder (open_clip's `gather_features`). Each rank then computes the loss
    of the whole global batch, whose gradient reaches the encoders only through local features: summing
    the encoders' gradients over ranks (`sync_gradients`) gives exactly the single-process gradient.
    """
    import torch.distributed as dist
    rank, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)                                              # world x (B / world, E) -> (B, E)


def sync_gradients(model: nn.Module) -> None:
    """Sum the towers' gradients over ranks. The logit scale t's is left alone: every rank computed the
    whole loss, so its gradient with respect to t is already the full one on every rank."""
    import torch.distributed as dist
    if dist_info()[1] == 1:
        return
    for name, p in model.named_parameters():
        if p.grad is not None and name != "logit_scale":
            dist.all_reduce(p.grad)


def render_split(data: ShapesDataset, detail: str | None = None,
                 as_bytes: bool = False) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Render every scene of `data` once: (pixels (B, C, I, I), captions, scenes), pixels as its items
    give them; as_bytes=True keeps the images as (B, I, I, C) uint8 (`normalize` them later).
    detail="full" re-captions every scene naming all its attributes (evaluation); None keeps the
    varied captions."""
    scenes, captions = map(list, zip(*(data.scene(i) for i in range(data.size))))
    images = torch.from_numpy(np.stack([np.asarray(render(s, data.image_size, rim=data.rim)) for s in scenes]))
    if detail is not None:
        captions = [caption(s, "", detail) for s in scenes]
    return (images if as_bytes else normalize(images)), captions, scenes


def train_step(model: CLIP, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of symmetric InfoNCE on this rank's shard, contrasted against the global batch."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    image = gather_with_grad(model.encode_image(pixels))                 # (B, E)
    text = gather_with_grad(model.encode_text(ids, mask))                # (B, E)
    loss = clip_loss(image, text, model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sync_gradients(model)
    optimizer.step()
    model.clamp_logit_scale_()
    return loss.detach()


def batch_indices(cfg: TrainConfig, step: int) -> torch.Tensor:
    """The global batch of `step`: batch_size // 2 hard-negative pairs (scenes 2k and 2k+1), drawn from a
    generator seeded by (seed, step) so that every rank, and a resumed run, agree without talking."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    pairs = torch.randperm(cfg.n_train // 2, generator=g)[:cfg.batch_size // 2]
    return (pairs[:, None] * 2 + torch.arange(2)).flatten()             # (B,)


def train(cfg: TrainConfig, model_cfg: CLIPConfig, out: str | Path, device: torch.device | str = "cpu",
          resume: bool = False, progress: bool = True) -> tuple[CLIP, list[list[float]]]:
    """Train CLIP on shapes; returns (model, losses). Under torchrun every rank takes a slice of each batch.
    Checkpoints go to out/step-<k>/ (see "Training checkpoints" below); resume=True continues from the
    latest, refusing one trained with another configuration. A NaN or infinite loss stops training
    before that step is saved (NonFiniteLossError), so the last good checkpoint stays the latest."""
    from tqdm import tqdm
    rank, world = dist_info()
    if cfg.batch_size % (2 * world):
        raise ValueError(f"batch size {cfg.batch_size} must split into whole hard-negative pairs on each of "
                         f"{world} ranks (a multiple of {2 * world})")
    if cfg.n_train < cfg.batch_size:
        raise ValueError(f"n_train ({cfg.n_train}) must be at least the batch size ({cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    model = CLIP(model_cfg)
    if cfg.init != "clip":
        init_weights(model, cfg.init)                                    # the ablation of README's table
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    out = Path(out)
    if rank == 0:
        clean_run_folder(out)                                            # what a crash in a save left
    start, losses = resume_training(out, model, optimizer, cfg, model_cfg) if resume else (0, [])
    model.trained_steps = 0                                              # steps of this process (run_train)
    tokenizer = ShapesTokenizer(model_cfg.context_length)
    train = ShapesDataset(cfg.n_train, "train", cfg.seed, model_cfg.image_size, hard_negatives=True, rim=cfg.rim)
    images, captions, _ = render_split(train, as_bytes=True)                  # bytes: 200 MB, not 800
    ids, mask = tokenizer.encode(captions)
    b = cfg.batch_size // world
    # a bar only on a terminal (disable=None); in a log file one line per log_every steps instead
    bar = tqdm(range(start, cfg.steps), disable=None if progress and rank == 0 else True, desc="CLIP on shapes",
               dynamic_ncols=True)
    running = []
    model.train()
    for step in bar:
        idx = batch_indices(cfg, step)[rank * b:(rank + 1) * b]
        m = mask[idx]
        T = int(m.sum(1).max())                                          # drop all-padding columns
        loss = train_step(model, optimizer, normalize(images[idx]).to(device), ids[idx, :T].to(device),
                          m[:, :T].to(device), lr_at(step, cfg))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the loss is {loss.item()} at step {step + 1}: training diverged (try a lower "
                                     f"--lr); nothing of this step was saved, the latest checkpoint is "
                                     f"{latest_checkpoint(out) if rank == 0 else 'on rank 0'}")
        running.append(loss)
        model.trained_steps += 1
        if len(running) == cfg.log_every or step + 1 == cfg.steps:
            losses.append([step + 1, torch.stack(running).mean().item()])
            running = []
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if progress and rank == 0 and bar.disable:
                print(f"step {step + 1}/{cfg.steps}  loss {losses[-1][1]:.3f}  "
                      f"exp(t) {model.logit_scale.exp().item():.1f}", file=sys.stderr, flush=True)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_trainer(out, model, optimizer, step + 1, losses, cfg)
    return model.eval(), losses


# ----------------------------------------------------------------------------------------------
# Evaluation on shapes: zero-shot on held-out colour-shape pairs, retrieval on unseen scenes
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: CLIP, n: int = 500, seed: int = 1, device: torch.device | str = "cpu",
             rim: bool = True) -> dict[str, dict[str, float]]:
    """Zero-shot accuracies (%) on single-shape scenes of held-out and of seen colour-shape pairs, and
    retrieval recall on unseen multi-shape scenes with full captions. rim: drawn as in training."""
    tok = ShapesTokenizer(model.cfg.context_length)
    S = model.cfg.image_size
    kinds = text_classifier(model, tok, SHAPES)
    colours = text_classifier(model, tok, [f"{c} shape" for c in COLOURS])
    pairs = [(c, k) for c in COLOURS for k in SHAPES]
    joint = text_classifier(model, tok, [f"{c} {k}" for c, k in pairs])
    results = {}
    for split in ("heldout", "test"):
        pixels, _, scenes = render_split(ShapesDataset(n, split, seed, S, max_shapes=1, rim=rim))
        truth_k = torch.tensor([SHAPES.index(s.shapes[0].kind) for s in scenes])
        truth_c = torch.tensor([list(COLOURS).index(s.shapes[0].colour) for s in scenes])
        pk, pc = zero_shot(model, pixels, kinds), zero_shot(model, pixels, colours)
        pj = zero_shot(model, pixels, joint)
        truth_j = truth_c * len(SHAPES) + truth_k
        results[split] = {"kind": 100 * (pk == truth_k).float().mean().item(),
                          "colour": 100 * (pc == truth_c).float().mean().item(),
                          "kind and colour": 100 * ((pk == truth_k) & (pc == truth_c)).float().mean().item(),
                          "joint prompt": 100 * (pj == truth_j).float().mean().item()}
    pixels, captions, scenes = render_split(ShapesDataset(n, "test", seed, S, rim=rim), detail="full")
    ids, mask = tok.encode(captions)
    image = F.normalize(model.encode_image(pixels.to(device)), dim=-1)
    text = F.normalize(model.encode_text(ids.to(device), mask.to(device)), dim=-1)
    correct = torch.tensor([[a == b for b in captions] for a in captions])   # same description = right
    results["retrieval"] = recall_at_k((image @ text.t()).cpu(), correct)
    return results


def zero_shot_table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| single-shape scenes | colour-shape pair (24 prompts) | kind (4 prompts) | colour (6 prompts) "
            "| kind and colour (4 and 6 prompts) |", "|---|---:|---:|---:|---:|"]
    for split, name in (("heldout", "held-out colour-shape pairs"), ("test", "seen colour-shape pairs")):
        r = results[split]
        rows.append(f"| {name} | {r['joint prompt']:.1f}% | {r['kind']:.1f}% | {r['colour']:.1f}% | {r['kind and colour']:.1f}% |")
    return "\n".join(rows)


def retrieval_table(r: dict[str, float]) -> str:
    return "\n".join(["| direction | R@1 | R@5 | R@10 | median rank |", "|---|---:|---:|---:|---:|"] +
                     [f"| {'image -> text' if d == 'i2t' else 'text -> image'} | {r[d + ' R@1']:.1f}% | "
                      f"{r[d + ' R@5']:.1f}% | {r[d + ' R@10']:.1f}% | {r[d + ' median rank']:.0f} |" for d in ("i2t", "t2i")])


@torch.no_grad()
def similarity_grid(model: CLIP, path: str | Path, n: int = 6, seed: int = 3, cell: int = 64,
                    rim: bool = True) -> torch.Tensor:
    """PNG: n unseen scenes (rows) against their n captions (columns), cosine similarity in each cell."""
    from PIL import ImageFont
    pixels, captions, scenes = render_split(ShapesDataset(n, "test", seed, model.cfg.image_size, max_shapes=2, rim=rim),
                                            detail="full")
    tok = ShapesTokenizer(model.cfg.context_length)
    ids, mask = tok.encode(captions)
    dev = model.logit_scale.device
    sim = (F.normalize(model.encode_image(pixels.to(dev)), dim=-1)
           @ F.normalize(model.encode_text(ids.to(dev), mask.to(dev)), dim=-1).t()).cpu()   # (B, B), B = n
    font = ImageFont.load_default()
    label_h, left = 150, cell + 8
    img = Image.new("RGB", (left + n * cell + 4, label_h + n * cell + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lo, hi = sim.min().item(), sim.max().item()
    for j, text in enumerate(captions):                               # captions, written upwards
        words, lines = text.split(), [""]
        for w in words:
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1]) + len(w) < 22 else [lines[-1], w]
        label = Image.new("RGB", (label_h - 4, cell), (255, 255, 255))
        ImageDraw.Draw(label).multiline_text((2, 2), "\n".join(x.strip() for x in lines), fill=(0, 0, 0), font=font)
        img.paste(label.rotate(90, expand=True), (left + j * cell, 2))
    for i, scene in enumerate(scenes):
        img.paste(render(scene, cell - 4, rim=rim), (2, label_h + i * cell + 2))
        for j in range(n):
            v = sim[i, j].item()
            grey = int(255 * (1 - (v - lo) / max(hi - lo, 1e-6)))         # darker = more similar
            x, y = left + j * cell, label_h + i * cell
            colour = (grey, grey, 255) if i == j else (grey, grey, grey)
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], fill=colour)
            draw.text((x + 14, y + cell // 2 - 6), f"{v:.2f}", fill=(255, 255, 255) if grey < 128 else (0, 0, 0), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return sim


# ==============================================================================================
# Plumbing: checkpoint files, training checkpoints that survive a crash, the command line.
# Nothing below teaches CLIP; it makes the code above safe to save, stop, resume and run.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Checkpoints in transformers' CLIPModel format (config.json + model.safetensors)
# ----------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A file or folder that is not a loadable checkpoint; the message names it and says what is wrong."""


class NonFiniteLossError(ValueError):
    """Training produced a NaN or infinite loss; raised before anything of that step is saved."""


def read_json(path: str | Path, what: str = "a JSON object") -> dict:
    """The object in a JSON file. Not UTF-8, truncated, not JSON or not an object: a CheckpointError that
    names the file (a missing file stays a FileNotFoundError, for the caller to explain)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); expected {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                              f"truncated or corrupt?); expected {what}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object; expected {what}")
    return value


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """Refuse NaN or infinite weights: what a corrupt file or a diverged run leaves behind."""
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                              f"{bad[:4]}{' ...' if len(bad) > 4 else ''}; the file is corrupt or comes "
                              "from a run that diverged")
    return tensors


def read_safetensors(path: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor} of one safetensors file, read by the safetensors package (no pickle, so loading runs
    no code), restricted to the names keep(name) accepts; every floating tensor is checked to be finite."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except Exception as e:                     # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); truncated or corrupt?") from None
    return check_finite(tensors, path)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string -> string metadata in a safetensors header ({} if none)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); truncated or corrupt?") from None


# transformers' activation names -> ours
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def config_from_hf(hf: dict) -> CLIPConfig:
    """A transformers CLIPConfig dict (config.json) -> CLIPConfig."""
    if hf.get("model_type") != "clip" or "text_config" not in hf or "vision_config" not in hf:
        raise CheckpointError(f"config.json describes model_type {hf.get('model_type')!r}, not a CLIPModel "
                              "(expected model_type 'clip' with text_config and vision_config)")
    t, v = hf["text_config"], hf["vision_config"]
    for part, act in (("text", t.get("hidden_act", "quick_gelu")), ("vision", v.get("hidden_act", "quick_gelu"))):
        if act not in HF_ACTIVATIONS:
            raise CheckpointError(f"{part} activation {act!r} is not supported; expected one of {sorted(HF_ACTIVATIONS)}")
    return CLIPConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), num_channels=v.get("num_channels", 3),
        vision_width=v.get("hidden_size", 768), vision_layers=v.get("num_hidden_layers", 12),
        vision_heads=v.get("num_attention_heads", 12), vision_mlp=v.get("intermediate_size", 3072),
        vision_act=HF_ACTIVATIONS[v.get("hidden_act", "quick_gelu")],
        vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
        text_width=t.get("hidden_size", 512), text_layers=t.get("num_hidden_layers", 12),
        text_heads=t.get("num_attention_heads", 8), text_mlp=t.get("intermediate_size", 2048),
        text_act=HF_ACTIVATIONS[t.get("hidden_act", "quick_gelu")], eos_token_id=t.get("eos_token_id", 49407),
        embed_dim=hf.get("projection_dim", 512), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        logit_scale_init=hf.get("logit_scale_init_value", math.log(1 / 0.07)))


def config_to_hf(cfg: CLIPConfig) -> dict:
    """CLIPConfig -> a config.json that transformers' CLIPModel.from_pretrained reads."""
    act = {v: k for k, v in HF_ACTIVATIONS.items() if k != "gelu_new"}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": cfg.logit_scale_init,
            "text_config": {"model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
                            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.text_width,
                            "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
                            "intermediate_size": cfg.text_mlp, "hidden_act": act[cfg.text_act],
                            "layer_norm_eps": cfg.layer_norm_eps, "eos_token_id": cfg.eos_token_id,
                            "bos_token_id": ShapesTokenizer.sot_token_id, "pad_token_id": ShapesTokenizer.pad_token_id},
            "vision_config": {"model_type": "clip_vision_model", "image_size": cfg.image_size,
                              "patch_size": cfg.patch_size, "num_channels": cfg.num_channels,
                              "hidden_size": cfg.vision_width, "num_hidden_layers": cfg.vision_layers,
                              "num_attention_heads": cfg.vision_heads, "intermediate_size": cfg.vision_mlp,
                              "hidden_act": act[cfg.vision_act], "layer_norm_eps": cfg.layer_norm_eps}}


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, {name: tensor}) of a checkpoint folder; one file or shards with an index. A training run
    folder (`--out` of `--train`) is read at the checkpoint its `latest` file names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; expected a CLIP checkpoint folder "
                              "(config.json + model.safetensors)")
    if not (folder / "config.json").exists() and (folder / LATEST).exists():
        folder = latest_checkpoint(folder)
    try:
        config = read_json(folder / "config.json", "a CLIP config.json (transformers' CLIPConfig)")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json; expected a CLIP checkpoint folder") from None
    config_from_hf(config)                          # is it a CLIP at all? (before reading any weights)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "a safetensors index with a weight_map").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        if not (folder / name).exists():
            raise CheckpointError(f"{folder} has no {name}; expected safetensors weights beside config.json")
        tensors.update(read_safetensors(folder / name))
    return config, tensors


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `tensors` into `model`; any missing or unexpected name (or wrong shape) is an error.

    Older checkpoints also store `position_ids` buffers (0, 1, ..., T-1); they carry nothing and are skipped.
    """
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the {type(model).__name__} it is loaded into: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in tensors.items()
           if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source} has tensors of the wrong shape: {bad[:4]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def fsync_path(path: str | Path) -> None:
    """Ask the OS to put a file, or a folder's list of names, on disk now. A rename survives a power cut
    only once its folder is synced; Windows cannot open a folder for this, and needs it less."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """write(tmp_path), fsync, then rename over `path`: a crash leaves the old file or the new, never half.
    The temporary name is unique (mkstemp) and removed if write fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# Training checkpoints: one folder per saved step, switched to atomically (qformer.py uses these too)
# ----------------------------------------------------------------------------------------------
#
#   out/step-000250/config.json            the model, in its checkpoint format (from_pretrained reads it)
#   out/step-000250/model.safetensors      ... with the step in its header metadata
#   out/step-000250/trainer.safetensors    optimizer moments, RNG states (uint8): tensors, step in metadata
#   out/step-000250/trainer.json           step, configs, losses, optimizer hyper-parameters: plain JSON
#   out/latest                             one line, "step-000250": the checkpoint to resume from
#
# Every file of step k goes into a fresh folder and is fsynced; only then does `latest` switch to it, by
# os.replace, which is atomic. A crash at any moment therefore leaves `latest` naming a complete
# checkpoint, and whatever the crash left beside it is deleted at the next start. Nothing is pickled:
# loading runs no code (torch.load(weights_only=False) of a planted trainer.pt would have).

LATEST = "latest"
CHECKPOINT_HOOK = None      # tests: a function(path) called after each file of a save is on disk


def _saved(path: str | Path) -> None:
    if CHECKPOINT_HOOK is not None:
        CHECKPOINT_HOOK(Path(path))


def latest_checkpoint(out: str | Path) -> Path | None:
    """The folder `out/latest` names, or None if out has no `latest`; a broken pointer is a CheckpointError."""
    pointer = Path(out) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if not name or not name.startswith("step-") or not name[5:].isdigit() or not (Path(out) / name).is_dir():
        raise CheckpointError(f"{pointer} should name a step-<k> checkpoint folder in {out}, but holds "
                              f"{name!r}; the run folder is damaged")
    return Path(out) / name


def clean_run_folder(out: str | Path) -> None:
    """Delete what a crashed save left: step folders `latest` does not name, temporary files of `latest`."""
    out = Path(out)
    if not out.is_dir():
        return
    keep = latest_checkpoint(out)
    for path in out.iterdir():
        if path.is_dir() and path.name.startswith("step-") and path != keep:
            shutil.rmtree(path)
        elif path.is_file() and path.name.startswith(LATEST + ".") and path.name.endswith(".tmp"):
            path.unlink()


def save_checkpoint(out: str | Path, step: int, files: dict[str, Callable[[Path], object]]) -> Path:
    """files: {file name: write(path)}. Writes each into a fresh out/step-<step>/, fsyncs it, then points
    out/latest there (atomically) and deletes the older checkpoint. Returns the new folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"step-{step:06d}"
    if latest_checkpoint(out) == folder:
        return folder                                  # already saved: a resumed run with no step left
    if folder.exists():
        shutil.rmtree(folder)                          # a crash's leftover, never the one `latest` names
    folder.mkdir()
    for name, write in files.items():
        write(folder / name)
        fsync_path(folder / name)
        _saved(folder / name)
    fsync_path(folder)
    fsync_path(out)
    atomic_write(out / LATEST, lambda p: Path(p).write_text(folder.name + "\n"))   # the commit point
    _saved(out / LATEST)
    clean_run_folder(out)
    return folder


def model_files(tensors: dict[str, torch.Tensor], config: dict, step: int) -> dict[str, Callable[[Path], object]]:
    """config.json + model.safetensors of a checkpoint; the step goes into the safetensors header."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {"config.json": lambda p: Path(p).write_text(json.dumps(config, indent=2)),
            "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt", "step": str(step)})}


def trainer_files(step: int, tensors: dict[str, torch.Tensor], info: dict) -> dict[str, Callable[[Path], object]]:
    """trainer.safetensors (tensors: optimizer moments, RNG states) + trainer.json (info, plain values)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {"trainer.safetensors": lambda p: save_file(tensors, str(p), metadata={"step": str(step)}),
            "trainer.json": lambda p: Path(p).write_text(json.dumps({"step": step, **info}, indent=1))}


def read_trainer_state(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, tensors) of a checkpoint folder, after checking that it is complete and that every part of
    it (folder name, trainer.json, each safetensors header) carries the same step."""
    folder = Path(folder)
    try:
        info = read_json(folder / "trainer.json", "the trainer state of a training checkpoint")
        tensors = read_safetensors(folder / "trainer.safetensors")
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} is not a complete training checkpoint: {e}") from None
    steps = {"folder name": folder.name[5:].lstrip("0") or "0", "trainer.json": str(info.get("step"))}
    steps.update({p.name: safetensors_metadata(p).get("step") for p in sorted(folder.glob("*.safetensors"))})
    if len(set(steps.values())) != 1:
        raise CheckpointError(f"{folder} mixes parts of different steps: "
                              + ", ".join(f"{k} {v}" for k, v in steps.items()))
    return info, tensors


# fields that may change when a run is resumed: how long it runs, how often it logs, saves and evaluates
RESUMABLE_FIELDS = ("steps", "log_every", "save_every", "n_eval")


def config_differences(saved: dict, current: dict, prefix: str = "",
                       ignore: Sequence[str] = RESUMABLE_FIELDS) -> list[str]:
    """["name: checkpoint X, now Y", ...] for every field that differs (compared as JSON, tuples = lists)."""
    current = json.loads(json.dumps(current))
    return [f"{prefix}{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(saved.keys() | current.keys()) if k not in ignore and saved.get(k) != current.get(k)]


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state_dict split for the two trainer files: ({name: tensor}, param_groups as JSON)."""
    sd = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, state in sd["state"].items() for k, v in state.items()}
    return tensors, sd["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         param_groups: list[dict] | None, source: str | Path) -> None:
    """The inverse of `optimizer_state`; a checkpoint of other parameters is a CheckpointError."""
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    if not isinstance(param_groups, list) or len(param_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{source}: the optimizer state has {len(param_groups or [])} parameter groups, "
                              f"the model's optimizer {len(optimizer.param_groups)}")
    groups = [{k: tuple(v) if isinstance(own.get(k), tuple) else v for k, v in saved.items()}   # JSON: lists
              for saved, own in zip(param_groups, optimizer.param_groups)]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: the optimizer state does not fit this model ({e})") from None


def save_trainer(out: str | Path, model: CLIP, optimizer: torch.optim.Optimizer, step: int, losses: list[list[float]],
                 cfg: TrainConfig) -> Path:
    """One checkpoint of clip.py's training (the layout above); returns its folder."""
    tensors, groups = optimizer_state(optimizer)
    info = {"train_config": asdict(cfg), "model_config": asdict(model.cfg), "losses": losses,
            "optimizer_param_groups": groups}
    return save_checkpoint(out, step, {**model_files(model.state_dict(), config_to_hf(model.cfg), step),
                                       **trainer_files(step, tensors, info)})


def checkpoint_to_resume(out: str | Path) -> Path:
    """The latest checkpoint of `out`, or a FileNotFoundError that says why there is none."""
    out = Path(out)
    folder = latest_checkpoint(out)
    if folder is None:
        old = (" (its trainer.pt was written by an older version and is a pickle, which is no longer loaded)"
               if (out / "trainer.pt").exists() else "")
        raise FileNotFoundError(f"--resume: no checkpoint to continue from in {out} (no {out / LATEST}){old}")
    return folder


def resume_training(out: str | Path, model: CLIP, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    model_cfg: CLIPConfig) -> tuple[int, list[list[float]]]:
    """Load the latest checkpoint of `out` into model and optimizer: (step, losses). Refused, with the
    differing fields listed, when the checkpoint was trained with another configuration."""
    folder = checkpoint_to_resume(out)
    info, tensors = read_trainer_state(folder)
    saved = info.get("train_config", {})
    if saved.get("rim", False) != cfg.rim:
        raise ValueError(f"--resume: {out} was trained {'with' if saved.get('rim') else 'without'} rims "
                         f"(--no-rim {'not given' if saved.get('rim') else 'given'}); resume it the same way")
    differ = (config_differences(saved, asdict(cfg))
              + config_differences(info.get("model_config", {}), asdict(model_cfg), "model ", ignore=()))
    if differ:
        raise CheckpointError(f"--resume: {folder} was trained with another configuration; differing "
                              f"fields: {'; '.join(differ)}")
    load_strict(model, read_checkpoint(folder)[1], folder)
    load_optimizer_state(optimizer, tensors, info.get("optimizer_param_groups"), folder / "trainer.json")
    return info["step"], info.get("losses", [])


DEFAULT_OUT = Path("runs/clip/shapes")


def load_or_train(out_dir: str | Path = DEFAULT_OUT, device: torch.device | str = "cpu",
                  progress: bool = True) -> CLIP:
    """clip.py's trained shapes CLIP (what qformer.py freezes): loaded from out_dir, or trained (resumed)
    there first with the default `--train` settings if its latest checkpoint is not finished. A folder
    holding anything else (another configuration, an incomplete or corrupt checkpoint) is an error."""
    out_dir = Path(out_dir)
    cfg, model_cfg = TrainConfig(), CLIPConfig()
    folder = latest_checkpoint(out_dir)
    if folder is not None:
        info, _ = read_trainer_state(folder)
        differ = (config_differences(info.get("train_config", {}), asdict(cfg))
                  + config_differences(info.get("model_config", {}), asdict(model_cfg), "model ", ignore=()))
        if differ:
            raise CheckpointError(f"{folder} is not a checkpoint of `python clip.py --train` (differing fields: "
                                  f"{'; '.join(differ)}); point at it explicitly (qformer.py --clip-dir) or move it")
        if info["step"] >= cfg.steps:
            return CLIP.from_pretrained(folder).to(device)
    elif (out_dir / "model.safetensors").exists() or (out_dir / "trainer.pt").exists():
        raise CheckpointError(f"{out_dir} holds weights but no {LATEST} checkpoint pointer (a run of an older "
                              "clip.py, or files copied there): move it away to train a fresh CLIP there")
    print(f"no trained CLIP in {out_dir}: training one first (python clip.py --train)", file=sys.stderr)
    model, _ = train(cfg, model_cfg, out_dir, device, resume=folder is not None, progress=progress)
    return model


# ----------------------------------------------------------------------------------------------
# Real checkpoints: zero-shot classification of an image file
# ----------------------------------------------------------------------------------------------

def preprocess(image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """openai/CLIP's transform: resize the short side to `size` (bicubic), centre-crop, normalise."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return to_pixel_values([image.crop((left, top, left + size, top + size))], mean, std)   # (1, C, S, S)


def hf_tokenizer(folder: str | Path) -> Tokenize:
    """transformers' CLIP tokenizer from the checkpoint folder, as a list of str -> (ids, mask) function."""
    folder = Path(folder)
    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.json")):
        raise CheckpointError(f"{folder} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
                              "copy them from the model's repository next to config.json")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)

    def tokenize(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(list(texts), padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return tokenize


@torch.no_grad()
def classify_image(model_dir: str | Path, image_path: str | Path, labels: Sequence[str],
                   templates: Sequence[str] = TEMPLATES,
                   device: torch.device | str = "cpu") -> list[tuple[str, float]]:
    """[(label, probability)] for one image file, most likely first (softmax over exp(t) cos)."""
    labels = [x.strip() for x in labels if x.strip()]
    if not labels:
        raise ValueError("--labels needs at least one label, e.g. --labels 'cat,dog,car'")
    model = CLIP.from_pretrained(model_dir).to(device)
    try:
        image = Image.open(image_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file {image_path}") from None
    except Exception as e:
        raise ValueError(f"{image_path} is not an image pillow can read ({e})") from None
    mean, std = CLIP_MEAN, CLIP_STD
    pre = Path(model_dir) / "preprocessor_config.json"
    if pre.exists():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    pixels = preprocess(image, model.cfg.image_size, mean, std).to(device)
    classifier = text_classifier(model, hf_tokenizer(model_dir), labels, templates)
    image_features = F.normalize(model.encode_image(pixels), dim=-1)          # (1, E)
    probs = (model.logit_scale.exp() * image_features @ classifier.t()).softmax(-1)[0]
    return sorted(zip(labels, probs.tolist()), key=lambda x: -x[1])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> str:
    """--device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"; a CUDA device that is not
    there is a ValueError that says so. Returns the name, e.g. "cuda:0"."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name[5:]) if ":" in name else 0
        if index >= count:
            raise ValueError(f"--device {name} was asked for, but torch sees "
                             f"{'no CUDA GPU' if count == 0 else f'{count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})'}")
        return name
    raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def add_common_arguments(parser: argparse.ArgumentParser, out_help: str, tiny: bool = True,
                         train_help: str = "train (the module docstring says what, and how long)") -> None:
    """The flags every root file shares, with the same words in every --help."""
    parser.add_argument("--train", action="store_true", help=train_help)
    parser.add_argument("--out", type=str, default=None, help=out_help)
    parser.add_argument("--resume", action="store_true", help="with --train: continue from the latest checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    if tiny:
        parser.add_argument("--tiny", action="store_true", help="the tiny preset (seconds): tests and quick checks")


def setup_distributed(device: str) -> None:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def leave_distributed() -> None:
    """End a rank that torchrun started, once its work is done: wait for every rank, leave the process
    group, and end the process at once (os._exit), skipping the interpreter's shutdown. A model wrapped
    in DistributedDataParallel keeps gloo's threads running past destroy_process_group, and a rank whose
    interpreter shut down around them was now and then aborted (SIGABRT, "terminate called without an
    active exception") as the other rank exited, so torchrun called a finished run failed. Without
    torchrun (WORLD_SIZE unset or 1) it does nothing."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_demo(device: str, out: str | Path = "runs/clip/demo") -> None:
    """Seconds: the loss on made-up features, then a tiny CLIP trained for a few steps on shapes."""
    B = 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 16, generator=g)
    print(f"clip_loss, batch of {B} (log B = {math.log(B):.3f}):")
    print(f"  uninformative features (all equal)  {clip_loss(torch.ones(B, 16), torch.ones(B, 16), 14.3).item():.3f}")
    print(f"  random features                     {clip_loss(x, torch.randn(B, 16, generator=g), 14.3).item():.3f}")
    print(f"  perfectly aligned, scale 100        {clip_loss(x, x, 100.0).item():.5f}")
    cfg = TrainConfig.tiny()
    model, losses = train(cfg, CLIPConfig.tiny(), out, device, progress=False)
    print(f"tiny CLIP ({sum(p.numel() for p in model.parameters()):,} weights) on shapes, {cfg.steps} steps of "
          f"batch {cfg.batch_size}: loss {losses[0][1]:.3f} (first {cfg.log_every} steps) -> {losses[-1][1]:.3f} "
          f"(last {cfg.log_every}); log {cfg.batch_size} = {math.log(cfg.batch_size):.3f}")


def run_train(args: argparse.Namespace, device: str) -> dict | None:
    rank, world = dist_info()
    given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    make = TrainConfig.tiny if args.tiny else TrainConfig
    cfg = make(seed=args.seed, rim=not args.no_rim, init=args.init, **given)
    t0 = time.time()
    model, losses = train(cfg, CLIPConfig.tiny() if args.tiny else CLIPConfig(), args.out, device, resume=args.resume)
    if rank != 0:
        return None
    minutes = (time.time() - t0) / 60
    # what this process did: after --resume that is the steps since the checkpoint, not the whole run's
    print(f"\ntrained {model.trained_steps} steps (to step {cfg.steps}) of batch {cfg.batch_size} on {world} "
          f"process(es) in {minutes:.1f} min; loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}, "
          f"exp(t) = {model.logit_scale.exp().item():.1f}")
    results = evaluate(model, n=cfg.n_eval, device=device, rim=cfg.rim)
    print(f"\n## zero-shot on {cfg.n_eval} single-shape scenes per row (prompt ensemble of {len(TEMPLATES)} templates)\n")
    print(zero_shot_table(results))
    acc = results["heldout"]["joint prompt"]
    print(f"\nzero-shot accuracy on held-out colour-shape pairs (\"a photo of a red circle\", ..., all 24 pairs as "
          f"labels; right = colour and kind right): {acc:.1f}% (goal >= 90%: {'met' if acc >= 90 else 'NOT met'})")
    print(f"\n## retrieval, {cfg.n_eval} unseen scenes with full captions (chance R@1 ~ {100 / cfg.n_eval:.1f}%)\n")
    print(retrieval_table(results["retrieval"]))
    figure = Path(args.figure) if args.figure else Path(args.out) / "similarity.png"   # tracked files: only if named
    similarity_grid(model, figure, rim=cfg.rim)
    print(f"\ncheckpoint: {latest_checkpoint(args.out)}/ (CLIP.from_pretrained, or transformers' CLIPModel; "
          f"CLIP.from_pretrained('{args.out}') follows its `{LATEST}`); picture: {figure}")
    return results


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="clip.py", description=__doc__.splitlines()[0])
    add_common_arguments(parser, f"run folder: checkpoints step-<k>/ and pictures (default: --train {DEFAULT_OUT}, "
                                 "the demo runs/clip/demo)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {TrainConfig.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 128)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    parser.add_argument("--no-rim", action="store_true", help="with --train: draw shapes without their thin white "
                        "outline, so that an edge exists only in its shape's colour channels (README: what it changes)")
    parser.add_argument("--init", choices=("clip", "gpt2"), default="clip", help="with --train: CLIP's weight "
                        "initialisation, or std 0.02 everywhere (README: what it changes)")
    parser.add_argument("--figure", type=str, default=None, help="with --train: write the similarity grid to this "
                        "PNG (the README's: --figure assets/clip_similarity.png); default: similarity.png in the "
                        "checkpoint folder under --out")
    parser.add_argument("--model", type=str, default=None, help="a CLIPModel checkpoint folder (zero-shot on --image)")
    parser.add_argument("--image", type=str, default=None, help="image file to classify with --model")
    parser.add_argument("--labels", type=str, default=None, help='comma-separated labels, e.g. "cat,dog,car"')
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        if args.model or args.image or args.labels is not None:
            if not (args.model and args.image and args.labels is not None):
                raise ValueError("zero-shot on an image needs all of --model DIR --image FILE --labels 'a,b,c'")
            for label, p in classify_image(args.model, args.image, args.labels.split(","), device=device):
                print(f"{p:7.2%}  {label}")
            return None
        if args.train:
            args.out = args.out or str(DEFAULT_OUT)
            setup_distributed(device)
            return run_train(args, device)
        return run_demo(device, args.out or "runs/clip/demo")
    except (ValueError, FileNotFoundError) as e:          # CheckpointError, NonFiniteLossError are ValueErrors
        parser.error(str(e))


if __name__ == "__main__":
    main()
    leave_distributed()

r"""Two-stage VLM training: a frozen vision encoder, a connector and a language model, joined and tuned.

A vision-language model answers text about an image by letting a decoder-only language model read
the image as a few "soft tokens" in front of its prompt (LLaVA, Liu et al. 2023, sec. 4; PaliGemma,
Beyer et al. 2024, sec. 3):

    z = Vision(image)                          (B, N, Dv)   frozen encoder, here clip.py's shapes ViT
    u = Connector(z)                           (B, M, D)    the only new part: M tokens of the LM's width
    x = [u ; E[prompt] ; E[answer]]            (B, T, D)    image tokens first, then the text
    L = -(1/|A|) sum_{t in A} log p(x_{t+1} | x_{<=t})      answer tokens A only (paligemma.suffix_loss)

with paligemma.py's prefix-LM mask: image + prompt attend to each other in full, the answer causally.
The connector is what the lecture compares; five of them, each a function (B, Lk, 1+N, Dv) -> (B, M, D):

    linear     u = W z_L + b                                  PaliGemma; LLaVA-1 (Liu et al. 2023) on z_{L-1}
    mlp        u = W2 gelu(W1 z_L + b1) + b2                  LLaVA-1.5 (Liu et al. 2024, sec. 3.2)
    dense      u = W [z_L ; mean(group 1) ; ... ; mean(G)]    dense connector (Yao et al. 2024, sec. 3)
    qformer    u = W_proj QFormer(queries, z_L)               BLIP-2 (Li et al. 2023, sec. 3.3); M = Q
    perceiver  u = W LN(Resampler(latents, z_L))              Flamingo (Alayrac et al. 2022, sec. 2.1); M = Q

The default is `linear`, PaliGemma's projector; the README measures it against LLaVA-1.5's MLP on
colour-shape pairs that no training image shows.

The three per-patch connectors first merge each m x m block of neighbouring patches into one token
(`merge_patches`, Qwen2-VL's patch merger; default m = 2, so M = N/4): the LM then reads 9 image
tokens instead of 36 here, and each training step costs less than half.

z_L is the last layer's grid. LLaVA's linear map reads the layer before the last, z_{L-1} (its sec. 5.2
ablation found the last one worse); every connector here reads the last, after the ViT's final
LayerNorm, which is what clip.py trained and what qformer.py freezes.

Training follows the two-stage recipe of LLaVA (sec. 4.2, "stage 1: pre-training for feature
alignment", "stage 2: fine-tuning end-to-end") and BLIP-2 (sec. 3.2-3.3):

  stage 0  (stands in for a pretrained LM) the small random Gemma decoder of paligemma.py learns the
           synthetic language text-only: captions, questions and their answers. Freezing an LM in
           stage 1 only makes sense for one that already speaks; real recipes download one. Cached.
  stage 1  alignment, LM frozen: the connector alone learns to caption (image -> caption). BLIP-2
           trains its Q-Former first with ITC + ITM + ITG on (image, caption) pairs (qformer.py; here
           with itc_steps > 0, as the blip2 preset and smolvlm's with --lm hf: do), then with the same caption loss.
  stage 2  VQA, vision still frozen: the connector plus the LM, fully (`full`), with LoRA
           (lora.py; h = W x + (alpha/r) B A x, Hu et al. 2021), or with QLoRA (the same LoRA around
           an NF4 base from nf4.py; Dettmers et al. 2023, sec. 3). Loss on answer tokens only.

Data: a CLEVR-style VQA set (Johnson et al. 2017) drawn from clip.py's shapes scenes: count, colour,
shape, size, relative position and existence questions; four colour-shape pairs (clip.HELDOUT) never
appear in training images, and split="heldout" scenes each contain one, so generalisation to unseen
combinations is measured apart. Every stage reads only an iterable of (image, question, answer) or
(image, caption) (`VQAData`), so other loaders slot in without touching the stages.

Relative position ("where is the red circle relative to the blue square?") needs two lookups and a
comparison, the skill VLMs are known to miss (Kamath et al. 2023). The recipe gives it four helps,
each a field that switches it off: learned row + column vectors on what the LM or the queries read
(image_pos, GridPositions / KeyPositions); answers that write each shape's cell before the relation,
"red circle top left, blue square top right: left" (position_answer, named_position_answer); one-hop
"which column / row is the red circle in?" training questions (grid_questions); and left, right,
above and below drawn equally often in stage 2 (balance_position). The decoder keeps one key / value
head per query head (lm_kv_heads = lm_heads). The query connectors (Q-Former, Perceiver) get one query
per cell of the scenes' 3 x 3 layout, each starting on a place of its own (query_prior, LocalPrior;
the Q-Former's also listening to itself, SelfPrior); query_prior="window" keeps each query inside its
cell, and query_pos gives their output tokens the row and column of their cell (QueryPositions). Both
take the window by default, each query reading one key, its whole cell (query_merge: merge_patches'
blocks); the Q-Former also takes query_pos, feed-forward layers that start at zero and a longer
warm-up for its post-LN layers (CONNECTOR_DEFAULTS).

Evaluation: exact match and ROUGE-1/2/L (rouge.py) of greedy answers, overall and per kind, after
stage 1 and after stage 2; retrieval R@1/5 of the Q-Former's ITC features after stage 1a.

Conventions: paligemma.py's, text left-padded; token_type_ids 0 = prefix, 1 = suffix; labels -100
where no loss is taken. Shapes: B batch, T tokens, N image patches (+ class token), M image tokens
given to the LM (N/m^2 after merging m x m patches, or Q), Q learned queries/latents, Lk vision layers kept, D LM width, Dv vision width, V vocab.

Reading order: configuration and presets, the five connectors, the model, the losses, the data,
evaluation, then one stage loop (`train_stage`) and the recipe (`train_vlm`). Below the Plumbing
banner: the `Run` object (checkpoints and --resume, logging, torchrun / DDP, the tests' kill switch),
data on disk (`--data clevr:DIR | captions:DIR | img2dataset:DIR`), transformers models from local
folders (`--lm hf:DIR`, any causal LM with its tokenizer, LLaVA-style causal attention; `--vision
hf:DIR`, a CLIP or SigLIP tower), `--init paligemma:DIR`, saving and loading, the command line. They
change where rows, weights and tokens come from and which rank computes them, not what a stage
computes. `--preset smolvlm` is the course's Q-Former tutorial recipe (PRESETS, FROM_SCRATCH).

Left out: several images per prompt (Flamingo's gated cross-attention and its time embeddings), and
unfreezing the vision encoder.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip
import lora
import nf4
import paligemma as pg
import qformer
import rouge

CONNECTORS = ("linear", "mlp", "qformer", "dense", "perceiver")
PER_PATCH = ("linear", "mlp", "dense")     # connectors whose tokens are merged patches, one per cell of a grid
STAGE2_MODES = ("full", "lora", "qlora")
KINDS = ("count", "colour", "shape", "size", "position", "existence")

# == Configuration =================================================================================

class ConfigError(ValueError):
    """A configuration that cannot work; the message says what was expected and what was given."""


@dataclass
class VLMConfig:
    """The model: which connector, how big the LM, how LoRA is set."""
    connector: str = "linear"          # PaliGemma's projector; "mlp" is LLaVA-1.5's
    lm: str = ""                       # "" = the small Gemma decoder below; "hf:DIR" = a transformers causal LM
    vision: str = ""                   # "" = clip.py's shapes ViT; "hf:DIR" = a transformers CLIP / SigLIP tower
    # the Gemma decoder (paligemma.TextConfig), sized so that `--train` runs in minutes on a CPU
    lm_width: int = 64                 # D
    lm_layers: int = 4                 # L
    lm_heads: int = 4                  # H
    lm_kv_heads: int = 4               # K: one key / value head per query head (1: multi-query, as Gemma 2B)
    lm_mlp: int = 256                  # F
    lm_init_std: float = 0.05
    num_queries: int = 9               # Q of the Q-Former and the Perceiver's latents: one per cell of the scenes' 3 x 3
    qformer_head: str = "linear"       # after the Q-Former: "linear" (BLIP-2's projection) or "mlp" (an MLP adapter)
    adapter_width: int = 0             # the MLP adapter's hidden width; 0: the LM's (LLaVA's two layers)
    qformer_vocab: tuple = ()          # the Q-Former's text words: () = clip.ShapesTokenizer's; --data: the folder's
    perceiver_layers: int = 2
    perceiver_attention: str = "softmax"   # "compete": the latents share out each patch (competing_attention)
    query_prior: str = "local"         # each query starts reading a place of its own (LocalPrior); "none": BLIP-2's, Flamingo's;
                                       # "window": and reads nothing outside its cell
    query_pos: bool = False            # the query connectors' Q output tokens get GridPositions too (a row + column per query)
    qformer_self_prior: bool = True    # with a query_prior, the Q-Former's queries start listening to themselves
    query_merge: int = 1               # m: the query connectors' keys are merge_patches' m x m blocks (2 with 9 queries: one key per cell)
    qformer_zero_ffn: bool = False     # the queries' feed-forward outputs start at zero: each layer starts passing on what they read
    dense_groups: int = 2              # G groups of earlier vision layers (clamped to the ViT's depth)
    patch_merge: int = 2               # m: each m x m block of patches -> one image token (linear, mlp, dense)
    image_pos: str = "2d"              # learned row + column positions: GridPositions (per-patch), KeyPositions (queries)
    position_answer: str = "named"     # position answers show their work (named_position_answer); "word": the relation alone
    lora_r: int = 16
    lora_alpha: float = 32
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tiny_vision: bool = False          # clip.CLIPConfig.tiny's ViT, random and frozen (demo and tests)

    def __post_init__(self) -> None:
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {self.connector!r}")
        for name, allowed in (("qformer_head", ("linear", "mlp")), ("perceiver_attention", ("softmax", "compete")),
                              ("query_prior", ("none", "local", "window"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.query_prior == "window" and self.perceiver_attention == "compete":
            raise ValueError("query_prior='window' leaves the class token to no latent, and perceiver_attention="
                             "'compete' shares each key out among the latents: use one or the other")
        if self.adapter_width < 0:
            raise ValueError(f"adapter_width must be 0 (the LM's width) or a positive width, got {self.adapter_width}")
        if self.image_pos not in ("none", "2d") or self.position_answer not in ("word", "named"):
            raise ValueError(f"image_pos must be 'none' or '2d' and position_answer 'word' or 'named', got "
                             f"{self.image_pos!r} and {self.position_answer!r}")
        for what in ("lm", "vision"):
            spec = getattr(self, what)
            if spec and not (spec.startswith("hf:") and len(spec) > 3):
                raise ValueError(f"--{what} expects hf:DIR (a transformers model saved with save_pretrained), got {spec!r}")
        self.lora_targets, self.qformer_vocab = tuple(self.lora_targets), tuple(self.qformer_vocab)

    @classmethod
    def tiny(cls, **overrides) -> VLMConfig:
        return cls(**{"lm_width": 32, "lm_layers": 1, "lm_heads": 2, "lm_kv_heads": 2, "lm_mlp": 64, "num_queries": 4,
                      "perceiver_layers": 1, "lora_r": 4, "lora_alpha": 8, "tiny_vision": True, **overrides})


@dataclass
class TrainConfig:
    """The recipe. Learning rates are for tiny models trained from scratch (see PRESETS for papers')."""
    stage2: str = "full"
    n_train: int = 6000                # training scenes (each gives ~9 questions and one caption)
    n_eval: int = 500                  # scenes per evaluation split (one question each, kinds balanced)
    batch_size: int = 64
    grad_accum: int = 1                # micro-batches per optimizer step
    pretrain_steps: int = 400          # stage 0: the LM on text alone
    pretrain_lr: float = 3e-3
    pretrain_warmup: float = 0.03      # stage 0: a fraction of its steps, whatever the connector
    itc_steps: int = 0                 # stage 1a (qformer only): BLIP-2's ITC + ITM + ITG first (presets blip2, smolvlm + hf:)
    itc_lr: float = 1e-3
    qformer_lr_scale: float = 1.0      # stage 1: lr x this on the Q-Former's cross-attention and query tokens
    stage1_steps: int = 300
    stage1_lr: float = 2e-3
    stage2_steps: int = 4000
    stage2_lr: float = 2e-3
    grid_questions: tuple = ("column", "row")   # one-hop training questions (grid_questions): "column", "row", "cell"
    balance_position: bool = True      # stage 2 draws left, right, above and below equally often (kind_weights)
    stage2_qformer: bool = True        # stage 2 also tunes the Q-Former (False: only its head, plus the LM)
    caption_prompt: str = "caption"    # the prompt of stage 1's captions
    warmup: float = 0.03               # stages 1 and 2: a fraction of the stage's steps (LLaVA-1.5's warm-up ratio)
    weight_decay: float = 0.0          # LLaVA uses none
    clip_norm: float = 1.0
    bf16: bool = True                  # autocast where the device supports bf16 (CUDA with bf16); CPU: fp32
    grad_checkpointing: bool = False   # stage 2: backward re-runs each LM layer instead of keeping its activations
    length_split: int = 512            # stage 2: a micro-batch runs as two, by row length, where that skips at least
                                       # this many padding tokens (split_by_length); 0: never
    save_every: int = 200
    seed: int = 0
    data: str = ""                     # "" = the embedded shapes data; else KIND:PATH (see load_data)

    def __post_init__(self) -> None:
        if self.stage2 not in STAGE2_MODES:
            raise ValueError(f"stage 2 mode must be one of {STAGE2_MODES}, got {self.stage2!r}")
        self.grid_questions = tuple(self.grid_questions)
        if not set(self.grid_questions) <= {"column", "row", "cell"}:
            raise ValueError(f"grid_questions must name 'column', 'row' or 'cell', got {self.grid_questions!r}")

    @classmethod
    def tiny(cls, **overrides) -> TrainConfig:
        # the demo and tests show LoRA, the homework's method (--train defaults to full: see README), and
        # the Q-Former's stage 1a (ITC + ITM + ITG), which --train's default recipe leaves out
        return cls(**{"stage2": "lora", "n_train": 48, "n_eval": 16, "batch_size": 8, "pretrain_steps": 6, "itc_steps": 4,
                      "stage1_steps": 6, "stage2_steps": 6, "save_every": 3, "pretrain_lr": 1e-2,
                      "stage1_lr": 1e-2, "stage2_lr": 1e-2, "itc_lr": 1e-2, **overrides})


# Presets: the structure of each paper's recipe. The papers' own learning rates are for pretrained
# billion-parameter models; ours are for a few-hundred-thousand-weight LM from scratch, so only the
# presets meant for a pretrained LM keep their numbers: paligemma-homework (--init paligemma:DIR, a real
# checkpoint) and smolvlm with --lm hf:DIR (on the default decoder it is FROM_SCRATCH's).
PRESETS = {
    # LLaVA-1.5 (Liu et al. 2024, sec. 3.2 and appendix Table 9): MLP connector; stage 1 trains the
    # connector alone on captions (lr 1e-3, batch 256), stage 2 the connector + the whole LM (lr 2e-5,
    # batch 128); warm-up ratio 0.03, cosine decay, no weight decay, AdamW.
    "llava": (dict(connector="mlp"), dict(stage2="full", warmup=0.03, weight_decay=0.0)),
    # BLIP-2 (Li et al. 2023, sec. 3.2-3.4): Q-Former with 32 plain queries (16 here) trained with ITC +
    # ITM + ITG, then its projection through the frozen LM; AdamW, weight decay 0.05, cosine decay. BLIP-2
    # keeps the LM frozen; the course's Q-Former tutorial (MiniGPT-4-like) then tunes it with LoRA: so do we.
    "blip2": (dict(connector="qformer", num_queries=16, query_prior="none"),
              dict(stage2="lora", weight_decay=0.05, itc_steps=300)),
    # The homework fine-tunes PaliGemma with LoRA / QLoRA. The homework gives no numbers; these are
    # Hugging Face's PaliGemma fine-tuning notebook's (Noyan 2024), which such homeworks follow: AdamW,
    # lr 2e-5, batch 4 x 4 accumulation steps (16 rows a step), 2 warm-up steps, weight decay 1e-6, LoRA
    # r = 8 on all seven linear layers of the decoder. Meant for --init paligemma:DIR; --stage2 qlora for
    # QLoRA. No stage 1: the checkpoint's projector is trained already, so "after stage 1" scores the
    # checkpoint itself, the homework's "before".
    "paligemma-homework": (dict(connector="linear", lora_r=8, lora_alpha=8),
                           dict(stage2="lora", stage1_steps=0, stage2_lr=2e-5, batch_size=16, grad_accum=4,
                                warmup=2, weight_decay=1e-6)),
    # The course's Q-Former VLM tutorial (a SmolVLM-like model: BLIP-2's Q-Former in front of a small
    # SmolLM-style LM): 32 queries; stage 1 trains the Q-Former (ITC + ITM + ITG here, then captions
    # through the frozen LM) at lr 1e-4 with 10x on its cross-attention and query tokens, the parts
    # that are new to a BERT-initialised Q-Former; stage 2 freezes it and trains an MLP adapter on its
    # outputs plus LoRA r = 64, alpha = 128 on every linear layer of the LM at lr 5e-4, batch 8 x 4
    # accumulation steps, bf16 autocast where the device has it, prompt "Describe this image".
    # Meant for --lm hf:DIR (a pretrained SmolLM); without it, FROM_SCRATCH["smolvlm"].
    "smolvlm": (dict(connector="qformer", num_queries=32, query_prior="none", qformer_head="mlp", lora_r=64,
                     lora_alpha=128),
                dict(stage2="lora", itc_steps=300, itc_lr=1e-4, stage1_lr=1e-4, qformer_lr_scale=10.0, stage2_qformer=False,
                     stage2_lr=5e-4, batch_size=32, grad_accum=4, bf16=True, caption_prompt="Describe this image")),
}

# What a preset meant for a pretrained LM becomes on the default decoder (no --lm hf:DIR), an LM trained from
# scratch: the tutorial's structure (a Q-Former trained on captions first, then frozen behind an MLP adapter,
# LoRA on every linear layer of the LM) over the Q-Former's own defaults (CONNECTOR_DEFAULTS) and this file's
# numbers; the adapter 4x the LM's width inside, as a transformer's feed-forward layer (one as narrow as the LM
# passes on less of a cell's colour, README), and 1.5x the steps: stage 2 learns from a frozen Q-Former slowly.
FROM_SCRATCH = {
    "smolvlm": (dict(connector="qformer", qformer_head="mlp", adapter_width=4 * VLMConfig.lm_width),
                dict(stage2="lora", stage2_qformer=False, stage2_steps=3 * TrainConfig.stage2_steps // 2)),
}

# A connector's own defaults, under --set, where no preset is named (make_configs). Both query connectors' queries
# each read one key, their whole cell (query_merge=2 and query_prior=window). The Q-Former's also hand the LM
# their cell's row and column (query_pos); it is BERT's post-LN transformer, x <- LayerNorm(x + F(x)), so its
# feed-forward layers start by passing on what the queries read (qformer_zero_ffn) and stages 1 and 2 warm up
# over 10% of their steps: a post-LN network's last layers get large gradients at initialisation, and a full
# learning rate from the first steps sends them where training does not recover from (Xiong et al. 2020,
# sec. 3; the pre-LN Perceiver and Gemma decoder do without). VLMConfig(connector=...) alone keeps the
# dataclass defaults.
CONNECTOR_DEFAULTS = {
    "qformer": (dict(query_merge=2, query_prior="window", query_pos=True, qformer_zero_ffn=True), dict(warmup=0.1)),
    "perceiver": (dict(query_merge=2, query_prior="window"), {}),
}


# == Connectors: (B, Lk, 1+N, Dv) frozen vision features -> (B, M, D) image tokens for the LM ======
# Lk is the number of vision layers kept: 1 (the last, after the ViT's final LayerNorm) for every
# connector but `dense`, which also gets the hidden states h_0 .. h_{L-1} (Lk = L + 1, last at -1).

def merge_patches(z: torch.Tensor, m: int) -> torch.Tensor:
    """(B, 1+N, Dv) grid features -> (B, N/m^2, m^2 Dv): the class token dropped and each m x m block
    of neighbouring patches concatenated channel-wise, blocks in raster order.

    Neighbouring patches mostly show the same object, so one token per block loses no pixels' worth
    of information (the channels keep all m^2 patches) while the LM reads m^2 times fewer image
    tokens, and its attention and MLPs cost about m^2 times less per image. Qwen2-VL merges 2 x 2
    blocks this way before its MLP connector (Wang et al. 2024, sec. 2.1), InternVL calls it pixel
    shuffle. m = 1 is one token per patch, as LLaVA and PaliGemma give it; the class token is dropped
    in both cases, as LLaVA does (it feeds the grid features only, Liu et al. 2023, sec. 4.1).
    """
    x = z[:, 1:]                                                                      # (B, N, Dv)
    B, N, Dv = x.shape
    g = math.isqrt(N)                                                                 # patches per side
    x = x.reshape(B, g // m, m, g // m, m, Dv)              # (B, block row, row in block, block col, col in block, Dv)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (g // m) ** 2, m * m * Dv)


class LinearConnector(nn.Module):
    """u = W z + b on the last layer, after `merge_patches` (PaliGemma's projector; LLaVA-1's reads the
    layer before the last)."""

    def __init__(self, vision_width: int, width: int, merge: int = 1):
        super().__init__()
        self.merge = merge
        self.linear = nn.Linear(merge * merge * vision_width, width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(merge_patches(feats[:, -1], self.merge))                 # (B, M, m^2 Dv) -> (B, M, D)


class MLPConnector(nn.Module):
    """u = W2 GELU(W1 z + b1) + b2 (LLaVA-1.5, sec. 3.2: "a two-layer MLP" instead of one linear map),
    after `merge_patches` (Qwen2-VL's merger is this MLP on 2 x 2 merged patches)."""

    def __init__(self, vision_width: int, width: int, merge: int = 1):
        super().__init__()
        self.merge = merge
        self.fc1, self.fc2 = nn.Linear(merge * merge * vision_width, width), nn.Linear(width, width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(merge_patches(feats[:, -1], self.merge))))  # (B, M, D)

    @staticmethod
    def mlp(in_width: int, width: int, hidden: int) -> nn.Sequential:
        """The same two layers as a module of its own, hidden wide in between (the Q-Former's MLP adapter)."""
        return nn.Sequential(nn.Linear(in_width, hidden), nn.GELU(), nn.Linear(hidden, width))


class DenseConnector(nn.Module):
    """u = W [z_L ; mean(group 1) ; ... ; mean(group G)] (Yao et al. 2024, Dense Channel Integration),
    with paligemma.dense_channel_integration doing the grouping, then `merge_patches`."""

    def __init__(self, vision_width: int, width: int, groups: int, merge: int = 1):
        super().__init__()
        self.groups, self.merge = groups, merge
        self.linear = nn.Linear(merge * merge * (groups + 1) * vision_width, width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        dense = pg.dense_channel_integration(list(feats[:, :-1].unbind(1)), feats[:, -1], self.groups)
        return self.linear(merge_patches(dense, self.merge))                         # (B, M, m^2 (G+1) Dv) -> (B, M, D)


def merged_grid(g: int, m: int) -> int:
    """The side of the grid of m x m blocks that a query connector's keys become (query_merge = m)."""
    if m < 1 or g % m:
        raise ConfigError(f"query_merge must divide the side of the {g} x {g} patch grid, got {m}")
    return g // m


class QFormerConnector(nn.Module):
    """qformer.QFormer's Q query outputs through its language_projection (BLIP-2 sec. 3.3), or, with
    qformer_head="mlp", through an MLP adapter u = W2 GELU(W1 q + b1) + b2, W1 q of width adapter_width (the course's
    Q-Former tutorial).
    g: the side of the ViT's patch grid (KeyPositions, LocalPrior).

    query_merge = m > 1: the queries read merge_patches' m x m blocks (and the class token, m^2 times side
    by side) instead of single patches. A read is a weighted mean of the keys, and the mean of a cell's
    patches keeps less of a shape's outline than the patches side by side; with one key per cell and
    query_prior="window" a query's read is a linear map of its whole cell, the locality that Honeybee's
    C-Abstractor keeps with convolutions (Cha et al. 2024, sec. 3.2)."""

    def __init__(self, vision_width: int, width: int, cfg: VLMConfig, g: int):
        super().__init__()
        self.merge = m = cfg.query_merge
        vision_width, g = vision_width * m * m, merged_grid(g, m)                   # the keys' width and grid
        self.tokenizer = clip.ShapesTokenizer(words=cfg.qformer_vocab or None)   # its text side's words (ITC, ITM, ITG)
        config = qformer.shapes_qformer_config(self.tokenizer, vision_width, tiny=cfg.tiny_vision)
        self.qformer = qformer.QFormer(replace(config, num_query_tokens=cfg.num_queries,
                                               lm_hidden_size=width if cfg.qformer_head == "linear" else 0))
        self.head = (MLPConnector.mlp(config.hidden_size, width, cfg.adapter_width or width)
                     if cfg.qformer_head == "mlp" else None)
        # the adapter starts as the Q-Former's own layers and linear head do (N(0, 1/D) weights, zero biases):
        # torch's default, U(-1/sqrt(D), 1/sqrt(D)), would start its tokens at a fifth of the linear head's size
        # on the default decoder (RMS 0.2 against 1.0)
        if self.head is not None:
            self.head.apply(self.qformer._init_weights)
        self.key_pos = KeyPositions(g, vision_width) if cfg.image_pos == "2d" else nn.Identity()
        if cfg.query_prior != "none":                 # the prior on every cross-attention's logits
            self.qformer.cross_attention_bias = LocalPrior(cfg.num_queries, g, window=cfg.query_prior == "window")
            if cfg.qformer_self_prior:                # and on the queries' attention among themselves
                self.qformer.query_attention_bias = SelfPrior(cfg.num_queries)
        if cfg.qformer_zero_ffn:                      # FFN(x) = 0 at first: LayerNorm(x + FFN(x)) = x
            for layer in self.qformer.qformer.encoder.layer:
                nn.init.zeros_(layer.output_query.dense.weight)
        self.query_pos = QueryPositions(cfg.num_queries, width) if cfg.query_pos else nn.Identity()

    def keys(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, Lk, 1+N, Dv) -> (B, 1+N/m^2, m^2 Dv): the last layer, what the queries attend to (+ KeyPositions)."""
        z = feats[:, -1]
        if self.merge > 1:
            z = torch.cat([z[:, :1].repeat(1, 1, self.merge ** 2), merge_patches(z, self.merge)], 1)
        return self.key_pos(z)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, Lk, 1+N, Dv) vision features -> (B, Q, D) image tokens. Given (B, Q, Dq) instead, the input is
        the Q-Former's own query outputs, computed once while it is frozen (frozen_queries), and only the head runs."""
        q = feats if feats.dim() == 3 else self.qformer(self.keys(feats))                # (B, Q, Dq)
        head = self.head if self.head is not None else self.qformer.language_projection   # BLIP-2's linear head
        return self.query_pos(head(q))                                                   # (B, Q, D)


def competing_attention(attn: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor, n_media: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The latents' read of kv = [image; latents] through attn's projections (no biases), with Slot
    Attention's competition on the image part (Locatello et al. 2020, sec. 2.1), per head, s = q k^T / sqrt(d):

        A_img = softmax over the Q latents of s_img       each patch is shared out among the latents
        A_img <- A_img / (sum over the patches + 1e-6)    each latent reads a weighted mean of its share
        A_own = softmax over the latents' own keys of s_own
        out   = W_o [ (A_img V_img + A_own V_own) / 2 ]   (B, Q, Dv)

    With softmax over the keys a latent whose attention is spread reads an average of every shape;
    here a patch that one latent takes is less available to the others. bias (Q, N + Q): added to s."""
    W, h, D = attn.in_proj_weight, attn.num_heads, q.shape[-1]
    heads = lambda t: t.unflatten(-1, (h, -1)).transpose(1, 2)                     # noqa: E731  (B, h, *, d)
    s = heads(q @ W[:D].T) @ heads(kv @ W[D:2 * D].T).transpose(-1, -2) / (D // h) ** 0.5   # (B, h, Q, N + Q)
    s = s if bias is None else s + bias
    media = s[..., :n_media].softmax(dim=-2)
    media = media / (media.sum(-1, keepdim=True) + 1e-6)
    weights = torch.cat([media, s[..., n_media:].softmax(dim=-1)], dim=-1) * 0.5
    return attn.out_proj((weights @ heads(kv @ W[2 * D:].T)).transpose(1, 2).flatten(2))


class PerceiverLayer(nn.Module):
    """One Perceiver Resampler block (Alayrac et al. 2022, Fig. 4 and appendix A.1.1):

        kv = [x_f ; latents]                    the latents attend to the image AND to themselves
        latents <- latents + Attn(q = LN(latents), k = v = LN(kv))      (compete: competing_attention)
        latents <- latents + FFW(LN(latents))   FFW = W2 GELU(W1 .), 4x wide, no biases
    """

    def __init__(self, width: int, heads: int, compete: bool = False):
        super().__init__()
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.ffw = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                 nn.Linear(4 * width, width, bias=False))
        self.compete = compete

    def forward(self, x: torch.Tensor, latents: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """bias (Q, N + Q) or None: added to the attention logits (query_prior)."""
        q = self.norm_latents(latents)                                                # (B, Q, Dv)
        kv = torch.cat([self.norm_media(x), q], dim=1)                                # (B, N + Q, Dv)
        if self.compete:
            latents = latents + competing_attention(self.attn, q, kv, x.shape[1], bias)
        else:
            latents = latents + self.attn(q, kv, kv, need_weights=False, attn_mask=bias)[0]   # (B, Q, Dv)
        return latents + self.ffw(latents)


class PerceiverResampler(nn.Module):
    """Q learned latents read a variable number of image features into a fixed Q tokens (Flamingo sec. 2.1).

    Simplified: one image, so Flamingo's learned time embeddings (added per frame, then the frames
    flattened) are left out; the ViT's position embeddings already mark where each patch is. Then a
    final LayerNorm and a linear map to the LM's width (Flamingo feeds its cross-attention instead).
    g: the side of the ViT's patch grid; query_prior="local" / "window" adds LocalPrior's logits in every layer.

    query_merge = m > 1: the latents read x = [class token ; W merge_patches(z, m)], each m x m block of
    patches as one key, W (m^2 Dv -> Dv) mapping it back to the width the latents' own keys have
    (the Q-Former's keys keep the m^2 Dv channels instead). With one key per cell and
    query_prior="window", a latent's read of the image is that one key: a linear map of its whole cell
    (Honeybee's C-Abstractor keeps this locality with convolutions, Cha et al. 2024, sec. 3.2).
    """

    def __init__(self, vision_width: int, width: int, cfg: VLMConfig, g: int, heads: int = 4):
        super().__init__()
        self.merge = m = cfg.query_merge
        self.merged = nn.Linear(m * m * vision_width, vision_width) if m > 1 else None   # W
        g = merged_grid(g, m)                                                          # the keys' grid
        self.latents = nn.Parameter(torch.randn(cfg.num_queries, vision_width) * vision_width ** -0.5)   # (Q, Dv)
        self.layers = nn.ModuleList(PerceiverLayer(vision_width, heads, cfg.perceiver_attention == "compete")
                                    for _ in range(cfg.perceiver_layers))
        self.norm = nn.LayerNorm(vision_width)
        self.linear = nn.Linear(vision_width, width)
        self.key_pos = KeyPositions(g, vision_width) if cfg.image_pos == "2d" else nn.Identity()
        self.prior = (None if cfg.query_prior == "none" else
                      LocalPrior(cfg.num_queries, g, cfg.num_queries, window=cfg.query_prior == "window"))
        self.query_pos = QueryPositions(cfg.num_queries, width) if cfg.query_pos else nn.Identity()

    def keys(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, Lk, 1+N, Dv) -> (B, 1+N/m^2, Dv): the last layer, what the latents read (+ KeyPositions)."""
        z = feats[:, -1]
        if self.merged is not None:
            z = torch.cat([z[:, :1], self.merged(merge_patches(z, self.merge))], dim=1)
        return self.key_pos(z)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.keys(feats)                                                          # (B, 1+N/m^2, Dv)
        latents = self.latents.expand(x.shape[0], -1, -1)                             # (B, Q, Dv)
        bias = None if self.prior is None else self.prior()                           # (Q, 1+N+Q)
        for layer in self.layers:
            latents = layer(x, latents, bias)
        return self.query_pos(self.linear(self.norm(latents)))                        # (B, Q, Dv) -> (B, Q, D)


class GridPositions(nn.Module):
    """A per-patch connector whose g x g output tokens (raster order) get learned 2-D positions:

        u_{r,c} <- u_{r,c} + R[r] + C[c]           R, C in R^{g x D}, drawn from N(0, 1)

    Why (benchmarks/bench_vlm_train.py --probe): the ViT's cell tokens still say where their cell is
    (column 85%, row 83% to a linear probe), the MLP connector's tokens no longer do (chance), and the
    LM's RoPE rotates queries and keys only, so what attention reads from an image token (its value)
    carries no place. Added after the connector, the place is in the value again (ViT-style factorised
    positions; Qwen2-VL's M-RoPE gives the LM rows and columns through the rotation instead).
    """

    def __init__(self, connector: nn.Module, g: int, width: int):
        super().__init__()
        self.connector = connector
        self.rows, self.cols = nn.Embedding(g, width), nn.Embedding(g, width)        # R, C: one vector per row, column

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.connector(feats) + grid_table(self.rows, self.cols)              # (B, g*g, D) + R[r] + C[c]


def grid_table(rows: nn.Embedding, cols: nn.Embedding) -> torch.Tensor:
    """(g*g, D): R[r] + C[c] for every cell (r, c) of a g x g grid, in raster order."""
    return (rows.weight[:, None] + cols.weight[None, :]).flatten(0, 1)


class KeyPositions(nn.Module):
    """The same learned 2-D positions for a query connector, on what its queries read (their keys and
    values): each of the g x g patch features (raster order, after the class token) gets

        z_{r,c} <- z_{r,c} + R[r] + C[c]           R, C in R^{g x Dv}, drawn from N(0, 1)

    A query's attention can then pick a place by its row and column, and what it reads says where it
    was: the locality a resampler otherwise has only from the ViT's own position embeddings (Honeybee,
    Cha et al. 2024, sec. 3, on resamplers that lose it)."""

    def __init__(self, g: int, width: int):
        super().__init__()
        self.rows, self.cols = nn.Embedding(g, width), nn.Embedding(g, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:                               # (B, 1+N, Dv)
        return torch.cat([z[:, :1], z[:, 1:] + grid_table(self.rows, self.cols)], dim=1)


class QueryPositions(nn.Module):
    """GridPositions for a query connector (query_pos): query q of Q = s x s owns cell q of an s x s grid
    (LocalPrior's places), and its output token gets that cell's R[r] + C[c], so the place is in what the
    LM reads from it, as it is for a per-patch connector's tokens (KeyPositions put it only in what the
    queries read, where a query may keep it or not)."""

    def __init__(self, num_queries: int, width: int):
        super().__init__()
        s = math.isqrt(num_queries)
        if s * s != num_queries:
            raise ConfigError(f"query_pos gives each query a row and a column: num_queries must be a square "
                              f"(4, 9, 16, ...), got {num_queries}")
        self.rows, self.cols = nn.Embedding(s, width), nn.Embedding(s, width)

    def forward(self, u: torch.Tensor) -> torch.Tensor:                               # (B, Q, D)
        return u + grid_table(self.rows, self.cols)


class LocalPrior(nn.Module):
    """Learned attention logits that start each of Q = s x s queries reading a place of its own:

        b[q, n] = -|r_q - p_n|^2 / (2 sigma^2) + c_q,   sigma = 1 / (2 g), half a patch

    r_q the centre of query q's cell in an s x s grid over the image, p_n the centre of patch n of the
    g x g grid (raster order), both in [0, 1]^2; c_q makes the nearest patch's logit 0, and every logit
    is floored at -10, which the class token and `extra` keys (a Perceiver latent's own) start at: off,
    but still learnable. Added to every head's logits: a query's softmax starts on the patches nearest
    its centre (with s = g / 2, its own 2 x 2 block, 96% of its weight) and training may move it.
    Attention averages what it reads, and an average over two shapes' patches no longer says which
    colour went with which shape; a query that starts on one place reads one shape. Honeybee's
    D-Abstractor (Cha et al. 2024, sec. 3.2) starts its queries' deformable attention from reference
    points on a grid for this locality; ConViT (d'Ascoli et al. 2021, sec. 3) starts its attention
    local as a learned bias too.

    window=True (query_prior="window") adds a fixed mask W: 0 on the patches whose centres lie in the
    query's own cell (its 2 x 2 block), -inf on the others and on the class token, so the query reads
    its cell and nothing else however its own logits q k^T / sqrt(d) grow (TokenPacker, Li et al. 2024,
    sec. 3.2: each query attends only to its own region of the features); `extra` keys stay open."""

    def __init__(self, num_queries: int, g: int, extra: int = 0, window: bool = False):
        super().__init__()
        s = math.isqrt(num_queries)
        if s * s != num_queries:
            raise ConfigError(f"query_prior=local places the queries on a square grid: num_queries must be a "
                              f"square (4, 9, 16, ...), got {num_queries}")
        centres = lambda k: torch.cartesian_prod(*[(torch.arange(k) + 0.5) / k] * 2)   # noqa: E731  (k*k, 2)
        b = -torch.cdist(centres(s), centres(g)).square() * 2 * g * g                  # (Q, N)
        b = F.pad(b - b.amax(1, keepdim=True), (1, extra), value=-10.0).clamp(min=-10.0)
        self.bias = nn.Parameter(b)                                                    # (Q, 1 + N + extra)
        self.register_buffer("window", None, persistent=False)
        if window:
            outside = torch.cdist(centres(s), centres(g), p=float("inf")) > 0.5 / s + 1e-6   # (Q, N): not in its cell
            if outside.all(1).any():
                raise ConfigError(f"query_prior=window: {num_queries} queries make cells smaller than the {g} x {g} "
                                  f"patches, and a cell with no patch in it reads nothing; use at most {g * g} queries")
            mask = F.pad(outside, (1, extra), value=True)
            mask[:, 1 + g * g:] = False                                                # `extra` keys stay open
            self.window = torch.zeros_like(b).masked_fill(mask, float("-inf"))         # (Q, 1 + N + extra)

    def forward(self) -> torch.Tensor:
        return self.bias if self.window is None else self.bias + self.window


class SelfPrior(nn.Module):
    """Learned logits on the Q-Former's self-attention among its Q queries, 0 on the diagonal and -10
    elsewhere: between its reads of the image each query starts listening to itself alone, and training
    may open it to the others. With LocalPrior on the cross-attention alone, the self-attention of every
    layer blends each query's place into every other's (a Perceiver latent's own keys start at -10 instead)."""

    def __init__(self, num_queries: int):
        super().__init__()
        self.bias = nn.Parameter(torch.eye(num_queries) * 10.0 - 10.0)                  # (Q, Q)

    def forward(self) -> torch.Tensor:
        return self.bias


def make_connector(cfg: VLMConfig, vision_width: int, vision_layers: int, num_patches: int,
                   lm_width: int) -> tuple[nn.Module, int]:
    """The connector of cfg and M, the number of image tokens it gives the LM."""
    width = lm_width                   # image tokens enter the decoder as they are: the LM's width
    if cfg.patch_merge < 1:
        raise ConfigError(f"patch_merge must be 1 (one token per patch) or more, got {cfg.patch_merge}")
    g = math.isqrt(num_patches)
    if g * g != num_patches or g % cfg.patch_merge:
        raise ConfigError(f"patch_merge {cfg.patch_merge} needs a square grid of patches whose side is a multiple "
                          f"of {cfg.patch_merge}; the vision encoder gives {num_patches} patches")
    M = num_patches // cfg.patch_merge ** 2
    if cfg.connector in PER_PATCH:
        if cfg.connector == "linear":
            connector = LinearConnector(vision_width, width, cfg.patch_merge)
        elif cfg.connector == "mlp":
            connector = MLPConnector(vision_width, width, cfg.patch_merge)
        else:
            connector = DenseConnector(vision_width, width, min(cfg.dense_groups, vision_layers), cfg.patch_merge)
        return (GridPositions(connector, math.isqrt(M), width) if cfg.image_pos == "2d" else connector), M
    if cfg.connector == "qformer":
        return QFormerConnector(vision_width, width, cfg, g), cfg.num_queries
    return PerceiverResampler(vision_width, width, cfg, g), cfg.num_queries


# == The model: paligemma.py's PaliGemma with clip.py's ViT and one of the connectors in front =====

@dataclass
class LMConfig(pg.PaliGemmaConfig):
    """paligemma.PaliGemmaConfig whose image-token count is the connector's M, not a patch grid."""
    image_tokens: int = 0

    @property
    def num_image_tokens(self) -> int:
        return self.image_tokens


class FrozenViT(nn.Module):
    """clip.py's shapes ViT, frozen: pixels (B, C, I, I) -> features (B, Lk, 1+N, Dv).

    Frozen means its output never changes, so it runs outside the model (`VLM.image_inputs`), once
    per image of the training and evaluation sets (`cache_features`); the model reads the features.
    """

    def __init__(self, vit: clip.VisionTransformer, all_layers: bool):
        super().__init__()
        self.vit, self.all_layers = vit.requires_grad_(False).eval(), all_layers
        c = vit.cfg
        self.width, self.layers, self.num_patches, self.image_size = c.vision_width, c.vision_layers, c.num_patches, c.image_size
        self.mean, self.std = clip.CLIP_MEAN, clip.CLIP_STD     # CLIP's, what the shapes ViT was trained on

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, I, I, C) uint8 -> (B, C, I, I) with the encoder's own mean and std."""
        return clip.normalize(images, self.mean, self.std)

    def train(self, mode: bool = True) -> FrozenViT:      # frozen means no dropout or batch statistics either, ever
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vit(pixel_values, output_hidden_states=True)                    # L+1 x (B, 1+N, Dv)
        last = self.vit.post_layernorm(hidden[-1])                                    # qformer's frozen features
        kept = hidden[:-1] + [last] if self.all_layers else [last]
        return torch.stack(kept, dim=1)                                               # (B, Lk, 1+N, Dv)


class ShapesVLM(pg.PaliGemma):
    """Connector -> Gemma decoder, reading frozen vision features (B, Lk, 1+N, Dv). Forward, masks, loss
    and KV-cache generation are PaliGemma's own; only `image_features` changes (PaliGemma's runs SigLIP
    + a linear projector on pixels; its argument keeps PaliGemma's name, pixel_values). The frozen
    encoder is a submodule so that it is saved and moved with the rest, but `VLM.image_inputs` runs it."""

    def __init__(self, cfg: VLMConfig, vision: FrozenViT | FrozenHFVision, vocab_size: int):
        nn.Module.__init__(self)
        D = cfg.lm_width
        text = pg.TextConfig(vocab_size=vocab_size, hidden_size=D, intermediate_size=cfg.lm_mlp,
                             num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                             num_key_value_heads=cfg.lm_kv_heads, head_dim=D // cfg.lm_heads,
                             max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        self.vision = vision
        self.connector, m = make_connector(cfg, vision.width, vision.layers, vision.num_patches, D)
        self.config = LMConfig(text=text, image_token_index=WordTokenizer.image_token_id, projection_dim=D,
                               image_tokens=m)
        self.language_model = pg.GemmaForCausalLM(text)
        pg.PaliGemma.init_weights(self.language_model, cfg.lm_init_std)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector(pixel_values)                      # (B, Lk, 1+N, Dv) features -> (B, M, D)


def set_stage(vlm: VLM, stage: int, mode: str = "full", train_qformer: bool = True) -> list[nn.Parameter]:
    """Freeze and unfreeze for a stage; returns the trainable parameters. Nothing else changes.

    stage 0: the LM alone (text). Stage 1: the connector alone. Stage 2: the connector plus the LM
    (mode "full") or plus the LoRA adapters that `add_lora` put on it ("lora", "qlora");
    train_qformer=False keeps a Q-Former connector's Q-Former and its KeyPositions frozen there (only
    its head trains).
    The vision encoder is frozen in every stage.
    """
    vlm.model.requires_grad_(False)
    if stage == 0:
        vlm.lm.requires_grad_(True)
    elif stage == 1:
        vlm.connector.requires_grad_(True)
    else:
        if mode == "full":
            vlm.lm.requires_grad_(True)
        elif not lora.lora_layers(vlm.lm):
            raise ConfigError(f"set_stage: stage 2 with {mode} trains LoRA adapters; add them with add_lora first")
        for layer in lora.lora_layers(vlm.lm).values():
            layer.lora_A.requires_grad_(True), layer.lora_B.requires_grad_(True)
        vlm.connector.requires_grad_(True)
        if not train_qformer and isinstance(vlm.connector, QFormerConnector):      # and what its queries read
            vlm.connector.qformer.requires_grad_(False), vlm.connector.key_pos.requires_grad_(False)
            if vlm.connector.head is None:                  # BLIP-2's head, language_projection, sits in the Q-Former
                vlm.connector.qformer.language_projection.requires_grad_(True)
    return [p for p in vlm.model.parameters() if p.requires_grad]


def quantize_lm(lm: nn.Module) -> dict[str, torch.Tensor]:
    """QLoRA's base (Dettmers et al. 2023, sec. 3): every linear layer of the LM but its output head
    to NF4 (nf4.py), frozen. Returns the float weights it replaced: QLoRA never changes the base, so
    the model is saved as those weights plus the adapter."""
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    nf4.quantize_model(lm, skip=("lm_head",))                                        # W -> NF4
    return before


def add_lora(vlm: VLM, quantize: bool = False) -> None:
    """h = W x + (alpha/r) B A x on the LM's lora_targets (lora.py, Hu et al. 2021), on an NF4 base
    first with quantize=True (QLoRA). A is drawn from torch's generator, B starts at 0."""
    cfg, vlm.stage2 = vlm.config, "qlora" if quantize else "lora"
    if quantize:
        vlm.lm_before_nf4 = quantize_lm(vlm.lm)
    lora.apply_lora(vlm.lm, list(cfg.lora_targets), cfg.lora_r, cfg.lora_alpha)


def checkpoint_activations(vlm: VLM) -> None:
    """Activation (gradient) checkpointing on the LM (Chen et al. 2016): backward re-runs each decoder
    layer from its input instead of keeping what the layer computed inside. The gradients stay the
    same; one extra forward pass buys the memory a 3B decoder's activations would take (paligemma.py)."""
    if isinstance(vlm.lm, pg.GemmaForCausalLM):
        vlm.lm.model.gradient_checkpointing = True
    else:                                                  # a transformers LM (--lm hf:DIR)
        vlm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# == Training: the losses of each stage, the optimizer, the schedule, the rows of a step, a batch ===

def vlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Answer-only next-token loss of a batch of (image, prefix, suffix) sequences (paligemma.suffix_loss),
    times the batch's `token_share` where it has one: its share of the step's answer tokens, so that the
    parts of a batch split by length (split_by_length), and under torchrun DDP's mean of the ranks'
    gradients (Run.micro_batch), give the gradient of one process's loss over the whole batch."""
    loss = model(batch["input_ids"], batch.get("image_inputs"), batch["attention_mask"],
                 batch["token_type_ids"], batch["labels"]).loss
    return loss * batch["token_share"] if "token_share" in batch else loss


def itc_itm_itg_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BLIP-2 stage 1 (sec. 3.2): L_itc + L_itm + L_itg of the Q-Former on the frozen image features.
    ITM's hard negatives are drawn from torch's global generator, which train_stage seeds and checkpoints."""
    losses = model.connector.qformer.losses(model.connector.keys(batch["image_inputs"]), batch["qf_ids"], batch["qf_mask"],
                                            batch["matches"], None)
    return sum(losses.values())


def schedule(step: int, lr: float, steps: int, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 0 (clip.lr_at). warmup < 1 is a fraction of the steps."""
    w = max(1, round(warmup * steps)) if warmup < 1 else int(warmup)
    return clip.lr_at(step, SimpleNamespace(lr=lr, warmup=w, steps=steps))


def stage_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float, scaled: Iterable[nn.Parameter] = (),
                   scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norm weights or other vectors).
    Parameters in `scaled` get lr x scale (each group's "lr_scale", applied by train_stage)."""
    scaled = {id(p) for p in scaled} if scale != 1.0 else set()
    groups = [{"params": [p for p in params if (p.dim() >= 2) == big and (id(p) in scaled) == fast],
               "weight_decay": weight_decay if big else 0.0, "lr_scale": scale if fast else 1.0}
              for fast in (False, True) for big in (True, False)]
    # foreach: each update is one call over a group's tensors instead of a Python loop, the same arithmetic
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, foreach=True)


def bf16_device(device: torch.device, enabled: bool = True) -> bool:
    """bf16 where it pays: CUDA devices that support it (on a CPU bf16 is slower here)."""
    return enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on a bf16_device; a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_device(device, enabled))


def hash_str(text: str) -> int:
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def kind_weights(qa: Sequence[tuple[int, str, str, str]], balance_position: bool = False) -> torch.Tensor:
    """Sampling weights 1 / (questions of its kind): every kind is drawn equally often.

    balance_position: position questions also give each of their answers an equal share of their
    kind's draws. Scenes say left / right three times as often as above / below (position_data), so
    a model trained on them sees a vertical comparison a quarter as often as a horizontal one; the
    balanced evaluation asks each equally. A position answer's last word is its relation (named answers)."""
    key = lambda row: (row[3], row[2].split()[-1]) if balance_position and row[3] == "position" else (row[3],)  # noqa: E731
    counts = collections.Counter(key(row) for row in qa)
    answers = collections.Counter(group[0] for group in counts)     # groups per kind: 4 for balanced position, else 1
    return torch.tensor([1.0 / (counts[key(row)] * answers[row[3]]) for row in qa])


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")     # prefix_suffix_batch's (B, T) tensors


def split_by_length(batch: dict[str, torch.Tensor], min_saved: int) -> list[dict[str, torch.Tensor]]:
    """A left-padded batch as one part, or as two parts by row length where that skips >= min_saved padding tokens.

    Every row of a batch is padded to its longest (prefix_suffix_batch), so a few long rows make every
    row pay for their length: in the default recipe's stage 2 a named position answer (ten words) pads
    the other 56 or so rows of a step from about 19 tokens to 31, and a third of the tokens computed are
    padding. A cut at length c puts the rows of at most c tokens in one part, padded to c, and the rest
    in another, padded to the longest; the c that leaves the fewest tokens is taken. Left padding makes
    the cut a slice: a row's last n_b columns are the same row in a narrower batch, with the same
    positions (counted over real tokens) and the same mask over them.

    Each part's loss is the mean over its answer tokens (suffix_loss), n_p of them; weighted by
    token_share = n_p / n, the parts' losses sum to the whole batch's mean over its n answer tokens,
    and so do their gradients: the same gradient, summed in another order (so not the same bits).
    A part costs a forward and a backward of its own, whatever its size (a few ms here), which is why
    a cut must skip at least min_saved tokens; 0 never splits. Under torchrun the batch's own
    token_share (Run.micro_batch) is scaled alike.
    """
    mask = batch["attention_mask"]
    B, T = mask.shape
    lengths = mask.sum(1)                                                      # (B,) real tokens per row

    def cost(c: int) -> int:                                                   # tokens computed with the cut at c
        return int((lengths <= c).sum()) * c + int((lengths > c).sum()) * T

    cut = min(lengths.unique().tolist()[:-1], key=cost, default=None)          # any length but the longest
    if min_saved <= 0 or cut is None or B * T - cost(cut) < min_saved:
        return [batch]
    n = (batch["labels"] != -100).sum()                                        # answer tokens of the batch
    parts = []
    for rows, width in (((lengths <= cut).nonzero()[:, 0], cut), ((lengths > cut).nonzero()[:, 0], T)):
        part = {k: v[rows, T - width:] if k in TEXT_KEYS else v[rows] for k, v in batch.items() if k != "token_share"}
        share = (part["labels"] != -100).sum() / n                             # n_p / n
        part["token_share"] = share * batch["token_share"] if "token_share" in batch else share
        parts.append(part)
    return parts


def step_rows(stage: Stage, batch_size: int, seed: int, step: int) -> tuple[str, torch.Tensor]:
    """(phase, rows) of a step: its kind of batch, and batch_size rows drawn from a generator seeded by
    (seed, phase, step) alone, so a resumed run draws exactly what the uninterrupted run drew."""
    phase = stage.phases[step % len(stage.phases)]             # stage 0 alternates captions and questions
    n_rows = len(stage.data.qa if phase in ("vqa", "text_qa") else stage.data.captions)
    g = torch.Generator().manual_seed(hash_str(f"{seed}-{phase}-{step}"))
    if stage.weights is not None:
        return phase, torch.multinomial(stage.weights, batch_size, replacement=True, generator=g)
    return phase, torch.randint(0, n_rows, (batch_size,), generator=g)


def qformer_text(tok: clip.ShapesTokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q-Former's text side (ITC, ITM, ITG) reads its own word-level tokenizer (QFormerConnector.tokenizer),
    cut to its context (24 tokens with start and end): longer captions keep their first 22 words."""
    return tok.encode([" ".join(tok.words(c)[:tok.context_length - 2]) for c in captions])


def same_texts(texts: Sequence[str]) -> torch.Tensor:
    """(n, n) bool, True where texts i and j are equal: captions that describe two scenes alike are
    never ITM negatives of each other, and count as right for both in retrieval."""
    return torch.tensor([[a == b for b in texts] for a in texts])


def make_batch(vlm: VLM, data: VQAData, rows: Sequence[int], phase: str) -> dict[str, torch.Tensor]:
    """Rows of the data -> the model's tensors, on its device. phase: "text_qa"/"text_cap" (stage 0),
    "caption" (stage 1), "itc" (stage 1a), "vqa" (stage 2)."""
    if phase in ("vqa", "text_qa"):
        items = [data.qa[i] for i in rows]
        prompts, answers, index = [x[1] for x in items], [x[2] for x in items], [x[0] for x in items]
    else:
        items = [data.captions[i] for i in rows]
        prompts, answers, index = [vlm.caption_prompt] * len(items), [x[1] for x in items], [x[0] for x in items]
    text_only = phase.startswith("text")
    batch = vlm.processor(prompts if phase != "itc" else [""] * len(prompts), answers, images=not text_only)
    if not text_only:
        batch["image_inputs"] = vlm.image_inputs(*data.image_rows(index))
    if phase == "itc":
        ids, mask = qformer_text(vlm.connector.tokenizer, answers)
        T = int(mask.sum(1).max())
        batch.update(qf_ids=ids[:, :T], qf_mask=mask[:, :T],
                     matches=same_texts(answers))
    return {k: v.to(vlm.model.device) for k, v in batch.items()}


# == Data: CLEVR-style questions about clip.py's shapes scenes, behind a small interface ===========

def question_kind(question: str, other: str | None = None) -> str:
    """The kind of one of clip.questions()'s questions, from its opening words; any other question is
    refused, or, where `other` is given, of that kind."""
    for opening, kind in (("how many", "count"), ("what colour", "colour"), ("what shape", "shape"),
                          ("what size", "size"), ("where", "position"), ("is there", "existence")):
        if question.startswith(opening):
            return kind
    if other is None:
        raise ValueError(f"not a shapes question: {question!r}")
    return other


def scene_questions(scene: clip.Scene, rng: random.Random, split: str) -> list[tuple[str, str, str]]:
    """clip.questions(scene) with the two existence questions re-drawn at random.

    clip.questions asks "is there" about the first shape (yes) and the first absent pair in a fixed
    order (no), so a text-only model could answer from the wording; here both pairs are random: a
    present shape, and an absent pair allowed in the split (held-out pairs only under "heldout").
    """
    qa = [(q, a) for q, a in clip.questions(scene) if not q.startswith("is there")]
    present = {(s.colour, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in clip.COLOURS for k in clip.SHAPES
              if (c, k) not in present and (split == "heldout" or (c, k) not in clip.HELDOUT)]
    colour, kind = rng.choice(sorted(present))
    qa.append((f"is there a {colour} {kind}?", "yes"))
    colour, kind = rng.choice(absent)
    qa.append((f"is there a {colour} {kind}?", "no"))
    return [(q, a, question_kind(q)) for q, a in qa]


def draw_scenes(n: int, seed: int, split: str) -> tuple[list[clip.Scene], list[list[tuple[str, str, str]]]]:
    """n scenes of a split, each with its questions; deterministic in (seed, split)."""
    rng = random.Random(f"vlm_train-{seed}-{split}")        # a str seed is stable across runs
    scenes = [clip.random_scene(rng, split) for _ in range(n)]
    return scenes, [scene_questions(s, rng, split) for s in scenes]


def pick_balanced(qas: Iterable[Sequence[tuple[str, str, str]]], rng: random.Random) -> list[tuple[str, str, str]]:
    """One question per scene, its kind drawn uniformly among the kinds the scene offers."""
    out = []
    for qa in qas:
        kind = rng.choice(sorted({k for _, _, k in qa}))
        out.append(rng.choice([x for x in qa if x[2] == kind]))
    return out


def synthetic_vqa(n: int, seed: int = 0, split: str = "test",
                  image_size: int = 48) -> list[tuple[Image.Image, str, str]]:
    """n (PIL image, question, answer) triples: n scenes, one question each, kinds balanced.

    split "train" / "test": scenes without held-out colour-shape pairs; "heldout": each scene has one.
    Training draws with seed = TrainConfig.seed; evaluation uses seed + 1 (test) so scenes never repeat.
    """
    scenes, qas = draw_scenes(n, seed, split)
    picks = pick_balanced(qas, random.Random(f"pick-{seed}-{split}"))
    return [(clip.render(s, image_size), q, a) for s, (q, a, _) in zip(scenes, picks)]


def synthetic_captions(n: int, seed: int = 0, split: str = "train",
                       image_size: int = 48) -> list[tuple[Image.Image, str]]:
    """n (PIL image, caption) pairs; captions name every attribute ("a large red circle above ...")."""
    scenes, _ = draw_scenes(n, seed, split)
    return [(clip.render(s, image_size), clip.caption(s)) for s in scenes]


@dataclass
class VQAData:
    """What every stage consumes: images (n, I, I, C) uint8, and rows pointing into them.

    qa: (image index, question, answer, kind); captions: (image index, caption). Build it from any
    iterables of (image, question, answer) and (image, caption) with `from_iterables`.
    """
    images: torch.Tensor
    qa: list
    captions: list
    skipped: int = 0                   # unreadable images
    malformed: int = 0                 # unusable lines of an annotation file (load_data)
    features: torch.Tensor = None      # (n, Lk, 1+N, Dv) frozen vision features, when cached

    def image_rows(self, index: Sequence[int] | torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, their cached features or None) at `index`: what VLM.image_inputs reads."""
        return self.images[index], None if self.features is None else self.features[index]

    @classmethod
    def from_iterables(cls, vqa: Iterable[tuple] = (), captions: Iterable[tuple] = (), image_size: int = 48) -> VQAData:
        """Unreadable images are skipped and counted, never fatal."""
        images, qa, caps, index, skipped = [], [], [], {}, 0

        def add(image):
            key = str(image) if isinstance(image, (str, Path)) else id(image)     # a path is read once
            if key not in index:
                array = load_image(image, image_size)
                index[key] = len(images)
                images.append(array)
            return index[key]

        for item, target in [(x, "qa") for x in vqa] + [(x, "cap") for x in captions]:
            try:
                i = add(item[0])
            except ValueError:
                skipped += 1
                continue
            if target == "qa":
                qa.append((i, item[1], item[2], item[3] if len(item) > 3 else question_kind(item[1])))
            else:
                caps.append((i, item[1]))
        if not images:
            raise ValueError(f"no readable image among {skipped} given")
        return cls(torch.from_numpy(np.stack(images)), qa, caps, skipped)


def load_image(image: Image.Image | str | Path | bytes | bytearray, size: int) -> np.ndarray:
    """A PIL image, path or bytes -> (size, size, 3) uint8; ValueError if it cannot be read."""
    import io
    try:
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, Path)):
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image, a path or bytes, got {type(image).__name__}")
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image ({e})") from None


def position_data(n: int, seed: int, image_size: int) -> VQAData:
    """n relative-position questions about n fresh scenes (one each), answers balanced: n/4 each of
    left, right, above and below, so always giving one answer scores 25%. Natural scenes would not be
    balanced: clip.relation says left / right whenever two columns differ, three times as often as
    above / below, and a model that always says "right" would score about 39% there."""
    return rendered(*position_scenes(n, seed), image_size)


def position_scenes(n: int, seed: int) -> tuple[list[clip.Scene], list[tuple[int, str, str, str]]]:
    """position_data's scenes and question rows, before rendering."""
    rng = random.Random(f"vlm_train-position-{seed}")
    quota = {a: n // 4 + (i < n % 4) for i, a in enumerate(("left", "right", "above", "below"))}
    scenes, qa = [], []
    while len(qa) < n:
        scene = clip.random_scene(rng, "test")
        options = [(q, a) for q, a in clip.questions(scene) if question_kind(q) == "position" and quota[a] > 0]
        if options:
            q, a = rng.choice(options)
            quota[a] -= 1
            qa.append((len(scenes), q, a, "position"))
            scenes.append(scene)
    return scenes, qa


def shapes_data(n: int, seed: int, split: str, image_size: int, all_questions: bool = True) -> VQAData:
    """The embedded data: n scenes; every question of each (training) or one per scene (evaluation)."""
    scenes, qas = draw_scenes(n, seed, split)
    if not all_questions:
        qas = [[x] for x in pick_balanced(qas, random.Random(f"pick-{seed}-{split}"))]
    return rendered(scenes, [(i, q, a, k) for i, rows in enumerate(qas) for q, a, k in rows], image_size)


ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")


def named_position_answer(scene: clip.Scene, question: str, answer: str) -> str:
    """The answer to "where is a relative to b?" with its work shown (a scratchpad; Nye et al. 2021):

        "where is the red circle relative to the blue square?" -> "red circle top left, blue square top right: left"

    Each shape's cell is written right after its name: one lookup of one named shape, which the model
    does well alone; the relation is then a comparison of words in its own context instead of two
    lookups composed inside one forward pass. The tokenizer drops the punctuation; evaluation scores
    the last word (evaluate_vqa)."""
    w = clip.ShapesTokenizer.words(question)                  # where is the C K relative to the C2 K2
    a, b = (next(x for x in scene.shapes if (x.colour, x.kind) == pair) for pair in ((w[3], w[4]), (w[8], w[9])))
    return ", ".join(f"{x.colour} {x.kind} {ROWS[x.row]} {COLUMNS[x.col]}" for x in (a, b)) + f": {answer}"


def grid_questions(scene: clip.Scene, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
    """One-hop training questions, for each kind asked:

        "column", "row": about each shape its colour and kind name uniquely,
            "which column is the red circle in?" -> "left"      "which row is the red circle in?" -> "top"
        "cell": about each shape alone in its cell, its attributes looked up by place,
            "what colour is the shape in the top left?" -> "red"     "what shape is in the top left?" -> "circle"

    A relative-position question composes two lookups of a cell and a comparison; the named answers
    write the lookups out one at a time, and column / row questions train each lookup on its own, a
    column as often as a row. Cell questions read a shape's colour and kind with no colour or kind in
    the question. Training only: every evaluation split asks clip.questions' six kinds."""
    out = []
    for x in scene.shapes:
        named = sum((y.colour, y.kind) == (x.colour, x.kind) for y in scene.shapes) == 1
        alone = sum((y.row, y.col) == (x.row, x.col) for y in scene.shapes) == 1
        for kind in kinds:
            if kind in ("column", "row") and named:
                answer = COLUMNS[x.col] if kind == "column" else ROWS[x.row]
                out.append((f"which {kind} is the {x.colour} {x.kind} in?", answer, kind))
            if kind == "cell" and alone:
                where = f"{ROWS[x.row]} {COLUMNS[x.col]}"
                out += [(f"what colour is the shape in the {where}?", x.colour, kind),
                        (f"what shape is in the {where}?", x.kind, kind)]
    return out


def position_training(data: VQAData, tcfg: TrainConfig, named: bool) -> VQAData:
    """The training rows with the position levers: the n_train scenes of the seed (drawn again: the cache
    keeps images, not scenes), their position answers written by named_position_answer (named), then
    grid_questions' rows for TrainConfig.grid_questions (their own kinds, so stage 2 draws each kind
    equally often)."""
    scenes, _ = draw_scenes(tcfg.n_train, tcfg.seed, "train")
    qa = [(i, q, named_position_answer(scenes[i], q, a) if named and k == "position" else a, k)
          for i, q, a, k in data.qa]
    qa += [(i, q, a, k) for i, scene in enumerate(scenes) for q, a, k in grid_questions(scene, tcfg.grid_questions)]
    return replace(data, qa=qa)


def rendered(scenes: Sequence[clip.Scene], qa: list, image_size: int) -> VQAData:
    """The scenes drawn at image_size, their question rows, and one caption each."""
    images = torch.from_numpy(np.stack([np.asarray(clip.render(s, image_size)) for s in scenes]))
    return VQAData(images, qa, [(i, clip.caption(s)) for i, s in enumerate(scenes)])


# == The word-level tokenizer of the default LM, and the prefix / suffix sequences =================

# Gemma's special ids where it has them (pad 0, eos 1, bos 2), then <unk>, <image> and <sep> (the
# newline that ends PaliGemma's prompt), then the words.
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>", "<sep>")


class WordTokenizer:
    """One id per word of the synthetic corpus; saved with the model as tokenizer.json."""
    pad_token_id, eos_token_id, bos_token_id, unk_token_id, image_token_id, sep_token_id = range(6)

    def __init__(self, words: Iterable[str]):
        self.itos = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        return cls({w for t in texts for w in clip.ShapesTokenizer.words(t)} | set(clip.ShapesTokenizer.WORDS))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_token_id) for w in clip.ShapesTokenizer.words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return " ".join(out)


def prefix_suffix_batch(prefixes: Sequence[list[int]], suffixes: Sequence[list[int]],
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded (prefix ids, suffix ids) rows -> input_ids, attention_mask, token_type_ids, labels.

    token type 0 = prefix (image + prompt, full attention), 1 = suffix (answer, causal, scored);
    labels keep the suffix ids and are -100 elsewhere (paligemma.suffix_labels): answer-only loss.
    """
    lengths = [len(p) + len(s) for p, s in zip(prefixes, suffixes)]                  # n_b, real tokens of row b
    width = max(lengths)
    input_ids = torch.tensor([[pad_id] * (width - n) + p + s for n, p, s in zip(lengths, prefixes, suffixes)],
                             dtype=torch.long)                                      # (B, T)
    column = torch.arange(width)
    answer = torch.tensor([len(s) for s in suffixes])[:, None]
    attention_mask = (column >= width - torch.tensor(lengths)[:, None]).long()       # a row's last n_b columns
    token_type_ids = (column >= width - answer).long()                               # ... and its last |suffix_b|
    labels = pg.suffix_labels(input_ids, token_type_ids, attention_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": labels}


@dataclass(eq=False)
class Processor:
    """What turns images and texts into a model's inputs, for every LM: <image> * M <bos> prompt <sep> |
    answer <eos>, left-padded (prefix_suffix_batch). LMs differ only in how a text becomes ids and how
    an image becomes pixels, so the three kinds (`word_processor` for the default LM's words,
    `hf_processor` for --lm hf:DIR's tokenizer, `checkpoint_processor` for --init paligemma:DIR) are
    this one class with other functions in its fields."""
    tokenizer: Any
    prefix: Callable[[str, bool], list[int]]            # (prompt, with image tokens?) -> <image> * M <bos> prompt <sep>
    suffix: Callable[[str], list[int]]                  # answer -> answer <eos>
    pixels: Callable[[torch.Tensor], torch.Tensor]      # (B, I, I, C) uint8 -> (B, C, I, I), as the encoder was trained
    decode: Callable[[torch.Tensor], list[str]]         # generated ids -> texts, up to the end-of-sequence token
    image_size: int
    eos_token_id: int
    pad_token_id: int

    def __call__(self, prompts: Sequence[str], answers: Sequence[str] | None = None,
                 images: bool = True) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids, labels (prefix_suffix_batch); images=False: text only."""
        suffixes = [[] for _ in prompts] if answers is None else [self.suffix(a) for a in answers]
        return prefix_suffix_batch([self.prefix(p, images) for p in prompts], suffixes, self.pad_token_id)


def word_processor(tokenizer: WordTokenizer, image_tokens: int, image_size: int,
                   normalize: Callable[[torch.Tensor], torch.Tensor] = clip.normalize) -> Processor:
    """The default LM's processor: [<image>] * M <bos> prompt <sep> | answer <eos> over WordTokenizer's ids."""
    t = tokenizer

    def prefix(prompt: str, images: bool) -> list[int]:
        return [t.image_token_id] * (image_tokens if images else 0) + [t.bos_token_id] + t.encode(prompt) + [t.sep_token_id]

    return Processor(t, prefix, lambda a: t.encode(a) + [t.eos_token_id], normalize,
                     lambda tokens: [t.decode(row) for row in tokens.tolist()], image_size, t.eos_token_id,
                     t.pad_token_id)


# == Evaluation: greedy answers, exact match and ROUGE per kind, retrieval =========================

@torch.no_grad()
def generate_answers(vlm: VLM, images: torch.Tensor, prompts: Sequence[str], max_new_tokens: int = 4,
                     batch_size: int = 128, features: torch.Tensor | None = None) -> list[str]:
    """Greedy answers (paligemma's KV-cache generation) to prompts about (B, I, I, C) uint8 images
    (or about their cached vision features, (B, Lk, 1+N, Dv))."""
    model, out = vlm.model.eval(), []
    device = model.device
    for s in range(0, len(prompts), batch_size):
        batch = vlm.processor(prompts[s:s + batch_size])
        inputs = vlm.image_inputs(images[s:s + batch_size], None if features is None else features[s:s + batch_size])
        gen = model.generate(batch["input_ids"].to(device), inputs.to(device), batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=vlm.processor.eos_token_id)
        out += [a.strip() for a in vlm.processor.decode(gen.tokens.cpu())]
    return out


def score_answers(predictions: Sequence[str], truths: Sequence[str],
                  kinds: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Exact match (%) and ROUGE-1/2/L F (x100, rouge.py), overall and per kind, each beside its majority
    baseline (% for always giving the most common true answer) and the share of each answer given."""
    scorer = rouge.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rows = [(k, p == t, scorer.score(t, p), p, t) for p, t, k in zip(predictions, truths, kinds)]

    def summary(subset):
        n = max(1, len(subset))
        given = collections.Counter(r[3] for r in subset)         # which answers the model gives, and how often
        return {"n": len(subset), "exact": 100 * sum(r[1] for r in subset) / n,
                **{name: 100 * sum(r[2][name].fmeasure for r in subset) / n for name in ("rouge1", "rouge2", "rougeL")},
                # always giving the most common true answer: the floor a model must beat
                "majority": 100 * max(collections.Counter(r[4] for r in subset).values(), default=0) / n,
                "answers": {a: 100 * c / n for a, c in given.most_common()}}

    order = list(KINDS) + sorted(set(kinds) - set(KINDS))           # a loaded data set's own kinds last
    return {"all": summary(rows), **{k: summary([r for r in rows if r[0] == k]) for k in order
                                     if any(r[0] == k for r in rows)}}


def answer_questions(vlm: VLM, data: VQAData, prompt_prefix: str = "", rows: slice = slice(None)) -> list[str]:
    """Greedy answers to the questions of `data` (rows: to those only; Run.score splits them over ranks)."""
    qa = data.qa[rows]
    idx = [x[0] for x in qa]
    longest = max(len(x[2].split()) for x in data.qa) + 1           # words of the longest answer, + <eos>
    if vlm.config.position_answer == "named" and any(x[3] == "position" for x in data.qa):
        longest = max(longest, 10)                                  # 9 words of work, then the relation
    images, features = data.image_rows(idx)
    return generate_answers(vlm, images, [prompt_prefix + x[1] for x in qa], max(4, longest), features=features)


def evaluate_vqa(vlm: VLM, data: VQAData, prompt_prefix: str = "",
                 predictions: list[str] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Score greedy answers on every question of `data` (predictions: answers already generated); a position
    answer that shows its work (position_answer="named") is scored by its last word."""
    predictions = answer_questions(vlm, data, prompt_prefix) if predictions is None else predictions
    final = [final_answer(vlm.config, x[3], p) for p, x in zip(predictions, data.qa)]
    return score_answers(final, [x[2] for x in data.qa], [x[3] for x in data.qa]), predictions


def final_answer(cfg: VLMConfig, kind: str, text: str) -> str:
    """What a generated text answers: a named position answer's last word (its relation), else the text."""
    return text.split()[-1] if cfg.position_answer == "named" and kind == "position" and text else text


@torch.no_grad()
def qformer_retrieval(vlm: VLM, data: VQAData, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """R@K of the Q-Former's ITC features (BLIP-2 sec. 3.2): image -> caption and back; captions
    that describe two scenes alike count as right for both. Beside them: R@1 of a random ranking
    (chance) and the share of caption words the Q-Former's tokenizer maps to <unk>."""
    model = vlm.model.eval()
    device = model.device
    captions = [c for _, c in data.captions]
    index = [i for i, _ in data.captions]
    feats = vlm.image_inputs(*data.image_rows(index)).to(device)
    tok = vlm.connector.tokenizer
    ids, mask = qformer_text(tok, captions)
    sim = vlm.connector.qformer.itc_logits(vlm.connector.keys(feats), ids.to(device), mask.to(device)).cpu()   # (n, n)
    correct = same_texts(captions)
    return {**clip.recall_at_k(sim, correct, ks), "chance R@1": 100 * correct.float().mean().item(),
            "unk %": 100 * (ids == tok.unk_token_id).sum().item() / max(1, int(mask.sum()) - 2 * len(captions))}


# == The model with its processor and parts; answer() and answer_batch() on PIL images =============

@dataclass(eq=False)
class VLM:
    """A model, the processor that turns images and questions into its inputs, and its three parts.

    vision is the frozen encoder run outside the model (its features can be computed once and cached),
    or None for a PaliGemma checkpoint (--init), whose tower runs inside the model on pixels.
    """
    model: nn.Module
    processor: Processor
    config: VLMConfig
    vision: nn.Module | None
    connector: nn.Module
    lm: nn.Module
    caption_prompt: str = "caption"
    question_prefix: str = ""
    stage2: str = "full"                   # "lora" / "qlora" once add_lora has put adapters on the LM
    lm_before_nf4: dict | None = None      # QLoRA: the float LM weights its NF4 base was made from (saved)

    def image_inputs(self, images: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """What the model reads for (B, I, I, C) uint8 images: their frozen features (given when cached,
        else computed), or the normalised pixels for a model with its own tower."""
        if features is not None:
            return features
        pixels = self.processor.pixels(images)
        if self.vision is None:                            # a checkpoint's tower, in the model's dtype
            return pixels.to(self.model.dtype)
        return self.vision(pixels.to(self.model.device))

    def answer_batch(self, images: Sequence[Image.Image | str | Path | bytes], questions: Sequence[str],
                     max_new_tokens: int | None = None, work: bool = False) -> list[str]:
        """Greedy answers to one question per image (PIL images, paths or bytes), up to max_new_tokens
        (default 4, or 10 where a named position answer writes its work first). A position question
        ("where is ...") is answered by the work's last word, the relation; work=True: the whole text."""
        if len(images) != len(questions):
            raise ValueError(f"one question per image: got {len(images)} images and {len(questions)} questions")
        kinds = [question_kind(q, other="") for q in questions]
        named = self.config.position_answer == "named" and "position" in kinds
        pixels = torch.from_numpy(np.stack([load_image(im, self.processor.image_size) for im in images]))
        texts = generate_answers(self, pixels, [self.question_prefix + q for q in questions],
                                 max_new_tokens or (10 if named else 4))
        return texts if work else [final_answer(self.config, k, t) for k, t in zip(kinds, texts)]

    def answer(self, image: Image.Image | str | Path | bytes, question: str, max_new_tokens: int | None = None) -> str:
        return self.answer_batch([image], [question], max_new_tokens)[0]


# == The stages: what each trains, on which rows, with which loss; one loop; the recipe ============

@dataclass(eq=False)
class Stage:
    """One stage of the recipe: a loss on rows of the data, over some parameters, for some steps."""
    name: str                          # stage0, stage1a, stage1, stage2: its checkpoint folder and log name
    phases: tuple[str, ...]            # make_batch's kind of batch, by step (stage 0 alternates two)
    data: VQAData
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    params: list[nn.Parameter]         # what set_stage left trainable
    steps: int
    lr: float
    warmup: float                      # a fraction of the steps (< 1) or a number of steps (schedule)
    config: dict                       # what a checkpoint must agree on to be resumed
    scaled: list = field(default_factory=list)      # trained at lr x qformer_lr_scale
    weights: torch.Tensor | None = None             # row sampling weights (stage 2: kinds balanced)
    save_every: int = 200                           # checkpoint interval (and always at the last step)
    length_split: int = 0                           # split_by_length's min_saved (stage 2: TrainConfig.length_split)


def text_stage(vlm: VLM, data: VQAData, tcfg: TrainConfig) -> Stage:
    """Stage 0: the LM alone on the corpus' text, captions and questions with answers in turn."""
    phases = ("text_cap", "text_qa") if data.captions else ("text_qa",)
    return Stage("stage0", phases, data, vlm_loss, set_stage(vlm, 0), tcfg.pretrain_steps, tcfg.pretrain_lr,
                 tcfg.pretrain_warmup, lm_fingerprint(vlm, tcfg), save_every=tcfg.save_every)


def align_stages(vlm: VLM, data: VQAData, tcfg: TrainConfig) -> list[Stage]:
    """Stage 1: the connector alone, LM frozen: (qformer with itc_steps: BLIP-2's ITC + ITM + ITG first, then) the caption
    loss through the LM. Data without captions (CLEVR) aligns on its questions and answers instead.
    The Q-Former's parts that read the image and have no pretrained counterpart get lr x qformer_lr_scale."""
    params, vcfg = set_stage(vlm, 1), vlm.config
    scaled = [p for n, p in vlm.connector.named_parameters() if "crossattention" in n or "query_tokens" in n]
    stages = [Stage("stage1", ("caption" if data.captions else "vqa",), data, vlm_loss, params, tcfg.stage1_steps,
                    tcfg.stage1_lr, tcfg.warmup, stage_config(vcfg, tcfg, "stage1"), scaled,
                    save_every=tcfg.save_every)]
    if vcfg.connector == "qformer" and tcfg.itc_steps and data.captions:
        stages.insert(0, Stage("stage1a", ("itc",), data, itc_itm_itg_loss, params, tcfg.itc_steps, tcfg.itc_lr,
                               tcfg.warmup, stage_config(vcfg, tcfg, "stage1a"), scaled,
                               save_every=tcfg.save_every))
    return stages


def vqa_stage(vlm: VLM, data: VQAData, tcfg: TrainConfig) -> Stage:
    """Stage 2: connector + LM (full, LoRA or QLoRA) on questions, loss on the answer only, kinds balanced."""
    if tcfg.grad_checkpointing:                       # memory for compute; the same gradients
        checkpoint_activations(vlm)
    params = set_stage(vlm, 2, tcfg.stage2, tcfg.stage2_qformer)
    if isinstance(vlm.connector, QFormerConnector) and not tcfg.stage2_qformer:
        data = frozen_queries(vlm, data, tcfg.bf16)   # the frozen Q-Former runs once per training image
    return Stage("stage2", ("vqa",), data, vlm_loss, params,
                 tcfg.stage2_steps, tcfg.stage2_lr, tcfg.warmup, stage_config(vlm.config, tcfg, "stage2"),
                 weights=kind_weights(data.qa, tcfg.balance_position), save_every=tcfg.save_every,
                 length_split=tcfg.length_split)


@torch.no_grad()
def frozen_queries(vlm: VLM, data: VQAData, bf16: bool, batch_size: int = 500) -> VQAData:
    """The data with the frozen Q-Former's query outputs (n, Q, Dq) as its features: stage 2 trains only what comes
    after them (the head, the LM), so they are the same at every step, and computed once, as the ViT's are."""
    def queries(s: int) -> torch.Tensor:
        feats = vlm.image_inputs(*data.image_rows(slice(s, s + batch_size)))
        with autocast(vlm.model.device, bf16):        # in the dtype the step would compute them in
            return vlm.connector.qformer(vlm.connector.keys(feats.to(vlm.model.device)))
    return replace(data, features=torch.cat([queries(s) for s in range(0, len(data.images), batch_size)]))


STAGE2_ONLY = ("stage2", "stage2_steps", "stage2_lr", "stage2_qformer", "lora_r", "lora_alpha", "lora_targets",
               "grad_checkpointing", "balance_position", "length_split")


def stage_config(vcfg: VLMConfig, tcfg: TrainConfig, phase: str) -> dict:
    """What a checkpoint of `phase` must agree on to be resumed: the whole model and recipe (stage 1
    ignores the stage-2 settings, so runs that differ only there can share one stage 1)."""
    keep = lambda k: phase == "stage2" or k not in STAGE2_ONLY  # noqa: E731
    return {"phase": phase, **{f"model.{k}": v for k, v in asdict(vcfg).items() if keep(k)},
            **{f"train.{k}": v for k, v in asdict(tcfg).items() if keep(k)}}


def lm_fingerprint(vlm: VLM, tcfg: TrainConfig) -> dict:
    """Everything the text-only LM depends on, its checkpoint's config and cache key: "lm", what it is (its
    sizes, the vocabulary, stage 0's recipe); "init", what else drew from the seed before its initial
    weights (ShapesVLM builds the connector, then the LM), so runs that share --cache with another
    connector, vision encoder or Q-Former vocabulary each train the LM they would train alone."""
    keys = ("lm_width", "lm_layers", "lm_heads", "lm_kv_heads", "lm_mlp", "lm_init_std")
    train = ("n_train", "batch_size", "grad_accum", "pretrain_steps", "pretrain_lr", "pretrain_warmup", "weight_decay",
             "clip_norm", "seed")
    lm = {**{k: getattr(vlm.config, k) for k in keys}, **{k: getattr(tcfg, k) for k in train},
          "vocab": vlm.processor.tokenizer.itos, **({"data": tcfg.data} if tcfg.data else {}),
          **({"grid_questions": tcfg.grid_questions} if tcfg.grid_questions else {})}
    init = {k: v for k, v in asdict(vlm.config).items() if k not in keys and k not in STAGE2_ONLY}
    return {"phase": "stage0", "lm": lm, "init": init}


def train_stage(vlm: VLM, stage: Stage, tcfg: TrainConfig, run: Run) -> list[float]:
    """Steps 0 .. steps-1 of AdamW with warm-up + cosine over stage.params; returns the step losses.

    `run` holds what a reader may skip: --resume (start, history), DDP under torchrun (net, this rank's
    rows, the mean over ranks), the log and checkpoints (end_step) and the tests' kill switch.
    """
    optimizer = stage_optimizer(stage.params, stage.lr, tcfg.weight_decay, stage.scaled, tcfg.qformer_lr_scale)
    torch.manual_seed(hash_str(f"{tcfg.seed}-{stage.name}-torch"))           # ITM's negatives; checkpointed
    start, history = run.resume_stage(stage, vlm.model, optimizer)
    net = run.wrap(StageLoss(vlm.model.train(), stage.loss))                  # DDP under torchrun
    for step in run.steps(stage, start):
        lr = schedule(step, stage.lr, stage.steps, stage.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        phase, rows = step_rows(stage, tcfg.batch_size, tcfg.seed, step)
        b, total = tcfg.batch_size // tcfg.grad_accum, 0.0
        for k in range(tcfg.grad_accum):                                      # gradients accumulate
            parts = split_by_length(run.micro_batch(vlm, stage.data, phase, rows[k * b:(k + 1) * b]), stage.length_split)
            for j, batch in enumerate(parts):                                 # one part, or two by row length
                last = k == tcfg.grad_accum - 1 and j == len(parts) - 1
                with run.no_sync(net, not last):                              # DDP: average at the last only
                    with autocast(vlm.model.device, tcfg.bf16):
                        loss = net(batch) / tcfg.grad_accum
                    if not torch.isfinite(loss):
                        raise clip.NonFiniteLossError(f"the loss is {loss.item()} at lr {lr:.2e}; stopping before the "
                                                      f"update (the last checkpoint is kept). Lower the learning rate.")
                    loss.backward()
                total += loss.item()
        # g <- g min(1, c / ||g||): one global norm over all trainable parameters
        torch.nn.utils.clip_grad_norm_(stage.params, tcfg.clip_norm)
        optimizer.step()
        history.append(run.mean_over_ranks(total))
        run.end_step(stage, vlm.model, optimizer, history, lr)                # log, checkpoint, kill switch
    vlm.model.eval()
    return history


def train_vlm(vcfg: VLMConfig, tcfg: TrainConfig, run: Run) -> tuple[dict, VLM]:
    """The recipe: stage 0 (a from-scratch LM learns the language; cached), stage 1, evaluation, stage 2,
    evaluation. Writes everything under run.out; returns (metrics, vlm)."""
    vlm, train = build_vlm(vcfg, tcfg, run)           # frozen vision + connector + LM, and the training rows
    metrics = run.start_metrics(vlm.config, tcfg, train)
    history = metrics["history"]
    if not vcfg.lm and run.init is None:
        cache_features(vlm, train)                    # the frozen ViT runs once per training image
        history["stage0"] = train_stage(vlm, text_stage(vlm, train, tcfg), tcfg, run)
    run.lap("setup and stage 0")
    for stage in align_stages(vlm, train, tcfg):
        history[stage.name] = train_stage(vlm, stage, tcfg, run)
    run.lap("stage 1")
    evals = run.eval_sets(vlm, tcfg, metrics)
    if evals and run.evaluate_stage1:
        metrics["after stage 1"] = {s: run.score(vlm, d)[0] for s, d in evals.items()}
        if vcfg.connector == "qformer" and run.init is None and tcfg.itc_steps and evals["test"].captions:
            metrics["retrieval after stage 1"] = qformer_retrieval(vlm, evals["test"])
    if tcfg.stage2 != "full":
        add_lora(vlm, quantize=tcfg.stage2 == "qlora")
    history["stage2"] = train_stage(vlm, vqa_stage(vlm, train, tcfg), tcfg, run)
    run.lap("stage 2")
    metrics["loss"] = {k: [v[0], v[-1]] for k, v in history.items() if v}
    metrics["trainable parameters"] = sum(p.numel() for p in vlm.model.parameters() if p.requires_grad)
    answers = {s: run.score(vlm, d) for s, d in evals.items()}
    if answers:
        metrics["after stage 2"] = {s: r[0] for s, r in answers.items()}
    run.finish(vlm, metrics, answers)                 # rank 0: model/, metrics.json, answers.png
    return metrics, vlm


# ----------------------------------------------------------------------------------------------
# Plumbing: the run object (checkpoints, --resume, log, torchrun / DDP, kill switch), the pipeline,
# data on disk, transformers parts, --init paligemma:DIR, save and load, memory estimate, command line
# ----------------------------------------------------------------------------------------------

CheckpointError = clip.CheckpointError          # a checkpoint that cannot be used; the message says why


class Killed(RuntimeError):
    """Raised right after the checkpoint of Run.stop_after's step: a `kill -9` for the tests of --resume."""


class StageLoss(nn.Module):
    """model + loss function as one module, so DDP sees every loss (the Q-Former's ITC too) as a forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class Run:
    """One training run's plumbing. Checkpoints in clip.py's layout (step-XXXXXX/ and `latest` per stage);
    stage 0 lives in the cache (cache/lm-HASH) and always resumes, the other stages with resume=True,
    refusing another configuration's. Under torchrun each rank trains on its slice; rank 0 writes."""
    out: Path
    device: torch.device = torch.device("cpu")
    cache: Path | None = None            # the ViT, data and text-only LM (default: out)
    resume: bool = False
    progress: bool = True
    init: str | None = None              # --init paligemma:DIR
    evaluate: bool = True
    evaluate_stage1: bool = True
    stage1_dir: Path | None = None       # a stage-1 folder shared by runs that differ only in stage 2
    lm_dir: Path | None = None           # a stage-0 LM shared on purpose by runs whose "init" differs (benchmark)
    stop_after: tuple[str, int] | None = None        # tests: raise Killed after this stage's step

    def __post_init__(self) -> None:
        self.out, self.cache = Path(self.out), Path(self.cache or self.out)
        self.stage1_dir = None if self.stage1_dir is None else Path(self.stage1_dir)
        self.lm_dir = None if self.lm_dir is None else Path(self.lm_dir)
        self.rank, self.world = clip.dist_info()
        self.t0 = self.t_lap = time.time()
        self.seconds, self.eval_data = {}, {}        # metrics["seconds"]; the evaluation sets (answers.png)
        self.out.mkdir(parents=True, exist_ok=True)

    def folder(self, stage: Stage) -> Path:
        if stage.name == "stage0":
            return self.lm_dir or self.cache / ("lm-" + f"{hash_str(json.dumps(stage.config)):x}"[:12])
        stage1 = self.stage1_dir or self.out / "stage1"
        return {"stage1a": stage1 / "itc", "stage1": stage1, "stage2": self.out / "stage2"}[stage.name]

    def resume_stage(self, stage: Stage, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """(0, []) for a fresh stage; else the latest checkpoint read into model, optimizer and torch's RNG."""
        resume = stage.name == "stage0" or self.resume or (self.stage1_dir is not None and stage.name != "stage2")
        latest = clip.latest_checkpoint(self.folder(stage)) if resume else None
        if latest is None:
            return 0, []
        info, tensors = clip.read_trainer_state(latest)
        if "rng.torch" not in tensors or "config" not in info:
            raise CheckpointError(f"{latest} is not a vlm_train.py stage checkpoint; use a new --out (or --cache)")
        differ = clip.config_differences(info["config"], stage.config, ignore=("init",) if self.lm_dir else ())
        if differ:
            raise ConfigError(f"--resume: {latest.parent} was written with a different configuration; differing "
                              f"fields: {'; '.join(differ)}. Resume with the same flags, or use a new --out.")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("param."):
                    params[key[6:]].copy_(value)
        clip.load_optimizer_state(optimizer, tensors, info["param_groups"], latest)
        torch.set_rng_state(tensors["rng.torch"])
        return info["step"], info["history"]

    def steps(self, stage: Stage, start: int) -> Iterable[int]:
        from tqdm import tqdm
        self.bar = tqdm(range(start, stage.steps), desc=stage.name, dynamic_ncols=True,
                        disable=None if self.progress and self.rank == 0 else True)
        return self.bar

    def end_step(self, stage: Stage, model: nn.Module, optimizer: torch.optim.Optimizer, history: list[float],
                 lr: float) -> None:
        """The progress bar and log; a checkpoint every save_every steps and at the end; the kill switch."""
        step, loss = len(history), history[-1]
        self.bar.set_postfix(loss=f"{loss:.3f}")
        self.log({"phase": stage.name, "step": step, "loss": loss, "lr": lr})
        if (step % stage.save_every == 0 or step == stage.steps) and self.rank == 0:
            tensors, groups = clip.optimizer_state(optimizer)
            names = {id(p): n for n, p in model.named_parameters()}
            tensors.update({f"param.{names[id(p)]}": p for p in stage.params})
            tensors["rng.torch"] = torch.get_rng_state()
            info = {"history": history, "config": stage.config, "param_groups": groups}
            clip.save_checkpoint(self.folder(stage), step, clip.trainer_files(step, tensors, info))
        if self.stop_after == (stage.name, step):
            raise Killed(f"stopped after step {step} of {stage.name}")

    def log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**row, "time": round(time.time() - self.t0, 3)}) + "\n")

    def lap(self, name: str) -> None:                        # metrics["seconds"][name]
        self.seconds[name], self.t_lap = time.time() - self.t_lap, time.time()

    def start_metrics(self, vcfg: VLMConfig, tcfg: TrainConfig, train: VQAData) -> dict:
        return {"config": {"model": asdict(vcfg), "train": asdict(tcfg)}, "skipped_images": train.skipped,
                "malformed_lines": train.malformed, "processes": self.world, "seconds": self.seconds, "history": {}}

    def eval_sets(self, vlm: VLM, tcfg: TrainConfig, metrics: dict) -> dict[str, VQAData]:
        """eval_sets with their frozen features cached, their unreadable rows counted ({} without evaluate)."""
        evals = {k: cache_features(vlm, d) for k, d in eval_sets(self.cache, tcfg, vlm.processor.image_size).items()
                 } if self.evaluate else {}
        metrics["skipped_images"] += sum(d.skipped for d in evals.values())
        metrics["malformed_lines"] += sum(d.malformed for d in evals.values())
        self.eval_data = evals
        return evals

    def finish(self, vlm: VLM, metrics: dict, answers: dict) -> None:
        self.seconds["total"] = time.time() - self.t0
        if self.rank == 0:
            if answers:
                answer_grid(self.eval_data["test"], answers["test"][1], self.out / "answers.png", vlm.config)
            save_vlm(vlm, self.out / "model", self.init)
            write_json(self.out / "metrics.json", metrics)

    def micro_batch(self, vlm: VLM, data: VQAData, phase: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's contiguous part of the rows (DistributedSampler's split of the global batch, which
        step_rows draws alike on every rank) as a batch, with token_share = W n_r / sum_r n_r (n_r: this
        rank's answer tokens): DDP averages the W ranks' gradients, and (1/W) sum_r (W n_r / N) mean_r =
        (1/N) sum of all token losses, one process's loss."""
        if len(rows) % self.world:
            raise ConfigError(f"a micro-batch of {len(rows)} rows does not split over {self.world} processes: make "
                              f"batch_size a multiple of grad_accum x {self.world}")
        b = len(rows) // self.world
        batch = make_batch(vlm, data, rows[self.rank * b:(self.rank + 1) * b].tolist(), phase)
        if self.world > 1 and phase == "itc":                 # ITM's negatives come from the whole batch
            batch["matches"] = same_texts([data.captions[i][1] for i in rows.tolist()]).to(batch["qf_ids"].device)
        if self.world > 1:
            n = (batch["labels"] != -100).sum().float().reshape(1)
            batch["token_share"] = self.world * n[0] / qformer.sum_over_ranks(n)[0].clamp(min=1)
        return batch

    def wrap(self, net: StageLoss) -> nn.Module:
        """DDP(net) under torchrun, new per stage (each trains other parameters). The Q-Former leaves some
        unused (ITC its projection, the caption loss its text side): DDP is told so. Stage 1a's ITC and ITM
        draw their negatives from every rank's rows (qformer.QFormer.losses_across_ranks)."""
        if self.world == 1:
            return net
        device = net.model.device
        unused = any(p.requires_grad for m in net.modules() if isinstance(m, qformer.QFormer) for p in m.parameters())
        return nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=unused)

    def score(self, vlm: VLM, data: VQAData) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """evaluate_vqa with the questions split over the ranks (rank r answers questions r, r + W, ...) and
        the answers gathered back in order: every rank scores the whole set, as one process would."""
        if self.world == 1:
            return evaluate_vqa(vlm, data, vlm.question_prefix)
        import torch.distributed as dist
        parts = [None] * self.world
        dist.all_gather_object(parts, answer_questions(vlm, data, vlm.question_prefix, slice(self.rank, None, self.world)))
        predictions = [parts[i % self.world][i // self.world] for i in range(len(data.qa))]
        return evaluate_vqa(vlm, data, predictions=predictions)

    def no_sync(self, net: nn.Module, quiet: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync for all micro-batches but the last: the gradients are averaged once per step."""
        return net.no_sync() if quiet and isinstance(net, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist
        x = torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=self.device)
        dist.all_reduce(x)
        return x.item() / self.world


def write_json(path: str | Path, obj: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    clip.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    clip.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


# -- the frozen ViT and the data, cached -------------------------------------------------------

# The frozen ViT every vlm_train.py figure in the README is measured with: clip.py's --train recipe,
# stopped at 1000 steps (the VLM's vision features need no more, and the ViT trains in half the time).
VIT_STEPS = 1000


def load_or_train_vit(cache: str | Path, tiny: bool, device: torch.device | str, seed: int = 0,
                      progress: bool = True) -> clip.VisionTransformer:
    """clip.py's shapes ViT, trained into cache/vit on first use (clip.py's layout); tiny: a random tiny
    ViT, for the seconds-long demo and the tests."""
    if tiny:
        torch.manual_seed(seed)
        return clip.CLIP(clip.CLIPConfig.tiny()).vision_model.to(device)
    folder = Path(cache) / "vit"
    if not (folder / "vlm_train_done.json").exists():
        print(f"no shapes ViT in {folder}: training one with clip.py's --train recipe, {VIT_STEPS} steps (minutes)",
              file=sys.stderr)
        t0 = time.time()
        clip.train(clip.TrainConfig(steps=VIT_STEPS), clip.CLIPConfig(), folder, device, progress=progress)
        write_json(folder / "vlm_train_done.json", {"steps": VIT_STEPS, "seconds": time.time() - t0})
    return clip.CLIP.from_pretrained(folder).vision_model.to(device)


def cached(cache: str | Path, name: str, build: Callable[[], VQAData]) -> VQAData:
    """VQAData kept as cache/data/NAME.safetensors (images) + NAME.json (texts, skip counts): read from
    there, or built by build() once and written there."""
    folder = Path(cache) / "data"
    if (folder / f"{name}.json").exists():
        meta = json.loads((folder / f"{name}.json").read_text())
        return VQAData(clip.read_safetensors(folder / f"{name}.safetensors")["images"], [tuple(x) for x in meta["qa"]],
                       [tuple(x) for x in meta["captions"]], meta.get("skipped", 0), meta.get("malformed", 0))
    data = build()
    save_tensors(folder / f"{name}.safetensors", {"images": data.images})
    write_json(folder / f"{name}.json", {"qa": data.qa, "captions": data.captions, "skipped": data.skipped,
                                         "malformed": data.malformed})
    return data


def split_data(cache: str | Path, tcfg: TrainConfig, size: int, split: str) -> VQAData:
    """A split's rows, kept in the cache: "train" (every question of each scene, seed), "test" / "heldout"
    (fresh scenes of seen / held-out pairs, one question each, seed + 1); --data: the folder's train / eval."""
    train = split == "train"
    n, seed = (tcfg.n_train, tcfg.seed) if train else (tcfg.n_eval, tcfg.seed + 1)
    if tcfg.data:
        return load_data(tcfg.data, "train" if train else "eval", n, size, cache)
    if split == "position":
        return cached(cache, f"position-{seed}-{n}-{size}", lambda: position_data(n, seed, size))
    name = f"{split}-{seed}-{n}-{size}-{'all' if train else 'one'}"
    return cached(cache, name, lambda: shapes_data(n, seed, split, size, train))


def build_vlm(vcfg: VLMConfig, tcfg: TrainConfig, run: Run) -> tuple[VLM, VQAData]:
    """Frozen vision + connector + LM, and the training data: the default LM is a Gemma decoder over
    the corpus' words (ShapesVLM); --lm hf:DIR a transformers LM with its own tokenizer (HFVLM);
    --init paligemma:DIR a whole PaliGemma checkpoint."""
    if run.init is not None:
        folder = init_folder(run.init)
        if vcfg.connector not in ("linear", "dense") or vcfg.image_pos != "none":
            raise ConfigError(f"--init paligemma uses the checkpoint's own projector: --connector linear or dense "
                              f"without image_pos, got {vcfg.connector!r} with image_pos={vcfg.image_pos!r}")
        # bf16 weights on a bf16 device (half of fp32's memory; paligemma.memory_estimate's assumption)
        dtype = torch.bfloat16 if bf16_device(run.device, tcfg.bf16) else torch.float32
        vlm = checkpoint_vlm(folder, vcfg, run.device, vcfg.connector, dtype)
        return vlm, split_data(run.cache, tcfg, vlm.processor.image_size, "train")
    dense = vcfg.connector == "dense"
    vision = (load_hf_vision(vcfg.vision, dense).to(run.device) if vcfg.vision else
              FrozenViT(load_or_train_vit(run.cache, vcfg.tiny_vision, run.device, tcfg.seed, run.progress), dense))
    train = split_data(run.cache, tcfg, vision.image_size, "train")
    if tcfg.data:                        # a folder's answers are its own: no shown work to score by its last word
        vcfg = replace(vcfg, position_answer="word")
        if vcfg.connector == "qformer" and not vcfg.qformer_vocab:                # the Q-Former reads the folder's words
            vcfg = replace(vcfg, qformer_vocab=sorted({w for _, c in train.captions for w in clip.ShapesTokenizer.words(c)}))
    elif vcfg.position_answer == "named" or tcfg.grid_questions:
        train = position_training(train, tcfg, vcfg.position_answer == "named")
    torch.manual_seed(tcfg.seed)
    words = None if vcfg.lm else WordTokenizer.from_texts([c for _, c in train.captions] + [tcfg.caption_prompt]
                                                          + [q + " " + a for _, q, a, _ in train.qa])
    vlm = assemble_vlm(vcfg, vision, vcfg.lm, words, tcfg.caption_prompt)
    vlm.model.to(run.device)
    return vlm, train


def assemble_vlm(vcfg: VLMConfig, vision: FrozenViT | FrozenHFVision, lm: str, words: WordTokenizer | None,
                 caption_prompt: str = "caption") -> VLM:
    """vision + connector + LM, with its processor: the Gemma decoder over `words` (ShapesVLM), or the
    transformers LM of the folder `lm` (hf:DIR) with its own tokenizer, its connector sized from its width."""
    if lm:
        lm, tokenizer = load_hf_lm(lm)
        connector, m = make_connector(vcfg, vision.width, vision.layers, vision.num_patches, lm.config.hidden_size)
        model = HFVLM(vision, connector, lm, m)
        processor = hf_processor(tokenizer, m, vision.image_size, vision.normalize)
    else:
        model = ShapesVLM(vcfg, vision, len(words))
        processor = word_processor(words, model.config.num_image_tokens, vision.image_size, vision.normalize)
    return VLM(model, processor, vcfg, vision, model.connector, model.language_model, caption_prompt)


def eval_sets(cache: str | Path, tcfg: TrainConfig, size: int) -> dict[str, VQAData]:
    """"test", "heldout" and "position" (split_data); with --data, the folder's evaluation split as "test"."""
    splits = ("test",) if tcfg.data else ("test", "heldout", "position")
    return {split: split_data(cache, tcfg, size, split) for split in splits}


@torch.no_grad()
def cache_features(vlm: VLM, data: VQAData, batch_size: int = 500) -> VQAData:
    """The frozen vision encoder's features of every image, once (a PaliGemma checkpoint's tower runs live)."""
    if vlm.vision is not None:
        data.features = torch.cat([vlm.image_inputs(data.images[s:s + batch_size])
                                   for s in range(0, len(data.images), batch_size)])
    return data


# -- data on disk: --data KIND:PATH ------------------------------------------------------------------

LAYOUTS = ("clevr:DIR        CLEVR v1.0: questions/CLEVR_{train,val}_questions.json and images/{train,val}/*.png",
           "captions:DIR     captions.jsonl ({\"image\": \"rel/path.jpg\", \"caption\": \"...\"} per line) or captions.csv "
           "(header image,caption); question + answer instead of caption for VQA",
           "img2dataset:DIR  img2dataset's `files` output: 00000/000000001.jpg + 00000/000000001.txt (caption)")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_WORDS = 48         # texts are cut to 48 words: the default LM reads at most 256 positions


class FolderError(FileNotFoundError):
    """--data, --lm, --vision or --init names a folder that does not exist or lacks what its layout
    needs; the message says what is missing (or lists the layouts)."""


def clevr_kind(q: dict) -> str:
    """CLEVR's question type (Johnson et al. 2017, sec. 3: exist, count, compare integer, query attribute,
    compare attribute) from the last function of the question's program, or from the answer without one."""
    last = (q.get("program") or [{}])[-1]
    f = last.get("function", last.get("type", "")) if isinstance(last, dict) else ""
    if f in ("exist", "count"):
        return f
    if f in ("equal_integer", "less_than", "greater_than"):
        return "compare_integer"
    if f.startswith(("query_", "equal_")):
        return "query_attribute" if f.startswith("query_") else "compare_attribute"
    return "count" if str(q["answer"]).isdigit() else "yes/no" if q["answer"] in ("yes", "no") else "query_attribute"


def clevr_rows(root: Path, split: str, bad: list[int]) -> Iterator[tuple[Path, str, str, str]]:
    """(image path, question, answer, kind) of CLEVR's train split (split "train") or val (evaluation)."""
    name = "train" if split == "train" else "val"
    path = root / "questions" / f"CLEVR_{name}_questions.json"
    try:
        questions = json.loads(path.read_text())["questions"]       # stdlib json reads the file whole
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FolderError(f"{path}: not a CLEVR questions file ({type(e).__name__}: {e})") from None
    for q in questions:
        if isinstance(q, dict) and all(isinstance(q.get(k), (str, int)) for k in ("image_filename", "question", "answer")):
            yield root / "images" / name / q["image_filename"], q["question"], str(q["answer"]), clevr_kind(q)
        else:
            bad[0] += 1                                              # test-split questions have no answer


def caption_rows(root: Path, split: str, bad: list[int]) -> Iterator[tuple[Path, str] | tuple[Path, str, str]]:
    """(image path, caption) or (image path, question, answer) per line of captions.jsonl / captions.csv."""
    import csv
    jsonl = root / "captions.jsonl"
    with open(jsonl if jsonl.exists() else root / "captions.csv", newline="") as f:
        lines = (line for line in f if line.strip()) if jsonl.exists() else csv.DictReader(f)
        for line in lines:
            try:
                row = json.loads(line) if isinstance(line, str) else line
                text = [row[k].strip() for k in (("question", "answer") if "question" in row else ("caption",))]
                if not row["image"] or not all(text):
                    raise ValueError
                yield (root / row["image"], *text)
            except (ValueError, KeyError, TypeError, AttributeError):
                bad[0] += 1


def img2dataset_rows(root: Path, split: str, bad: list[int]) -> Iterator[tuple[Path, str | None]]:
    """(image path, caption) pairs of img2dataset's shards, one folder listed and one caption read at a time."""
    for shard in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(p for p in shard.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                yield image, image.with_suffix(".txt").read_text().strip() or None
            except (OSError, UnicodeDecodeError):
                bad[0] += 1                                          # an image without its caption file


READERS = {"clevr": (clevr_rows, lambda root: (root / "questions").is_dir()),
           "captions": (caption_rows, lambda root: (root / "captions.jsonl").exists() or (root / "captions.csv").exists()),
           "img2dataset": (img2dataset_rows, lambda root: any(p.is_dir() for p in root.iterdir()))}


def read_folder(spec: str, split: str, n: int) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]], int]:
    """(vqa rows, caption rows, malformed lines) of at most n images of a split. CLEVR has its own val
    split; in the other layouts every 10th image (in file order) is held out for evaluation, and the
    malformed lines of their one annotation file are counted in the training split only."""
    kind, _, path = spec.partition(":")
    root = Path(path)
    if kind not in READERS or not path:
        raise ConfigError(f"--data expects KIND:PATH with KIND one of {', '.join(READERS)}, got {spec!r}")
    read, looks_right = READERS[kind]
    if not root.is_dir() or not looks_right(root):
        why = "does not exist" if not root.exists() else f"is not in the {kind} layout"
        raise FolderError(f"--data {spec}: {root} {why}. Accepted layouts:\n  " + "\n  ".join(LAYOUTS))
    bad, seen, kept, vqa, caps = [0], {}, set(), [], []
    for row in read(root, split, bad):
        texts, kind_of_question = (row[1:3], row[3]) if len(row) == 4 else (row[1:], "question")
        if texts[-1] is None:
            bad[0] += 1
            continue
        path = str(row[0])
        order = seen.setdefault(path, len(seen))
        if kind != "clevr" and (order % 10 == 9) != (split != "train"):
            continue                                                 # the other split's image
        if path not in kept and len(kept) == n:
            break
        kept.add(path)
        texts = [" ".join(t.split()[:MAX_WORDS]) for t in texts]
        vqa.append((path, *texts, kind_of_question)) if len(texts) == 2 else caps.append((path, texts[0]))
    return vqa, caps, bad[0] if kind == "clevr" or split == "train" else 0


def load_data(spec: str, split: str, n: int, image_size: int, cache: str | Path) -> VQAData:
    """VQAData of at most n images of a folder's split ("train" or "eval"), resized once and cached as
    cache/data/NAME.safetensors + NAME.json (delete them after changing the folder). Caption-only data
    gets one question per image, "caption", answered by its caption: stage 2 and the evaluation then
    caption. Evaluation keeps one question per image, as for the shapes data."""
    kind, _, path = spec.partition(":")

    def read_and_resize() -> VQAData:
        vqa, caps, malformed = read_folder(spec, split, n)
        try:
            data = VQAData.from_iterables(vqa, caps, image_size)
        except ValueError as e:
            raise FolderError(f"--data {spec}: {path} holds nothing usable for {split} ({e}; {malformed} malformed "
                              f"lines). Accepted layouts:\n  " + "\n  ".join(LAYOUTS)) from None
        data.malformed = malformed
        data.qa = data.qa or [(i, "caption", c, "caption") for i, c in data.captions]
        if split != "train":
            first = {}
            data.qa = list(first.setdefault(row[0], row) for row in data.qa if row[0] not in first)
        return data

    return cached(cache, f"{kind}-{hash_str(str(Path(path).resolve())):x}-{split}-{n}-{image_size}", read_and_resize)


# -- the same model on transformers parts (--vision hf:DIR, --lm hf:DIR) ------------------------------

class FrozenHFVision(FrozenViT):
    """A transformers CLIP or SigLIP vision tower, frozen: pixels (B, C, I, I) -> (B, Lk, 1+N, Dv), the
    same layout as FrozenViT: hidden states h_0 .. h_{L-1} (dense only), then the last layer after
    the final LayerNorm. SigLIP has no class token: the mean of its patches fills that slot (the
    per-patch connectors drop it; the Q-Former and the Perceiver read it as one more feature)."""

    def __init__(self, model: nn.Module, all_layers: bool, mean: Sequence[float], std: Sequence[float]):
        nn.Module.__init__(self)
        self.model, self.all_layers = model.requires_grad_(False).eval(), all_layers
        c = model.config
        self.width, self.layers, self.image_size = c.hidden_size, c.num_hidden_layers, c.image_size
        self.num_patches = (c.image_size // c.patch_size) ** 2
        self.has_class_token = c.model_type.startswith("clip")
        self.mean, self.std = tuple(mean), tuple(std)                # what FrozenViT.normalize uses

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        last = out.last_hidden_state
        if self.has_class_token:                  # CLIP normalises only its pooled token; SigLIP all of them
            last = self.model.post_layernorm(last)
        kept = list(out.hidden_states[:-1]) + [last] if self.all_layers else [last]
        if not self.has_class_token:
            kept = [torch.cat([h.mean(1, keepdim=True), h], dim=1) for h in kept]
        return torch.stack(kept, dim=1)                                               # (B, Lk, 1+N, Dv)


class HFVLM(nn.Module):
    """Frozen vision -> connector -> a transformers causal LM (Llama, Gemma, SmolLM, ...), LLaVA's way:
    the M image tokens replace M placeholder ids at the front of the prompt, and the LM attends
    causally throughout (its own mask; PaliGemma's prefix-LM mask is Gemma-in-PaliGemma's). The loss
    is the same answer-only suffix loss; `forward` and `generate` take what ShapesVLM's take: frozen
    vision features (B, Lk, 1+N, Dv), computed outside the model (`VLM.image_inputs`)."""

    IMAGE = -1                                     # the placeholder id (never a real token)

    def __init__(self, vision: FrozenViT | FrozenHFVision, connector: nn.Module, lm: nn.Module, num_image_tokens: int):
        super().__init__()
        self.vision, self.connector, self.language_model = vision, connector, lm
        self.num_image_tokens = num_image_tokens

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.connector(features)                                               # (B, M, D)

    def embed_inputs(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        is_image = input_ids == self.IMAGE                                            # (B, T)
        x = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))        # (B, T, D)
        if features is not None:
            counts = is_image.sum(-1)
            if bool((counts != self.num_image_tokens).any()):
                raise ValueError(f"each prompt needs exactly {self.num_image_tokens} image placeholders, got {counts.tolist()}")
            u = self.image_features(features)                                     # (B, M, D)
            x = x.masked_scatter(is_image[..., None], u.to(x.dtype))
        elif bool(is_image.any()):
            raise ValueError("the prompt has image placeholders but no features were given")
        return x

    def lm_inputs(self, input_ids: torch.Tensor, features: torch.Tensor | None,
                  attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)                         # left padding moves nothing
        return {"inputs_embeds": self.embed_inputs(input_ids, features), "attention_mask": mask, "position_ids": positions}

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> pg.Output:
        logits = self.language_model(**self.lm_inputs(input_ids, features, attention_mask)).logits
        return pg.Output(logits, None if labels is None else pg.suffix_loss(logits, labels))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, features: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | Sequence[int] | None = None) -> pg.GenerateOutput:
        """Greedy decoding with the LM's own KV cache (past_key_values); rows padded after their EOS."""
        lm = self.language_model
        eos = lm.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else int(eos[0])
        inputs = self.lm_inputs(input_ids, features, attention_mask)
        out, mask, positions = lm(**inputs, use_cache=True), inputs["attention_mask"], inputs["position_ids"]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, pad)                 # (B,)
            tokens.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                     past_key_values=out.past_key_values, use_cache=True)
        return pg.GenerateOutput(torch.stack(tokens, 1))


# -- --lm hf:DIR and --vision hf:DIR: transformers models from local folders -------------------------
# transformers is imported here only, inside the functions: the default run needs none of it.

def checked_folder(spec: str, flag: str, layout: str, *required: tuple[str, ...]) -> Path:
    """The DIR of `--flag KIND:DIR`, checked: a folder holding one file of each group of names (or glob
    patterns); else a FolderError that says what is missing (an "incomplete" folder) and what was expected."""
    folder = Path(spec.partition(":")[2])
    if not folder.is_dir():
        raise FolderError(f"--{flag} {spec}: {folder} is not a folder; expected {layout}")
    missing = [" or ".join(names) for names in required if not any(any(folder.glob(name)) for name in names)]
    if missing:
        raise FolderError(f"--{flag} {spec}: {folder} is incomplete, missing {', '.join(missing)} (expected {layout})")
    return folder


def hf_folder(spec: str, what: str, needs_tokenizer: bool = False) -> tuple[Path, dict]:
    """'hf:DIR' -> (DIR, its config.json), checked: config.json, safetensors weights and (an LM) a tokenizer."""
    folder = checked_folder(spec, what, "a transformers save_pretrained folder (config.json, model.safetensors or "
                            "sharded" + (", tokenizer.json or tokenizer.model)" if needs_tokenizer else ")"),
                            ("config.json",), ("*.safetensors",), *[("tokenizer.json", "tokenizer.model")] * needs_tokenizer)
    try:
        return folder, json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FolderError(f"--{what} {spec}: {folder / 'config.json'} is not valid JSON ({e})") from None


def quiet_transformers() -> None:
    """No hub and no progress bars: folders are local (HF_HUB_OFFLINE is read when huggingface_hub is
    first imported, so it is set before transformers is)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_hf_vision(spec: str, all_layers: bool) -> FrozenHFVision:
    """--vision hf:DIR: CLIPVisionModel or SiglipVisionModel (a whole CLIP / SigLIP folder works too)."""
    quiet_transformers()
    from transformers import CLIPVisionModel, SiglipVisionModel
    folder, config = hf_folder(spec, "vision")
    kind = config.get("model_type", "")
    towers = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel, "siglip": SiglipVisionModel,
              "siglip_vision_model": SiglipVisionModel}
    if kind not in towers:
        raise ConfigError(f"--vision {spec}: expected a CLIP or SigLIP checkpoint (model_type one of "
                          f"{sorted(towers)}), got model_type {kind!r}")
    model = towers[kind].from_pretrained(folder, dtype=torch.float32)
    pre = folder / "preprocessor_config.json"
    norm = json.loads(pre.read_text()) if pre.is_file() else {}
    default = (clip.CLIP_MEAN, clip.CLIP_STD) if kind.startswith("clip") else ((0.5,) * 3, (0.5,) * 3)
    return FrozenHFVision(model, all_layers, norm.get("image_mean", default[0]), norm.get("image_std", default[1]))


def hf_processor(tok: Any, image_tokens: int, image_size: int,
                 normalize: Callable[[torch.Tensor], torch.Tensor]) -> Processor:
    """A transformers LM's processor, with its own tokenizer: [IMAGE] * M <bos> prompt \\n | answer <eos>."""
    eos, start = tok.eos_token_id, [] if tok.bos_token_id is None else [tok.bos_token_id]

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def decode(tokens: torch.Tensor) -> list[str]:
        return [tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
                for row in tokens.tolist()]

    return Processor(tok, lambda p, images: [HFVLM.IMAGE] * (image_tokens if images else 0) + start + ids(p + "\n"),
                     lambda a: ids(a) + [eos], normalize, decode, image_size, eos,
                     eos if tok.pad_token_id is None else tok.pad_token_id)


def load_hf_lm(spec: str) -> tuple[nn.Module, Any]:
    """--lm hf:DIR: AutoModelForCausalLM in fp32 and its tokenizer."""
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, config = hf_folder(spec, "lm", needs_tokenizer=True)
    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except ValueError as e:                    # transformers: a config it has no causal LM for
        raise ConfigError(f"--lm {spec}: not a causal LM checkpoint ({e})") from None
    return lm, AutoTokenizer.from_pretrained(folder)


def init_folder(spec: str) -> Path:
    """'paligemma:DIR' -> DIR, checked: config.json, weights (single or sharded) and the tokenizer."""
    if spec.partition(":")[0] != "paligemma" or not spec.partition(":")[2]:
        raise ConfigError(f"--init expects paligemma:DIR (a PaliGemma checkpoint folder), got {spec!r}")
    return checked_folder(spec, "init", "a PaliGemma checkpoint folder (config.json, model.safetensors, tokenizer.json)",
                          ("config.json",), ("model.safetensors", "model.safetensors.index.json"),
                          ("tokenizer.json", "tokenizer.model"))


def checkpoint_processor(folder: str | Path, config: pg.PaliGemmaConfig) -> Processor:
    """The checkpoint's own tokenizer and image preprocessing (paligemma.PaliGemmaProcessor), in the
    same layout: <image> * M <bos> prompt \\n | answer <eos>."""
    processor = pg.PaliGemmaProcessor.from_pretrained(folder, config)
    tok, image = processor.tokenizer, processor.IMAGE_TOKEN * config.num_image_tokens

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return torch.stack([processor.preprocess_image(Image.fromarray(x.numpy())) for x in images])

    return Processor(tok, lambda p, images: ids((image if images else "") + tok.bos_token + p + "\n"),
                     lambda a: ids(a + tok.eos_token), pixels, processor.decode, config.vision.image_size,
                     tok.eos_token_id, config.text.pad_token_id if tok.pad_token_id is None else tok.pad_token_id)


def checkpoint_vlm(folder: Path, vcfg: VLMConfig, device: torch.device | str, connector: str | None = None,
                   dtype: torch.dtype = torch.float32) -> VLM:
    """A PaliGemma checkpoint (PaliGemma.from_pretrained) as a VLM: its tower reads pixels inside the model,
    its projector is the connector (connector="dense" widens a linear one); every weight in `dtype`, the
    trained ones too (bf16 training keeps no fp32 copy); PaliGemma's prompts."""
    model = pg.PaliGemma.from_pretrained(folder, dtype=dtype, device=device, connector=connector)
    return VLM(model, checkpoint_processor(folder, model.config), vcfg, None, model.multi_modal_projector,
               model.language_model, "caption en", "answer en ")


# -- out/model: one format for every model, written by save_vlm, read by load_vlm ---------------------
#
#   vlm.json            the manifest: config, stage-2 mode, the parts the folder holds, the default LM's
#                       vocabulary or --init's source checkpoint
#   model.safetensors   base weights (LoRA layers unwrapped, the LM before NF4) that no folder below holds
#   lm/, vision/        --lm, --vision: transformers folders (lm/ save_pretrained after full tuning, else
#                       a copy of its source; with its tokenizer)
#   base/               --init: the whole model as a transformers PaliGemma, with the checkpoint's tokenizer
#   adapter/            LoRA / QLoRA, in peft's format on the module names of what it extends: lm/'s
#                       (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm/), adapter/)),
#                       base/'s as transformers names them, or ours


def transformers_parts(vcfg: VLMConfig) -> tuple[str, ...]:
    """State-dict prefixes of the parts that live in their own transformers folders (lm/, vision/)."""
    return (("language_model.",) if vcfg.lm else ()) + (("vision.",) if vcfg.vision else ())


def base_state(vlm: VLM) -> dict[str, torch.Tensor]:
    """The state dict without LoRA's A, B; `base_layer.` dropped from names; under QLoRA the LM as the
    float weights its NF4 base was made from (vlm.lm_before_nf4, kept by add_lora)."""
    state = {k.replace(".base_layer.", "."): v for k, v in vlm.model.state_dict().items() if ".lora_" not in k}
    if vlm.stage2 == "qlora":
        state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
        state.update({"language_model." + k: v for k, v in vlm.lm_before_nf4.items()})
    return state


def save_base(vlm: VLM, folder: Path, init: str) -> str:
    """base/: the trained PaliGemma in transformers' format with the source checkpoint's tokenizer files."""
    import shutil
    source, base = init_folder(init), pg.PaliGemma(vlm.model.config)
    clip.load_strict(base, base_state(vlm), "the trained model")
    base.save_pretrained(folder)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, folder / f.name)
    return str(source)


def transformers_adapter(folder: Path, targets: Sequence[str]) -> None:
    """adapter/ renamed for transformers' PaliGemmaForConditionalGeneration (what peft sees), with a
    target regex (peft and lora.py both fullmatch it) that names the decoder's layers under either
    naming: SigLIP's layers are also called q_proj, ..."""
    renames = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."))

    def theirs(key: str) -> str:
        name = key.removeprefix(lora.PEFT_PREFIX)
        return next((lora.PEFT_PREFIX + new + name.removeprefix(old) for old, new in renames if name.startswith(old)), key)

    save_tensors(folder / lora.ADAPTER_WEIGHTS, {theirs(k): v for k, v in clip.read_safetensors(
        folder / lora.ADAPTER_WEIGHTS).items()})
    config = json.loads((folder / lora.ADAPTER_CONFIG).read_text())
    config["target_modules"] = r".*language_model.*\.(" + "|".join(targets) + ")"
    write_json(folder / lora.ADAPTER_CONFIG, config)


def save_vlm(vlm: VLM, folder: str | Path, init: str | None = None) -> None:
    """out/model in the format above, what load_vlm reads; init: --init's paligemma:DIR (then base/)."""
    import shutil
    folder, vcfg, mode = Path(folder), vlm.config, vlm.stage2
    meta = {"model": asdict(vcfg), "stage2": mode, "parts": []}
    if init is not None:
        meta["init"], meta["parts"] = save_base(vlm, folder / "base", init), ["base"]
    else:
        skip = transformers_parts(vcfg)
        save_tensors(folder / "model.safetensors", {k: v for k, v in base_state(vlm).items() if not k.startswith(skip)})
        meta["parts"].append("model.safetensors")
    if vcfg.lm and mode == "full":
        vlm.lm.save_pretrained(folder / "lm")
        vlm.processor.tokenizer.save_pretrained(folder / "lm")
    elif vcfg.lm:
        shutil.copytree(vcfg.lm[3:], folder / "lm", dirs_exist_ok=True)
    elif init is None:
        meta["vocab"] = vlm.processor.tokenizer.itos
    if vcfg.vision:
        shutil.copytree(vcfg.vision[3:], folder / "vision", dirs_exist_ok=True)
    meta["parts"] += [part for part, has in (("lm", vcfg.lm), ("vision", vcfg.vision), ("adapter", mode != "full"))
                      if has]
    if mode != "full":
        lora.save_adapter(vlm.lm if vcfg.lm else vlm.model, str(folder / "adapter"))
        if init is not None:
            transformers_adapter(folder / "adapter", vcfg.lora_targets)
    write_json(folder / "vlm.json", meta)


RENAMED_FIELDS = {"qformer_merge": "query_merge"}      # VLMConfig fields by their earlier names (load_vlm)


def load_vlm(out_dir: str | Path, device: torch.device | str = "cpu") -> VLM:
    """The trained VLM of a `--train` run (out_dir or out_dir/model), ready for answer()."""
    folder = Path(out_dir)
    folder = folder / "model" if (folder / "model").is_dir() else folder
    if not (folder / "vlm.json").exists():
        raise CheckpointError(f"{folder} has no vlm.json: expected the `model` folder a vlm_train.py run writes")
    meta = json.loads((folder / "vlm.json").read_text())
    model = {RENAMED_FIELDS.get(k, k): v for k, v in meta["model"].items()}   # manifests from before a rename
    unknown = sorted(set(model) - {f.name for f in fields(VLMConfig)})
    if unknown:
        raise CheckpointError(f"{folder / 'vlm.json'} names model fields this vlm_train.py does not have: {unknown}; "
                              f"expected those of VLMConfig (a newer vlm_train.py may have written it)")
    vcfg, parts = VLMConfig(**model), meta.get("parts", ())              # older manifests name none
    if "base" in parts:
        vlm = checkpoint_vlm(folder / "base", vcfg, device)
    else:
        dense = vcfg.connector == "dense"
        # the transformers parts from the copies in the folder, not from where they were trained
        vision = (load_hf_vision(f"hf:{folder / 'vision'}", dense) if vcfg.vision else FrozenViT(
            clip.CLIP(clip.CLIPConfig.tiny() if vcfg.tiny_vision else clip.CLIPConfig()).vision_model, dense))
        words = None if vcfg.lm else WordTokenizer(meta["vocab"])
        vlm = assemble_vlm(vcfg, vision, vcfg.lm and f"hf:{folder / 'lm'}", words)
        kept = {k: v for k, v in vlm.model.state_dict().items() if k.startswith(transformers_parts(vcfg))}
        clip.load_strict(vlm.model, {**clip.read_safetensors(folder / "model.safetensors"), **kept}, folder)
    model = vlm.model
    if meta["stage2"] != "full":
        add_lora(vlm, quantize=meta["stage2"] == "qlora")
        set_stage(vlm, 2, meta["stage2"])
        if "base" in parts:                    # transformers' names -> ours (paligemma.load_adapter)
            pg.load_adapter(model, folder / "adapter")
        else:
            lora.load_adapter(vlm.lm if vcfg.lm else model, str(folder / "adapter"))
    model.to(device).eval()
    return vlm


# -- memory: what fine-tuning a PaliGemma takes, per stage-2 mode ------------------------------------

def memory_report(vcfg: VLMConfig, tcfg: TrainConfig, init: str | None, text_tokens: int = 128) -> list[dict]:
    """paligemma.memory_estimate for each stage-2 mode, with and without activation checkpointing: weights,
    gradients, AdamW state and the activations of one micro-batch (batch_size / grad_accum rows of the
    image tokens + text_tokens), counted on the meta device, so no weights are read. The --init checkpoint's
    config (its config.json), else PaliGemma-3B's; LoRA of rank lora_r on every decoder linear layer."""
    folder = init_folder(init) if init else None
    config = pg.read_config(folder) if folder else pg.PaliGemmaConfig()
    rows = pg.memory_rows(config, max(1, tcfg.batch_size // tcfg.grad_accum), text_tokens, vcfg.lora_r)
    name = f"the checkpoint {folder}" if folder else "PaliGemma-3B"
    print(f"\n## fine-tuning {name} ({rows[0]['params']:,} parameters), micro-batch {rows[0]['batch_size']} x "
          f"({config.num_image_tokens} image + {text_tokens} text tokens), LoRA r = {vcfg.lora_r}\n")
    print(pg.memory_table(rows))
    return rows


# -- pictures ------------------------------------------------------------------------------------

def answer_grid(data: VQAData, predictions: Sequence[str], path: str | Path, cfg: VLMConfig, n: int = 8) -> None:
    """PNG: the first n questions of an evaluation set, each with its image, the model's answer (green where
    right), the truth and, for a named position answer, the work written before it (grey)."""
    from PIL import ImageFont
    font = ImageFont.load_default_imagefont()     # the bitmap font: FreeType's default draws a 2-px space
    cols, cell, text_h = 4, 112, 64

    def wrap(text: str, width: int) -> str:
        lines = [""]
        for w in text.split():
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1]) + len(w) < width else [lines[-1], w]
        return "\n".join(line.strip() for line in lines)

    rows = math.ceil(min(n, len(data.qa)) / cols)
    img = Image.new("RGB", (cols * (cell + 120), rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, ((i, q, a, kind), p) in enumerate(list(zip(data.qa, predictions))[:n]):
        x, y = (j % cols) * (cell + 120), (j // cols) * (cell + text_h)
        img.paste(Image.fromarray(data.images[i].numpy()).resize((cell, cell), Image.NEAREST), (x + 4, y + 4))
        draw.multiline_text((x + 4, y + cell + 6), wrap(q, 36), fill=(0, 0, 0), font=font)
        final = final_answer(cfg, kind, p)
        draw.text((x + cell + 10, y + 20), f"model: {final}", fill=(0, 130, 0) if final == a else (200, 0, 0), font=font)
        draw.text((x + cell + 10, y + 40), f"truth: {a}", fill=(0, 0, 0), font=font)
        if final != p:                                # the shown work: each shape's cell
            draw.multiline_text((x + cell + 10, y + 60), wrap(p[:p.rindex(final)], 18), fill=(120, 120, 120), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    clip.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# -- printing ------------------------------------------------------------------------------------

def results_table(metrics: dict) -> str:
    """The before / after table: exact match, ROUGE-1 and ROUGE-L, overall and per kind, both splits."""
    lines = ["| split | questions | kind | n | exact after stage 1 | exact after stage 2 | majority baseline "
             "| ROUGE-1 after 1 -> 2 | ROUGE-L after 1 -> 2 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    data = metrics["config"]["train"]["data"]
    for split, name in (("test", f"{data.partition(':')[0]} evaluation split" if data else "unseen scenes"),
                        ("heldout", "held-out colour-shape pairs"),
                        ("position", "relative position, answers balanced")):
        if split not in metrics["after stage 2"]:
            continue                                     # --data: the folder's evaluation split only
        before, after = metrics["after stage 1"][split], metrics["after stage 2"][split]
        for kind in ("all",) if split == "position" else after:
            b, a = before[kind], after[kind]
            lines.append(f"| {split} | {name} | {kind} | {a['n']} | {b['exact']:.1f}% | {a['exact']:.1f}% | "
                         f"{a['majority']:.1f}% | {b['rouge1']:.1f} -> {a['rouge1']:.1f} | "
                         f"{b['rougeL']:.1f} -> {a['rougeL']:.1f} |")
    if "position" in metrics["after stage 2"]:
        given = metrics["after stage 2"]["position"]["all"]["answers"]
        lines.append("\nposition answers given after stage 2: " + ", ".join(f"{a or '(empty)'} {v:.1f}%" for a, v in given.items()))
    return "\n".join(lines)


def print_summary(metrics: dict, out: str | Path) -> None:
    s = metrics["seconds"]
    print("\nloss (first -> last step): " + ", ".join(f"{k} {v[0]:.3f} -> {v[1]:.3f}" for k, v in metrics["loss"].items()))
    print(f"time: setup + stage 0 {s['setup and stage 0']:.0f} s, stage 1 {s['stage 1']:.0f} s, "
          f"stage 2 {s['stage 2']:.0f} s, total {s['total']:.0f} s; trainable in stage 2: "
          f"{metrics['trainable parameters']:,}; processes: {metrics['processes']}; skipped: {metrics['skipped_images']} "
          f"rows with an unreadable image, {metrics['malformed_lines']} malformed lines")
    if "after stage 2" in metrics:
        print("\n" + results_table(metrics))
    if "retrieval after stage 1" in metrics:
        r = metrics["retrieval after stage 1"]
        print(f"\nQ-Former ITC retrieval after stage 1 (unseen scenes): image->text R@1 {r['i2t R@1']:.1f}% "
              f"R@5 {r['i2t R@5']:.1f}%, text->image R@1 {r['t2i R@1']:.1f}% R@5 {r['t2i R@5']:.1f}%")
    print(f"\nwritten under {out}/: model/ (load_vlm), metrics.json, metrics.jsonl, answers.png, stage checkpoints")


# -- command line ----------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N (clip.pick_device checks that a CUDA device exists); under torchrun,
    its process group joined (clip.setup_distributed: gloo on CPU, nccl on CUDA) and cuda:LOCAL_RANK."""
    import torch.distributed as dist
    try:
        device = torch.device(clip.pick_device(name))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    clip.setup_distributed(str(device))
    if dist.is_initialized() and device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return device


def parse_setting(item: str) -> tuple[str, object]:
    """--set KEY=VALUE -> (key, value typed as the field's default), for any VLMConfig / TrainConfig field."""
    key, sep, text = item.partition("=")
    known = {f.name: f for cls in (VLMConfig, TrainConfig) for f in fields(cls)}
    if not sep or key not in known:
        raise ConfigError(f"--set expects KEY=VALUE with KEY a field of VLMConfig or TrainConfig "
                          f"({', '.join(sorted(known))}), got {item!r}")
    default = known[key].default
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return key, text.lower() in ("true", "1")
        if isinstance(default, tuple):
            return key, tuple(x for x in text.split(",") if x)
        return key, type(default)(text)
    except ValueError:
        raise ConfigError(f"--set {key}: expected a {type(default).__name__} like {default!r}, got {text!r}") from None


def split_settings(items: Iterable[str]) -> tuple[dict, dict]:
    """--set KEY=VALUE items -> (VLMConfig fields, TrainConfig fields), each value typed by parse_setting."""
    model, vcfg_over, tcfg_over = {f.name for f in fields(VLMConfig)}, {}, {}
    for item in items:
        key, value = parse_setting(item)
        (vcfg_over if key in model else tcfg_over)[key] = value
    return vcfg_over, tcfg_over


def make_configs(vcfg_over: dict, tcfg_over: dict, tiny: bool = False, preset: bool = False) -> tuple[VLMConfig, TrainConfig]:
    """VLMConfig and TrainConfig (or their tiny presets) of the given fields over the connector's
    CONNECTOR_DEFAULTS; a preset is a whole recipe and takes none of them."""
    vdef, tdef = ({}, {}) if preset else CONNECTOR_DEFAULTS.get(vcfg_over.get("connector", VLMConfig.connector), ({}, {}))
    return ((VLMConfig.tiny if tiny else VLMConfig)(**{**vdef, **vcfg_over}),
            (TrainConfig.tiny if tiny else TrainConfig)(**{**tdef, **tcfg_over}))


def configs_from_args(args: argparse.Namespace) -> tuple[VLMConfig, TrainConfig]:
    tiny = args.tiny or not (args.train or args.memory_report)
    # a preset meant for a pretrained LM, run on the default decoder, is its FROM_SCRATCH recipe
    scratch = args.preset in FROM_SCRATCH and not (getattr(args, "lm", None) or getattr(args, "init", None))
    vcfg_over, tcfg_over = (FROM_SCRATCH if scratch else PRESETS)[args.preset] if args.preset else ({}, {})
    if tiny:                 # the demo and --tiny keep their own step counts; a stage a preset skips stays skipped
        tcfg_over = {k: v for k, v in tcfg_over.items() if not (k.endswith("_steps") and v)}
    vcfg_over = {**vcfg_over, **({"connector": args.connector} if args.connector else {}),
                 **{k: getattr(args, k) for k in ("lm", "vision") if getattr(args, k, None)}}
    if getattr(args, "init", None):          # a checkpoint's trained projector reads no new positions
        vcfg_over = {"image_pos": "none", **vcfg_over}
    tcfg_over = {**tcfg_over, "seed": args.seed, **({"stage2": args.stage2} if args.stage2 else {}),
                 **({"data": args.data} if getattr(args, "data", None) else {})}   # a hand-made Namespace may lack it
    if args.steps is not None:
        tcfg_over["stage2_steps"] = args.steps
    vcfg_set, tcfg_set = split_settings(args.set or ())
    vcfg_over, tcfg_over = {**vcfg_over, **vcfg_set}, {**tcfg_over, **tcfg_set}
    return make_configs(vcfg_over, tcfg_over, tiny, bool(args.preset) and not scratch)


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="vlm_train.py", description=__doc__.splitlines()[0])
    clip.add_common_arguments(parser, "where everything of the run is written (default runs/vlm_train)",
                              train_help="both stages on the embedded data (minutes on a CPU)")
    parser.add_argument("--cache", type=str, default=None, help="where the ViT, data and text-only LM are cached "
                        "(default: --out); share it between runs")
    parser.add_argument("--connector", type=str, default=None, choices=CONNECTORS, help="default linear")
    parser.add_argument("--stage2", type=str, default=None, choices=STAGE2_MODES,
                        help="default full with --train, lora in the tiny demo")
    parser.add_argument("--preset", type=str, default=None, choices=sorted(PRESETS))
    parser.add_argument("--init", type=str, default=None, help="paligemma:DIR, a whole PaliGemma checkpoint folder")
    parser.add_argument("--lm", type=str, default=None, help="hf:DIR, a transformers causal LM folder with its "
                        "tokenizer (default: a small Gemma decoder trained here)")
    parser.add_argument("--vision", type=str, default=None, help="hf:DIR, a transformers CLIP or SigLIP folder "
                        "(default: clip.py's shapes ViT)")
    parser.add_argument("--data", type=str, default=None, help="clevr:DIR, captions:DIR or img2dataset:DIR "
                        "(default: the embedded shapes data)")
    parser.add_argument("--steps", type=int, default=None, help="stage-2 steps (default: the configuration's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a VLMConfig or TrainConfig "
                        "field, e.g. --set patch_merge=1 --set lm_layers=3 (repeatable)")
    parser.add_argument("--memory-report", action="store_true", help="full vs LoRA vs QLoRA: what fine-tuning "
                        "PaliGemma-3B (or the --init checkpoint) takes, activations included (estimated, no weights read)")
    parser.add_argument("--figure", type=str, default=None, help="also write the answers grid PNG here "
                        "(e.g. assets/vlm_train_answers.png); without --train, from --out's trained model")
    args = parser.parse_args(argv)
    args.out = args.out or "runs/vlm_train"
    try:
        device = pick_device(args.device)                         # torchrun: joins its process group
        vcfg, tcfg = configs_from_args(args)
        if args.memory_report:
            return memory_report(vcfg, tcfg, args.init)
        if args.figure and not args.train:
            vlm = load_vlm(args.out, device)
            data = eval_sets(args.cache or args.out, tcfg, vlm.processor.image_size)["test"]
            answer_grid(data, evaluate_vqa(vlm, data, vlm.question_prefix)[1], args.figure, vlm.config)
            print(f"wrote {args.figure}")
            return None
        run = Run(args.out, device, args.cache, args.resume, progress=args.train, init=args.init)
        if not args.train:
            return run_demo(vcfg, tcfg, run)
        metrics, _ = train_vlm(vcfg, tcfg, run)
        if clip.dist_info()[0] == 0:
            print_summary(metrics, args.out)
            if args.init:                                         # the homework: what this model needs where
                memory_report(vcfg, tcfg, args.init)
            if args.figure:
                import shutil
                shutil.copy(Path(args.out) / "answers.png", args.figure)
        return metrics
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def run_demo(vcfg: VLMConfig, tcfg: TrainConfig, run: Run) -> dict:
    """Seconds: both stages of a tiny VLM (random frozen tiny ViT), with the numbers a reader checks."""
    vision = f"frozen {vcfg.vision[3:]}" if vcfg.vision else "random frozen ViT"
    lm = f"{vcfg.lm[3:]}" if vcfg.lm else f"Gemma decoder ({vcfg.lm_layers} layer x {vcfg.lm_width})"
    print(f"tiny VLM: {vision} -> {vcfg.connector} connector -> {lm}; stage 2 {tcfg.stage2}")
    metrics, vlm = train_vlm(vcfg, tcfg, run)
    for phase, (first, last) in metrics["loss"].items():
        print(f"  {phase}: loss {first:.3f} (first step) -> {last:.3f} (step {len(metrics['history'][phase])})")
    a, b = metrics["after stage 1"]["test"]["all"], metrics["after stage 2"]["test"]["all"]
    print(f"  exact match on {b['n']} unseen questions: {a['exact']:.1f}% after stage 1 -> {b['exact']:.1f}% after stage 2 "
          f"(a tiny random ViT and {tcfg.stage2_steps} steps: the plumbing, not the accuracy; see --train)")
    return metrics


if __name__ == "__main__":
    main()
    clip.leave_distributed()

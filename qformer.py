"""The BLIP-2 Q-Former: learned queries that read a frozen image encoder, trained with ITC, ITM and ITG.

BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models", section 3.1) connects a FROZEN image encoder to a frozen
language model through a small BERT-style transformer, the Q-Former. Its input is Q learned query
vectors (Q = 32 in the paper) and, optionally, a caption. In every layer

    queries + text  --self-attention (shared weights, masked)-->         (B, Q+T, D)
    queries only    --cross-attention to the frozen image features-->    (B, Q, D)    every
                                                                          cross_attention_freq layers
    queries / text  --feed-forward, SEPARATE weights for each-->         (B, Q+T, D)

and every sub-layer is BERT's post-norm residual, x <- LayerNorm(x + Sublayer(x)). Whatever the image
encoder's size (N patches of width Dv), the Q-Former hands on Q vectors: a fixed-size summary.

Stage 1 (section 3.2) trains the queries to pull out the image information that text needs, with
three objectives that share ALL weights and differ only in the self-attention mask:

    ITC  image-text contrastive   queries and text cannot see each other (uni-modal mask)
         s(I, T) = max_q cos(z_q, t_cls) / temp;  L = (CE(rows) + CE(columns)) / 2
    ITM  image-text matching       everyone sees everyone (bidirectional mask)
         p(match) = softmax(mean_q W h_q);  negatives sampled with probability ~ softmax(s / temp)
    ITG  image-grounded generation queries see queries, text sees queries + earlier text
         L = -sum_t log p(w_t | queries, w_<t);  the caption starts with a [DEC] token

`temp` is tau itself (learned from 0.07, clamped to [0.001, 0.5] as LAVIS does); clip.py learns the
other parameterisation, t = ln(1/tau), so temp here is exp(-t) there.

Retrieval ranks by ITC and re-ranks the top k by ITM, as BLIP-2 does, by log p_ITM(match) + s / temp
(`rerank_top_k` says why not LAVIS's raw ITM logit plus raw cosine). For stage 2 `language_projection`
maps the Q outputs to a language model's width; vlm_train.py prepends them to its input as a soft prompt.

Flamingo's Perceiver Resampler, ViLBERT's co-attention and MiniGPT-4 compared: the comment after `QFormerLayer`.

Conventions: text is right-padded, position 0 holds [CLS] (ITC, ITM) or [DEC] (ITG), and
attention_mask is 1 for real tokens. Module names equal the keys of transformers'
Blip2ForImageTextRetrieval, so `QFormer.from_pretrained` loads such a checkpoint strictly, and
`itc_logits` / `itm_logits` reproduce its outputs (tests/test_qformer.py). The image features it
expects are what that model's vision tower returns: BLIP-2's LayerNorm on the frozen features
(`ln_vision` in LAVIS) is `vision_model.post_layernorm` there, so it belongs to the image side.
Under torchrun (DDP) `losses` gathers over the ranks as BLIP-2 does, so that W processes with b pairs each
take one process's step on the W b pairs: ITC's negatives and ITM's hard negatives come from the whole
global batch (`losses_across_ranks`). Left out: the frozen ViT-g and the language model themselves, beam
search (captions are greedy), and the BERT initialisation of the paper (we train from scratch).

    python qformer.py            # seconds: a tiny Q-Former on random features, three losses fall
    python qformer.py --train    # minutes: align the ViT of `clip.py --train` with shapes captions
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import clip      # the shapes data and frozen ViT of --train, and the plumbing (checkpoints, CLI) both share


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class QFormerConfig:
    """Sizes of the Q-Former. Defaults are BLIP-2's (a BERT-base Q-Former over ViT-g/14 features)."""
    vocab_size: int = 30523            # V: BERT's 30522 word pieces + the [DEC] token BLIP-2 adds
    hidden_size: int = 768             # D
    num_hidden_layers: int = 12        # L
    num_attention_heads: int = 12      # H
    intermediate_size: int = 3072      # F
    max_position_embeddings: int = 512
    num_query_tokens: int = 32         # Q
    encoder_hidden_size: int = 1408    # width of the frozen image features (ViT-g: 1408)
    cross_attention_freq: int = 2      # layers 0, f, 2f, ... cross-attend to the image
    embed_dim: int = 256               # ITC space (transformers: image_text_hidden_size)
    lm_hidden_size: int = 0            # width of the language model fed by language_projection; 0 = none
    layer_norm_eps: float = 1e-12      # BERT's
    initializer_range: float = 0.02    # BERT's; a narrow model needs about D^-0.5 (`_init_weights`)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    label_smoothing: float = 0.1       # BLIP-2 smooths the ITC and ITG targets
    # ITC temperature tau itself (LAVIS: 0.07, learned, clamped to [0.001, 0.5]); clip.py learns t = ln(1/tau)
    temp_init: float = 0.07
    pad_token_id: int = 0              # BERT's [PAD], [CLS], [SEP]; [DEC] is the added token
    cls_token_id: int = 101
    sep_token_id: int = 102
    dec_token_id: int = 30522

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")
        self.head_dim = self.hidden_size // self.num_attention_heads   # d = D / H

    @classmethod
    def tiny(cls, **overrides) -> QFormerConfig:
        """A Q-Former of a few hundred thousand weights: tests and the seconds-long demo."""
        sizes = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, num_query_tokens=4,
                     encoder_hidden_size=24, embed_dim=16, pad_token_id=0, cls_token_id=1,
                     sep_token_id=2, dec_token_id=3, hidden_dropout=0.0, attention_dropout=0.0,
                     initializer_range=32 ** -0.5)
        return cls(**{**sizes, **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------
# The three losses and the hard-negative sampler, as pure functions of the features and logits that
# the QFormer below computes: the docstring's ITC / ITM / ITG equations
# ----------------------------------------------------------------------------------------------

def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """s(I_i, T_j) = max_q <z_iq, t_j>, both unit length: (B_img, Q, E), (B_txt, E) -> (B_img, B_txt)."""
    per_query = torch.einsum("iqe,te->iqt", image_feats, text_feats)    # (B_img, Q, B_txt)
    # BLIP-2 section 3.2: "select the one that has the highest similarity as the image-text similarity"
    return per_query.max(dim=1).values                                  # (B_img, Q, B_txt) -> (B_img, B_txt)


def itc_loss(similarity: torch.Tensor, temp: torch.Tensor | float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE on a square (B, B) similarity matrix; pair i is the diagonal."""
    logits = similarity / temp                                          # (B, B)
    # L = (CE over rows (image -> text) + CE over columns (text -> image)) / 2: CLIP's InfoNCE
    return clip.symmetric_cross_entropy(logits, label_smoothing)


def sample_hard_negatives(similarity: torch.Tensor, temp: torch.Tensor | float, forbidden: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row i pick a column j != i with probability softmax_j(s_ij / temp) (BLIP-2 sec. 3.2).

    `forbidden` (B, B) bool marks further pairs that are not negatives (e.g. identical captions);
    the diagonal is always forbidden. A row whose every column is forbidden falls back to the
    off-diagonal ones. Returns (B,) column indices; never the positive i.
    """
    B = similarity.shape[0]
    if B < 2:
        raise ValueError(f"hard negatives need a batch of at least 2 pairs, got {B}")
    eye = torch.eye(B, dtype=torch.bool, device=similarity.device)
    blocked = eye if forbidden is None else eye | forbidden.to(similarity.device)
    blocked = torch.where(blocked.all(dim=1, keepdim=True), eye, blocked)  # nothing left: any other
    weights = torch.softmax((similarity.detach() / temp).masked_fill(blocked, float("-inf")), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)   # (B, B) -> (B,)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the ITM head: (B, 2) logits, labels 1 = matched, 0 = not."""
    return F.cross_entropy(logits, labels)


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; padding is not a target.
    reduction="sum" gives the sum over the n target tokens instead of their mean."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)   # (B, T-1)
    # L = -1/n sum_t log p(w_{t+1} | queries, w_<=t)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                           ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)


def same_caption(input_ids: torch.Tensor) -> torch.Tensor:
    """The default `matches` of ITM: (B, T) -> (B, B) bool, True where captions i and j have equal ids."""
    return (input_ids[:, None] == input_ids[None]).all(-1)


# ----------------------------------------------------------------------------------------------
# The same losses over torchrun's W ranks, equal to one process on the global batch
# ----------------------------------------------------------------------------------------------
#
# Under DDP each of W ranks holds b pairs of a global batch of B = W b, computes a loss L_r and its
# gradient g_r, and DDP steps along the mean (1/W) sum_r g_r. One process would step along the gradient
# of its loss L on all B pairs. The two agree when (1/W) sum_r L_r = L and g_r counts every rank's use of
# this rank's rows (`GatherRows`). So rank r
#   ITC  scores its b images against all B captions and its b captions against all B images, the right
#        answer of its pair i at column r b + i: the mean over ranks of its row-averaged cross-entropies
#        is one process's average over all B rows;
#   ITM  draws hard negatives for all B rows from the global similarity, exactly as one process draws
#        them (same generator, same calls), and keeps its own b rows: its 3b pairs are one process's 3B
#        cut into W equal parts;
#   ITG  weighs its token mean by W n_r / N (n_r its target tokens, N all ranks'): the mean over ranks is
#        sum of all N token losses / N, one process's mean (vlm_train.py's `token_share`).
# LAVIS (blip2_qformer.py) gathers as well, but ITC's other-rank features without gradient
# (concat_all_gather) and each rank draws negatives for its own rows from its own RNG: equal to one
# process in expectation, not step for step as here.

class GatherRows(torch.autograd.Function):
    """Every rank's rows in rank order: (b, ...) -> (W b, ...); the backward sums over ranks.

    Forward: all_gather. Backward: rank r' receives dL_r'/dX for the whole gathered X, which holds rank
    r's rows x_r at rows r b .. r b + b - 1. The all-reduce sums over r', and rank r keeps its own rows,
    sum_r' dL_r'/dx_r: what every rank's loss asks of x_r (the direct uses of x_r in L_r add theirs
    locally). Rank r's backward carries it through its own network, and DDP's mean over ranks is

        (1/W) sum_r sum_r' dL_r'/dx_r dx_r/dtheta = d/dtheta (1/W) sum_r' L_r' = dL/dtheta,

    one process's gradient, L being the mean of the ranks' losses on equal-sized batches. clip.py's
    gather_with_grad keeps the local slice instead and lets every rank compute the whole loss, whose
    gradients are then SUMMED; under DDP's mean that would shrink the encoders' gradient W times.
    An input without gradient (token ids, frozen image features) is only gathered: nothing comes back.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)                                         # W x (b, ...) -> (B, ...)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()             # all_reduce writes in place; autograd owns `grad`
        dist.all_reduce(grad)                                           # sum_r' dL_r'/dX
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]                             # (B, ...) -> (b, ...)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """GatherRows: every rank's (b, ...) in rank order -> (W b, ...), gradients summed back to their rank."""
    return GatherRows.apply(x)


def global_text_length(input_ids: torch.Tensor) -> int:
    """Longest caption length T of any rank; every rank must hold the same number b of pairs."""
    sizes = gather_rows(torch.tensor([input_ids.shape], device=input_ids.device))   # (W, 2): each rank's (b, T)
    if bool((sizes[:, 0] != sizes[0, 0]).any()):
        raise ValueError(f"under torch.distributed every rank must pass the same number of pairs (its rows "
                         f"of the global batch); got {sizes[:, 0].tolist()} pairs on ranks 0..{len(sizes) - 1}")
    return int(sizes[:, 1].max())


def pad_right(x: torch.Tensor, T: int, value: int) -> torch.Tensor:
    """Right-pad (b, T_r) token ids or mask with `value` to (b, T): ranks' captions differ in length."""
    return F.pad(x, (0, T - x.shape[1]), value=value)                   # (b, T_r) -> (b, T)


def itc_loss_of_rows(image_to_text: torch.Tensor, text_to_image: torch.Tensor, rows: torch.Tensor,
                     temp: torch.Tensor | float, label_smoothing: float = 0.0) -> torch.Tensor:
    """ITC of this rank's b pairs. image_to_text (b, B): its images against every caption; text_to_image
    (b, B): its captions against every image; rows (b,): its pairs' global indices, the right answers.
    With rows = arange(B) and the full matrices it is itc_loss."""
    # L_r = (CE over this rank's rows + CE over this rank's columns) / 2;  mean_r L_r = itc_loss of all B
    return (F.cross_entropy(image_to_text / temp, rows, label_smoothing=label_smoothing)
            + F.cross_entropy(text_to_image / temp, rows, label_smoothing=label_smoothing)) / 2


def hard_negatives_of_rows(similarity: torch.Tensor, temp: torch.Tensor | float, matches: torch.Tensor,
                           rows: torch.Tensor,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One process's two draws (a caption for every image, an image for every caption) on the global (B, B)
    similarity, kept for `rows`: (b,) global indices of the hard captions and of the hard images.
    Every rank draws all B rows, so every rank and one process use the generator alike; they draw the
    same negatives when the generator (or torch's global RNG) is in the same state on every rank."""
    hard_text = sample_hard_negatives(similarity, temp, matches, generator)           # image i -> text
    hard_image = sample_hard_negatives(similarity.t(), temp, matches.t(), generator)  # text i -> image
    return hard_text[rows], hard_image[rows]                                          # (B,) -> (b,)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """All ranks' x added up (an all-reduce of a copy)."""
    total = x.clone()
    dist.all_reduce(total)
    return total


# ----------------------------------------------------------------------------------------------
# The three self-attention masks (BLIP-2 Figure 2, right). True = the row may attend to the column.
# ----------------------------------------------------------------------------------------------
#
# Drawn for Q = 2 queries and T = 3 text tokens; rows are the tokens that look, columns the tokens
# they look at. A padded text token (attention_mask = 0) is additionally hidden from every row.
#
#   ITC, uni-modal                ITM, bidirectional            ITG, multimodal causal
#          q1 q2 | t1 t2 t3              q1 q2 | t1 t2 t3              q1 q2 | t1 t2 t3
#     q1 [  1  1 |  0  0  0 ]       q1 [  1  1 |  1  1  1 ]       q1 [  1  1 |  0  0  0 ]
#     q2 [  1  1 |  0  0  0 ]       q2 [  1  1 |  1  1  1 ]       q2 [  1  1 |  0  0  0 ]
#     t1 [  0  0 |  1  1  1 ]       t1 [  1  1 |  1  1  1 ]       t1 [  1  1 |  1  0  0 ]
#     t2 [  0  0 |  1  1  1 ]       t2 [  1  1 |  1  1  1 ]       t2 [  1  1 |  1  1  0 ]
#     t3 [  0  0 |  1  1  1 ]       t3 [  1  1 |  1  1  1 ]       t3 [  1  1 |  1  1  1 ]
#
# ITC: the queries must summarise the image without peeking at the caption they are compared to.
# ITM: the queries read the caption too, so they can judge whether it fits the image.
# ITG: the text can only learn about the image THROUGH the queries (it has no cross-attention), and
#      must not see its own future; the queries must not see the text they are asked to generate.

MASK_KINDS = ("itc", "itm", "itg")


def build_attention_mask(kind: str, num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """Self-attention mask over [queries; text]: (B, T) 0/1 -> (B, Q+T, Q+T) bool."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    B, T = text_attention_mask.shape
    device = text_attention_mask.device
    position = torch.arange(num_queries + T, device=device)            # (Q+T,)
    is_query = position < num_queries                                   # (Q+T,)
    row_query, col_query = is_query[:, None], is_query[None, :]         # (Q+T, 1), (1, Q+T)
    if kind == "itm":
        allowed = torch.ones(num_queries + T, num_queries + T, dtype=torch.bool, device=device)
    elif kind == "itc":
        allowed = row_query == col_query                                # same modality only
    else:
        causal = position[None, :] <= position[:, None]                 # column j <= row i
        allowed = torch.where(row_query, col_query, col_query | causal)
    visible = torch.cat([torch.ones(B, num_queries, dtype=torch.bool, device=device),
                         text_attention_mask.bool()], dim=1)            # (B, Q+T): real tokens
    return allowed[None] & visible[:, None, :]                          # (B, Q+T, Q+T)


# ----------------------------------------------------------------------------------------------
# The layers (names equal transformers' Blip2QFormer* checkpoint keys)
# ----------------------------------------------------------------------------------------------

class AddNorm(nn.Module):
    """BERT's post-norm residual: x <- LayerNorm(x + Dropout(W h + b))."""

    def __init__(self, in_features: int, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + M) V per head; keys and values come from `context`.

    x (B, T, D) attends to context (B, S, D or Dv): T and S are the README's queries and keys of
    attention. In self-attention x and context are one sequence of width D: [queries; text] (Q + T
    long), the queries alone or the text alone; in the cross-attention x is the queries (T = Q) and the
    context the frozen image features (S = N, width Dv). mask (B, T, S): True where attention may look,
    or logits to add (a cross-attention bias).
    """

    def __init__(self, config: QFormerConfig, context_width: int):
        super().__init__()
        self.num_heads, self.p = config.num_attention_heads, config.attention_dropout
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_width, config.hidden_size)     # context_width: D, or Dv for the
        self.value = nn.Linear(context_width, config.hidden_size)   # cross-attention to the image

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)
        q = split(self.query(x))                                    # (B, T, D) -> (B, H, T, d)
        k, v = split(self.key(context)), split(self.value(context))  # (B, S, D or Dv) -> (B, H, S, d)
        mask = None if mask is None else mask[:, None]              # (B, T, S) -> (B, 1, T, S)
        # softmax(q k^T / sqrt(d) + M) v, M = 0 where mask is True and -inf where it is False (a float mask: M itself)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)
        return h.transpose(1, 2).reshape(B, T, D)                   # (B, H, T, d) -> (B, T, D)


class Attention(nn.Module):
    """Attention sub-layer: LayerNorm(x + W_o MultiHead(x, context))."""

    def __init__(self, config: QFormerConfig, context_width: int):
        super().__init__()
        self.attention = MultiHeadAttention(config, context_width)
        self.output = AddNorm(config.hidden_size, config)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    """First half of the feed-forward sub-layer: GELU(W_1 x + b_1), D -> F."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))                                # (B, Q or T, D) -> (B, Q or T, F)


class QFormerLayer(nn.Module):
    """One Q-Former layer: shared self-attention, queries-only cross-attention, two FFNs."""

    def __init__(self, config: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(config, config.hidden_size)
        # BLIP-2 section 3.1: "cross-attention layers inserted every other transformer block"
        self.crossattention = (Attention(config, config.encoder_hidden_size)
                               if index % config.cross_attention_freq == 0 else None)
        self.intermediate, self.output = Intermediate(config), AddNorm(config.intermediate_size, config)
        self.intermediate_query = Intermediate(config)
        self.output_query = AddNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image_embeds: torch.Tensor | None,
                num_queries: int, cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, x, mask)                              # (B, Q+T, D), queries and text mix
        queries, text = x[:, :num_queries], x[:, num_queries:]      # (B, Q, D), (B, T, D)
        if self.crossattention is not None and num_queries > 0:
            bias = None if cross_bias is None else cross_bias.expand(len(queries), -1, -1)   # (B, Q, N)
            queries = self.crossattention(queries, image_embeds, bias)   # (B, Q, D): read the image
        # separate feed-forward weights: queries and words are different kinds of token
        queries = self.output_query(self.intermediate_query(queries), queries)
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)                    # (B, Q+T, D)


# ----------------------------------------------------------------------------------------------
# The Q-Former beside its neighbours (what the lecture compares it with)
# ----------------------------------------------------------------------------------------------
#
# The layer above is where the Q-Former differs from the bridges a lecture puts beside it.
#
# Flamingo (Alayrac et al. 2022, sections 2.1-2.2) bridges a frozen vision encoder and a frozen LM in two parts.
#   - Its Perceiver Resampler, like the Q-Former, turns any number of frozen image features into a fixed
#     number of learned latents (64) by cross-attention. But only vision takes part: the latents attend
#     to [image features; latents], no text ever enters, and it has no loss of its own (it learns only
#     through the language model's next-token loss). vlm_train.py's `perceiver` connector is one.
#   - Its output does not enter the LM as input tokens: new GATED XATTN-DENSE layers are inserted between
#     the frozen LM's layers, in which the text cross-attends to the visual tokens, each new layer's
#     output scaled by tanh(alpha), alpha learned and initialised at 0, so that at the start the model
#     computes exactly the frozen LM.
#   The Q-Former instead lets queries and text share self-attention (the masks above), is pre-trained
#   with its own ITC / ITM / ITG losses (stage 1), and hands the LM a soft prompt at its input, leaving
#   the LM's layers as they are.
#
# ViLBERT (Lu et al. 2019): two streams, one over image regions and one over words, each its own
#   transformer, joined by co-attention layers in which each stream's queries attend to the OTHER stream's
#   keys and values, so image and text update each other. In the Q-Former the image features are frozen
#   and only read: the queries cross-attend to them, nothing attends back, and text sees the image only
#   through the queries.
#
# MiniGPT-4 (Zhu et al. 2023) keeps BLIP-2's ViT and Q-Former frozen as well as its Vicuna LM, and trains
#   a single linear projection from the 32 query outputs to Vicuna's width (our `language_projection`);
#   BLIP-2's own stage 2 trains the Q-Former together with that layer.


class LayerStack(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))


class QFormerEncoder(nn.Module):
    """LayerNorm on the input embeddings (queries and words alike), then the L layers."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.encoder = LayerStack(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image_embeds: torch.Tensor | None,
                num_queries: int, cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(self.layernorm(x))
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds, num_queries, cross_bias)
        return x


class TextEmbeddings(nn.Module):
    """e(w_t) + p(t): word plus learned absolute position, positions counted from the first word."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)


class ITGHead(nn.Module):
    """BERT's LM head: logits = LayerNorm(GELU(W h)) E^T + b, decoder tied to the word embeddings E."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(F.gelu(self.dense(h)))
        return h @ word_embeddings.t() + self.bias                  # (B, T, D) -> (B, T, V)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class QFormer(nn.Module):
    """Learned queries + text embeddings + the Q-Former layers + the ITC / ITM / ITG / LM heads.

    Parameter names follow transformers' Blip2ForImageTextRetrieval (query_tokens, embeddings.*,
    qformer.*, vision_projection, text_projection, itm_head); `temp` and `itg_head` are BLIP-2
    stage-1 parts that checkpoint leaves out, `language_projection` is Blip2ForConditionalGeneration's.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = c = config
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_query_tokens, c.hidden_size))  # (1, Q, D)
        self.embeddings = TextEmbeddings(c)
        self.qformer = QFormerEncoder(c)
        self.vision_projection = nn.Linear(c.hidden_size, c.embed_dim)
        self.text_projection = nn.Linear(c.hidden_size, c.embed_dim)
        self.itm_head = nn.Linear(c.hidden_size, 2)
        self.itg_head = ITGHead(c)
        self.temp = nn.Parameter(torch.tensor(float(c.temp_init)))
        self.language_projection = nn.Linear(c.hidden_size, c.lm_hidden_size) if c.lm_hidden_size else None
        self.apply(self._init_weights)
        # LAVIS draws the queries like every other weight
        nn.init.normal_(self.query_tokens, std=c.initializer_range)
        # None, or modules whose outputs are added to attention logits (BLIP-2 has neither): (Q, N) to every
        # cross-attention's, (Q, Q) to the queries' self-attention logits among themselves, in every pass
        self.cross_attention_bias: nn.Module | None = None
        self.query_attention_bias: nn.Module | None = None

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, initializer_range^2) weights, zero biases, LayerNorm = identity.

        BERT's 0.02 is 0.55 / sqrt(768). A narrow model trained from scratch needs the same ratio, about
        1 / sqrt(D); with 0.02 at D = 32 the attention outputs start at 1% of the residual stream and ITM
        sits on its 1/3-vs-2/3 plateau (loss 0.636) for hundreds of steps (hence `tiny` and
        `shapes_qformer_config` set D^-0.5).
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight), nn.init.zeros_(module.bias)

    # -- input checks: a user's mistake gets a sentence, not a shape error from deep inside torch --

    def _check_image(self, image_embeds: torch.Tensor) -> None:
        width = self.config.encoder_hidden_size
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != width:
            raise ValueError(f"image_embeds must be frozen image features of shape (B, N, {width}) "
                             f"(encoder_hidden_size={width}); got {tuple(image_embeds.shape)}")

    def _check_generation_tokens(self) -> None:
        """ITG needs [DEC] and [SEP]; transformers' checkpoints do not record them (BERT's are defaults)."""
        c = self.config
        if not (0 <= c.dec_token_id < c.vocab_size and 0 <= c.sep_token_id < c.vocab_size):
            raise ValueError(f"dec_token_id={c.dec_token_id} and sep_token_id={c.sep_token_id} must lie in "
                             f"[0, vocab_size={c.vocab_size}); set your tokenizer's ids in QFormerConfig")

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T) token ids; got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"text has {input_ids.shape[1]} tokens but the position table holds "
                             f"max_position_embeddings={c.max_position_embeddings}; truncate it")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool((attention_mask[:, 0] == 1).all()):
            raise ValueError("text must be right-padded: attention_mask[:, 0] must be 1 ([CLS] / [DEC])")
        return attention_mask

    # -- the one forward pass every objective uses --

    def forward(self, image_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mask_kind: str = "itm") -> torch.Tensor:
        """Hidden states of [queries; text]: (B, Q+T, D). Queries come with image_embeds, text with
        input_ids; either may be absent (ITC's two uni-modal passes). mask_kind picks the mask."""
        parts, num_queries, mask = [], 0, None
        if image_embeds is not None:
            self._check_image(image_embeds)
            num_queries = self.config.num_query_tokens
            parts.append(self.query_tokens.expand(image_embeds.shape[0], -1, -1))   # (B, Q, D)
        if input_ids is not None:
            attention_mask = self._check_text(input_ids, attention_mask)
            if image_embeds is not None and image_embeds.shape[0] != input_ids.shape[0]:
                raise ValueError(f"{image_embeds.shape[0]} images but {input_ids.shape[0]} texts; "
                                 "a joint pass pairs image i with text i")
            parts.append(self.embeddings(input_ids))                                # (B, T, D)
            mask = build_attention_mask(mask_kind, num_queries, attention_mask)     # (B, Q+T, Q+T)
        if not parts:
            raise ValueError("give image_embeds, input_ids or both")
        x = torch.cat(parts, dim=1)                                                 # (B, Q+T, D)
        if self.query_attention_bias is not None and num_queries:                   # a float mask: logits + M
            L = x.shape[1]
            own = F.pad(self.query_attention_bias(), (0, L - num_queries, 0, L - num_queries))   # (Q+T, Q+T)
            mask = own.expand(len(x), -1, -1) if mask is None else torch.where(mask, own, float("-inf"))
        bias = None if self.cross_attention_bias is None or not num_queries else self.cross_attention_bias()
        return self.qformer(x, mask, image_embeds, num_queries, bias)

    # -- features and logits --

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """z_q = normalize(W_v h_q) for every query: (B, N, Dv) -> (B, Q, E)."""
        return F.normalize(self.vision_projection(self(image_embeds)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t = normalize(W_t h_[CLS]): (B, T) -> (B, E). BLIP-2 uses the first token's output."""
        h = self(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_projection(h[:, 0]), dim=-1)

    def itc_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """max_q cos(z_q, t) for every image and text: (B_img, B_txt). Like transformers' logits_per_image
        this is the raw cosine; the ITC loss divides by the learned temperature."""
        return itc_similarity(self.image_features(image_embeds), self.text_features(input_ids, attention_mask))

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Match / no-match logits of image i with text i: (B, 2), class 1 = match."""
        Q = self.config.num_query_tokens
        h = self(image_embeds, input_ids, attention_mask, mask_kind="itm")  # (B, Q+T, D)
        # BLIP-2 sec. 3.2: "average the logits across all queries as the output matching score"
        return self.itm_head(h[:, :Q]).mean(dim=1)                          # (B, Q, 2) -> (B, 2)

    def itg_logits(self, image_embeds: torch.Tensor, decoder_input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of a caption that starts with [DEC]: (B, T) -> (B, T, V)."""
        Q = self.config.num_query_tokens
        h = self(image_embeds, decoder_input_ids, attention_mask, mask_kind="itg")
        return self.itg_head(h[:, Q:], self.embeddings.word_embeddings.weight)

    def language_model_inputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Stage 2: the Q query outputs mapped to the LM's width, a soft visual prompt: (B, Q, lm_hidden_size)."""
        if self.language_projection is None:
            raise ValueError("this Q-Former has no language_projection; build it with lm_hidden_size > 0")
        return self.language_projection(self(image_embeds))

    # -- checkpoints (the functions live with the other checkpoint code below) --

    def save_pretrained(self, directory: str | Path) -> None:
        save_qformer(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, lm_hidden_size: int = 0) -> QFormer:
        return load_qformer(directory, lm_hidden_size)

    # -- stage-1 training: the three losses on one batch of matched (image, caption) pairs --

    def losses(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               matches: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{'itc', 'itm', 'itg'} losses of B matched pairs (BLIP-2 section 3.2).

        matches: optional (B, B) bool, True where caption j also describes image i (a synthetic data
        set repeats descriptions); such pairs are never drawn as ITM negatives. Default: equal ids.
        Under torch.distributed with W > 1 ranks each rank passes its own b pairs (the same b on every
        rank) and gets `losses_across_ranks`: the mean over ranks of each loss, and DDP's mean of the
        gradients, are one process's on all W b pairs.
        """
        if clip.dist_info()[1] > 1:
            return self.losses_across_ranks(image_embeds, input_ids, attention_mask, matches, generator)
        c = self.config
        # ITC: one pass with the uni-modal mask gives both the query and the [CLS] features
        image_feats, text_feats = self._itc_features(image_embeds, input_ids, attention_mask)   # (B, Q, E), (B, E)
        similarity = itc_similarity(image_feats, text_feats)                         # (B, B)
        loss_itc = itc_loss(similarity, self.temp, c.label_smoothing)

        # ITM: B matched pairs, B (image, hard caption), B (hard image, caption)
        if matches is None:
            matches = same_caption(input_ids)                                        # (B, B)
        hard_text = sample_hard_negatives(similarity, self.temp, matches, generator)       # image i -> text
        hard_image = sample_hard_negatives(similarity.t(), self.temp, matches.t(), generator)  # text i -> image
        loss_itm = self._itm_loss(image_embeds, input_ids, attention_mask,
                                  (image_embeds[hard_image], input_ids[hard_text], attention_mask[hard_text]))
        return {"itc": loss_itc, "itm": loss_itm, "itg": self._itg_loss(image_embeds, input_ids, attention_mask)}

    def losses_across_ranks(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            matches: torch.Tensor | None = None,
                            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`losses` of this rank's b pairs under torch.distributed: rank r holds rows r b .. r b + b - 1 of a
        global batch of B = W b. Each loss is this rank's part (the section "The same losses over torchrun's
        W ranks" says which): their mean over ranks, and DDP's mean of the gradients, are one process's.

        matches: the GLOBAL (B, B) bool matrix, the same on every rank (default: equal ids, compared over
        all ranks' captions). generator: in the same state on every rank (or None: torch's global RNG,
        seeded alike); every rank draws all B rows' negatives, as one process would, and keeps its own.
        Captions may be padded to different lengths on different ranks. image_embeds should be frozen
        features; if they require grad, the negative images from other ranks send their gradient back to
        their rank (`gather_rows`), so every rank must then require it.
        """
        c, b = self.config, input_ids.shape[0]
        rank, world = clip.dist_info()
        T = global_text_length(input_ids)                           # and checks b is equal on every rank
        rows = rank * b + torch.arange(b, device=input_ids.device)  # this rank's pairs in the global batch
        if matches is not None and tuple(matches.shape) != (world * b, world * b):
            raise ValueError(f"under torch.distributed matches must be the global batch's ({world * b}, {world * b}) "
                             f"matrix ({world} ranks x {b} pairs), the same on every rank; got {tuple(matches.shape)}")
        # ITC: this rank's images against all captions, its captions against all images
        image_feats, text_feats = self._itc_features(image_embeds, input_ids, attention_mask)   # (b, Q, E), (b, E)
        all_image_feats, all_text_feats = gather_rows(image_feats), gather_rows(text_feats)     # (B, Q, E), (B, E)
        loss_itc = itc_loss_of_rows(itc_similarity(image_feats, all_text_feats),                # (b, B)
                                    itc_similarity(all_image_feats, text_feats).t(),            # (B, b) -> (b, B)
                                    rows, self.temp, c.label_smoothing)

        # ITM: negatives drawn from the global batch; captions padded to the longest rank's T to travel
        ids, mask = pad_right(input_ids, T, c.pad_token_id), pad_right(attention_mask, T, 0)   # (b, T)
        all_ids, all_masks, all_images = gather_rows(ids), gather_rows(mask), gather_rows(image_embeds)  # (B, ...)
        matches = same_caption(all_ids) if matches is None else matches                         # (B, B)
        # one process's (B, B) ITC similarity, on every rank alike; sampling needs no gradient
        similarity = itc_similarity(all_image_feats.detach(), all_text_feats.detach())          # (B, B)
        hard_text, hard_image = hard_negatives_of_rows(similarity, self.temp, matches, rows, generator)   # (b,), (b,)
        loss_itm = self._itm_loss(image_embeds, ids, mask,
                                  (all_images[hard_image], all_ids[hard_text], all_masks[hard_text]))

        # ITG: the sum of this rank's n_r token losses x W / N = its token mean x W n_r / N; written as a sum
        # so that a rank without target tokens adds 0, not 0/0
        n_all = sum_over_ranks((attention_mask[:, 1:] != 0).sum().float().reshape(1))          # N: all targets
        loss_itg = self._itg_loss(image_embeds, input_ids, attention_mask, "sum") * world / n_all[0].clamp(min=1)
        return {"itc": loss_itc, "itm": loss_itm, "itg": loss_itg}

    def _itc_features(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC's features from one pass with the uni-modal mask: (B, Q, E) queries and (B, E) [CLS], unit length."""
        Q = self.config.num_query_tokens
        h = self(image_embeds, input_ids, attention_mask, mask_kind="itc")          # (B, Q+T, D)
        image_feats = F.normalize(self.vision_projection(h[:, :Q]), dim=-1)          # (B, Q, E)
        text_feats = F.normalize(self.text_projection(h[:, Q]), dim=-1)              # (B, E)
        return image_feats, text_feats

    def _itm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  negatives: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """ITM on B matched pairs, B (image, hard caption), B (hard image, caption); negatives = (hard images
        (B, N, Dv), hard captions' ids and masks (B, T))."""
        hard_images, hard_ids, hard_masks = negatives
        B = input_ids.shape[0]
        images = torch.cat([image_embeds, image_embeds, hard_images])                # (3B, N, Dv)
        texts = torch.cat([input_ids, hard_ids, input_ids])                          # (3B, T)
        masks = torch.cat([attention_mask, hard_masks, attention_mask])
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(input_ids.device)
        return itm_loss(self.itm_logits(images, texts, masks), labels)

    def _itg_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
        """ITG: the same caption with [CLS] swapped for [DEC], under the multimodal-causal mask."""
        self._check_generation_tokens()
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.config.dec_token_id
        logits = self.itg_logits(image_embeds, decoder_input_ids, attention_mask)    # (B, T, V)
        return itg_loss(logits, decoder_input_ids, attention_mask, self.config.label_smoothing, reduction)

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, max_new_tokens: int = 20) -> torch.Tensor:
        """Greedy captions: start from [DEC], append argmax until [SEP]. (B, N, Dv) -> (B, T)."""
        c = self.config
        self._check_generation_tokens()
        max_new_tokens = min(max_new_tokens, c.max_position_embeddings - 1)
        ids = torch.full((image_embeds.shape[0], 1), c.dec_token_id, device=image_embeds.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            # no KV cache: each step recomputes the short sequence, which keeps the code obvious
            next_id = self.itg_logits(image_embeds, ids)[:, -1].argmax(-1)          # (B,)
            next_id = next_id.masked_fill(done, c.pad_token_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)                          # (B, T+1)
            done |= next_id == c.sep_token_id
            if bool(done.all()):
                break
        return ids


# ----------------------------------------------------------------------------------------------
# Retrieval: rank everything by ITC, re-rank each query's top k by ITM (LAVIS compute_sim_matrix)
# ----------------------------------------------------------------------------------------------

def rerank_top_k(similarity: torch.Tensor, k: int, match_logprob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 temp: float, chunk: int = 256) -> torch.Tensor:
    """score_ij = log p_ITM(match | i, j) + s_ij / temp for the k best j of each row, -inf elsewhere.

    similarity: ITC cosines, rows the retrieval queries and columns the candidates: (B_img, B_txt) for
    image -> text, its transpose for text -> image (shapes below: image -> text). match_logprob(rows,
    cols) gives the ITM log-probability of "match" of each (query, candidate) pair named by two equally
    long index tensors.
    Both terms are log-probabilities (s / temp is ITC's logit, its log-softmax up to a per-row
    constant), so the score multiplies the two models' beliefs. LAVIS adds the raw ITM logit and the
    raw cosine instead; the cosine (at most 1) then hardly counts beside logits that span several
    units. That is harmless behind BLIP-2's ITM trained for days and costly behind ours trained for
    minutes, which still errs where ITC is right.
    """
    k = min(k, similarity.shape[1])
    top_sim, top_idx = similarity.topk(k, dim=1)                          # (B_img, k)
    rows = torch.arange(similarity.shape[0], device=similarity.device)[:, None].expand(-1, k).flatten()
    cols = top_idx.flatten()                                              # (B_img k,)
    logprob = torch.cat([match_logprob(rows[s:s + chunk], cols[s:s + chunk])
                         for s in range(0, rows.numel(), chunk)])         # (B_img k,)
    scores = torch.full_like(similarity, float("-inf"))
    return scores.scatter(1, top_idx, logprob.view(-1, k) + top_sim / temp)   # (B_img, B_txt)


@torch.no_grad()
def retrieval_scores(model: QFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     k: int = 8) -> dict[str, torch.Tensor]:
    """ITC similarities and the ITM re-ranked image->text (B_img, B_txt) and text->image (B_txt, B_img) scores."""
    sim = model.itc_logits(image_embeds, input_ids, attention_mask)      # (B_img, B_txt)
    temp = model.temp.item()
    # log p(match) = log_softmax over the ITM head's two classes, class 1
    match = lambda i, t: model.itm_logits(image_embeds[i], input_ids[t], attention_mask[t]).log_softmax(-1)[:, 1]
    return {"itc": sim,
            "i2t": rerank_top_k(sim, k, lambda i, t: match(i, t), temp),
            "t2i": rerank_top_k(sim.t(), k, lambda t, i: match(i, t), temp)}


def recall_at_k(scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of rows whose top K candidates hold a correct one: {K: fraction}. scores and correct (bool)
    are (B_img, B_txt) for image -> text retrieval, their transposes for text -> image."""
    order = scores.argsort(dim=1, descending=True)                        # (B_img, B_txt)
    hits = correct.gather(1, order)                                       # (B_img, B_txt), sorted by score
    return {K: hits[:, :K].any(dim=1).float().mean().item() for K in ks}


# ----------------------------------------------------------------------------------------------
# Training: one step, the learning-rate schedule, the loop
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Stage-1 optimisation. BLIP-2 uses AdamW, weight decay 0.05, warm-up then cosine decay."""
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3            # higher than BLIP-2's 1e-4: we start from random weights, not BERT
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    n_train: int = 8000         # shapes scenes whose frozen features are computed once
    n_eval: int = 500           # held-out scenes per evaluation split
    rerank_k: int = 16          # ITM re-scores each query's k best ITC candidates
    save_every: int = 250       # steps between checkpoints that --resume continues from
    log_every: int = 100        # off a terminal (no progress bar): one line of mean losses per this many steps

    @classmethod
    def tiny(cls, **overrides) -> TrainConfig:
        small = dict(steps=300, batch_size=32, lr=3e-3, warmup=10, n_train=256, n_eval=64, rerank_k=8)
        return cls(**{**small, **overrides})


# Linear warm-up to cfg.lr over cfg.warmup steps, then cosine decay to 0 at cfg.steps: clip.py's schedule.
get_lr = clip.lr_at


def make_optimizer(model: QFormer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, LayerNorms, embeddings' rows of queries, or the temperature."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "query_tokens"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "query_tokens")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def train_step(model: QFormer, optimizer: torch.optim.Optimizer, batch: Sequence[torch.Tensor], lr: float,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One AdamW step on L = L_itc + L_itm + L_itg (BLIP-2 weighs the three equally)."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = model.losses(*batch, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    with torch.no_grad():
        # LAVIS keeps tau in [0.001, 0.5], logits at most 1000 x cosine; clip.py clamps exp(t) = 1/tau to [1, 100]
        model.temp.clamp_(0.001, 0.5)
    return {k: v.item() for k, v in losses.items()}


def train(model: QFormer, optimizer: torch.optim.Optimizer, sample_batch: Callable[[int], Sequence[torch.Tensor]],
          cfg: TrainConfig, start_step: int = 0, generator: torch.Generator | None = None,
          on_step: Callable[[int, list[dict[str, float]]], object] | None = None) -> list[dict[str, float]]:
    """Run steps start_step .. cfg.steps - 1; sample_batch(step) gives (image_embeds, ids, mask). A NaN or
    infinite loss stops it (clip.NonFiniteLossError) before on_step could save that step."""
    from tqdm import tqdm
    history = []
    bar = tqdm(range(start_step, cfg.steps), desc="qformer", disable=None)     # a bar only on a terminal
    for step in bar:
        losses = train_step(model, optimizer, sample_batch(step), get_lr(step, cfg), generator)
        if not all(math.isfinite(v) for v in losses.values()):
            raise clip.NonFiniteLossError(f"a non-finite loss at step {step + 1} ({losses}): training diverged "
                                          "(try a lower learning rate); nothing of this step was saved")
        history.append(losses)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        every = getattr(cfg, "log_every", 100)
        if bar.disable and (step + 1) % every == 0:               # off a terminal: one line now and then
            print(f"step {step + 1}/{cfg.steps}  " + "  ".join(f"{k} {v:.3f}" for k, v in mean_losses(
                history[-every:]).items()), file=sys.stderr, flush=True)
        if on_step is not None:
            on_step(step, history)
    return history


def mean_losses(history: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: sum(h[k] for h in history) / len(history) for k in history[0]}


# ----------------------------------------------------------------------------------------------
# Evaluation: recall@K by ITC and by ITC + ITM, ITM accuracy against the hardest negative
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: QFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             correct: torch.Tensor, k: int = 16, ks: Sequence[int] = (1, 5, 10),
             true_of: torch.Tensor | None = None) -> dict:
    """correct[i, j]: caption j describes image i. Returns recalls and ITM accuracy (a dict). true_of (same
    shape), if given: caption j is true of image i, though perhaps not its description (a partial caption
    such as "a red shape" is true of many scenes); the same scores are then also judged by it, under
    result["true_of_scene"]."""
    model.eval()
    scores = retrieval_scores(model, image_embeds, input_ids, attention_mask, k)
    result = judge(model, scores, image_embeds, input_ids, attention_mask, correct, ks)
    if true_of is not None:
        result["true_of_scene"] = judge(model, scores, image_embeds, input_ids, attention_mask, true_of, ks)
    return result


def judge(model: QFormer, scores: dict[str, torch.Tensor], image_embeds: torch.Tensor, input_ids: torch.Tensor,
          attention_mask: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recalls of retrieval `scores` and ITM accuracy, with correct[i, j] saying which pairs are right."""
    result = {"itc_i2t": recall_at_k(scores["itc"], correct, ks),
              "itc_t2i": recall_at_k(scores["itc"].t(), correct.t(), ks),
              "rerank_i2t": recall_at_k(scores["i2t"], correct, ks),
              "rerank_t2i": recall_at_k(scores["t2i"], correct.t(), ks)}
    # ITM accuracy: every matched pair, and each image with the caption ITC ranks highest among
    # the ones that are not right for it (its hardest negative); chance is 50%.
    hardest = scores["itc"].masked_fill(correct, float("-inf")).argmax(dim=1)        # (B_img,)
    pos = model.itm_logits(image_embeds, input_ids, attention_mask).argmax(-1) == 1
    neg = model.itm_logits(image_embeds, input_ids[hardest], attention_mask[hardest]).argmax(-1) == 0
    result["itm_accuracy"] = torch.cat([pos, neg]).float().mean().item()
    return result


def loss_table(first: dict[str, float], last: dict[str, float]) -> str:
    """Markdown: the three losses over the first and the last steps."""
    lines = ["| loss | first steps | last steps |", "|---|---|---|"]
    return "\n".join(lines + [f"| {k.upper()} | {first[k]:.3f} | {last[k]:.3f} |" for k in first])


def retrieval_table(result: dict) -> str:
    """Markdown: recall@K by ITC alone and after ITM re-ranking, both directions; ITM accuracy."""
    ks = list(result["itc_t2i"])
    lines = ["| retrieval | " + " | ".join(f"R@{K}" for K in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for key, name in [("itc_t2i", "text->image, ITC"), ("rerank_t2i", "text->image, ITC + ITM re-rank"),
                      ("itc_i2t", "image->text, ITC"), ("rerank_i2t", "image->text, ITC + ITM re-rank")]:
        lines.append(f"| {name} | " + " | ".join(f"{100 * result[key][K]:.1f}%" for K in ks) + " |")
    lines.append(f"\nITM accuracy (matched pairs + hardest ITC negatives, chance 50%): "
                 f"{100 * result['itm_accuracy']:.1f}%")
    if "true_of_scene" in result:
        lines.append("\nThe same retrievals, right when the caption is true of the scene (not only its own "
                     "description):\n\n" + retrieval_table(result["true_of_scene"]).replace(
                         "hardest ITC negatives", "hardest ITC negatives that are false of the scene"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Demo without --train: a toy world of "frozen features" whose captions name two or three attributes
# ----------------------------------------------------------------------------------------------

TOY_WORDS = ("[PAD]", "[CLS]", "[SEP]", "[DEC]", "red", "green", "blue", "yellow",
             "circle", "square", "triangle", "diamond", "small", "large")


def toy_data(config: QFormerConfig, n: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = n (image_embeds, caption) pairs of a toy world. Caption [CLS] (size) colour shape [SEP], ids
    into TOY_WORDS; the "frozen features" put a prototype of each attribute on its own patch (N = 6
    patches), plus noise. Returns image_embeds (B, N, Dv), input_ids and attention_mask (B, 5)."""
    g = torch.Generator().manual_seed(1234)                     # the same world for every seed
    protos = torch.randn(14, config.encoder_hidden_size, generator=g)
    colour = torch.randint(4, 8, (n,), generator=generator)
    shape = torch.randint(8, 12, (n,), generator=generator)
    size = torch.randint(12, 15, (n,), generator=generator)     # 14 = no size word: a shorter caption
    has_size = size < 14
    ids = torch.zeros(n, 5, dtype=torch.long)
    ids[:, 0] = config.cls_token_id
    ids[has_size, 1] = size[has_size]
    words = torch.stack([colour, shape], 1)                     # (B, 2)
    ids[has_size, 2:4], ids[~has_size, 1:3] = words[has_size], words[~has_size]
    ids[has_size, 4], ids[~has_size, 3] = config.sep_token_id, config.sep_token_id
    feats = 0.5 * torch.randn(n, 6, config.encoder_hidden_size, generator=generator)   # (B, N, Dv)
    feats[:, 0] += protos[colour]
    feats[:, 1] += protos[shape]
    feats[has_size, 2] += protos[size[has_size]]
    return feats, ids, (ids != config.pad_token_id).long()


def run_demo(args: argparse.Namespace, device: torch.device | str) -> dict:
    """Seconds: the tiny Q-Former learns the toy world; losses, recalls, ITM accuracy, captions."""
    torch.manual_seed(args.seed)
    config, cfg = QFormerConfig.tiny(), TrainConfig.tiny(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    g = torch.Generator().manual_seed(args.seed)
    feats, ids, mask = (t.to(device) for t in toy_data(config, 2048, g))
    test = [t.to(device) for t in toy_data(config, 256, torch.Generator().manual_seed(args.seed + 1))]
    model = QFormer(config).to(device)
    optimizer = make_optimizer(model, cfg)

    def sample_batch(step):
        i = torch.randint(0, feats.shape[0], (cfg.batch_size,), generator=g).to(device)
        return feats[i], ids[i], mask[i]

    history = train(model, optimizer, sample_batch, cfg, generator=g)
    first, last = mean_losses(history[:10]), mean_losses(history[-10:])
    correct = (test[1][:, None] == test[1][None]).all(-1)       # same caption = a correct match
    result = evaluate(model, *test, correct, k=8)
    print(loss_table(first, last) + "\n\n" + retrieval_table(result))
    words = lambda row: " ".join(TOY_WORDS[i] for i in row[1:] if i > config.dec_token_id)
    print("\nITG captions (greedy) | true captions")
    for generated, true in zip(model.generate(test[0][:4], max_new_tokens=6).tolist(), test[1][:4].tolist()):
        print(f"  {words(generated):22s} | {words(true)}")
    return {"first": first, "last": last, **result}


# ----------------------------------------------------------------------------------------------
# --train: align the frozen ViT of clip.py with captions of the shapes data set
# ----------------------------------------------------------------------------------------------

def shapes_qformer_config(tokenizer: clip.ShapesTokenizer, image_width: int, tiny: bool = False) -> QFormerConfig:
    """A Q-Former sized for a 2-core CPU, speaking clip.py's word-level shapes vocabulary.

    The tokenizer's start-of-text plays [CLS], end-of-text [SEP]; [DEC] is one new id after its words.
    """
    sizes = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  num_query_tokens=4, embed_dim=16) if tiny else
             dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                  num_query_tokens=16, embed_dim=64))
    return QFormerConfig(
        vocab_size=tokenizer.vocab_size + 1, max_position_embeddings=tokenizer.context_length,
        encoder_hidden_size=image_width, pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.sot_token_id, sep_token_id=tokenizer.eos_token_id,
        dec_token_id=tokenizer.vocab_size, initializer_range=sizes["hidden_size"] ** -0.5,
        # no dropout: the data are synthetic and plentiful, and dropout costs a fifth of a CPU step
        hidden_dropout=0.0, attention_dropout=0.0, **sizes)


@torch.no_grad()
def frozen_image_features(vit: clip.VisionTransformer, pixel_values: torch.Tensor, device: torch.device | str,
                          batch_size: int = 256) -> torch.Tensor:
    """BLIP-2's frozen image side: every ViT token through the ViT's final LayerNorm (what
    transformers' Blip2VisionModel returns as last_hidden_state): (B, C, I, I) -> (B, 1+N, Dv)."""
    vit.eval()
    chunks = [vit.post_layernorm(vit(pixel_values[s:s + batch_size].to(device)))
              for s in range(0, len(pixel_values), batch_size)]
    return torch.cat(chunks)


def true_captions(clip: ModuleType, scene: clip.Scene) -> set[str]:
    """Every caption the shapes grammar can write that is true of `scene`, without its prefix: each level of
    detail, and the shapes named in any order (two shapes: the relation read from the first; three or
    more: a list, which says nothing about their order)."""
    import itertools
    orders = itertools.permutations(scene.shapes) if len(scene.shapes) <= 4 else [scene.shapes]
    return {clip.caption(clip.Scene(order), "", detail) for order in orders for detail in clip.DETAILS}


def caption_is_true(clip: ModuleType, text: str, truths: set[str]) -> bool:
    """Is `text` (with any of the data set's prefixes) one of `truths` (a scene's `true_captions`)?"""
    return any(text.startswith(p) and text[len(p):] in truths for p in clip.CAPTION_PREFIXES)


def shapes_split(clip: ModuleType, vit: clip.VisionTransformer, tokenizer: clip.ShapesTokenizer, split: str, n: int,
                 seed: int, device: torch.device | str, judge_truth: bool = False) -> dict:
    """Frozen features, token ids, masks and the "same description" matrix of n rendered scenes;
    judge_truth=True (evaluation splits) adds the "caption true of the scene" matrix, n^2 string tests."""
    data = clip.ShapesDataset(n, split=split, seed=seed, image_size=vit.cfg.image_size)
    pixels, captions, scenes = clip.collate([data[i] for i in range(n)])
    ids, mask = tokenizer.encode(captions)
    # two scenes with the same description (ignoring "a photo of") are equally right for either caption
    described = [clip.caption(scene) for scene in scenes]
    index = {d: k for k, d in enumerate(dict.fromkeys(described))}
    description = torch.tensor([index[d] for d in described], device=device)       # (B,)
    # the fairer judge: caption j is right for scene i whenever it is true of it ("a red shape" of any scene
    # with a red shape), whether or not it is scene i's own description
    true_of = None
    if judge_truth:
        truths = [true_captions(clip, scene) for scene in scenes]
        true_of = torch.tensor([[caption_is_true(clip, text, t) for text in captions] for t in truths], device=device)
    return {"image_embeds": frozen_image_features(vit, pixels, device), "input_ids": ids.to(device),
            "attention_mask": mask.to(device), "description": description,
            "correct": description[:, None] == description[None], "true_of": true_of, "captions": captions}


def load_frozen_clip(args: argparse.Namespace, device: torch.device | str) -> tuple[ModuleType, clip.VisionTransformer]:
    """clip.py's trained model, frozen: --clip-dir (a checkpoint or run folder), or clip.py's default run
    folder, checked to be a finished `clip.py --train` checkpoint (trained or resumed first if absent)."""
    if args.clip_dir and not Path(args.clip_dir).is_dir():
        raise FileNotFoundError(f"--clip-dir {args.clip_dir} does not exist; omit it to use (or train) "
                                "clip.py's default checkpoint")
    model = clip.CLIP.from_pretrained(args.clip_dir) if args.clip_dir else clip.load_or_train(device=device)
    model = model.to(device).eval().requires_grad_(False)
    return clip, model.vision_model


def train_shapes(cfg: TrainConfig, config: QFormerConfig, train_set: dict[str, torch.Tensor], out: str | Path,
                 device: torch.device | str, resume: bool = False) -> tuple[QFormer, list[dict[str, float]]]:
    """Stage 1 on precomputed frozen features: (model, losses of this process's steps). train_set holds
    image_embeds, input_ids, attention_mask and description (scenes with equal ids are equally right).
    Checkpoints every cfg.save_every steps and at the end; resume=True continues from the latest."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = QFormer(config).to(device)
    optimizer = make_optimizer(model, cfg)
    clip.clean_run_folder(out)                                   # what a crash in the middle of a save left
    start = resume_trainer(out, model, optimizer, g, cfg) if resume else 0
    print(f"Q-Former: {sum(p.numel() for p in model.parameters()):,} weights, "
          f"Q={model.config.num_query_tokens} queries, steps {start}..{cfg.steps}")

    def sample_batch(step):
        i = torch.randint(0, cfg.n_train, (cfg.batch_size,), generator=g).to(device)
        mask = train_set["attention_mask"][i]
        T = int(mask.sum(1).max())                       # drop the columns that are padding everywhere
        description = train_set["description"][i]
        return (train_set["image_embeds"][i], train_set["input_ids"][i, :T], mask[:, :T],
                description[:, None] == description[None])

    def checkpoint(step, history):
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_trainer(out, model, optimizer, step + 1, g, cfg)

    return model, train(model, optimizer, sample_batch, cfg, start, g, on_step=checkpoint)


def run_shapes(args: argparse.Namespace, device: torch.device | str) -> dict:
    """Minutes: stage-1 training of a Q-Former on the frozen ViT of clip.py, then retrieval and captions."""
    cfg = (TrainConfig.tiny if args.tiny else TrainConfig)(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    out = Path(args.out)
    if args.resume:
        clip.checkpoint_to_resume(out)                       # "nothing to resume" before minutes of features
    clip_module, vit = load_frozen_clip(args, device)
    tokenizer = clip_module.ShapesTokenizer()
    t0 = time.time()
    train_set = shapes_split(clip_module, vit, tokenizer, "train", cfg.n_train, cfg.seed, device)
    evals = {split: shapes_split(clip_module, vit, tokenizer, split, cfg.n_eval, cfg.seed + 1, device,
                                 judge_truth=True) for split in ("test", "heldout")}
    print(f"frozen ViT features of {cfg.n_train} + 2 x {cfg.n_eval} scenes: {time.time() - t0:.1f} s")
    config = shapes_qformer_config(tokenizer, vit.cfg.vision_width, args.tiny)
    model, history = train_shapes(cfg, config, train_set, out, device, resume=args.resume)
    if history:
        print("\n" + loss_table(mean_losses(history[:20]), mean_losses(history[-20:])))
    results = {}
    for split, data in evals.items():
        results[split] = evaluate(model, data["image_embeds"], data["input_ids"], data["attention_mask"],
                                  data["correct"], k=cfg.rerank_k, true_of=data["true_of"])
        n = len(data["captions"])
        chance = lambda right: 100 * right.float().sum(0).mean().item() / n
        print(f"\n## {n} unseen '{split}' scenes (chance text->image R@1: {chance(data['correct']):.1f}% by "
              f"description, {chance(data['true_of']):.1f}% by truth)\n")
        print(retrieval_table(results[split]))
    data = evals["test"]
    print("\nITG captions (greedy) | true captions")
    for ids, true in zip(model.generate(data["image_embeds"][:4]).tolist(), data["captions"][:4]):
        print(f"  {tokenizer.decode(ids[1:]):60s} | {true}")
    print(f"\ncheckpoint: {clip.latest_checkpoint(out)}/ (QFormer.from_pretrained; QFormer.from_pretrained('{out}') "
          f"follows its `{clip.LATEST}`)")
    return {"history": history, **results}


# ==============================================================================================
# Plumbing: checkpoint files, crash-safe training checkpoints (clip.py's), the command line.
# Nothing below teaches the Q-Former; it makes the code above safe to save, stop, resume and run.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Checkpoints: our own (config.json + model.safetensors) and transformers' Blip2ForImageTextRetrieval
# ----------------------------------------------------------------------------------------------

CheckpointError = clip.CheckpointError     # a file that is not a loadable checkpoint (named in the message)


# parts of BLIP-2 stage 1 that a Blip2ForImageTextRetrieval checkpoint does not store
NOT_IN_BLIP2_RETRIEVAL = ("temp", "itg_head.", "language_projection.")
# parts of a Blip2ForImageTextRetrieval checkpoint that are not the Q-Former's
OUTSIDE_QFORMER = ("vision_model.", "embeddings.position_ids")

_atomic_write = clip.atomic_write           # unique temporary name, fsync, rename


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _read_tensors(directory: Path, keep: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Tensors named by `keep(name)` from model.safetensors or a sharded index, read by the safetensors
    package and checked to be finite (clip.read_safetensors); returns (tensors, their names)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = clip.read_json(index, "a safetensors index with a weight_map").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {directory}")
    tensors = {}
    for name in files:
        tensors.update(clip.read_safetensors(directory / name, keep))
    return tensors, set(tensors)


def config_from_blip2(hf: dict, lm_hidden_size: int = 0) -> QFormerConfig:
    """Our QFormerConfig from a transformers Blip2Config dict (its defaults where a field is absent)."""
    q, v = hf.get("qformer_config") or {}, hf.get("vision_config") or {}
    if not q.get("use_qformer_text_input", False):
        raise CheckpointError("this BLIP-2 checkpoint's Q-Former has no text weights "
                              "(qformer_config.use_qformer_text_input is false); a "
                              "Blip2ForImageTextRetrieval checkpoint (e.g. blip2-itm-vit-g) has them")
    if q.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"only hidden_act='gelu' is implemented, got {q['hidden_act']!r}")
    return QFormerConfig(
        vocab_size=q.get("vocab_size", 30522), hidden_size=q.get("hidden_size", 768),
        num_hidden_layers=q.get("num_hidden_layers", 12), num_attention_heads=q.get("num_attention_heads", 12),
        intermediate_size=q.get("intermediate_size", 3072),
        max_position_embeddings=q.get("max_position_embeddings", 512),
        num_query_tokens=hf.get("num_query_tokens", 32),
        encoder_hidden_size=v.get("hidden_size", q.get("encoder_hidden_size", 1408)),
        cross_attention_freq=q.get("cross_attention_frequency", 2),
        embed_dim=hf.get("image_text_hidden_size", 256), lm_hidden_size=lm_hidden_size,
        layer_norm_eps=q.get("layer_norm_eps", 1e-12), initializer_range=q.get("initializer_range", 0.02),
        hidden_dropout=q.get("hidden_dropout_prob", 0.1),
        attention_dropout=q.get("attention_probs_dropout_prob", 0.1), pad_token_id=q.get("pad_token_id", 0) or 0)


def load_strict(model: QFormer, tensors: dict[str, torch.Tensor], source: str | Path,
                fresh: tuple[str, ...] = ()) -> QFormer:
    """Copy tensors into model; any missing, unexpected or mis-shaped tensor is an error listing them.
    Names starting with a prefix in `fresh` are expected to be absent and keep their initial values."""
    own = model.state_dict()
    expected = {k for k in own if not k.startswith(fresh)} if fresh else set(own)
    if not expected & set(tensors):
        raise CheckpointError(f"{source} holds no Q-Former weights: expected tensors such as "
                              f"query_tokens, qformer.encoder.layer.0.*, embeddings.*; found "
                              f"{_list(tensors) or 'nothing else'}")
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    wrong = [f"{k} {tuple(tensors[k].shape)} (model: {tuple(own[k].shape)})"
             for k in expected & set(tensors) if tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not match the Q-Former. missing: {_list(missing) or '-'}; "
                              f"unexpected: {_list(unexpected) or '-'}; wrong shape: {_list(wrong) or '-'}")
    with torch.no_grad():
        for k in expected:
            own[k].copy_(tensors[k])
    return model


def save_qformer(model: QFormer, directory: str | Path) -> None:
    """config.json (our fields + model_type 'qformer') and model.safetensors, each written atomically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qformer", **model.config.to_dict()}
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p)))


def config_from_dict(raw: dict, source: str | Path) -> QFormerConfig:
    """QFormerConfig from our config.json's fields; a value of the wrong kind is a CheckpointError."""
    names = {f.name for f in fields(QFormerConfig)}
    try:
        return QFormerConfig(**{k: v for k, v in raw.items() if k in names})
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source} does not describe a Q-Former ({e})") from None


def load_qformer(directory: str | Path, lm_hidden_size: int = 0) -> QFormer:
    """A QFormer from our own directory or a transformers Blip2ForImageTextRetrieval one.

    From transformers we take query_tokens, embeddings, qformer, vision_projection, text_projection
    and itm_head (the vision tower stays behind); `temp`, the ITG head and a language_projection of
    width lm_hidden_size are new and keep their initial values. Where the config sets
    image_token_index, transformers' processor puts Q placeholder tokens in front of the caption and
    the model strips them again; our methods take the caption alone.
    """
    directory = Path(directory)
    if not (directory / "config.json").exists() and (directory / clip.LATEST).exists():
        directory = clip.latest_checkpoint(directory)       # a --train run folder: its latest checkpoint
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {directory}: expected a directory written by "
                                "QFormer.save_pretrained or transformers' save_pretrained")
    raw = clip.read_json(directory / "config.json", "a Q-Former or BLIP-2 config.json")
    kind = raw.get("model_type")
    if kind == "qformer":
        config = config_from_dict(raw, directory / "config.json")
        fresh, keep = (), lambda key: True
        if lm_hidden_size and lm_hidden_size != config.lm_hidden_size:
            if config.lm_hidden_size:
                raise CheckpointError(f"{directory} has a language_projection to width "
                                      f"{config.lm_hidden_size}, not {lm_hidden_size}")
            config, fresh = replace(config, lm_hidden_size=lm_hidden_size), ("language_projection.",)
    elif kind == "blip-2":
        config = config_from_blip2(raw, lm_hidden_size)
        fresh, keep = NOT_IN_BLIP2_RETRIEVAL, lambda key: not key.startswith(OUTSIDE_QFORMER)
    else:
        raise CheckpointError(f"{directory}/config.json has model_type={kind!r}; expected 'qformer' "
                              "or 'blip-2' (a Blip2ForImageTextRetrieval checkpoint)")
    tensors, _ = _read_tensors(directory, keep)
    return load_strict(QFormer(config), tensors, str(directory), fresh)



# ----------------------------------------------------------------------------------------------
# Training checkpoints of --train: clip.py's layout (out/step-<k>/, then out/latest), no pickle
# ----------------------------------------------------------------------------------------------

def save_trainer(out: str | Path, model: QFormer, optimizer: torch.optim.Optimizer, step: int,
                 generator: torch.Generator, cfg: TrainConfig | None = None) -> Path:
    """One checkpoint (clip.py's layout: out/step-<k>/ then out/latest): the model (config.json +
    model.safetensors) and what --resume needs, step, optimizer moments and RNG states, with no pickle."""
    tensors, groups = clip.optimizer_state(optimizer)
    tensors.update({"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()})   # uint8
    info = {"train_config": asdict(cfg) if cfg is not None else {}, "model_config": model.config.to_dict(),
            "optimizer_param_groups": groups}
    config = {"model_type": "qformer", **model.config.to_dict()}
    return clip.save_checkpoint(out, step, {**clip.model_files(model.state_dict(), config, step),
                                            **clip.trainer_files(step, tensors, info)})


def resume_trainer(out: str | Path, model: QFormer, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                   cfg: TrainConfig) -> int:
    """Load out's latest checkpoint into model, optimizer and RNGs; returns its step. A checkpoint of another
    configuration is refused, with the differing fields listed."""
    folder = clip.checkpoint_to_resume(out)
    info, tensors = clip.read_trainer_state(folder)
    differ = (clip.config_differences(info.get("train_config", {}), asdict(cfg))
              + clip.config_differences(info.get("model_config", {}), model.config.to_dict(), "model ", ignore=()))
    if differ:
        raise CheckpointError(f"--resume: {folder} was trained with another configuration; differing fields: "
                              f"{'; '.join(differ)}")
    tensors_of_model, _ = _read_tensors(folder, lambda key: True)
    load_strict(model, tensors_of_model, str(folder))
    clip.load_optimizer_state(optimizer, tensors, info.get("optimizer_param_groups"), folder / "trainer.json")
    for name in ("rng.torch", "rng.generator"):
        if name not in tensors or tensors[name].dtype != torch.uint8:
            raise CheckpointError(f"{folder / 'trainer.safetensors'} has no uint8 tensor {name} (an RNG state)")
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    return info["step"]


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N as a torch.device (clip.pick_device checks that a CUDA device exists)."""
    return torch.device(clip.pick_device(name))


def main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="qformer.py", description=__doc__.splitlines()[0])
    clip.add_common_arguments(parser, "run folder of --train: checkpoints step-<k>/ (default runs/qformer)",
                              train_help="align the ViT of `clip.py --train` with shapes captions (minutes)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--clip-dir", type=str, default=None,
                        help="with --train: a clip.py checkpoint or run folder (default: clip.py's runs/clip/shapes, "
                             "trained there if absent)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: at these sizes threads mostly wait on each other)")
    args = parser.parse_args(argv)
    args.out = args.out or "runs/qformer"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)     # restored below, so a caller's (a test's) setting survives
    try:
        device = pick_device(args.device)
        return run_shapes(args, device) if args.train else run_demo(args, device)
    except (ValueError, FileNotFoundError) as e:      # clip.CheckpointError, NonFiniteLossError are ValueErrors
        parser.error(str(e))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()

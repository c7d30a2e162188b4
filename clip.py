"""CLIP: contrastive language-image pre-training, from the lecture's pseudo-code to real checkpoints.

Two encoders map an image and a caption into one D-dimensional space. Training pulls the N matching
pairs of a batch together and pushes the N^2 - N mismatched pairs apart (Radford et al. 2021, Fig. 3):

    I = normalize(image_encoder(images) W_i)        # (N, D) unit vectors
    T = normalize(text_encoder(texts) W_t)          # (N, D)
    logits = exp(t) * I T^T                         # (N, N) scaled cosine similarities
    L = ( CE(logits, diag) + CE(logits^T, diag) ) / 2   # symmetric InfoNCE

The image encoder is a ViT (Dosovitskiy et al. 2021): P x P patches -> linear embedding, a class token,
learned position embeddings, pre-norm transformer blocks; the class token's output is the image. The
text encoder is a causal transformer read out at the end-of-text token (CLIP paper, section 2.4). The
temperature t is learned, starts at ln(1/0.07) and is clamped at ln(100) during training. Zero-shot
classification (section 3.1.2) turns label names into captions ("a photo of a {}"), averages the text
embeddings of several templates (section 3.1.4), and picks the caption nearest the image.

Also here: the SigLIP loss (Zhai et al. 2023), which PaliGemma's vision tower is trained with;
gathering features across ranks under torchrun so the loss sees the global batch (as open_clip does);
and the synthetic "shapes" data set (rendered scenes, captions, questions, a held-out split of
colour-shape combinations) that qformer.py and vlm_train.py reuse.

Conventions: module names equal the keys of transformers' `CLIPModel`, so `CLIP.from_pretrained`
loads a checkpoint folder strictly; images are (B, C, S, S) normalised with CLIP's mean and std;
text is right-padded and every row contains the end-of-text token. Left out: dropout, the
ResNet image encoder, interpolation of position embeddings to other image sizes, and BPE (the shapes
data use a word-level tokenizer; real checkpoints use transformers' tokenizer).
"""
import argparse
import math
import random
from dataclasses import dataclass, field

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
    # vision tower: a ViT over (C, S, S) images cut into (S/P)^2 patches
    image_size: int = 48            # S
    patch_size: int = 8             # P
    num_channels: int = 3           # C
    vision_width: int = 128         # D of the ViT
    vision_layers: int = 3          # L
    vision_heads: int = 4           # H
    vision_mlp: int = 512           # F
    vision_act: str = "quick_gelu"
    # text tower: a causal transformer over T tokens
    vocab_size: int = None          # V; None = the shapes tokenizer's
    context_length: int = 24        # T, the longest caption plus start and end tokens
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_mlp: int = 512
    text_act: str = "quick_gelu"
    eos_token_id: int = None        # the end-of-text token the text is read out at; None = the shapes tokenizer's
    # shared space and temperature
    embed_dim: int = 128            # width of the joint embedding space
    layer_norm_eps: float = 1e-5
    # t = ln(1/0.07): CLIP starts at temperature 0.07, i.e. logits are cosines times 14.3 (section 2.5)
    logit_scale_init: float = math.log(1 / 0.07)
    num_patches: int = field(init=False)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.num_patches = (self.image_size // self.patch_size) ** 2   # N
        if self.vocab_size is None:
            self.vocab_size = ShapesTokenizer.vocab_size
        if self.eos_token_id is None:
            self.eos_token_id = ShapesTokenizer.eos_token_id

    @classmethod
    def tiny(cls, **overrides):
        """A model of a few thousand parameters for tests and the seconds-long demo."""
        small = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                     vision_mlp=64, text_width=32, text_layers=1, text_heads=2, text_mlp=64, embed_dim=16)
        return cls(**{**small, **overrides})


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

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.heads, -1).transpose(1, 2)    # (B, T, D) -> (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.heads, -1).transpose(1, 2)    # (B, H, T, d)
        v = self.v_proj(x).view(B, T, self.heads, -1).transpose(1, 2)    # (B, H, T, d)
        # softmax(q k^T / sqrt(d) + mask) v; the mask is additive (0 = attend, very negative = do not)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, D)                           # (B, H, T, d) -> (B, T, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width, mlp_width, activation):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))                           # (B, T, D) -> (B, T, F) -> (B, T, D)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

    Submodule names equal transformers' CLIP and SigLIP keys (`layer_norm1`, `self_attn.q_proj`, ...,
    `mlp.fc1`), so a checkpoint's `encoder.layers.{i}.*` tensors load into it unchanged.
    `attn_mask` is an optional additive float mask broadcastable to (B, H, T, T).
    """

    def __init__(self, width, heads, mlp_width, activation="quick_gelu", eps=1e-5):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, activation)

    def forward(self, x, attn_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask)          # (B, T, D)
        return x + self.mlp(self.layer_norm2(x))                         # (B, T, D)


class Encoder(nn.Module):
    """A stack of L blocks, held as `layers` so the keys read `encoder.layers.{i}.*`."""

    def __init__(self, layers, width, heads, mlp_width, activation, eps):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, mlp_width, activation, eps)
                                    for _ in range(layers))

    def forward(self, x, attn_mask=None, output_hidden_states=False):
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

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values)                           # (B, C, S, S) -> (B, D, S/P, S/P)
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

    def forward(self, pixel_values, output_hidden_states=False):
        """(B, C, S, S) -> (B, 1+N, D); with output_hidden_states, the list of all L+1 such tensors."""
        check_pixel_values(pixel_values, self.cfg)
        x = self.pre_layrnorm(self.embeddings(pixel_values))            # (B, 1+N, D)
        return self.encoder(x, output_hidden_states=output_hidden_states)

    def pool(self, tokens):
        return self.post_layernorm(tokens[:, 0])                         # (B, 1+N, D) -> (B, D)


def check_pixel_values(pixel_values, cfg: CLIPConfig):
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

    def forward(self, input_ids):
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]   # (B, T) -> (B, T, D)


def text_attention_mask(attention_mask, T, dtype, device):
    """Additive mask (B or 1, 1, T, T): token i sees tokens j <= i that are not padding.

    A large negative number instead of -inf keeps a fully masked row (a padding query with left
    padding) finite instead of NaN; the rows that matter are unaffected.
    """
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()   # (T, T) causal
    if attention_mask is not None and not bool(attention_mask.all()):
        allowed = allowed & attention_mask.bool()[:, None, None, :]     # (B, 1, T, T): hide padding keys
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def pool_eos(hidden, input_ids, eos_token_id):
    """Read each row out at its end-of-text token: (B, T, D) -> (B, D).

    transformers' rule: configs with eos_token_id == 2 predate a fix and take the highest token id (in
    CLIP's BPE vocabulary that is end-of-text, 49407); newer configs take the first eos_token_id, which
    stays right when padding uses the same id.
    """
    if eos_token_id == 2:
        index = input_ids.argmax(dim=-1)                                 # (B,)
    else:
        is_eos = input_ids == eos_token_id                               # (B, T)
        if not bool(is_eos.any(dim=-1).all()):
            missing = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {missing} of input_ids have no end-of-text token (id {eos_token_id}); "
                             "the text encoder reads each row out at that token")
        index = is_eos.int().argmax(dim=-1)                              # (B,) first end-of-text
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.text_layers, cfg.text_width, cfg.text_heads, cfg.text_mlp,
                               cfg.text_act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None):
        """(B, T) token ids, optional (B, T) 1/0 padding mask -> (B, T, D) after the final LayerNorm."""
        check_input_ids(input_ids, self.cfg)
        x = self.embeddings(input_ids)                                   # (B, T, D)
        mask = text_attention_mask(attention_mask, input_ids.shape[1], x.dtype, x.device)
        return self.final_layer_norm(self.encoder(x, mask))             # (B, T, D)


def check_input_ids(input_ids, cfg: CLIPConfig):
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be an integer tensor of shape (B, T); got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > cfg.context_length:
        raise ValueError(f"text of {input_ids.shape[1]} tokens is longer than the context length "
                         f"{cfg.context_length}")
    if input_ids.numel() and not (0 <= int(input_ids.min()) and int(input_ids.max()) < cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got [{int(input_ids.min())}, "
                         f"{int(input_ids.max())}]")


# ----------------------------------------------------------------------------------------------
# The losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid
# ----------------------------------------------------------------------------------------------

def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE (Radford et al. 2021, Fig. 3); `logit_scale` is the multiplier exp(t).

    Row i of the similarity matrix asks "which caption belongs to image i?", column j asks "which
    image belongs to caption j?"; the right answer is always the diagonal.
    """
    image_features = F.normalize(image_features, dim=-1)                 # (B, E), unit length
    text_features = F.normalize(text_features, dim=-1)                   # (B, E)
    # logits_ij = exp(t) cos(I_i, T_j)
    logits = logit_scale * image_features @ text_features.t()            # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)         # the diagonal is correct
    # L = (CE over rows + CE over columns) / 2
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
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
    # L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b))
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


# ----------------------------------------------------------------------------------------------
# The dual encoder
# ----------------------------------------------------------------------------------------------

class CLIP(nn.Module):
    """ViT + text transformer + two projections into one space + a learned temperature.

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
        # t, stored as a log so that exp(t) stays positive; exp(ln(1/0.07)) = 14.3
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.apply(init_weights)

    def encode_image(self, pixel_values):
        tokens = self.vision_model(pixel_values)                         # (B, 1+N, D)
        return self.visual_projection(self.vision_model.pool(tokens))    # (B, D) -> (B, E)

    def encode_text(self, input_ids, attention_mask=None):
        hidden = self.text_model(input_ids, attention_mask)              # (B, T, D)
        pooled = pool_eos(hidden, input_ids, self.cfg.eos_token_id)      # (B, D)
        return self.text_projection(pooled)                              # (B, E)

    def forward(self, pixel_values, input_ids, attention_mask=None):
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))."""
        image = F.normalize(self.encode_image(pixel_values), dim=-1)     # (B_img, E)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)   # (B_txt, E)
        # Not clamped here: training clamps the parameter itself (`clamp_logit_scale_`), and
        # transformers applies exp(t) as loaded, so checkpoints give the same logits in both.
        logits_per_image = self.logit_scale.exp() * image @ text.t()     # (B_img, B_txt)
        return logits_per_image, logits_per_image.t()

    @torch.no_grad()
    def clamp_logit_scale_(self):
        """t <= ln(100) (CLIP section 2.5: "clipped to prevent scaling the logits by more than 100")."""
        self.logit_scale.clamp_(0, math.log(100))


def init_weights(module):
    """Small normal initialisation (std 0.02 for weights and embeddings, zero biases), as GPT-2 and
    transformers' CLIP do; LayerNorms start as the identity."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# The shapes data set: rendered scenes with captions, structured descriptions and questions
# ----------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230),
           "yellow": (235, 205, 30), "purple": (150, 60, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.18, "large": 0.30}          # diameter as a fraction of the image side
GRID = 3                                          # shapes sit in distinct cells of a 3 x 3 grid
BACKGROUND = (40, 40, 40)
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

    @property
    def col(self):
        return min(int(self.x * GRID), GRID - 1)

    @property
    def row(self):
        return min(int(self.y * GRID), GRID - 1)

    def phrase(self):
        return f"a {self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple    # of Shape, in the order the caption names them


def relation(a: Shape, b: Shape):
    """Where a is relative to b: left/right when their grid columns differ, else above/below."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def random_scene(rng: random.Random, split="train", max_shapes=4):
    """Draw a scene: 1..max_shapes shapes in distinct grid cells.

    split "train" / "test": only colour-shape pairs outside HELDOUT; "heldout": the first shape is a
    held-out pair, the others anything. Scenes with one or two shapes are the most common, because their
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
            held = (colour, kind) in HELDOUT
            if (split == "heldout" and i == 0) == held or (split == "heldout" and i > 0):
                break
        row, col = divmod(cell, GRID)
        # centre of the cell, jittered a little so positions are not a lattice
        x = (col + 0.5 + rng.uniform(-0.12, 0.12)) / GRID
        y = (row + 0.5 + rng.uniform(-0.12, 0.12)) / GRID
        shapes.append(Shape(kind, colour, rng.choice(list(SIZES)), x, y))
    if n > 2:   # several shapes are named left to right, top to bottom
        shapes.sort(key=lambda s: (s.col, s.row))
    return Scene(tuple(shapes))


def caption(scene: Scene, prefix=""):
    """"a large red circle to the left of a small blue square"; three or more shapes are listed."""
    s = scene.shapes
    if len(s) == 1:
        body = s[0].phrase()
    elif len(s) == 2:
        body = f"{s[0].phrase()} {relation(s[0], s[1])} {s[1].phrase()}"
    else:
        body = f"{COUNT_WORDS[len(s)]} shapes: " + ", ".join(x.phrase() for x in s[:-1]) + f" and {s[-1].phrase()}"
    return prefix + body


def render(scene: Scene, image_size=48, supersample=4):
    """Draw the scene with pillow; drawn `supersample` times larger, then downsized for smooth edges."""
    side = image_size * supersample
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = s.x * side, s.y * side, SIZES[s.size] * side / 2
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            h = r * 0.85   # a slightly smaller square has about a circle's area
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img.resize((image_size, image_size), Image.BOX)


def questions(scene: Scene):
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


def to_pixel_values(images, mean=CLIP_MEAN, std=CLIP_STD):
    """PIL images (all S x S, RGB) -> (B, C, S, S) float tensor normalised with CLIP's mean and std."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))  # (B, S, S, C)
    x = x.permute(0, 3, 1, 2) / 255.0                                    # (B, C, S, S) in [0, 1]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


class ShapesDataset(torch.utils.data.Dataset):
    """`size` scenes of one split; item i is (pixel_values (C, S, S), caption, Scene).

    Item i depends only on (seed, split, i), so any item can be regenerated in any order and on any
    rank. The caption's opening ("a photo of ", ...) also varies with i. Batch with `collate`.
    """

    def __init__(self, size, split="train", seed=0, image_size=48, max_shapes=4):
        random_scene(random.Random(0), split)       # validates split
        self.size, self.split, self.seed = size, split, seed
        self.image_size, self.max_shapes = image_size, max_shapes

    def __len__(self):
        return self.size

    def scene(self, i):
        rng = random.Random(f"shapes-{self.seed}-{self.split}-{i}")   # str seeds are stable across runs
        return random_scene(rng, self.split, self.max_shapes), rng.choice(CAPTION_PREFIXES)

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a data set of {self.size}")
        scene, prefix = self.scene(i)
        pixels = to_pixel_values([render(scene, self.image_size)])[0]   # (C, S, S)
        return pixels, caption(scene, prefix), scene


def collate(batch):
    """[(pixels, caption, scene)] -> ((B, C, S, S), list of captions, list of scenes)."""
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

    def __init__(self, context_length=24):
        self.context_length = context_length
        self.stoi = {w: i for i, w in enumerate(self.ITOS)}

    @staticmethod
    def words(text):
        return "".join(c if c.isalnum() else " " for c in text.lower()).split()

    def encode(self, texts):
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

    def decode(self, ids):
        """(T,) ids -> the words between start- and end-of-text."""
        out = []
        for i in ids.tolist() if torch.is_tensor(ids) else ids:
            if i == self.eos_token_id:
                break
            if i not in (self.pad_token_id, self.sot_token_id):
                out.append(self.ITOS[i])
        return " ".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    parser.parse_args(argv)


if __name__ == "__main__":
    main()

"""LoRA: fine-tune a frozen linear layer through a low-rank update, and QLoRA on an NF4 base.

Idea (Hu et al. 2021, "LoRA", section 4.1). Fine-tuning changes a pretrained weight W (out, in)
by some dW, and that change has low "intrinsic rank". So freeze W and learn dW = B A with
A (r, in), B (out, r), r << min(in, out):

    h = W x + (alpha / r) * B A dropout(x)

A starts random and B at zero, so at step 0 the model is exactly the pretrained one and only B A
moves. The paper draws A from a Gaussian (section 4.1, "random Gaussian initialization for A");
microsoft/LoRA's code and peft (our default here) use nn.Linear's Kaiming-uniform instead; only the
randomness of A matters for the argument that follows. Why not both at zero: dL/dB = s (dL/dh) (A x)^T and dL/dA = s B^T (dL/dh) x^T, so
with A = B = 0 neither gets a gradient and training never starts; with A random, B gets a gradient
at step 0, and A starts moving once B is non-zero. The trainable parameters drop from out * in to
r * (in + out) per layer, and with them the gradients and the optimizer state (AdamW keeps two
numbers per trainable parameter).

Why the scale s = alpha / r: Hu et al. (section 4.1) divide by r so that, with Adam, alpha acts
like a learning rate that need not be retuned when r changes (they set alpha to the first r tried).
It does not make learning equally fast at every rank: Kalajdzievski (2023, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA") proves that with alpha / r learning slows down as r grows
(the gradients collapse), so large ranks learn no better than small ones, and that alpha / sqrt(r)
is the scale that keeps learning stable in r. That is rsLoRA below; the default here is LoRA's
alpha / r, as in peft.

Variants:
- rsLoRA (Kalajdzievski 2023): s = alpha / sqrt(r) (`use_rslora=True`).
- DoRA (Liu et al. 2024, eq. 5): split W into a magnitude m (one number per output row) and a
  direction; LoRA updates the direction and m is trained too:
      W' = m * (W + s B A) / ||W + s B A||_c      (||.||_c: the norm of each output row)
  with the norm treated as a constant in backward (section 4.3) (`use_dora=True`).
- QLoRA (Dettmers et al. 2023): the frozen W is stored in 4-bit NF4 (`nf4.LinearNF4`) and
  dequantized on the fly; the adapters stay in full precision and get all the gradients.

Memory, per parameter, training with AdamW in fp32 (`training_state_bytes` counts it;
`python benchmarks/bench_lora.py --skip-speed` measures it on a 134M-parameter model):

    full fine-tuning:  4 (weight) + 4 (gradient) + 8 (AdamW's two moments)   = 16 bytes
    LoRA:              4 (frozen weight)  + 16 per adapter parameter (a few % of the model)
    QLoRA:             4.127 / 8 = 0.52 (NF4 weight) + 16 per adapter parameter

so the frozen base is what remains. NF4 stores a linear layer's weight in 4.127 bits instead of 32,
7.75x smaller, but embeddings and lm_head stay in full precision (as bitsandbytes keeps them), so
the whole model shrinks less: the benchmark measures 522 -> 240 MiB of weights (2.2x) on its
134M-parameter model, where the 32,000-word embedding and lm_head are 188 of those 240 MiB.
Activations (which grow with batch and sequence length) are about the same for all three: neither
method shrinks them.

Merging: after training, W <- W + s B A gives a plain layer with no inference cost (section 4.1).
On an NF4 base the merged weight has to be re-quantized, which rounds part of B A away;
`merge_lora` reports how much.

On disk, adapters use peft's format (adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)), so adapters
trained here load in peft and the other way round, with identical outputs.

Left out: LoRA for embeddings and convolutions, several adapters per layer, per-layer ranks
(peft's rank_pattern), LoRA biases.

Run `python lora.py` for a small LoRA / QLoRA training run; the memory of full fine-tuning vs LoRA
vs QLoRA on a 134M-parameter Llama-style model is `python benchmarks/bench_lora.py --skip-speed`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import nf4

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """The adapter's hyperparameters, saved as peft's adapter_config.json."""
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    use_dora: bool = False


# Every linear layer, lm_head included: a random base's frozen output layer can only produce small
# logits (|h| |w| ~ 1), so without an adapter on lm_head no model could become confident.
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@dataclass
class DemoConfig:
    """The training demo: a random Llama-style model learns arithmetic progressions with LoRA."""
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 24
    batch_size: int = 32
    steps: int = 150
    lr: float = 3e-3             # larger than the ~2e-4 usual on real models: the base here is random
    r: int = 8
    alpha: float = 16
    seed: int = 0

    @classmethod
    def tiny(cls, **overrides: object) -> DemoConfig:
        return cls(**{"hidden_size": 32, "intermediate_size": 64, "steps": 12, "batch_size": 8, **overrides})


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

def check_hparams(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def lora_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """h = W x + b + s B (A x): the LoRA formula as written (Hu et al. 2021, eq. 3, with s = alpha / r).

    LoRALinear.forward computes exactly this, in place to save memory (a test checks they agree)."""
    # B (A x) as two thin matmuls, never forming B A: (B, T, in) -> (B, T, r) -> (B, T, out)
    return F.linear(x, W, b) + scaling * F.linear(F.linear(x, A), B)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """W (out, in) of a linear-like layer, dequantized when it is stored in NF4."""
    if isinstance(layer, nf4.LinearNF4):
        return layer.dequantize()
    return layer.weight


class LoRALinear(nn.Module):
    """h = base(x) + s * B A dropout(x), s = alpha / r (or alpha / sqrt(r)), around a frozen base.

    `base_layer` is an nn.Linear or an nf4.LinearNF4. `lora_A` (r, in) and `lora_B` (out, r) are
    the trainable parameters (plus `lora_magnitude_vector` (out,) with DoRA).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        check_hparams(r, alpha, dropout)
        if not isinstance(base_layer, (nn.Linear, nf4.LinearNF4)):
            raise TypeError(f"LoRALinear wraps nn.Linear or nf4.LinearNF4, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        # rsLoRA: s = alpha / sqrt(r);  LoRA: s = alpha / r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        W = base_weight(base_layer)
        dtype = W.dtype if W.dtype in nf4.FLOAT_DTYPES else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=W.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=W.device, dtype=dtype))
        # A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt(5)); B = 0 so B A = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if use_dora:
            # m = ||W||_c at the start, so W' = W until training moves m or B A
            self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(W.detach().to(dtype), dim=1))
        self.merged = False
        self.weight_norm = None   # ||W + s B A||_c, kept by a DoRA merge so that unmerge can undo it

    def delta_weight(self) -> torch.Tensor:
        """dW = s * B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)                                 # W x + b
        if self.merged:
            return result
        x_in = self.lora_dropout(x).to(self.lora_A.dtype)
        # B A x as two thin matmuls, never forming B A: (B, T, in) -> (B, T, r) -> (B, T, out)
        lora = F.linear(F.linear(x_in, self.lora_A), self.lora_B)
        if not self.use_dora:
            # h = W x + b + s B A x, i.e. lora_linear() above: the same operations as peft, so outputs
            # agree bit for bit. Fast path: done in place on tensors autograd does not keep (a linear
            # layer's backward needs only its input and weight), which saves two (B, T, out)
            # temporaries per layer
            return result.add_(lora.mul_(self.scaling).to(result.dtype))
        return self.dora_forward(x_in, result, lora)

    def dora_forward(self, x_in: torch.Tensor, result: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """h = (m / ||W + s B A||_c) (W x + s B A x) + b, the norm detached (DoRA section 4.3)."""
        W = base_weight(self.base_layer).to(x_in.dtype)
        norm = torch.linalg.norm(W + self.scaling * (self.lora_B @ self.lora_A).detach(), dim=1).detach()
        g = (self.lora_magnitude_vector / norm).view(1, -1)          # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_out = result if bias is None else result - bias     # W x, reused from base(x)
        else:
            base_out = F.linear(x_in, W)                              # W dropout(x), as peft does
        # h = W x + b + (g - 1) W x + g s B A x
        return result + ((g - 1) * base_out + g * lora * self.scaling).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The weight a plain layer needs to compute what this layer computes, in fp32 for NF4."""
        W = base_weight(self.base_layer).detach()
        W = W.float() if isinstance(self.base_layer, nf4.LinearNF4) else W
        merged = W + self.delta_weight().detach().to(W.dtype)         # W + s B A
        if self.use_dora:
            self.weight_norm = torch.linalg.norm(merged, dim=1)        # ||W + s B A||_c
            merged = (self.lora_magnitude_vector.detach() / self.weight_norm).view(-1, 1).to(W.dtype) * merged
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A in place (DoRA: W <- m (W + s B A) / ||W + s B A||_c); forward then skips B A."""
        if self.merged:
            return
        if isinstance(self.base_layer, nf4.LinearNF4):
            raise ValueError("a 4-bit base cannot be merged in place: use merge_lora(model), which "
                             "dequantizes, adds and re-quantizes (or keeps full precision)")
        self.base_layer.weight.data = self.merged_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W <- W - s B A (DoRA: W <- W ||W + s B A||_c / m - s B A)."""
        if not self.merged:
            return
        W = self.base_layer.weight.data
        if self.use_dora:
            W = W / (self.lora_magnitude_vector / self.weight_norm).view(-1, 1).to(W.dtype)
        self.base_layer.weight.data = W - self.delta_weight().to(W.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}"


# ----------------------------------------------------------------------------------------------
# Injection into a model, and the parameter count
# ----------------------------------------------------------------------------------------------

def linear_layers(model: nn.Module) -> list[str]:
    """Names of the linear-like layers LoRA can wrap (those already wrapped excluded)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nf4.LinearNF4)) and not name.endswith("base_layer"):
            names.append(name)
    return names


def check_target_modules(target_modules: object) -> None:
    """A list of name suffixes, a regex string or "all-linear" (peft's three forms), else a clear error."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({err}); "
                             "give a list of layer-name suffixes, a regex or 'all-linear'") from None
        return
    if not isinstance(target_modules, (list, tuple, set)) or not target_modules or \
            not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be a non-empty list of layer-name suffixes (e.g. ['q_proj', "
                         f"'v_proj']), a regex string or 'all-linear'; got {target_modules!r}")


def matches(name: str, target_modules: list[str] | str) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches by suffix."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return name.rpartition(".")[2] != "lm_head"
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def apply_lora(model: nn.Module, target_modules: list[str] | str, r: int, alpha: float, dropout: float = 0.0,
               use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """Wrap the matching linear layers of `model` in LoRALinear (in place); freeze everything else.

    target_modules: a list of name suffixes (["q_proj", "v_proj"]), a regex matched against full
    module names, or "all-linear" (every linear layer except lm_head), as in peft.
    """
    check_hparams(r, alpha, dropout)
    check_target_modules(target_modules)
    candidates = linear_layers(model)
    targets = [n for n in candidates if matches(n, target_modules)]
    if not targets:
        suffixes = sorted({n.rpartition(".")[2] for n in candidates})
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer; the model's linear "
                         f"layers end in {suffixes}" + (f" (e.g. {candidates[0]!r})" if candidates else ""))
    model.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        model.set_submodule(name, LoRALinear(base, r, alpha, dropout, use_rslora, use_dora))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a 4-bit weight counts as out * in parameters, not as its packed bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, nf4.LinearNF4))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print peft's summary line and return (trainable, total)."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(model: nn.Module, requantize: bool = True, unload: bool = True) -> dict[str, dict[str, float]]:
    """Fold every adapter into its base: W <- W + s B A (in place).

    unload=True puts a plain layer back. A full-precision base becomes an nn.Linear with
    W + s B A (the same output, up to float rounding). An NF4 base is dequantized and W + s B A is
    re-quantized into a LinearNF4 (`requantize=True`) or kept as an fp32 nn.Linear. Returns, per
    re-quantized layer, the RMS of the update s B A and of the rounding error re-quantization
    added: when the error is as large as the update, the 4-bit model has lost what the adapter
    learned. unload=False keeps the LoRALinear wrappers, merged, so that `unmerge_lora` can undo
    it (full-precision bases only).
    """
    report = {}
    for name, layer in lora_layers(model).items():
        if not unload:
            layer.merge()
            continue
        base = layer.base_layer
        merged = layer.merged_weight() if not layer.merged else base.weight.data
        bias = None if base.bias is None else base.bias.detach()
        if isinstance(base, nf4.LinearNF4) and requantize:
            state = base.quant_state
            plain = nf4.LinearNF4.from_weight(merged.to(state.dtype), bias, state.blocksize,
                                              state.double_quant, base.compute_dtype)
            err = plain.dequantize(torch.float32) - merged.float()
            report[name] = {"update_rms": rms(layer.delta_weight()), "rounding_rms": rms(err),
                            "rounding_max": err.abs().max().item()}
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                              device=merged.device, dtype=merged.dtype)
            plain.weight.data = merged
            if bias is not None:
                plain.bias.data = bias.to(merged.dtype)
        model.set_submodule(name, plain.requires_grad_(False))
    return report


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora(model, unload=False): W <- W - s B A on every merged layer."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------------------------
# Training adapters, and the memory training keeps
# ----------------------------------------------------------------------------------------------

def progressions(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Token sequences a, a + d, a + 2d, ... (mod vocab) with d in {1, 2, 3}: (B, T) int64."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(seq_len)) % vocab         # (B, T)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def train_adapters(model: nn.Module, cfg: DemoConfig, device: torch.device | str, desc: str) -> tuple[float, float]:
    """AdamW on the trainable (LoRA) parameters; returns (loss at step 0, mean loss of the last 10)."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in tqdm(range(cfg.steps), desc=desc, leave=False, disable=None):   # a bar only on a terminal
        tokens = progressions(cfg.batch_size, cfg.seq_len, cfg.vocab_size, g).to(device)
        loss = lm_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-10:]) / len(losses[-10:])


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def training_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of weights (params + 4-bit buffers), gradients and optimizer state."""
    packed = [m for m in model.modules() if isinstance(m, nf4.LinearNF4)]
    weights = tensor_bytes(model.parameters()) + sum(m.weight.nbytes + m.quant_state.nbytes() for m in packed)
    grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optim = tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"weights": weights, "grads": grads, "optimizer": optim}


# ==============================================================================================
# Plumbing: adapters on disk in peft's format, the demo, measuring memory, the CLI.
# A reader learning LoRA can stop here.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Adapters on disk, in peft's format
# ----------------------------------------------------------------------------------------------

def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names."""
    out = {}
    for name, layer in lora_layers(model).items():
        key = PEFT_PREFIX + name
        out[key + ".lora_A.weight"] = layer.lora_A
        out[key + ".lora_B.weight"] = layer.lora_B
        if layer.use_dora:
            out[key + ".lora_magnitude_vector"] = layer.lora_magnitude_vector
    return out


def adapter_config(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig the model's adapters were built with (one r / alpha for all layers)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layer: call apply_lora(model, ...) first")
    settings = {(l.r, l.alpha, l.use_rslora, l.use_dora, getattr(l.lora_dropout, "p", 0.0)) for l in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"all LoRA layers must share r, alpha, rsLoRA, DoRA and dropout to be saved; found {sorted(settings)}")
    r, alpha, use_rslora, use_dora, dropout = settings.pop()
    return LoRAConfig(r, alpha, dropout, target_names(model, list(layers)), use_rslora, use_dora)


def target_names(model: nn.Module, wrapped: list[str]) -> list[str]:
    """The shortest target_modules that selects exactly the wrapped layers: suffixes if they do."""
    suffixes = sorted({n.rpartition(".")[2] for n in wrapped})
    candidates = linear_layers(model) + wrapped
    selected = {n for n in candidates if matches(n, suffixes)}
    return suffixes if selected == set(wrapped) else sorted(wrapped)


def save_adapter(model: nn.Module, out_dir: str) -> str:
    """Write adapter_config.json and adapter_model.safetensors as peft's save_pretrained does."""
    from safetensors.torch import save_file

    cfg = adapter_config(model)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": cfg.target_modules, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {k: v.detach().contiguous() for k, v in adapter_tensors(model).items()}
    os.makedirs(out_dir, exist_ok=True)
    nf4.atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2)
    nf4.atomic_write(os.path.join(out_dir, ADAPTER_CONFIG), lambda tmp: Path(tmp).write_text(text))
    return out_dir


def read_adapter_config(adapter_dir: str) -> LoRAConfig:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir!r}")
    with open(path) as fh:
        config = json.load(fh)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "layers_to_transform",
                                          "exclude_modules", "modules_to_save", "target_parameters")
                   if config.get(k)}
    if config.get("bias", "none") != "none" or config.get("lora_bias") or config.get("fan_in_fan_out"):
        unsupported["bias / lora_bias / fan_in_fan_out"] = True
    if unsupported:
        raise ValueError(f"{path}: these adapter settings are not supported here: {unsupported}")
    return LoRAConfig(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config["target_modules"],
                      config.get("use_rslora", False), config.get("use_dora", False))


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a peft-format adapter into `model` (applying LoRA first if the model has none), strictly.

    Missing or unexpected tensors raise a KeyError that lists them, shape mismatches a ValueError,
    an unreadable file or a NaN / inf in it an nf4.CheckpointError naming the file and the tensors.
    """

    cfg = read_adapter_config(adapter_dir)
    if not lora_layers(model):
        apply_lora(model, cfg.target_modules, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora)
    have = adapter_config(model)
    if (have.r, have.alpha, have.use_rslora, have.use_dora) != (cfg.r, cfg.alpha, cfg.use_rslora, cfg.use_dora):
        raise ValueError(f"the model's adapters (r={have.r}, alpha={have.alpha}, rslora={have.use_rslora}, "
                         f"dora={have.use_dora}) differ from {adapter_dir!r} (r={cfg.r}, alpha={cfg.alpha}, "
                         f"rslora={cfg.use_rslora}, dora={cfg.use_dora})")
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir!r}")
    copy_adapter_tensors(adapter_tensors(model), read_adapter_weights(path), adapter_dir)
    return model


def read_adapter_weights(path: str) -> dict[str, torch.Tensor]:
    """{key: tensor} of adapter_model.safetensors, read by the safetensors package (no pickle); a corrupt
    file or a non-finite tensor is an error that names the file (and the tensor)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as e:                     # safetensors raises its own error type for a bad header
        raise nf4.CheckpointError(f"{path} is not a readable safetensors file ({e}); truncated or corrupt?") from None
    return nf4.check_finite(tensors, path)


@torch.no_grad()
def copy_adapter_tensors(params: dict, loaded: dict, where: str) -> None:
    missing = sorted(set(params) - set(loaded))
    unexpected = sorted(set(loaded) - set(params))
    if missing or unexpected:
        raise KeyError(f"adapter {where!r} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
                       f" ({len(missing)} missing, {len(unexpected)} unexpected)")
    wrong = [f"{k}: file {tuple(loaded[k].shape)}, model {tuple(p.shape)}"
             for k, p in params.items() if loaded[k].shape != p.shape]
    if wrong:
        raise ValueError(f"adapter {where!r} has tensors whose shapes do not fit the model: {wrong[:8]}")
    for key, param in params.items():
        param.copy_(loaded[key])


# ----------------------------------------------------------------------------------------------
# The training demo
# ----------------------------------------------------------------------------------------------

def llama_config(vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int) -> Any:
    """transformers' LlamaConfig of the demo's small random base (Any: transformers is imported here only)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                       tie_word_embeddings=False)


def build_base(cfg: DemoConfig, device: torch.device | str) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = llama_config(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                          cfg.num_heads, cfg.num_kv_heads)
    return LlamaForCausalLM(config).to(device).eval()


def run_demo(cfg: DemoConfig, device: torch.device | str, out_dir: str) -> dict:
    """Train LoRA on the fp32 base and QLoRA on its NF4 copy; save, merge, reload the adapters."""
    probe = progressions(16, cfg.seq_len, cfg.vocab_size, torch.Generator().manual_seed(123)).to(device)
    results = {method: train_and_merge(method, cfg, device, probe, out_dir) for method in ("LoRA", "QLoRA")}
    with torch.no_grad():                                              # a fresh base + the saved adapter
        reloaded = load_adapter(build_base(cfg, device), os.path.join(out_dir, "lora"))
        results["LoRA"]["reload_diff"] = (reloaded(input_ids=probe).logits - results["LoRA"].pop("logits")).abs().max().item()
    results["QLoRA"].pop("logits")
    print_demo(results, out_dir)
    return results


def train_and_merge(method: str, cfg: DemoConfig, device: torch.device | str, probe: torch.Tensor,
                    out_dir: str) -> dict:
    model = build_base(cfg, device)
    if method == "QLoRA":
        nf4.quantize_model(model)                                      # lm_head stays fp32
    torch.manual_seed(cfg.seed)                                        # the same A for both
    apply_lora(model, DEMO_TARGETS, cfg.r, cfg.alpha)
    trainable, total = count_parameters(model)
    t0 = time.perf_counter()
    first, last = train_adapters(model.train(), cfg, device, method)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        logits = model.eval()(input_ids=probe).logits
        eval_loss = lm_loss(model, probe).item()
        save_adapter(model, os.path.join(out_dir, method.lower()))
        report = merge_lora(model)                                      # plain layers again
        merged_loss = lm_loss(model, probe).item()
        merged_diff = (model(input_ids=probe).logits - logits).abs().max().item()
    return dict(trainable=trainable, total=total, first=first, last=last, seconds=seconds, logits=logits,
                eval_loss=eval_loss, merged_loss=merged_loss, merged_diff=merged_diff, report=report)


def print_demo(results: dict, out_dir: str) -> None:
    print("| method | trainable / all params | loss at step 0 | loss, last 10 steps | held-out loss | "
          "held-out loss after merge | max abs logit change by merge |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.1f}%) | "
              f"{r['first']:.3f} | {r['last']:.3f} | {r['eval_loss']:.3f} | {r['merged_loss']:.3f} | "
              f"{r['merged_diff']:.2e} |")
    print("\ntraining time (wall): " + ", ".join(f"{m} {r['seconds']:.1f} s" for m, r in results.items()))
    rep = results["QLoRA"]["report"]
    ratio = sum(v["rounding_rms"] / v["update_rms"] for v in rep.values()) / len(rep)
    print(f"\nQLoRA's merge re-quantized {len(rep)} layers (lm_head stays fp32); the rounding it added has "
          f"{ratio:.2f} x the RMS of the update s B A, on average.")
    print(f"LoRA adapter saved to {os.path.join(out_dir, 'lora')} and loaded into a fresh base: "
          f"max abs logit difference {results['LoRA']['reload_diff']:.2e}")


# ----------------------------------------------------------------------------------------------
# Measuring memory (used by benchmarks/bench_lora.py and vlm_train.py)
# ----------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024       # Linux reports KiB


def return_freed_memory_to_the_os() -> None:
    """Make glibc give large freed blocks back to the OS, so the peak RSS is what was in use.

    By default glibc raises its mmap threshold each time a large block is freed and then serves
    blocks of that size from its heap, which it rarely shrinks. QLoRA frees a dequantized weight
    per layer per step, so the heap would grow by allocator slack, not by data. A fixed threshold
    (mallopt M_MMAP_THRESHOLD, which also turns the adjustment off) keeps large blocks in mmap.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 128 * 1024)                                 # M_MMAP_THRESHOLD = -3
    except (OSError, TypeError, AttributeError):                   # not glibc: nothing to adjust
        pass


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="lora.py", description="LoRA / QLoRA: train adapters, merge them, reload them.",
        epilog="No --train or --resume: the default run is the whole training demo, with no checkpoint to "
               "continue from.")
    # the shared flags, in clip.py's words (tests/test_plumbing.py checks every file's --help says the same)
    parser.add_argument("--out", type=str, default=os.path.join("runs", "lora"),
                        help="run folder: the adapters lora/ and qlora/ in peft's format (default runs/lora)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (seconds): tests and quick checks")
    parser.add_argument("--steps", type=int, default=None, help="training steps of the demo")
    parser.add_argument("--r", type=int, default=None, help="LoRA rank")
    args = parser.parse_args(argv)
    try:
        device = nf4.resolve_device(args.device)
        cfg = DemoConfig.tiny() if args.tiny else DemoConfig()
        overrides = {k: v for k, v in dict(steps=args.steps, r=args.r).items() if v is not None}
        cfg = DemoConfig(**{**asdict(cfg), **overrides, "seed": args.seed})
        check_hparams(cfg.r, cfg.alpha, 0.0)
        if cfg.steps <= 0:
            raise ValueError(f"--steps must be positive, got {cfg.steps}")
        return run_demo(cfg, device, args.out)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()

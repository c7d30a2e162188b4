"""Flow matching: train a continuous normalizing flow by regression, then sample it with an ODE solver.

A flow carries points from a source p_0 (noise, or any 2-D distribution here) to a target p_1 (the data)
by integrating a velocity field,  dx/dt = v_theta(t, x),  x(0) ~ p_0,  x(1) ~ p_1.  A probability path
p_t joins the two, and a field u_t generates it when the continuity equation holds,
d p_t / dt + div(p_t u_t) = 0.  Flow matching (FM) regresses the network on that field:

    L_FM(theta)  = E_{t ~ U[0,1], x ~ p_t} |v_theta(t, x) - u_t(x)|^2             (Lipman et al. 2023, eq. 5)

u_t is unknown, but it is an average of simple conditional fields.  Draw a pair z = (x0, x1) from a
coupling q whose marginals are p_0 and p_1, put a Gaussian conditional path p_t(x | z) = N(mu_t(z),
sigma_t^2 I) between them, and let u_t(x | z) be the field that moves along it.  Then
p_t(x) = E_z p_t(x | z) and u_t(x) = E[u_t(x | z) | x_t = x], and the conditional loss

    L_CFM(theta) = E_{t, z ~ q, x ~ p_t(. | z)} |v_theta(t, x) - u_t(x | z)|^2       (Lipman et al. 2023, eq. 9)

has the same gradient as L_FM (Lipman et al. 2023, Thm 2): the two differ by a constant, because the
best squared-error prediction of u_t(x | z) given x is its conditional mean, u_t(x).  Training is
therefore simulation-free: draw z, t and x_t in closed form, call the network once, regress; no ODE is
solved.  The ODE appears only at sampling time, x(1) = x(0) + int_0^1 v_theta(t, x(t)) dt, solved with
Euler steps or adaptive Runge-Kutta (dopri5); its cost is the number of network calls (NFE).

The three matchers differ only in the coupling q and the path (mu_t, sigma_t):

    fm     Lipman's FM:  x0 ~ N(0, I) is the noise, q = p_0 x p_1 (independent),       (Lipman et al. 2023,
           mu_t = t x1,  sigma_t = 1 - (1 - sigma_min) t,                                sec. 4.1, eq. 20-21)
           x_t = t x1 + (1 - (1 - sigma_min) t) x0,   u_t = x1 - (1 - sigma_min) x0
    icfm   independent CFM (I-CFM): any source, q = p_0 x p_1,                         (Tong et al. 2023,
           x_t = t x1 + (1 - t) x0 + sigma eps,   u_t = x1 - x0                          eq. 14-15)
    otcfm  minibatch OT-CFM: as I-CFM, but each minibatch is paired by the exact
           2-Wasserstein plan,  pi = argmin_pi sum_ij pi_ij |x0_i - x1_j|^2             (Tong et al. 2023, eq. 17;
                                                                                        Pooladian et al. 2023)

Why OT straightens paths.  With independent pairs the straight conditional paths cross: a point x_t
lies on segments heading many ways, so the marginal field E[x1 - x0 | x_t = x] averages directions and
bends, and an ODE solver needs many steps.  The segments of an optimal plan for the squared distance do
not cross at equal times (cyclical monotonicity), so near every x_t runs essentially one segment, the
learned paths are nearly straight, and one or two Euler steps already land on p_1 (see the README's
table).  As the batch grows, minibatch OT approaches the true OT map and the flow the Benamou-Brenier
geodesic.  Entropic OT (Sinkhorn, `--ot sinkhorn`) gives a blurred plan; with reg = 2 sigma^2 it is the
coupling of Tong et al.'s Schrodinger-bridge variant (SB-CFM), whose score term we leave out.

Compared with diffusion.  A diffusion model learns the score of a noising SDE and samples with many
small steps along curved (variance-preserving) paths.  FM keeps Gaussian conditional paths but makes
mean and width move linearly in t (Lipman's "OT path"), trains a plain regression on a velocity, and
samples with a deterministic ODE; I-CFM and OT-CFM also drop the need for a Gaussian source.

Exact OT on a minibatch.  With B source and B target points of equal weight the optimal plan is a
permutation (Birkhoff), so the plan is a linear assignment problem, solved exactly by scipy's
`linear_sum_assignment` (Crouse 2016).  We warm-start it: subtracting any column potential v_j from
the cost changes every permutation's cost by the same sum_j v_j, so the optimum is unchanged, but the
solver's augmenting paths become short when v is close to the optimal dual, and a few Sinkhorn
iterations (Cuturi 2013) get v close.  The result is the exact plan, in a fraction of the time.

Conventions: t = 0 is the source (noise), t = 1 the target (data), as in Lipman et al. and torchcfm.
Points are (B, 2) tensors.  The loss is the mean squared error over points and coordinates.  Under
torchrun the coupling is solved over the global batch gathered from all ranks, not per rank.

Left out: the Schrodinger-bridge score term, likelihoods (instantaneous change of variables), image
U-Nets and guidance.  Try `python flow_matching.py` (a seeded demo in seconds), `--train`, `--compare`.
"""
import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("fm", "icfm", "otcfm")
OT_SOLVERS = ("exact", "sinkhorn")
ODE_SOLVERS = ("dopri5", "euler", "midpoint", "rk4")
NAMES = {"fm": "FM", "icfm": "I-CFM", "otcfm": "OT-CFM"}
DEFAULT_OUT = Path("runs") / "flow_matching"


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

@dataclass
class FlowConfig:
    """Everything a run needs; saved beside the weights as config.json."""
    method: str = "otcfm"          # fm | icfm | otcfm
    source: str = "8gaussians"     # p_0; fm requires "gaussian" (its x0 is the noise)
    target: str = "moons"          # p_1
    sigma: float = 0.0             # path width (icfm/otcfm) or sigma_min (fm); 0 gives straight paths
    ot: str = "exact"              # otcfm coupling: exact assignment, or entropic (Sinkhorn) on torch
    ot_reg: float = 0.01           # Sinkhorn's epsilon as a fraction of the batch's mean squared distance
    width: int = 128               # hidden width of the velocity MLP
    depth: int = 3                 # hidden layers
    time_features: int = 8         # sin/cos pairs of the time embedding
    steps: int = 5000              # optimizer steps
    batch_size: int = 256          # global batch (split across ranks under torchrun)
    lr: float = 2e-3               # peak; warm-up then cosine to 0.  A small MLP on 2-D points tolerates a
                                   # large step; the homework's 2e-4 needs its 100,000 steps to get as far
    warmup: int = 100              # warm-up steps
    weight_decay: float = 0.0      # AdamW's decoupled decay; a 2-D field has nothing to regularise
    seed: int = 0
    prefetch: int = 2              # batches drawn and OT-paired ahead on worker threads (0: inline)
    log_every: int = 50            # loss-log interval (steps)
    ckpt_every: int = 1000         # checkpoint interval (steps); the last step is always saved
    eval_n: int = 1000             # points per W2 estimate (exact assignment: cost grows like n^2..n^3)
    eval_repeats: int = 4          # independent draws averaged, because W2 of a finite sample is noisy

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("ot", self.ot, OT_SOLVERS)
        check_choice("source", self.source, DATASETS)
        check_choice("target", self.target, DATASETS)
        if self.method == "fm" and self.source != "gaussian":
            raise ValueError(f"method fm (Lipman et al.) uses x0 ~ N(0, I) as its noise, so the source must be "
                             f"'gaussian'; got source {self.source!r} (icfm and otcfm accept any source)")
        for name in ("width", "depth", "time_features", "steps", "batch_size", "log_every", "ckpt_every",
                     "eval_n", "eval_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.sigma < 0 or self.ot_reg <= 0 or self.warmup < 0 or self.prefetch < 0:
            raise ValueError(f"need lr > 0, sigma >= 0, ot_reg > 0, warmup >= 0, prefetch >= 0; got lr={self.lr}, "
                             f"sigma={self.sigma}, ot_reg={self.ot_reg}, warmup={self.warmup}, "
                             f"prefetch={self.prefetch}")

    @classmethod
    def tiny(cls, **overrides):
        """Seconds on a CPU: what the demo and the tests run."""
        return cls(**{**dict(width=64, steps=300, batch_size=128, lr=3e-3, warmup=20, log_every=25,
                             ckpt_every=150, eval_n=256, eval_repeats=1), **overrides})

    @classmethod
    def homework(cls, **overrides):
        """The course homework's settings: learning rate 2e-4, batch 64, 100,000 steps."""
        return cls(**{**dict(lr=2e-4, batch_size=64, steps=100_000, warmup=1000, ckpt_every=5000), **overrides})


PRESETS = {"tiny": FlowConfig.tiny, "default": FlowConfig, "homework": FlowConfig.homework}


def check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------------
# 2-D data: each sampler maps (n, generator) to an (n, 2) tensor; any of them can be source or target
# ----------------------------------------------------------------------------------------------------

def _gaussian(n, g):
    return torch.randn(n, 2, generator=g)


def _eight_gaussians(n, g):
    """Eight N(c_k, 0.5^2 I) on a circle of radius 5 (torchcfm's tutorial scale)."""
    angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
    centers = 5.0 * torch.stack([angle.cos(), angle.sin()], 1)                       # (n, 2)
    return centers + 0.5 * torch.randn(n, 2, generator=g)


def _moons(n, g):
    """Two interleaved half circles (scikit-learn's make_moons, noise 0.1), scaled by 3 and centred."""
    upper = torch.rand(n, generator=g) < 0.5
    a = math.pi * torch.rand(n, generator=g)
    arc = torch.where(upper[:, None], torch.stack([a.cos(), a.sin()], 1),
                      torch.stack([1 - a.cos(), 0.5 - a.sin()], 1))                  # (n, 2)
    return 3.0 * (arc + 0.1 * torch.randn(n, 2, generator=g) - torch.tensor([0.5, 0.25]))


def _circles(n, g):
    """Two concentric rings of radius 4 and 2, equally likely."""
    radius = torch.where(torch.rand(n, generator=g) < 0.5, 4.0, 2.0)
    a = 2 * math.pi * torch.rand(n, generator=g)
    return radius[:, None] * torch.stack([a.cos(), a.sin()], 1) + 0.2 * torch.randn(n, 2, generator=g)


def _checkerboard(n, g):
    """Uniform on the 8 dark squares of a 4 x 4 board covering [-4, 4]^2."""
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2                       # row + col even
    corner = torch.stack([col, row], 1).float() * 2 - 4                              # (n, 2)
    return corner + 2 * torch.rand(n, 2, generator=g)


def _spirals(n, g):
    """Two interleaved spiral arms of 1.5 turns, radius up to 4."""
    s = torch.rand(n, generator=g).sqrt()                                            # uniform density along the area
    angle = 3 * math.pi * s
    arm = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
    return (arm * 4 * s)[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.15 * torch.randn(n, 2, generator=g)


DATASETS = {"gaussian": _gaussian, "8gaussians": _eight_gaussians, "moons": _moons, "circles": _circles,
            "checkerboard": _checkerboard, "spirals": _spirals}


def sample_2d(name, n, generator=None, device=None):
    """n points of the named 2-D distribution, (n, 2) float32; seeded when a generator is given."""
    check_choice("dataset", name, DATASETS)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"number of points must be a positive integer, got {n!r}")
    return DATASETS[name](n, generator).to(device)


sample_source = sample_2d   # p_0 and p_1 come from the same menu; the two names say which end a call feeds
sample_target = sample_2d


# ----------------------------------------------------------------------------------------------------
# Optimal transport between two equal-size point clouds
# ----------------------------------------------------------------------------------------------------

def squared_distances(x0, x1):
    """C_ij = |x0_i - x1_j|^2, (B, 2), (B, 2) -> (B, B)."""
    return torch.cdist(x0, x1).square()


def sinkhorn_potential(C, eps_schedule, iters):
    """Column potential v (B,) of entropic OT between uniform marginals, by stabilised Sinkhorn.

    With g = v, the entropic plan is pi_ij = a_i exp((v_j - C_ij) / eps).  Each stage builds that kernel
    with every row divided by its largest entry, so nothing overflows and every row keeps a 1 (Peyre &
    Cuturi 2019, sec. 4.4), runs `iters` Sinkhorn iterations and folds the column scaling into v.
    Decreasing eps across stages (eps-scaling) settles the coarse shape of v first, then the detail.
    """
    v = torch.zeros(C.shape[1], dtype=C.dtype, device=C.device)
    for eps in eps_schedule:
        K = torch.sub(v, C).div_(eps)                                                # (B, B)
        K = K.sub_(K.amax(1, keepdim=True)).exp_()                                   # entries in [0, 1]
        b = torch.ones_like(v)
        for _ in range(iters):
            # a = 1 / (K b), b = 1 / (K^T a): match the row sums, then the column sums (Cuturi 2013, Alg. 1);
            # the uniform marginal 1/B only shifts potentials by a constant, so it is left out.  A column
            # that underflowed to all zeros gets a large finite b instead of 1/0.
            a = K.mv(b).reciprocal_()
            b = K.t().mv(a).clamp_min_(1e-30).reciprocal_()
        # the stage's column potential eps log b joins v
        v = v + eps * b.log()
    return v


def exact_ot_permutation(x0, x1, warm_start=True):
    """cols with x0[i] <-> x1[cols[i]] minimising sum_i |x0_i - x1_cols[i]|^2, exactly.

    For equal-size uniform batches the OT plan is a permutation matrix / B (Birkhoff), found by
    linear assignment.  warm_start only changes the speed: the optimum is the same with or without.
    """
    from scipy.optimize import linear_sum_assignment
    check_pairable(x0, x1)
    C = squared_distances(x0.double(), x1.double())                                 # (B, B)
    if warm_start and len(C) > 1:
        # sum_i (C_i,s(i) - v_s(i)) = cost(s) - sum_j v_j for every permutation s: same argmin, and
        # short augmenting paths once v is near the optimal dual.  float32 is plenty for a first guess;
        # the schedules were tuned on a 2-core CPU (training batches of 256, W2 samples of 1000).
        scale = max(C.mean().item(), 1e-12)
        stages, iters = ((10, 40), 5) if len(C) <= 512 else ((10, 40, 160, 640), 20)
        v = sinkhorn_potential(C.float(), [scale / s for s in stages], iters).double()
        C = C - v if torch.isfinite(v).all() else C      # a failed warm start would only cost time
    _, cols = linear_sum_assignment(C.cpu().numpy())
    return torch.as_tensor(cols, device=x0.device)


def sinkhorn_pairing(x0, x1, reg=0.01, generator=None):
    """cols drawn from the entropic plan: cols[i] ~ pi(i, .) / pi(i, :).sum(), all in torch (CPU or GPU).

    pi_ij = exp((f_i + g_j - C_ij) / eps), so the row-conditional is softmax_j((g_j - C_ij) / eps).
    Unlike the exact plan this can pair one x1 with several x0 (torchcfm draws pairs the same way).
    """
    check_pairable(x0, x1)
    C = squared_distances(x0.float(), x1.float())                                   # (B, B)
    eps = reg * max(C.mean().item(), 1e-12)
    schedule = [eps * 4.0 ** k for k in range(3, -1, -1)]                            # 64 eps, ..., eps
    v = sinkhorn_potential(C, schedule, 20)
    probs = torch.softmax((v - C) / eps, dim=1)                                      # (B, B), rows sum to 1
    if generator is not None:
        probs = probs.to(generator.device)            # draw where the seeded generator lives
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(x0.device)


def wasserstein2(a, b):
    """Exact 2-Wasserstein distance between two equal-size samples: sqrt(min_s mean_i |a_i - b_s(i)|^2)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    cols = exact_ot_permutation(a, b)
    return (a - b[cols]).square().sum(1).mean().sqrt().item()


def check_pairable(x0, x1):
    if x0.dim() != 2 or x0.shape != x1.shape or len(x0) == 0:
        raise ValueError(f"expected two non-empty (B, d) point sets of the same shape, got {tuple(x0.shape)} "
                         f"and {tuple(x1.shape)}")


# ----------------------------------------------------------------------------------------------------
# Probability paths and matchers: sample_location_and_conditional_flow(x0, x1) -> (t, xt, ut)
# ----------------------------------------------------------------------------------------------------

class ConditionalFlowMatcher:
    """I-CFM: independent pairs, x_t = t x1 + (1 - t) x0 + sigma eps, u_t = x1 - x0 (Tong et al. 2023, eq. 14-15)."""
    method = "icfm"

    def __init__(self, sigma=0.0):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def couple(self, x0, x1, generator=None):
        """The coupling q(x0, x1): independent, so the batch stays as drawn."""
        return x0, x1

    def path(self, x0, x1, t, noise=None, generator=None):
        """A point x_t ~ p_t(. | x0, x1) and the conditional field u_t(x_t | x0, x1); t is (B,)."""
        tb = t[:, None]                                                              # (B,) -> (B, 1)
        # mu_t = t x1 + (1 - t) x0
        xt = tb * x1 + (1 - tb) * x0
        if self.sigma > 0:
            noise = torch.randn(x0.shape, generator=generator).to(x0) if noise is None else noise
            xt = xt + self.sigma * noise
        # u_t = d mu_t / dt = x1 - x0 (sigma_t is constant, so the noise does not move)
        return xt, x1 - x0

    def sample_location_and_conditional_flow(self, x0, x1, t=None, generator=None):
        """Couple the batch, draw t ~ U[0, 1] (unless given), return (t, x_t, u_t), each (B,) or (B, 2)."""
        check_pairable(x0, x1)
        if t is None:
            t = torch.rand(len(x0), generator=generator).to(x0)
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(len(x0))
        x0, x1 = self.couple(x0, x1, generator)
        return (t, *self.path(x0, x1, t, generator=generator))


class TargetFlowMatcher(ConditionalFlowMatcher):
    """Lipman's FM with the OT Gaussian path; x0 ~ N(0, I) is the noise (Lipman et al. 2023, eq. 20-21)."""
    method = "fm"

    def path(self, x0, x1, t, noise=None, generator=None):
        tb = t[:, None]                                                              # (B,) -> (B, 1)
        # x_t = mu_t + sigma_t x0,  mu_t = t x1,  sigma_t = 1 - (1 - sigma_min) t
        xt = tb * x1 + (1 - (1 - self.sigma) * tb) * x0
        # u_t(x | x1) = (x1 - (1 - sigma_min) x) / (1 - (1 - sigma_min) t), which at x = x_t is:
        return xt, x1 - (1 - self.sigma) * x0


class OTConditionalFlowMatcher(ConditionalFlowMatcher):
    """OT-CFM: I-CFM on pairs re-drawn from the minibatch OT plan (Tong et al. 2023, eq. 17)."""
    method = "otcfm"

    def __init__(self, sigma=0.0, ot="exact", ot_reg=0.01):
        super().__init__(sigma)
        check_choice("ot", ot, OT_SOLVERS)
        self.ot, self.ot_reg = ot, ot_reg

    def couple(self, x0, x1, generator=None):
        if self.ot == "exact":
            return x0, x1[exact_ot_permutation(x0, x1)]
        return x0, x1[sinkhorn_pairing(x0, x1, self.ot_reg, generator)]


def make_matcher(method, sigma=0.0, ot="exact", ot_reg=0.01):
    check_choice("method", method, METHODS)
    if method == "otcfm":
        return OTConditionalFlowMatcher(sigma, ot, ot_reg)
    return {"fm": TargetFlowMatcher, "icfm": ConditionalFlowMatcher}[method](sigma)


# ----------------------------------------------------------------------------------------------------
# The velocity network v_theta(t, x)
# ----------------------------------------------------------------------------------------------------

class VelocityField(nn.Module):
    """MLP on [x, sin(pi k t), cos(pi k t)] for k = 1 .. time_features, hidden width D = `width`.

    Called as model(t, x), the signature torchdiffeq's odeint expects.
    """

    def __init__(self, width=128, depth=3, time_features=8):
        super().__init__()
        # frequencies pi k: t in [0, 1] then spans k half-periods, so the net sees both slow and fast changes
        self.register_buffer("frequencies", math.pi * torch.arange(1, time_features + 1).float(), persistent=False)
        dims = [2 + 2 * time_features] + [width] * depth
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))   # () or (B,) -> (B,)
        angles = t[:, None] * self.frequencies                                       # (B, time_features)
        features = torch.cat([x, angles.sin(), angles.cos()], 1)                     # (B, 2 + 2 time_features)
        return self.net(features)                                                    # -> (B, D) ... -> (B, 2)


def build_model(cfg):
    torch.manual_seed(cfg.seed)
    return VelocityField(cfg.width, cfg.depth, cfg.time_features)


# ----------------------------------------------------------------------------------------------------
# Sampling: integrate dx/dt = v(t, x) from t = 0 to 1 with torchdiffeq, counting network calls
# ----------------------------------------------------------------------------------------------------

def integrate(model, x0, method="dopri5", steps=None, times=None, atol=1e-5, rtol=1e-5):
    """Solve the flow ODE from x0; returns (x at each of `times`, (T, B, 2); NFE).

    dopri5 is adaptive (atol / rtol; steps must be None); euler, midpoint and rk4 take `steps` equal
    steps.  NFE counts every call of the network, the sampler's real cost.
    """
    from torchdiffeq import odeint
    check_choice("ODE solver", method, ODE_SOLVERS)
    if method == "dopri5" and steps is not None:
        raise ValueError(f"dopri5 chooses its own steps (set atol / rtol); got steps={steps!r}")
    if method != "dopri5" and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"{method} needs a positive integer number of steps, got {steps!r}")
    nfe = 0

    def field(t, x):
        nonlocal nfe
        nfe += 1
        return model(t, x)

    times = torch.tensor([0.0, 1.0]) if times is None else torch.as_tensor(times, dtype=torch.float32)
    times = times.to(x0)
    options = {}
    if method != "dopri5":
        # a grid of steps + 1 points (plus the requested times) makes exactly `steps` solver steps
        grid = torch.linspace(0, 1, steps + 1, dtype=x0.dtype, device=x0.device)
        options = {"grid_constructor": lambda *_: grid}
    with torch.no_grad():
        xs = odeint(field, x0, times, method=method, atol=atol, rtol=rtol, options=options)   # (T, B, 2)
    return xs, nfe


def sample(model, x0, method="dopri5", steps=None):
    """The flow's end points x(1), (B, 2), for source points x0."""
    return integrate(model, x0, method, steps)[0][-1]


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def step_generator(seed, step, stream):
    """A generator seeded by (seed, step, stream): every batch is a pure function of its step number,
    so a resumed run, or one with batches prepared ahead on threads, draws the very same data."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def lr_at(step, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def dist_info():
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_global(x):
    """Concatenate every rank's (b, 2) shard in rank order: (b, 2) -> (world * b, 2)."""
    rank, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def couple_global(matcher, x0g, x1g, b, generator=None):
    """Pair the gathered global batch (B, 2) with one plan and keep this rank's (b, 2) slice.

    Every rank solves the same problem on the same gathered points, so all agree without talking, and
    the plan of B points is better than W separate plans of B / W points: that is what the flow learns.
    """
    rank, _ = dist_info()
    x0g, x1g = matcher.couple(x0g, x1g, generator)
    return x0g[rank * b:(rank + 1) * b], x1g[rank * b:(rank + 1) * b]


def draw_batch(cfg, step, device):
    """This rank's shard of step `step`: source and target points, times t; gathered for the coupling."""
    rank, world = dist_info()
    b = cfg.batch_size // world
    g = step_generator(cfg.seed, step, 1 + rank)
    x0 = sample_2d(cfg.source, b, g, device)
    x1 = sample_2d(cfg.target, b, g, device)
    t = torch.rand(b, generator=g).to(device)
    # one more generator shared by all ranks, for a random coupling (Sinkhorn) that must agree
    return gather_global(x0), gather_global(x1), t, g, step_generator(cfg.seed, step, 0)


def pair_batch(matcher, drawn):
    """Solve the coupling of a drawn batch; runs on a worker thread.  Returns (x0, x1, t, generator)."""
    x0g, x1g, t, g, shared = drawn
    return (*couple_global(matcher, x0g, x1g, len(t), shared), t, g)


def paired_batches(cfg, matcher, device, start, stop):
    """Yield (x0, x1, t, generator) for steps start .. stop - 1, prepared cfg.prefetch steps ahead.

    The coupling depends only on the data, never on theta, so it is data preparation: the OT of batch
    k + 1 is solved on a worker thread (scipy and torch release the GIL) while the net trains on batch k.
    Under torchrun the drawing and gathering stay on the main thread, so that collectives keep the same
    order on every rank; alone, the workers draw too.
    """
    if cfg.prefetch == 0:
        for step in range(start, stop):
            yield pair_batch(matcher, draw_batch(cfg, step, device))
        return
    alone = dist_info()[1] == 1

    def submit(pool, step):
        if alone:
            return pool.submit(lambda: pair_batch(matcher, draw_batch(cfg, step, device)))
        return pool.submit(pair_batch, matcher, draw_batch(cfg, step, device))

    with ThreadPoolExecutor(cfg.prefetch) as pool:
        pending = collections.deque()
        for step in range(start, stop):
            while len(pending) <= cfg.prefetch and step + len(pending) < stop:
                pending.append(submit(pool, step + len(pending)))
            yield pending.popleft().result()


def train_step(model, optimizer, matcher, x0, x1, t, lr, generator=None):
    """One regression step on coupled pairs: L = mean |v_theta(t, x_t) - u_t(x_t | x0, x1)|^2."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    xt, ut = matcher.path(x0, x1, t, generator=generator)
    loss = F.mse_loss(model(t, xt), ut)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                                   # DDP averages the gradients over ranks here
    optimizer.step()
    return loss.detach()


def make_optimizer(model, cfg):
    """AdamW; its fused kernel (one op for all parameters, CPU or GPU) where this torch has one."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg, out_dir, device="cpu", resume=False, stop_at=None, progress=True):
    """Train (or resume) a flow; checkpoints go to out_dir.  Returns the model (unwrapped) and loss log.

    Under torchrun each rank trains a DDP replica on its shard; rank 0 writes the checkpoints.
    stop_at ends this call early (a checkpoint is written), as an interruption would.
    """
    from tqdm import tqdm
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    out_dir = Path(out_dir)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    start, losses = 0, []
    if resume:
        start, losses = load_checkpoint(out_dir, model, optimizer, cfg, device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    matcher = make_matcher(cfg.method, cfg.sigma, cfg.ot, cfg.ot_reg)
    stop = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    bar = tqdm(total=stop, initial=start, disable=not progress or rank != 0, dynamic_ncols=True,
               desc=f"{NAMES[cfg.method]} {cfg.source} -> {cfg.target}")
    running, done = [], start
    batches = paired_batches(cfg, matcher, device, start, stop)
    try:
        for step, (x0, x1, t, g) in zip(range(start, stop), batches):
            running.append(train_step(net, optimizer, matcher, x0, x1, t, lr_at(step, cfg), g))
            done = step + 1
            if len(running) == cfg.log_every or done == stop:
                losses.append([done, mean_over_ranks(torch.stack(running).mean())])
                running = []
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", lr=f"{lr_at(step, cfg):.1e}")
            bar.update(1)
            if done % cfg.ckpt_every == 0 and done < stop:
                save_checkpoint(out_dir, model, optimizer, cfg, done, losses)
    except KeyboardInterrupt:
        save_checkpoint(out_dir, model, optimizer, cfg, done, losses)
        raise
    finally:
        bar.close()
        batches.close()
    save_checkpoint(out_dir, model, optimizer, cfg, stop, losses)
    return model, losses


def mean_over_ranks(x):
    _, world = dist_info()
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.item()


# ----------------------------------------------------------------------------------------------------
# Checkpoints: model.safetensors + train_state.safetensors (AdamW moments) + json, written atomically
# ----------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that is missing pieces, corrupt, or from another configuration."""


def atomic_write(path, write):
    """Write through a temporary file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)                          # mkstemp makes 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(out_dir, model, optimizer, cfg, step, losses):
    """Rank 0 writes train state, then weights, then config.json, which names the step: the commit record."""
    from safetensors.torch import save_file
    if dist_info()[0] != 0:
        return
    out_dir = Path(out_dir)
    names = {p: n for n, p in model.named_parameters()}
    moments = {f"{names[p]}.{k}": v.detach().cpu().reshape(-1) if k == "step" else v.detach().cpu()
               for p, state in optimizer.state.items() for k, v in state.items()}
    atomic_write(out_dir / "train_state.safetensors", lambda tmp: save_file(moments, tmp))
    write_json(out_dir / "train_state.json", {"step": step, "losses": losses})
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(weights, tmp))
    write_json(out_dir / "config.json", {"format": "flow_matching", "step": step, "config": asdict(cfg)})


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path} (train one with `python flow_matching.py --train "
                                f"--out {path.parent}`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: {e}") from None


def read_tensors(path, device="cpu"):
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        return load_file(path, device=str(device))
    except Exception as e:                            # safetensors raises its own error type for bad headers
        raise CheckpointError(f"corrupt checkpoint file {path}: {e}") from None


def check_keys(path, found, expected):
    """Strict loading: every expected tensor present with its shape, nothing else."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}, "
                              f"wrong shape {wrong}")


def load_config(out_dir):
    """The FlowConfig and step recorded in out_dir/config.json."""
    meta = read_json(Path(out_dir) / "config.json")
    if meta.get("format") != "flow_matching" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{Path(out_dir) / 'config.json'} is not a flow_matching checkpoint config")
    known = {f.name for f in fields(FlowConfig)}
    unknown = sorted(set(meta["config"]) - known)
    if unknown:
        raise CheckpointError(f"{Path(out_dir) / 'config.json'} has unknown settings {unknown}")
    return FlowConfig(**meta["config"]), meta.get("step", 0)


def load_model(out_dir, device="cpu"):
    """The trained VelocityField in out_dir, in eval mode; its FlowConfig is model.config."""
    cfg, _ = load_config(out_dir)
    model = VelocityField(cfg.width, cfg.depth, cfg.time_features).to(device)
    path = Path(out_dir) / "model.safetensors"
    tensors = read_tensors(path, device)
    check_keys(path, tensors, model.state_dict())
    model.load_state_dict(tensors)
    model.config = cfg
    return model.eval()


def load_checkpoint(out_dir, model, optimizer, cfg, device):
    """Restore weights and AdamW moments for --resume; returns (step, loss log)."""
    saved, step = load_config(out_dir)
    differ = {k: (getattr(saved, k), getattr(cfg, k)) for k in ("method", "source", "target", "sigma", "ot",
                                                                 "width", "depth", "time_features", "seed",
                                                                 "batch_size")
              if getattr(saved, k) != getattr(cfg, k)}
    if differ:
        raise CheckpointError(f"cannot resume {out_dir} with different settings (saved, requested): {differ}")
    state = read_json(Path(out_dir) / "train_state.json")
    if state.get("step") != step:
        raise CheckpointError(f"{out_dir}: train_state.json is at step {state.get('step')} but config.json at "
                              f"step {step}; the checkpoint was interrupted while being written")
    weights_path = Path(out_dir) / "model.safetensors"
    weights = read_tensors(weights_path, device)
    check_keys(weights_path, weights, model.state_dict())
    model.load_state_dict(weights)
    moments_path = Path(out_dir) / "train_state.safetensors"
    moments = read_tensors(moments_path, device)
    names = dict(model.named_parameters())
    expected = {f"{n}.{k}": t for n, p in names.items() for k, t in
                (("step", torch.zeros(1)), ("exp_avg", p), ("exp_avg_sq", p))} if moments else {}
    check_keys(moments_path, moments, expected)
    by_index = {i: {k: (moments[f"{n}.{k}"].reshape(()).cpu() if k == "step" else moments[f"{n}.{k}"])
                    for k in ("step", "exp_avg", "exp_avg_sq")}
                for i, n in enumerate(names) if moments}
    optimizer.load_state_dict({"state": by_index, "param_groups": optimizer.state_dict()["param_groups"]})
    return step, state.get("losses", [])


# ----------------------------------------------------------------------------------------------------
# Evaluation: exact W2 to the target, next to the noise floor W2(target sample, another target sample)
# ----------------------------------------------------------------------------------------------------

SOLVER_GRID = (("dopri5", None), ("euler", 1), ("euler", 2), ("euler", 10))


def evaluate(model, cfg, device="cpu", solvers=SOLVER_GRID, seed=12345):
    """W2 between flow samples and a target sample, per solver, averaged over cfg.eval_repeats draws.

    The noise floor is W2 between two independent target samples of the same size: a perfect model
    scores about that, not 0, because a finite sample is never its distribution.
    """
    model.eval()
    floor, scores, nfes = [], collections.defaultdict(list), collections.defaultdict(list)
    for r in range(cfg.eval_repeats):
        g = step_generator(seed, r, 0)
        x0 = sample_2d(cfg.source, cfg.eval_n, g, device)
        reference = sample_2d(cfg.target, cfg.eval_n, g, device)
        floor.append(wasserstein2(sample_2d(cfg.target, cfg.eval_n, g, device), reference))
        for method, steps in solvers:
            xs, nfe = integrate(model, x0, method, steps)
            scores[(method, steps)].append(wasserstein2(xs[-1], reference))
            nfes[(method, steps)].append(nfe)
    return {"floor": (float(np.mean(floor)), float(np.std(floor))), "n": cfg.eval_n, "repeats": cfg.eval_repeats,
            "rows": [{"solver": m, "steps": s, "nfe": round(float(np.mean(nfes[(m, s)]))), "w2": float(np.mean(scores[(m, s)])),
                      "ratio": float(np.mean(scores[(m, s)]) / np.mean(floor))} for m, s in solvers]}


def solver_label(row):
    if row["solver"] == "dopri5":
        return "dopri5 (atol = rtol = 1e-5)"
    return f"{row['solver']}, {row['steps']} step{'s' * (row['steps'] > 1)}"


def results_table(results):
    """Markdown table: one column group per trained method."""
    names = list(results)
    head = "| solver | " + " | ".join(f"{NAMES[m]} NFE | {NAMES[m]} W2 | {NAMES[m]} W2 / floor" for m in names) + " |"
    rule = "|---|" + "---:|---:|---:|" * len(names)
    lines = [head, rule]
    for i, row in enumerate(results[names[0]]["rows"]):
        cells = [f"{r['rows'][i]['nfe']} | {r['rows'][i]['w2']:.3f} | {r['rows'][i]['ratio']:.2f}x"
                 for r in results.values()]
        lines.append(f"| {solver_label(row)} | " + " | ".join(cells) + " |")
    any_result = results[names[0]]
    mean, std = any_result["floor"]
    lines.append(f"\nnoise floor W2(target, another target sample) = {mean:.3f} +- {std:.3f} "
                 f"(n = {any_result['n']} points, mean of {any_result['repeats']} draw{'s' * (any_result['repeats'] > 1)})")
    return "\n".join(lines)


def quality_line(result, goal=1.5):
    """Our bar for a good run: 2 Euler steps within 1.5x of the noise floor."""
    row = next(r for r in result["rows"] if r["solver"] == "euler" and r["steps"] == 2)
    verdict = "met" if row["ratio"] <= goal else "NOT met"
    rough = " (a rough check: few points, one draw)" if result["n"] < 1000 or result["repeats"] < 2 else ""
    return f"quality goal, W2 with 2 Euler steps <= {goal}x noise floor: {row['ratio']:.2f}x, {verdict}{rough}"


# ----------------------------------------------------------------------------------------------------
# Pictures (pillow): target vs generated points, and trajectories, one column per method
# ----------------------------------------------------------------------------------------------------

def draw_figure(columns, path, size=340):
    """columns: list of (title, panels); each panel (caption, target (n, 2) or None, points (n, 2), paths
    (T, m, 2) or None).  One column per method, one row per panel, saved as a PNG at `path`."""
    from PIL import Image, ImageDraw
    rows = max(len(panels) for _, panels in columns)
    head, caption_h, gap = 28, 24, 6
    image = Image.new("RGB", (size * len(columns) + gap * (len(columns) - 1), head + rows * (size + caption_h)),
                      "white")
    everything = torch.cat([p.reshape(-1, 2) for _, panels in columns for panel in panels
                            for p in panel[1:] if p is not None])
    lo, hi = everything.quantile(0.002, 0).tolist(), everything.quantile(0.998, 0).tolist()
    half = max(hi[0] - lo[0], hi[1] - lo[1]) / 2 * 1.1
    centre = ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2)

    def to_px(xy):                                    # data coordinates -> panel pixels, y up
        x = (xy[:, 0] - centre[0] + half) / (2 * half) * size
        y = (centre[1] + half - xy[:, 1]) / (2 * half) * size
        return torch.stack([x, y], 1).tolist()

    def dots(draw, points, color, r=1.4):
        for x, y in to_px(points):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)

    page = ImageDraw.Draw(image)
    for c, (title, panels) in enumerate(columns):
        ox = c * (size + gap)
        centred_text(page, (ox + size / 2, head / 2), title, 15)
        for r, (caption, target, points, paths) in enumerate(panels):
            panel = Image.new("RGB", (size, size), "white")       # its own canvas: nothing spills over
            draw = ImageDraw.Draw(panel, "RGBA")
            if target is not None:
                dots(draw, target, (170, 170, 170, 140))
            if paths is not None:
                for line in paths.transpose(0, 1):    # (T, m, 2) -> m polylines of T points
                    draw.line([tuple(p) for p in to_px(line)], fill=(128, 128, 0, 90), width=1)
                dots(draw, paths[0], (0, 0, 0, 200))
            dots(draw, points, (31, 119, 180, 170))
            draw.rectangle([0, 0, size - 1, size - 1], outline=(190, 190, 190))
            oy = head + r * (size + caption_h)
            image.paste(panel, (ox, oy))
            centred_text(page, (ox + size / 2, oy + size + caption_h / 2), caption, 12)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def centred_text(draw, xy, text, size):
    """Text centred on xy; pillow's scalable default font when FreeType is there, its bitmap font if not."""
    from PIL import ImageFont
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2 - top), text, fill="black", font=font)


def method_panels(model, cfg, result, device="cpu", n=1500, n_paths=300, seed=777):
    """Three panels for one model: dopri5 samples, 2 Euler steps samples (both over the target in grey),
    and dopri5 trajectories from source (black) to end (blue)."""
    g = step_generator(seed, 0, 0)
    x0 = sample_2d(cfg.source, n, g, device)
    target = sample_2d(cfg.target, n, g).cpu()
    row = {(r["solver"], r["steps"]): r for r in result["rows"]}
    ode, nfe = integrate(model, x0, "dopri5")
    euler = sample(model, x0, "euler", 2)
    paths, _ = integrate(model, x0[:n_paths], "dopri5", times=torch.linspace(0, 1, 21))
    w2 = lambda key: f"W2 {row[key]['w2']:.2f} ({row[key]['ratio']:.2f}x floor)" if key in row else ""
    return [(f"dopri5, NFE {nfe}   {w2(('dopri5', None))}", target, ode[-1].cpu(), None),
            (f"2 Euler steps   {w2(('euler', 2))}", target, euler.cpu(), None),
            ("trajectories (dopri5): source -> end", None, paths[-1].cpu(), paths.cpu())]


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA GPU")
    return name


def setup_distributed(device):
    """Join the torchrun process group when launched by torchrun; returns (device, created_here)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device, True


def config_from_args(args):
    """Preset, then every flag the user actually gave."""
    overrides = {f.name: getattr(args, f.name) for f in fields(FlowConfig)
                 if getattr(args, f.name, None) is not None}
    if args.method == "fm" and args.source is None:
        overrides["source"] = "gaussian"             # FM's source is N(0, I) by definition
    return PRESETS[args.preset](**overrides)


def run_and_report(cfg, out_dir, device, resume=False, figure=None):
    """Train one method, evaluate, print the table, draw the picture; returns (model, result)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    model, losses = train(cfg, out_dir, device, resume=resume)
    rank, _ = dist_info()
    if rank != 0:
        return model, None
    train_wall = time.perf_counter() - t_wall
    first, last = losses[0][1], losses[-1][1]
    print(f"\n{NAMES[cfg.method]} {cfg.source} -> {cfg.target}: {cfg.steps} steps, batch {cfg.batch_size}, "
          f"width {cfg.width}, lr {cfg.lr:g}; loss {first:.4f} (step {losses[0][0]}) -> {last:.4f} "
          f"(step {losses[-1][0]}); training took {train_wall:.1f} s")
    result = evaluate(model, cfg, device)
    write_json(Path(out_dir) / "metrics.json", result)
    if figure is not False:
        draw_figure([(f"{NAMES[cfg.method]}: {cfg.source} -> {cfg.target}", method_panels(model, cfg, result, device))],
                    figure or Path(out_dir) / "samples.png")
    print(f"\n{results_table({cfg.method: result})}\n{quality_line(result)}")
    print(f"total {time.perf_counter() - t_wall:.1f} s wall, {time.process_time() - t_cpu:.1f} s CPU (this process)")
    return model, result


def cmd_train(args, device):
    cfg = config_from_args(args)
    out_dir = Path(args.out or DEFAULT_OUT / cfg.method)
    if args.resume:
        # --resume keeps the saved settings; only --steps (a longer schedule) may change
        cfg = replace(load_config(out_dir)[0], **({"steps": args.steps} if args.steps else {}))
    run_and_report(cfg, out_dir, device, resume=args.resume)
    if dist_info()[0] == 0:
        print_files(out_dir, ["model.safetensors", "config.json", "train_state.safetensors", "train_state.json",
                              "metrics.json", "samples.png"])


def cmd_compare(args, device):
    """Train I-CFM and OT-CFM with the same settings and seed; one table and one picture for both."""
    cfg = config_from_args(args)
    out_root = Path(args.out or DEFAULT_OUT / "compare")
    models, results = {}, {}
    for method in ("icfm", "otcfm"):
        run_cfg = replace(cfg, method=method)
        models[method], results[method] = run_and_report(run_cfg, out_root / method, device, figure=False)
    if dist_info()[0] != 0:
        return
    print(f"\nI-CFM vs OT-CFM, same data, seed and steps:\n\n{results_table(results)}")
    figure = Path(args.figure or out_root / "icfm_vs_otcfm.png")
    columns = [(f"{NAMES[m]}: {cfg.source} -> {cfg.target}", method_panels(models[m], replace(cfg, method=m),
                                                                          results[m], device)) for m in models]
    print(f"\npicture: {draw_figure(columns, figure)}")


def cmd_sample(args, device):
    """Draw from a trained model: points, NFE, W2 against a fresh target sample, picture."""
    from safetensors.torch import save_file
    out_dir = Path(args.out or DEFAULT_OUT / "otcfm")
    model = load_model(out_dir, device)
    cfg = model.config
    method = args.solver or "dopri5"
    steps = 2 if method != "dopri5" and args.solver_steps is None else args.solver_steps
    n = args.n or cfg.eval_n
    g = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
    x0 = sample_2d(cfg.source, n, g, device)
    xs, nfe = integrate(model, x0, method, steps)
    w2 = wasserstein2(xs[-1], sample_2d(cfg.target, n, g, device))
    floor = wasserstein2(sample_2d(cfg.target, n, g, device), sample_2d(cfg.target, n, g, device))
    name = f"samples_{method}{'' if steps is None else steps}"
    atomic_write(out_dir / f"{name}.safetensors",
                 lambda tmp: save_file({"x0": x0.cpu().contiguous(), "x1": xs[-1].cpu().contiguous()}, tmp))
    draw_figure([(f"{NAMES[cfg.method]}: {method}{'' if steps is None else f', {steps} steps'}",
                  [(f"NFE {nfe}, W2 {w2:.3f} (floor {floor:.3f})", sample_2d(cfg.target, n, g), xs[-1].cpu(), None)])],
                out_dir / f"{name}.png")
    print(f"{n} points from {out_dir} with {method}"
          f"{'' if steps is None else f' ({steps} steps)'}: NFE {nfe}, W2 to a fresh target sample {w2:.3f}, "
          f"noise floor {floor:.3f} ({w2 / floor:.2f}x)")
    print_files(out_dir, [f"{name}.safetensors", f"{name}.png"])


def cmd_demo(args, device):
    """The no-flag demo: tiny OT-CFM in seconds, seeded, numbers to check."""
    cfg = FlowConfig.tiny(seed=args.seed or 0)
    out_dir = Path(args.out or DEFAULT_OUT / "demo")
    print("flow_matching.py demo: OT-CFM, 8 Gaussians -> two moons, tiny network, 300 steps "
          "(the full run is `python flow_matching.py --train`)")
    run_and_report(cfg, out_dir, device)
    print_files(out_dir, ["model.safetensors", "config.json", "samples.png"])


def print_files(out_dir, names):
    print(f"\nfiles in {out_dir}/: " + ", ".join(n for n in names if (Path(out_dir) / n).exists()))


def build_parser():
    p = argparse.ArgumentParser(
        prog="flow_matching.py",
        description="Conditional and optimal-transport flow matching on 2-D data. Without a mode flag: "
                    "a seeded demo of a few seconds.",
        epilog="examples:  python flow_matching.py --train | --train --method icfm | --compare --figure "
               "assets/flow_matching_icfm_vs_otcfm.png | --sample --out runs/flow_matching/otcfm --solver euler "
               "--solver-steps 2 | torchrun --nproc_per_node 2 flow_matching.py --train")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="train one flow, evaluate it, draw it")
    mode.add_argument("--compare", action="store_true", help="train I-CFM and OT-CFM alike; table + side-by-side PNG")
    mode.add_argument("--sample", action="store_true", help="draw from the model in --out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting settings: tiny (seconds), default (about a minute on CPU), homework "
                        "(lr 2e-4, batch 64, 100,000 steps); flags below override them")
    p.add_argument("--method", choices=METHODS, default=None, help="fm | icfm | otcfm (default otcfm)")
    p.add_argument("--source", choices=sorted(DATASETS), default=None, help="p_0 (default 8gaussians; fm: gaussian)")
    p.add_argument("--target", choices=sorted(DATASETS), default=None, help="p_1 (default moons)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 5000)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="global batch (default 256)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    p.add_argument("--sigma", type=float, default=None, help="path width / sigma_min (default 0)")
    p.add_argument("--width", type=int, default=None, help="hidden width of the MLP (default 128)")
    p.add_argument("--ot", choices=OT_SOLVERS, default=None, help="OT-CFM coupling (default exact)")
    p.add_argument("--prefetch", type=int, default=None, help="batches OT-paired ahead on threads (default 2)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--out", type=str, default=None, help="run directory (default runs/flow_matching/<method>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--figure", type=str, default=None, help="--compare: where to write the side-by-side PNG")
    p.add_argument("--solver", choices=ODE_SOLVERS, default=None, help="--sample: ODE solver (default dopri5)")
    p.add_argument("--solver-steps", dest="solver_steps", type=int, default=None,
                   help="--sample: steps of euler / midpoint / rk4 (default 2)")
    p.add_argument("--n", type=int, default=None, help="--sample: number of points (default the run's eval_n)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    created = False
    try:
        device, created = setup_distributed(pick_device(args.device))
        if device == "cpu":
            # one intra-op thread per Python thread: the network's matrices are small, and the second
            # core is better spent on the OT pairing of the next batches (cfg.prefetch worker threads)
            torch.set_num_threads(1)
        if args.train:
            cmd_train(args, device)
        elif args.compare:
            cmd_compare(args, device)
        elif args.sample:
            cmd_sample(args, device)
        else:
            cmd_demo(args, device)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted: a checkpoint was saved; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

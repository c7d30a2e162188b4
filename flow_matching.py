"""Flow matching: train a continuous normalizing flow by regression, then sample it with an ODE solver.

A flow carries points from a source p_0 (noise, or any 2-D distribution here) to the data p_1 by
integrating a velocity field, dx/dt = v_theta(t, x), x(0) ~ p_0.  Flow matching regresses v_theta on a
field known to carry p_0 to p_1; only sampling solves the ODE.  The derivation, step by step
(Lipman et al. 2023, sec. 2-4; Tong et al. 2023, sec. 3):

1. Continuity equation.  A field u_t moves a density p_t exactly when  d p_t / dt + div(p_t u_t) = 0
   (mass is conserved: what a region loses flows out through its boundary).  Then integrating
   dx/dt = u_t(x) from x(0) ~ p_0 gives x(t) ~ p_t for every t, and x(1) ~ p_1.
2. The marginal loss  L_FM = E_{t ~ U[0,1], x ~ p_t} |v_theta(t, x) - u_t(x)|^2  (Lipman eq. 5) would
   teach that field, but for a path p_t between p_0 and the data neither p_t nor u_t is known.
3. Conditional paths.  Draw a pair z = (x0, x1) from a coupling q whose marginals are p_0 and p_1 and
   join its two ends by a Gaussian path p_t(x | z) = N(mu_t(z), sigma_t(z)^2 I).  The field that moves
   it is u_t(x | z) = sigma_t'/sigma_t (x - mu_t) + mu_t'  (Lipman Thm 3): at x_t = mu_t + sigma_t eps
   it is simply d x_t / dt.  Averaged over z, p_t(x) = E_z p_t(x | z) and
   u_t(x) = E[u_t(x_t | z) | x_t = x]  solve the continuity equation together, because it is linear in
   (p, p u) (Lipman Thm 1).  This marginal pair is the path the flow learns.
4. Same gradient (Lipman Thm 2).  L_CFM = E_{t, z ~ q, x_t ~ p_t(. | z)} |v_theta(t, x_t) - u_t(x_t | z)|^2.
   Expand both squares.  The |v_theta|^2 terms agree (x_t has the marginal law p_t in both); the cross
   terms agree by the tower rule, E <v_theta, u_t(x_t | z)> = E <v_theta, E[u_t(x_t | z) | x_t]>
   = E <v_theta, u_t(x_t)>; the rest does not depend on theta.  So grad L_CFM = grad L_FM: regressing on
   conditional targets learns their conditional mean, the marginal field.  Training is simulation-free:
   draw z, t and x_t in closed form, call the network once, no ODE.
5. The matchers below differ only in q and the path (x0 ~ p_0, x1 ~ p_1, eps ~ N(0, I)):
     fm     Lipman's "OT path": x0 is the noise N(0, I), q independent,        (Lipman eq. 20-21)
            mu_t = t x1, sigma_t = 1 - (1 - sigma_min) t
     icfm   any source, q independent, mu_t = t x1 + (1 - t) x0, sigma_t = sigma    (Tong eq. 14-15)
     otcfm  as icfm, but q = the minibatch 2-Wasserstein plan                      (Tong eq. 17)
     sbcfm  q = the entropic OT plan with eps = 2 sigma^2,                         (Tong SB-CFM)       
            sigma_t = sigma sqrt(t (1 - t)): a Brownian bridge between the pair
     vp     diffusion's variance-preserving path written as an FM path            (Lipman sec. 4.1, eq. 19)
6. Why OT straightens paths.  Independent pairs give segments x0 -> x1 that cross: many directions pass
   through one x_t, their average u_t(x) bends, the ODE's trajectories curve, and a solver needs many
   steps.  The segments of an optimal plan for the squared distance do not cross at equal times (cyclical
   monotonicity), so near each x_t runs essentially one segment: nearly straight trajectories, and one or
   two Euler steps land on p_1.  As the batch grows, minibatch OT approaches the OT map (Pooladian et al.
   2023) and the flow the displacement interpolation of Benamou-Brenier.
7. Diffusion as the contrast.  A VP diffusion (Song et al. 2021) noises data by an SDE with schedule
   beta(s); its conditional marginals are the Gaussian path mu_t = alpha_{1-t} x1, sigma_t^2 =
   1 - alpha_{1-t}^2, alpha_s = exp(-int_0^s beta / 2), in our time (t = 1 is data).  A diffusion model
   learns the score grad log p_t (or the noise eps) and samples by the reverse SDE or its probability-
   flow ODE; for a Gaussian path the two targets convert into each other, u_t(x | z) = mu_t' -
   sigma_t' sigma_t grad_x log p_t(x | z).  What still differs: the path, the loss's weighting over t
   (an eps-loss is a velocity loss times a function of t) and the sampler (reverse SDE or ODE).  Each
   VP pair travels an arc (alpha^2 + sigma^2 = 1) at a varying speed (alpha_{1-t} is 0.28 at t = 0.5,
   0.81 at t = 0.8), which Euler steps of equal size cut short.  FM's OT path moves each pair along a
   line at constant speed, but with independent pairs the marginal paths still bend (step 6), and on
   2-D data that is the larger effect: `--compare-diffusion` (the README's table) finds FM's OT path no
   better than the VP path at 1 to 8 Euler steps, and OT-CFM, whose marginal paths are nearly straight
   (dopri5 still spends about 60 network calls on them), within 1.5x of the noise floor from 1 step.
8. Likelihood: log p_1(x) = log p_0(x(0)) - int_0^1 div v(t, x(t)) dt, x(0) by solving the ODE backward
   from x (Chen et al. 2018, eq. 4); Hutchinson's estimate of div for high dimension (FFJORD).
9. Guidance: one network learns v(t, x, c) and, with labels dropped, v(t, x); sampling follows
   v_w = (1 - w) v(t, x, empty) + w v(t, x, c)  (Ho & Salimans 2022; Zheng et al. 2023).
10. Rectified flow = I-CFM with sigma = 0; reflow retrains it on the pairs (x0, Z_1(x0)) of its own ODE,
   which straightens the paths (Liu et al. 2023).  Details at each section below.

Exact OT on a minibatch.  With B source and B target points of equal weight the optimal plan is a
permutation (Birkhoff), so it is a linear assignment, solved exactly by scipy (Crouse 2016) and warm-
started with Sinkhorn potentials (Cuturi 2013), which changes the speed, not the answer.

Conventions: t = 0 is the source (noise), t = 1 the target (data), as in Lipman et al. and torchcfm.
Points are (B, 2) tensors.  The loss is F.mse_loss, the mean over the B points and their 2
coordinates (as torchcfm's examples compute it): half of L_CFM's mean of |.|^2.  Left out: SB-CFM's
learned score term, image U-Nets, guidance by a separate classifier, and training by likelihood.
Try `python flow_matching.py` (a seeded demo in seconds), `--train`, `--compare`, `--compare-diffusion`,
`--likelihood`, `--guidance`, `--reflow`.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("fm", "icfm", "otcfm", "sbcfm", "vp")
OT_SOLVERS = ("exact", "sinkhorn")
ODE_SOLVERS = ("dopri5", "euler", "midpoint", "rk4")
NAMES = {"fm": "FM", "icfm": "I-CFM", "otcfm": "OT-CFM", "sbcfm": "SB-CFM", "vp": "VP diffusion path"}
NOISE_SOURCE = ("fm", "vp")         # methods whose x0 is the noise N(0, I) by definition


@dataclass
class FlowConfig:
    """Everything a run needs; saved in each checkpoint as config.json."""
    method: str = "otcfm"          # fm | icfm | otcfm | sbcfm | vp
    source: str = "8gaussians"     # p_0; fm and vp require "gaussian" (their x0 is the noise)
    target: str = "moons"          # p_1
    sigma: float = 0.0             # path width of icfm / otcfm, sigma of sbcfm (must be > 0 there)
    sigma_min: float = 0.0         # fm only: the width left at t = 1 (Lipman's sigma_min)
    ot: str = "exact"              # otcfm coupling: exact assignment, or entropic (Sinkhorn) on torch
    ot_reg: float = 0.01           # otcfm with ot=sinkhorn: eps as a fraction of the batch's mean squared
                                   # distance (sbcfm does not use it: its eps is 2 sigma^2, absolute)
    width: int = 128               # D, hidden width of the velocity MLP
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

    def __post_init__(self) -> None:
        check_config(self)          # in the plumbing at the end of the file

    @classmethod
    def tiny(cls, **overrides: object) -> FlowConfig:
        """Seconds on a CPU: what the demo and the tests run."""
        return cls(**{**dict(width=64, steps=300, batch_size=128, lr=3e-3, warmup=20, log_every=25,
                             ckpt_every=150, eval_n=256, eval_repeats=1), **overrides})

    @classmethod
    def homework(cls, **overrides: object) -> FlowConfig:
        """The course homework's settings: learning rate 2e-4, batch 64, 100,000 steps."""
        return cls(**{**dict(lr=2e-4, batch_size=64, steps=100_000, warmup=1000, ckpt_every=5000), **overrides})


# ----------------------------------------------------------------------------------------------------
# Conditional probability paths: x_t ~ p_t(. | x0, x1) and the field u_t(x_t | x0, x1) that moves it.
# Each is a Gaussian path x_t = mu_t + sigma_t eps, and u_t = d x_t / dt along it (step 3 above).
# t is (B,), points are (B, 2).
# ----------------------------------------------------------------------------------------------------

def icfm_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma: float = 0.0,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """I-CFM's path (Tong et al. 2023, eq. 14-15): a straight segment, widened by a constant sigma."""
    tb = t[:, None]                                                              # (B,) -> (B, 1)
    # mu_t = t x1 + (1 - t) x0,  x_t = mu_t + sigma eps
    xt = tb * x1 + (1 - tb) * x0
    if sigma > 0:
        xt = xt + sigma * noise
    # u_t = mu_t' = x1 - x0  (sigma_t is constant, so the noise does not move)
    return xt, x1 - x0


def fm_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
            sigma_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lipman's OT path (Lipman et al. 2023, eq. 20-21); x0 ~ N(0, I) plays the role of eps."""
    tb = t[:, None]                                                              # (B,) -> (B, 1)
    # mu_t = t x1,  sigma_t = 1 - (1 - sigma_min) t,  x_t = mu_t + sigma_t x0
    xt = tb * x1 + (1 - (1 - sigma_min) * tb) * x0
    # u_t(x | x1) = (x1 - (1 - sigma_min) x) / (1 - (1 - sigma_min) t), which at x = x_t is:
    return xt, x1 - (1 - sigma_min) * x0


def sb_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma: float,
            noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SB-CFM's path (Tong et al. 2023, sec. 3): a Brownian bridge of diffusion sigma from x0 to x1."""
    tb = t[:, None]                                                              # (B,) -> (B, 1)
    # mu_t = t x1 + (1 - t) x0,  sigma_t = sigma sqrt(t (1 - t)),  x_t = mu_t + sigma_t eps
    mu = tb * x1 + (1 - tb) * x0
    xt = mu + sigma * (tb * (1 - tb)).sqrt() * noise
    # u_t = sigma_t'/sigma_t (x_t - mu_t) + mu_t' = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0.
    # At t = 0 or 1 the ratio is 0/0; written out it is sigma (1 - 2t) / (2 sqrt(t (1 - t))) eps, which
    # still blows up there, so like torchcfm we add 1e-8 to the denominator.
    return xt, (1 - 2 * tb) / (2 * tb * (1 - tb) + 1e-8) * (xt - mu) + x1 - x0


# VP schedule of Song et al. 2021 (and Lipman et al.'s diffusion example): beta(s) = 0.1 + (20 - 0.1) s
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def vp_alpha(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_s = exp(-T(s) / 2), T(s) = int_0^s beta = beta_min s + (beta_max - beta_min) s^2 / 2, and d alpha / ds."""
    T = VP_BETA_MIN * s + (VP_BETA_MAX - VP_BETA_MIN) * s * s / 2
    alpha = torch.exp(-T / 2)
    return alpha, -(VP_BETA_MIN + (VP_BETA_MAX - VP_BETA_MIN) * s) / 2 * alpha


def vp_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP diffusion as an FM path (Lipman et al. 2023, sec. 4.1, eq. 18-19); x0 ~ N(0, I) is eps.

    mu_t = alpha_{1-t} x1, sigma_t = sqrt(1 - alpha_{1-t}^2): at t = 0, alpha_1 = 0.0066, so x_t is
    (almost) pure noise; at t = 1 it is the data point.  Diffusion reaches noise only as s -> infinity,
    so this path starts a hair off N(0, I); Lipman et al. accept the same.
    """
    # the field grows like 1/sigma_t as t -> 1 (sigma_t -> 0); keep s = 1 - t >= 1e-3 (sigma_t >= 0.01),
    # as diffusion codes stop at a small time instead of 0
    s = (1 - t).clamp_min(1e-3)[:, None]                                         # (B,) -> (B, 1)
    alpha, dalpha = vp_alpha(s)
    sigma_t = (1 - alpha * alpha).sqrt()
    xt = alpha * x1 + sigma_t * x0
    # eq. 19: u_t(x | x1) = alpha'_{1-t} / (1 - alpha_{1-t}^2) (alpha_{1-t} x - x1), evaluated at x = x_t
    return xt, dalpha / (1 - alpha * alpha) * (alpha * xt - x1)


# ----------------------------------------------------------------------------------------------------
# Couplings q(x0, x1) on a minibatch: exact optimal transport (a permutation) or entropic OT (Sinkhorn)
# ----------------------------------------------------------------------------------------------------

def squared_distances(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """C_ij = |x0_i - x1_j|^2, (B, 2), (B, 2) -> (B, B)."""
    return torch.cdist(x0, x1).square()


def exact_ot_permutation(x0: torch.Tensor, x1: torch.Tensor, warm_start: bool = True) -> torch.Tensor:
    """cols with x0[i] <-> x1[cols[i]] minimising sum_i |x0_i - x1_cols[i]|^2, exactly.

    For equal-size uniform batches the OT plan pi = argmin sum_ij pi_ij C_ij is a permutation matrix / B
    (Birkhoff), found by linear assignment.  warm_start changes the speed only, never the optimum.
    """
    from scipy.optimize import linear_sum_assignment
    check_pairable(x0, x1)
    C = squared_distances(x0.double(), x1.double())                                 # (B, B)
    if warm_start and len(C) > 1:
        # sum_i (C_i,s(i) - v_s(i)) = cost(s) - sum_j v_j for every permutation s: the same argmin, and
        # short augmenting paths once v is near the optimal dual.  float32 is plenty for a first guess;
        # the schedules were tuned on a 2-core CPU (training batches of 256, W2 samples of 1000).
        scale = max(C.mean().item(), 1e-12)
        stages, iters = ((10, 40), 5) if len(C) <= 512 else ((10, 40, 160, 640), 20)
        v = sinkhorn_potential(C.float(), [scale / s for s in stages], iters).double()
        C = C - v if torch.isfinite(v).all() else C      # a failed warm start would only cost time
    _, cols = linear_sum_assignment(C.cpu().numpy())
    return torch.as_tensor(cols, device=x0.device)


def sinkhorn_potential(C: torch.Tensor, eps_schedule: list[float], iters: int) -> torch.Tensor:
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


def entropic_plan(x0: torch.Tensor, x1: torch.Tensor, eps: float, iters: int = 20) -> torch.Tensor:
    """pi (B, B) = argmin sum_ij pi_ij C_ij - eps H(pi) with uniform marginals 1/B, in torch (CPU or GPU).

    pi_ij = exp((f_i + g_j - C_ij) / eps); for fixed g = v, f makes each row sum to 1/B, so a row of pi
    is softmax_j((v_j - C_ij) / eps) / B.  eps-scaling from 64 eps down to eps.
    """
    check_pairable(x0, x1)
    C = squared_distances(x0.float(), x1.float())                                   # (B, B)
    v = sinkhorn_potential(C, [eps * 4.0 ** k for k in range(3, -1, -1)], iters)
    return torch.softmax((v - C) / eps, dim=1) / len(C)                            # (B, B)


def draw_from_plan(plan: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """cols[i] ~ pi(i, .) / pi(i, :).sum(): each x0 keeps its place and draws a partner.

    torchcfm instead draws B (i, j) pairs from the whole plan with replacement, so its x0 repeat too; the
    pairs follow the same plan either way, and keeping every x0 keeps the batch's source sample intact.
    An x1 may be drawn by several x0, unlike with the exact permutation.
    """
    probs = plan if generator is None else plan.to(generator.device)   # draw where the generator lives
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(plan.device)


def sinkhorn_pairing(x0: torch.Tensor, x1: torch.Tensor, reg: float = 0.01,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Pairs drawn from the entropic plan with eps = reg * mean C_ij (a scale-free blur for otcfm)."""
    eps = reg * max(squared_distances(x0.float(), x1.float()).mean().item(), 1e-12)
    return draw_from_plan(entropic_plan(x0, x1, eps), generator).to(x0.device)


# ----------------------------------------------------------------------------------------------------
# Matchers: sample_location_and_conditional_flow(x0, x1, t=None) -> (t, x_t, u_t), torchcfm's interface.
# Each is a coupling (couple) and a path (path); the subclasses override only what differs.
# ----------------------------------------------------------------------------------------------------

class ConditionalFlowMatcher:
    """I-CFM: independent pairs and icfm_path (Tong et al. 2023, eq. 14-15)."""
    method = "icfm"

    def __init__(self, sigma: float = 0.0):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def couple(self, x0: torch.Tensor, x1: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The coupling q(x0, x1): independent, so the batch stays as drawn."""
        return x0, x1

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t ~ p_t(. | x0, x1) and u_t(x_t | x0, x1); noise eps is drawn when not given."""
        if self.sigma > 0 and noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0)
        return icfm_path(x0, x1, t, self.sigma, noise)

    def sample_location_and_conditional_flow(self, x0: torch.Tensor, x1: torch.Tensor,
                                             t: torch.Tensor | float | None = None,
                                             generator: torch.Generator | None = None
                                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Couple the batch, draw t ~ U[0, 1] (unless given), return (t, x_t, u_t): (B,), (B, 2), (B, 2)."""
        check_pairable(x0, x1)
        if t is None:
            t = torch.rand(len(x0), generator=generator).to(x0)
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(len(x0))
        x0, x1 = self.couple(x0, x1, generator)
        return (t, *self.path(x0, x1, t, generator=generator))


class TargetFlowMatcher(ConditionalFlowMatcher):
    """Lipman's FM: x0 ~ N(0, I) is the noise and fm_path; `sigma_min` is the width left at t = 1."""
    method = "fm"

    def __init__(self, sigma_min: float = 0.0):
        super().__init__(0.0)
        if not 0 <= sigma_min < 1:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return fm_path(x0, x1, t, self.sigma_min)


class OTConditionalFlowMatcher(ConditionalFlowMatcher):
    """OT-CFM: I-CFM on pairs re-drawn from the minibatch OT plan (Tong et al. 2023, eq. 17)."""
    method = "otcfm"

    def __init__(self, sigma: float = 0.0, ot: str = "exact", ot_reg: float = 0.01):
        super().__init__(sigma)
        check_choice("ot", ot, OT_SOLVERS)
        self.ot, self.ot_reg = ot, ot_reg

    def couple(self, x0: torch.Tensor, x1: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ot == "exact":
            return x0, x1[exact_ot_permutation(x0, x1)]
        return x0, x1[sinkhorn_pairing(x0, x1, self.ot_reg, generator)]


class SchrodingerBridgeFlowMatcher(ConditionalFlowMatcher):
    """SB-CFM: pairs from the entropic plan with eps = 2 sigma^2, then the Brownian-bridge sb_path.

    With that eps the entropic plan is the static Schrodinger bridge between the two batches for a
    Brownian motion of diffusion sigma, and sb_path is that motion pinned at both ends (Tong et al. 2023,
    sec. 3; torchcfm's SchrodingerBridgeConditionalFlowMatcher with ot_method="sinkhorn").  We learn
    the bridge's probability-flow field only, not its score, so sampling stays an ODE.
    """
    method = "sbcfm"

    def __init__(self, sigma: float = 1.0):
        if sigma <= 0:
            raise ValueError(f"sbcfm needs sigma > 0 (its entropic eps is 2 sigma^2), got {sigma}")
        super().__init__(sigma)

    def couple(self, x0: torch.Tensor, x1: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return x0, x1[draw_from_plan(entropic_plan(x0, x1, 2 * self.sigma ** 2), generator).to(x0.device)]

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=generator).to(x0) if noise is None else noise
        return sb_path(x0, x1, t, self.sigma, noise)


class VPDiffusionMatcher(TargetFlowMatcher):
    """Diffusion's VP path trained as flow matching: x0 ~ N(0, I) is the noise and vp_path."""
    method = "vp"

    def __init__(self):
        super().__init__(0.0)

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return vp_path(x0, x1, t)


def make_matcher(method: str, sigma: float = 0.0, ot: str = "exact", ot_reg: float = 0.01,
                 sigma_min: float = 0.0) -> ConditionalFlowMatcher:
    check_choice("method", method, METHODS)
    return {"fm": lambda: TargetFlowMatcher(sigma_min), "icfm": lambda: ConditionalFlowMatcher(sigma),
            "otcfm": lambda: OTConditionalFlowMatcher(sigma, ot, ot_reg),
            "sbcfm": lambda: SchrodingerBridgeFlowMatcher(sigma), "vp": VPDiffusionMatcher}[method]()


def matcher_for(cfg: FlowConfig) -> ConditionalFlowMatcher:
    return make_matcher(cfg.method, cfg.sigma, cfg.ot, cfg.ot_reg, cfg.sigma_min)


# ----------------------------------------------------------------------------------------------------
# The 2-D distributions: each sampler maps (n, generator) to (n, 2) points; any can be p_0 or p_1
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


def sample_2d(name: str, n: int, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """n points of the named 2-D distribution, (n, 2) float32; seeded when a generator is given."""
    check_choice("dataset", name, DATASETS)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"number of points must be a positive integer, got {n!r}")
    return DATASETS[name](n, generator).to(device)


sample_source = sample_2d   # p_0 and p_1 come from the same menu; the two names say which end a call feeds
sample_target = sample_2d


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator seeded by (seed, step, stream): every batch is a pure function of its step number,
    so a resumed run, or one with batches prepared ahead on threads, draws the very same data."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ----------------------------------------------------------------------------------------------------
# The velocity network v_theta(t, x)
# ----------------------------------------------------------------------------------------------------

class VelocityField(nn.Module):
    """MLP on [x, sin(pi k t), cos(pi k t)] for k = 1 .. time_features, hidden width D = `width`.

    Called as model(t, x), the signature torchdiffeq's odeint expects.
    """

    def __init__(self, width: int = 128, depth: int = 3, time_features: int = 8, extra_inputs: int = 0):
        super().__init__()
        # frequencies pi k: t in [0, 1] then spans k half-periods, so the net sees both slow and fast changes
        self.register_buffer("frequencies", math.pi * torch.arange(1, time_features + 1).float(), persistent=False)
        dims = [2 + 2 * time_features + extra_inputs] + [width] * depth     # extra_inputs: a label embedding
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(t, x))                                         # -> (B, D) ... -> (B, 2)

    def features(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))   # () or (B,) -> (B,)
        angles = t[:, None] * self.frequencies                                       # (B, time_features)
        return torch.cat([x, angles.sin(), angles.cos()], 1)                         # (B, 2 + 2 time_features)


def build_model(cfg: FlowConfig) -> VelocityField:
    torch.manual_seed(cfg.seed)
    return VelocityField(cfg.width, cfg.depth, cfg.time_features)


# ----------------------------------------------------------------------------------------------------
# Training step: the regression of L_CFM (step 4 of the docstring)
# ----------------------------------------------------------------------------------------------------

def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, matcher: ConditionalFlowMatcher,
               x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, lr: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One step on already coupled pairs; returns the loss, mean over points and coordinates of
    (v_theta(t, x_t) - u_t(x_t | x0, x1))^2, which is L_CFM / 2 for 2-D points."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    xt, ut = matcher.path(x0, x1, t, generator=generator)                        # (B, 2), (B, 2)
    loss = F.mse_loss(model(t, xt), ut)                                          # mean over B and the 2 coords
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                                   # DDP averages the gradients over ranks here
    optimizer.step()
    return loss.detach()


def lr_at(step: int, cfg: FlowConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: FlowConfig) -> torch.optim.Optimizer:
    """AdamW; its fused kernel (one op for all parameters, CPU or GPU) where this torch has one."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------------
# Sampling: integrate dx/dt = v_theta(t, x) from t = 0 to 1 with torchdiffeq, counting network calls
# ----------------------------------------------------------------------------------------------------

# Why straight paths need few steps.  Euler replaces the trajectory over a step of size h by its
# tangent: x(t + h) = x(t) + h v(t, x(t)) + h^2/2 x''(t) + O(h^3), so its error per step is set by the
# trajectory's acceleration x'' = dv/dt + (grad_x v) v.  A straight path at constant speed has x'' = 0
# and ONE step is exact; a bent path (independent pairs) or one whose speed varies in time (the VP path,
# which moves little until t near 1 and then fast) needs h small where x'' is large.  Adaptive solvers
# (dopri5) find those places themselves and pay for them in network calls (NFE).

def integrate(model: Callable, x0: torch.Tensor, method: str = "dopri5", steps: int | None = None,
              times: torch.Tensor | None = None, atol: float = 1e-5, rtol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """Solve the flow ODE from x0; returns (x at each of `times`, (len(times), B, 2); NFE).

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
        # a grid of steps + 1 points (plus the requested times) makes exactly `steps` solver steps;
        # Euler: x_{k+1} = x_k + h v_theta(t_k, x_k), h = 1 / steps
        grid = torch.linspace(0, 1, steps + 1, dtype=x0.dtype, device=x0.device)
        options = {"grid_constructor": lambda *_: grid}
    with torch.no_grad():
        xs = odeint(field, x0, times, method=method, atol=atol, rtol=rtol, options=options)   # (len(times), B, 2)
    return xs, nfe


def sample(model: Callable, x0: torch.Tensor, method: str = "dopri5", steps: int | None = None) -> torch.Tensor:
    """The flow's end points x(1), (B, 2), for source points x0."""
    return integrate(model, x0, method, steps)[0][-1]


# ----------------------------------------------------------------------------------------------------
# Measuring a flow: exact W2 to the target, next to the noise floor W2(target sample, another one)
# ----------------------------------------------------------------------------------------------------

# W2(p, q)^2 = min over couplings of E|x - y|^2: the same OT problem as the pairing, here as a yardstick.
# Between two finite samples it is the exact assignment cost, and it does not vanish even for two
# samples of one distribution; that value, the noise floor, is what a perfect model scores.

def wasserstein2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between two equal-size samples: sqrt(min_s mean_i |a_i - b_s(i)|^2)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    cols = exact_ot_permutation(a, b)
    return (a - b[cols]).square().sum(1).mean().sqrt().item()


SOLVER_GRID = (("dopri5", None), ("euler", 1), ("euler", 2), ("euler", 10))
EULER_GRID = (("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("dopri5", None))


def evaluate(model: nn.Module, cfg: FlowConfig, device: str = "cpu", solvers: tuple = SOLVER_GRID,
             seed: int = 12345) -> dict:
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
            "rows": [{"solver": m, "steps": s, "nfe": round(float(np.mean(nfes[(m, s)]))),
                      "w2": float(np.mean(scores[(m, s)])), "ratio": float(np.mean(scores[(m, s)]) / np.mean(floor))}
                     for m, s in solvers]}


def solver_label(row: dict) -> str:
    if row["solver"] == "dopri5":
        return "dopri5 (atol = rtol = 1e-5)"
    return f"{row['solver']}, {row['steps']} step{'s' * (row['steps'] > 1)}"


def results_table(results: dict) -> str:
    """Markdown table: one column group per trained method (results: {name: evaluate(...)})."""
    names = list(results)
    head = "| solver | " + " | ".join(f"{n} NFE | {n} W2 | {n} W2 / floor" for n in names) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(names)]
    for i, row in enumerate(results[names[0]]["rows"]):
        cells = [f"{r['rows'][i]['nfe']} | {r['rows'][i]['w2']:.3f} | {r['rows'][i]['ratio']:.2f}x"
                 for r in results.values()]
        lines.append(f"| {solver_label(row)} | " + " | ".join(cells) + " |")
    first = results[names[0]]
    mean, std = first["floor"]
    lines.append(f"\nnoise floor W2(target, another target sample) = {mean:.3f} +- {std:.3f} "
                 f"(n = {first['n']} points, mean of {first['repeats']} draw{'s' * (first['repeats'] > 1)})")
    return "\n".join(lines)


def quality_line(result: dict, goal: float = 1.5) -> str:
    """Our bar for a good run: 2 Euler steps within 1.5x of the noise floor."""
    row = next(r for r in result["rows"] if r["solver"] == "euler" and r["steps"] == 2)
    verdict = "met" if row["ratio"] <= goal else "NOT met"
    rough = " (a rough check: few points, one draw)" if result["n"] < 1000 or result["repeats"] < 2 else ""
    return f"quality goal, W2 with 2 Euler steps <= {goal}x noise floor: {row['ratio']:.2f}x, {verdict}{rough}"


def cmd_compare_diffusion(args: argparse.Namespace, device: str, out_dir: Path) -> None:
    """The same network and recipe on three paths from N(0, I): VP diffusion, Lipman's OT path, OT-CFM.
    W2 at 1, 2, 4, 8 Euler steps (and dopri5) shows what straight paths buy; 2000 steps unless --steps."""
    cfg, results, t0 = replace(config_from_args(args), source="gaussian"), {}, time.perf_counter()
    if args.steps is None and not args.tiny:
        cfg = replace(cfg, steps=2000)              # three trainings in a few minutes on a 2-core CPU
    for method, label in (("vp", "VP path"), ("fm", "FM OT path"), ("otcfm", "OT-CFM")):
        run_cfg = replace(cfg, method=method)
        model, _ = train(run_cfg, out_dir / method, device)
        if dist_info()[0] == 0:
            results[label] = evaluate(model, run_cfg, device, EULER_GRID)
    if dist_info()[0] == 0:
        print(f"\nN(0, I) -> {cfg.target}, same network, {cfg.steps} steps, batch {cfg.batch_size}, seed {cfg.seed} "
              f"({time.perf_counter() - t0:.0f} s):\n\n{results_table(results)}")
        write_json(out_dir / "metrics.json", results)


# ----------------------------------------------------------------------------------------------------
# Likelihood: the instantaneous change of variables (step 8 of the docstring)
# ----------------------------------------------------------------------------------------------------

# A flow is an invertible map, so it has an exact density.  Read along a trajectory, the continuity
# equation of step 1 says how fast the density changes there:
#   d log p_t(x(t)) / dt = -div v(t, x(t))                         (Chen et al. 2018, Thm 1, eq. 4)
# so  log p_1(x(1)) = log p_0(x(0)) - int_0^1 div v(t, x(t)) dt.  To score a data point x, solve the ODE
# backward from x(1) = x to t = 0 and carry the integral along as a second state (FFJORD, sec. 2-3).
# Flow matching never needs this to train (the regression has no log-determinant); it scores models.

def divergence_exact(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """div v = sum_i d v_i / d x_i, one backward pass per coordinate: exact, and cheap for 2-D points.
    v (B, d) must have been computed from x (B, d) with grad enabled; returns (B,)."""
    columns = [torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1])]
    return torch.stack(columns, 1).sum(1)                                        # (B, d) -> (B,)


def divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate e^T (dv/dx) e of the trace (FFJORD, Grathwohl et al. 2019, sec. 3.1), (B,).

    Unbiased whenever E[e e^T] = I (Gaussian or Rademacher e), and one backward pass whatever the
    dimension d, where the exact trace needs d: the option for images, a detour in 2-D.
    """
    # e^T J e = (e^T J) e: one vector-Jacobian product, e^T J = grad_x <v, e>
    vjp = torch.autograd.grad((v * probe).sum(), x)[0]                           # (B, d)
    return (vjp * probe).sum(1)


def log_likelihood(model: Callable, x1: torch.Tensor, log_p0: Callable, exact: bool = True,
                   generator: torch.Generator | None = None, atol: float = 1e-5,
                   rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log p_1(x1) of the flow dx/dt = model(t, x), (B,); also its source points x(0), (B, 2), and the NFE.

    dopri5 from t = 1 down to t = 0 on the state (x, l) with dl/dt = div v, so l(0) = -int_0^1 div v dt
    and log p_1(x1) = log p_0(x(0)) + l(0).  exact=False uses one Rademacher probe per point, fixed for the
    whole solve (an adaptive solver needs a deterministic field).
    """
    from torchdiffeq import odeint
    probe = None if exact else (torch.randint(0, 2, x1.shape, generator=generator) * 2.0 - 1).to(x1)
    nfe = 0

    def field(t, state):
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            v = model(t, x)                                                      # (B, 2)
            div = divergence_exact(v, x) if exact else divergence_hutchinson(v, x, probe)
        return v.detach(), div.detach()

    times = torch.tensor([1.0, 0.0]).to(x1)
    xs, ls = odeint(field, (x1, torch.zeros(len(x1)).to(x1)), times, method="dopri5", atol=atol, rtol=rtol)
    return xs[-1], log_p0(xs[-1]) + ls[-1], nfe


def class_log_density(name: str, x: torch.Tensor, nodes: int = 1024) -> torch.Tensor:
    """log p(x | class k) of a labelled 2-D distribution, (n, 2) -> (n, K), in closed form or by quadrature.

    8gaussians: class k is N(c_k, 0.5^2 I).  moons: class k is an arc (upper, lower) blurred by N(0, 0.3^2 I),
    p(x | k) = (1/pi) int_0^pi N(x; m_k(a), 0.3^2 I) da, by the midpoint rule on `nodes` angles (their
    spacing, 3 pi / nodes, is 1/30 of the blur: the rule is then exact to many digits).  gaussian: one class.
    """
    check_choice("labelled dataset", name, CLASSES)
    dtype, x = x.dtype, x.double()
    if name == "gaussian":
        return (-0.5 * x.square().sum(1) - math.log(2 * math.pi))[:, None].to(dtype)   # (n, 1)
    if name == "8gaussians":
        angle = torch.arange(8, dtype=x.dtype) * (math.pi / 4)
        means, std = 5.0 * torch.stack([angle.cos(), angle.sin()], 1)[:, None], 0.5   # (8, 1, 2)
    else:
        a = (torch.arange(nodes, dtype=x.dtype) + 0.5) * (math.pi / nodes)
        arcs = torch.stack([torch.stack([a.cos(), a.sin()], 1), torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)])
        means, std = 3.0 * (arcs - torch.tensor([0.5, 0.25], dtype=x.dtype)), 0.3      # (2, nodes, 2)
    # log N(x; m, std^2 I) for every class and node, then the mean over nodes (one node for 8gaussians)
    sq = (x[None, :, None, :] - means[:, None]).square().sum(-1)                # (K, n, nodes)
    log_n = -sq / (2 * std ** 2) - math.log(2 * math.pi * std ** 2)
    return (torch.logsumexp(log_n, 2) - math.log(log_n.shape[2])).t().to(dtype)  # (n, K)


def log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """log p(x) of a 2-D distribution whose density we know: log (1/K) sum_k p(x | k), (n, 2) -> (n,)."""
    per_class = class_log_density(name, x)
    return torch.logsumexp(per_class, 1) - math.log(per_class.shape[1])


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance (step 9 of the docstring): one network, labels dropped at random
# ----------------------------------------------------------------------------------------------------

# Train one network on labelled pairs, each label replaced by an empty one with probability p (Ho &
# Salimans 2022): it learns the conditional field v(t, x, c) and the unconditional v(t, x) together.
# Sampling mixes them with a weight w (guided_velocity).  For w other than 0 and 1 the guided field is
# the velocity of no path from p_0 to p(x | c): samples land in class c more often, but off its law.

CLASSES = {"gaussian": 1, "8gaussians": 8, "moons": 2}   # the labelled targets: mixture components, moon arcs


def sample_labelled(name: str, n: int, generator: torch.Generator | None = None,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): n points (n, 2) of the named distribution with their classes (n,), y uniform unless given.
    Class y of 8gaussians is the component at angle y pi/4; of moons, 0 the upper arc, 1 the lower."""
    check_choice("labelled dataset", name, CLASSES)
    y = torch.randint(0, CLASSES[name], (n,), generator=generator) if labels is None else labels
    if name == "gaussian":
        return torch.randn(n, 2, generator=generator), y
    if name == "8gaussians":
        angle = y * (math.pi / 4)
        return 5.0 * torch.stack([angle.cos(), angle.sin()], 1) + 0.5 * torch.randn(n, 2, generator=generator), y
    a = math.pi * torch.rand(n, generator=generator)
    arc = torch.where((y == 0)[:, None], torch.stack([a.cos(), a.sin()], 1), torch.stack([1 - a.cos(), 0.5 - a.sin()], 1))
    return 3.0 * (arc + 0.1 * torch.randn(n, 2, generator=generator) - torch.tensor([0.5, 0.25])), y


def bayes_class(name: str, x: torch.Tensor) -> torch.Tensor:
    """The most probable class of each point, argmax_k p(x | k) (equal priors): the judge of the sweep, (n,)."""
    return class_log_density(name, x).argmax(1)


class ConditionalVelocityField(VelocityField):
    """v_theta(t, x, y): VelocityField with a learned embedding of the class y appended to its input.

    Label K (one past the last class) is the empty label: v_theta(t, x, K) is the unconditional field.
    """

    def __init__(self, num_classes: int, width: int = 128, depth: int = 3, time_features: int = 8,
                 label_dim: int = 16):
        super().__init__(width, depth, time_features, extra_inputs=label_dim)
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes + 1, label_dim)

    def forward(self, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.full((len(x),), self.num_classes, device=x.device) if y is None else y.expand(len(x))
        return self.net(torch.cat([self.features(t, x), self.label(y)], 1))       # (B, 2 + 2 tf + label_dim) -> (B, 2)


def guided_train_step(model: ConditionalVelocityField, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
                      x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor, lr: float, p_uncond: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One I-CFM step on labelled data, each label replaced by the empty one with probability p_uncond
    (Ho & Salimans 2022, Alg. 1): one network learns v(t, x, c) and v(t, x, empty) = v(t, x) at once.
    The rest is `train_step` on I-CFM's sigma = 0 path, with the labels bound to the network."""
    drop = torch.rand(len(y), generator=generator).to(y.device) < p_uncond
    y = torch.where(drop, model.num_classes, y)
    return train_step(lambda tt, xt: model(tt, xt, y), optimizer, ConditionalFlowMatcher(0.0), x0, x1, t, lr,
                      generator)


def guided_velocity(model: ConditionalVelocityField, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    w: float) -> torch.Tensor:
    """The guided field of Zheng et al. 2023 (guided flows), (B, 2):

        v_w(t, x | c) = (1 - w) v(t, x, empty) + w v(t, x, c)

    w = 0 is the unconditional flow, w = 1 the conditional one, w > 1 extrapolates past it, away from
    the unconditional field.  Ho & Salimans write (1 + w') eps(c) - w' eps(empty), and Meta's flow_matching
    examples (1 + cfg_scale) v(c) - cfg_scale v(empty): both are this with w = 1 + w' = 1 + cfg_scale.
    """
    if w == 0:
        return model(t, x)
    conditional = model(t, x, y)
    if w == 1:
        return conditional
    return (1 - w) * model(t, x) + w * conditional


# ----------------------------------------------------------------------------------------------------
# Rectified flow and reflow (step 10 of the docstring)
# ----------------------------------------------------------------------------------------------------

# Rectified flow (Liu et al. 2023) is I-CFM with sigma = 0: the straight interpolant between independent
# pairs.  Its ODE defines a new, deterministic coupling x0 -> Z_1(x0), the ends of trajectories that
# never cross, whose straight segments cross far less than independent pairs' do; retraining on them
# ("reflow") gives the 2-rectified flow, with straighter paths (Liu et al. show that reflow drives
# the straightness below toward 0), so a few Euler steps suffice.  OT-CFM gets its straight paths from
# an OT solve per minibatch instead; reflow needs a trained flow first and pays for its ODE solves,
# but no OT solver.

def reflow_pairs(model: Callable, source: str, n: int, seed: int,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The coupling a trained flow defines (Liu et al. 2023, "reflow"): x0 ~ p_0 drawn with `seed`, and
    x1 = Z_1, the end of its ODE from x0 (dopri5).  A deterministic map, so the same seed, same pairs."""
    x0 = sample_2d(source, n, step_generator(seed, 0, 7), device)
    return x0, sample(model, x0, "dopri5")


def train_on_pairs(model: nn.Module, cfg: FlowConfig, x0: torch.Tensor, x1: torch.Tensor) -> nn.Module:
    """Reflow's training: I-CFM's straight path with sigma = 0 (the rectified-flow loss of Liu et al. 2023)
    on minibatches of fixed pairs (x0_i, x1_i), cfg.steps steps; returns the model."""
    optimizer, matcher = make_optimizer(model, cfg), ConditionalFlowMatcher(0.0)
    model.train()
    for step in range(cfg.steps):
        g = step_generator(cfg.seed, step, 5)
        i = torch.randint(0, len(x0), (cfg.batch_size,), generator=g).to(x0.device)
        t = torch.rand(cfg.batch_size, generator=g).to(x0)
        train_step(model, optimizer, matcher, x0[i], x1[i], t, lr_at(step, cfg), g)
    return model.eval()


def straightness(model: Callable, x0: torch.Tensor, points: int = 33) -> float:
    """S = int_0^1 E |(Z_1 - Z_0) - v(t, Z_t)|^2 dt (Liu et al. 2023): 0 exactly for straight
    paths at constant speed.  Z_t from dopri5 at `points` equal times, the integral by the trapezoid rule."""
    times = torch.linspace(0, 1, points)
    zs, _ = integrate(model, x0, "dopri5", times=times)                           # (points, B, 2)
    with torch.no_grad():
        gap = torch.stack([(zs[-1] - zs[0] - model(t, z)).square().sum(1).mean() for t, z in zip(times, zs)])
    return torch.trapezoid(gap, times).item()


def train_guided(cfg: FlowConfig, p_uncond: float = 0.2, device: str = "cpu") -> ConditionalVelocityField:
    """A class-conditional flow from cfg.source to the labelled cfg.target, labels dropped with p_uncond."""
    check_choice("labelled target", cfg.target, CLASSES)
    torch.manual_seed(cfg.seed)
    model = ConditionalVelocityField(CLASSES[cfg.target], cfg.width, cfg.depth, cfg.time_features).to(device)
    optimizer = make_optimizer(model, cfg)
    for step in range(cfg.steps):
        g = step_generator(cfg.seed, step, 1)
        x0 = sample_2d(cfg.source, cfg.batch_size, g, device)
        x1, y = (z.to(device) for z in sample_labelled(cfg.target, cfg.batch_size, g))
        t = torch.rand(cfg.batch_size, generator=g).to(device)
        guided_train_step(model, optimizer, x0, x1, y, t, lr_at(step, cfg), p_uncond, g)
    return model.eval()


# ====================================================================================================
# Plumbing: validation, threads and DDP, the training loop, checkpoints, CLI, pictures.  A reader may stop here.
# ====================================================================================================

def check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(choices)}")


def check_config(cfg: FlowConfig) -> None:
    """FlowConfig's validation: every error names the field and the value."""
    for what, choices in (("method", METHODS), ("ot", OT_SOLVERS), ("source", DATASETS), ("target", DATASETS)):
        check_choice(what, getattr(cfg, what), choices)
    if cfg.method in NOISE_SOURCE and cfg.source != "gaussian":
        raise ValueError(f"method {cfg.method} uses x0 ~ N(0, I) as its noise, so the source must be 'gaussian'; "
                         f"got source {cfg.source!r} (icfm, otcfm and sbcfm accept any source)")
    if cfg.method == "sbcfm" and not cfg.sigma > 0:
        raise ValueError(f"method sbcfm needs sigma > 0 (its entropic eps is 2 sigma^2), got sigma={cfg.sigma}")
    for f in fields(cfg):
        value, lowest = getattr(cfg, f.name), 0 if f.name in ("seed", "warmup", "prefetch", "sigma", "weight_decay",
                                                               "sigma_min") else 1e-300
        if f.type in (int, "int") and (type(value) is not int or value < lowest):
            raise ValueError(f"{f.name} must be a {'positive' if lowest else 'non-negative'} integer, got {value!r}")
        if f.type in (float, "float") and (type(value) not in (int, float) or not lowest <= value < math.inf):
            raise ValueError(f"{f.name} must be a finite number {'> 0' if lowest else '>= 0'}, got {value!r}")
    if cfg.sigma_min >= 1:
        raise ValueError(f"sigma_min must be < 1, got {cfg.sigma_min}")


def check_pairable(x0: torch.Tensor, x1: torch.Tensor) -> None:
    if x0.dim() != 2 or x0.shape != x1.shape or len(x0) == 0:
        raise ValueError(f"expected two non-empty (B, d) point sets of the same shape, got {tuple(x0.shape)} "
                         f"and {tuple(x1.shape)}")


# ---------------------------------------------------------------- batches: threads and torchrun (DDP)

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_global(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (b, 2) shard in rank order: (b, 2) -> (W b, 2) = (B, 2)."""
    rank, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def couple_global(matcher: ConditionalFlowMatcher, x0g: torch.Tensor, x1g: torch.Tensor, b: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair the gathered global batch (B, 2) with one plan and keep this rank's (b, 2) slice.

    Every rank solves the same problem on the same gathered points, so all agree without talking, and
    the plan of B points is better than W separate plans of B / W points: that is what the flow learns.
    """
    rank, _ = dist_info()
    x0g, x1g = matcher.couple(x0g, x1g, generator)
    return x0g[rank * b:(rank + 1) * b], x1g[rank * b:(rank + 1) * b]


def draw_batch(cfg: FlowConfig, step: int, device: str) -> tuple:
    """This rank's shard of step `step`: source and target points, times t; gathered for the coupling."""
    rank, world = dist_info()
    b = cfg.batch_size // world
    g = step_generator(cfg.seed, step, 1 + rank)
    x0 = sample_2d(cfg.source, b, g, device)
    x1 = sample_2d(cfg.target, b, g, device)
    t = torch.rand(b, generator=g).to(device)
    # one more generator shared by all ranks, for a random coupling (Sinkhorn) that must agree
    return gather_global(x0), gather_global(x1), t, g, step_generator(cfg.seed, step, 0)


def pair_batch(matcher: ConditionalFlowMatcher, drawn: tuple) -> tuple:
    """Solve the coupling of a drawn batch; runs on a worker thread.  Returns (x0, x1, t, generator)."""
    x0g, x1g, t, g, shared = drawn
    return (*couple_global(matcher, x0g, x1g, len(t), shared), t, g)


def paired_batches(cfg: FlowConfig, matcher: ConditionalFlowMatcher, device: str, start: int,
                   stop: int) -> Generator[tuple, None, None]:
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


def mean_over_ranks(x: torch.Tensor) -> float:
    _, world = dist_info()
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.item()


# ---------------------------------------------------------------- the training loop

def train(cfg: FlowConfig, out_dir: str | Path, device: str = "cpu", resume: bool = False, stop_at: int | None = None,
          progress: bool = True) -> tuple[VelocityField, list[list[float]]]:
    """Train (or resume) a flow; checkpoints go to out_dir.  Returns the model (unwrapped) and loss log.

    Under torchrun each rank trains a DDP replica on its shard; rank 0 writes the checkpoints.
    stop_at ends this call early (a checkpoint is written), as an interruption would.  A non-finite loss
    stops training with FloatingPointError before anything more is saved.
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
        start, losses = resume_checkpoint(out_dir, model, optimizer, cfg, device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    matcher = matcher_for(cfg)
    stop = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    # disable=None: a bar only on a terminal; logs and CI get one line per checkpoint instead
    bar = tqdm(total=stop, initial=start, disable=None if progress and rank == 0 else True, dynamic_ncols=True,
               desc=f"{NAMES[cfg.method]} {cfg.source} -> {cfg.target}")
    running, done = [], start
    batches = paired_batches(cfg, matcher, device, start, stop)
    try:
        for step, (x0, x1, t, g) in zip(range(start, stop), batches):
            loss = train_step(net, optimizer, matcher, x0, x1, t, lr_at(step, cfg), g)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}; stopped without "
                                         f"saving, the last good checkpoint in {out_dir} is untouched")
            running.append(loss)
            done = step + 1
            if len(running) == cfg.log_every or done == stop:
                losses.append([done, mean_over_ranks(torch.stack(running).mean())])
                running = []
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", lr=f"{lr_at(step, cfg):.1e}")
            bar.update(1)
            if done % cfg.ckpt_every == 0 and done < stop:
                save_checkpoint(out_dir, model, optimizer, cfg, done, losses)
                if progress and bar.disable and rank == 0:
                    print(f"step {done}/{stop}: loss {losses[-1][1]:.4f}, checkpoint saved", flush=True)
    except KeyboardInterrupt:
        save_checkpoint(out_dir, model, optimizer, cfg, done, losses)
        raise
    finally:
        bar.close()
        batches.close()
    save_checkpoint(out_dir, model, optimizer, cfg, stop, losses)
    return model, losses


# ---------------------------------------------------------------- checkpoints
# One checkpoint is one unit: out/step-K/ holds model.safetensors, train_state.safetensors (AdamW
# moments), train_state.json (step, loss log) and config.json, each stamped with K.  They are written
# into a fresh folder and fsynced; only then does out/latest switch to it (os.replace is atomic), and
# older step folders go.  A crash at any point leaves `latest` naming a complete checkpoint.

# CheckpointError, check_finite, fsync_path and atomic_write are clip.py's canonical text, copied byte
# for byte (flow_matching.py stands alone; tests/test_plumbing.py fails if a copy drifts).

class CheckpointError(ValueError):
    """A file or folder that is not a loadable checkpoint; the message names it and says what is wrong."""


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """Refuse NaN or infinite weights: what a corrupt file or a diverged run leaves behind."""
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                              f"{bad[:4]}{' ...' if len(bad) > 4 else ''}; the file is corrupt or comes "
                              "from a run that diverged")
    return tensors


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


LATEST = "latest"
STEP_DIR = re.compile(r"step-(\d{8})")
FILE_WRITTEN = None     # tests set a function here, called with each path a checkpoint save has written


def _written(path):
    if FILE_WRITTEN is not None:
        FILE_WRITTEN(Path(path))


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON through atomic_write (temporary name, fsync, os.replace): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: FlowConfig,
                    step: int, losses: list) -> None:
    """Rank 0 writes out/step-{step}/ and then points out/latest at it."""
    from safetensors.torch import save_file
    if dist_info()[0] != 0:
        return
    out_dir = Path(out_dir)
    name = f"step-{step:08d}"
    if latest_name(out_dir) == name:
        return                                      # this very step is already saved (a resume that stops at once)
    names = {p: n for n, p in model.named_parameters()}
    moments = {f"{names[p]}.{k}": v.detach().cpu().reshape(-1) if k == "step" else v.detach().cpu()
               for p, state in optimizer.state.items() for k, v in state.items()}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in {**weights, **moments}.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite values in {bad}; not saved, {out_dir} keeps its last "
                                 f"good checkpoint")
    folder = out_dir / name
    if folder.exists():
        shutil.rmtree(folder)                       # left by a save that crashed before `latest` moved
    folder.mkdir(parents=True)
    meta = {"format": "flow_matching", "step": str(step)}
    for file, tensors in (("model.safetensors", weights), ("train_state.safetensors", moments)):
        save_file(tensors, folder / file, metadata=meta)
        fsync_path(folder / file)
        _written(folder / file)
    write_json(folder / "train_state.json", {"step": step, "losses": losses})
    _written(folder / "train_state.json")
    write_json(folder / "config.json", {"format": "flow_matching", "step": step, "config": asdict(cfg)})
    _written(folder / "config.json")
    fsync_path(folder)
    write_json(out_dir / LATEST, {"checkpoint": name, "step": step})   # the commit (atomic_write syncs out_dir)
    _written(out_dir / LATEST)
    clean_run_dir(out_dir)


def latest_name(out_dir: str | Path) -> str | None:
    """The folder name `latest` points at, or None; a corrupt pointer is an error naming it."""
    pointer = Path(out_dir) / LATEST
    if not pointer.exists():
        return None
    record = read_json(pointer)
    name = record.get("checkpoint") if isinstance(record, dict) else None
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name) or not (Path(out_dir) / name).is_dir():
        raise CheckpointError(f"{pointer} does not name a checkpoint folder in {out_dir}: {record!r}")
    return name


def latest_checkpoint(out_dir: str | Path) -> Path:
    """The newest complete checkpoint folder of a run directory (out/step-K/)."""
    name = latest_name(out_dir)
    if name is None:
        raise FileNotFoundError(f"no checkpoint in {out_dir} (no file {Path(out_dir) / LATEST}); train one with "
                                f"`python flow_matching.py --train --out {out_dir}`")
    return Path(out_dir) / name


def clean_run_dir(out_dir: str | Path) -> None:
    """Remove what a crashed save leaves: step folders other than the latest, and temporary files."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    keep = latest_name(out_dir)
    for path in out_dir.iterdir():
        if path.is_dir() and STEP_DIR.fullmatch(path.name) and path.name != keep:
            shutil.rmtree(path)
        elif path.is_file() and path.name.endswith(".tmp"):         # atomic_write's name.<random>.tmp
            path.unlink()


def read_json(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: not valid UTF-8 JSON ({e})") from None


def read_tensors(path: str | Path, device: str = "cpu") -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, every tensor checked to be finite."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:                            # safetensors raises its own error types for bad files
        raise CheckpointError(f"corrupt checkpoint file {path}: {e}") from None
    return check_finite(tensors, path), metadata


def check_keys(path: str | Path, found: dict, expected: dict) -> None:
    """Strict loading: every expected tensor present with its shape, nothing else."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}, "
                              f"wrong shape {wrong}")


def load_config(folder: str | Path) -> tuple[FlowConfig, int]:
    """The FlowConfig and step recorded in a checkpoint folder's config.json."""
    path = Path(folder) / "config.json"
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != "flow_matching" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not a flow_matching checkpoint config (needs format and config)")
    unknown = sorted(set(meta["config"]) - {f.name for f in fields(FlowConfig)})
    if unknown:
        raise CheckpointError(f"{path} has unknown settings {unknown}")
    try:
        return FlowConfig(**meta["config"]), meta.get("step")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_model(path: str | Path, device: str = "cpu") -> VelocityField:
    """The trained VelocityField of a run directory or checkpoint folder, in eval mode; config in .config."""
    path = Path(path)                               # a run directory (follow `latest`) or a step folder
    folder = path if (path / "config.json").is_file() and not (path / LATEST).exists() else latest_checkpoint(path)
    cfg, _ = load_config(folder)
    model = VelocityField(cfg.width, cfg.depth, cfg.time_features).to(device)
    weights, _ = read_tensors(folder / "model.safetensors", device)
    check_keys(folder / "model.safetensors", weights, model.state_dict())
    model.load_state_dict(weights)
    model.config = cfg
    return model.eval()


# Settings a resume may change: they touch neither the weights nor the data of a step
RESUME_MAY_CHANGE = ("steps", "prefetch", "ckpt_every", "eval_n", "eval_repeats")


def resume_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: FlowConfig,
                      device: str) -> tuple[int, list]:
    """Clean a crash's leftovers, then restore weights and AdamW moments from `latest`: (step, loss log).

    With no complete checkpoint yet, training starts at step 0 (a crash before the first save).
    """
    if dist_info()[0] == 0:
        clean_run_dir(out_dir)                      # rank 0 alone; the others read only what `latest` names
    if latest_name(out_dir) is None:
        print(f"no complete checkpoint in {out_dir}; starting at step 0", file=sys.stderr)
        return 0, []
    folder = latest_checkpoint(out_dir)
    saved, step = load_config(folder)
    differ = [f"{f.name}: saved {getattr(saved, f.name)!r}, requested {getattr(cfg, f.name)!r}"
              for f in fields(FlowConfig) if f.name not in RESUME_MAY_CHANGE
              and getattr(saved, f.name) != getattr(cfg, f.name)]
    if differ:
        raise CheckpointError(f"cannot resume {folder} with different settings: {'; '.join(differ)}")
    state = read_json(folder / "train_state.json")
    weights, weights_meta = read_tensors(folder / "model.safetensors", device)
    moments, moments_meta = read_tensors(folder / "train_state.safetensors", device)
    steps = {"config.json": step, "train_state.json": state.get("step"), "folder name": int(folder.name[5:]),
             "model.safetensors": weights_meta.get("step"), "train_state.safetensors": moments_meta.get("step")}
    if len({str(s) for s in steps.values()}) != 1:
        raise CheckpointError(f"{folder}: its parts are from different steps: {steps}")
    check_keys(folder / "model.safetensors", weights, model.state_dict())
    model.load_state_dict(weights)
    names = dict(model.named_parameters())
    expected = {f"{n}.{k}": t for n, p in names.items() for k, t in
                (("step", torch.zeros(1)), ("exp_avg", p), ("exp_avg_sq", p))} if moments else {}
    check_keys(folder / "train_state.safetensors", moments, expected)
    by_index = {i: {k: (moments[f"{n}.{k}"].reshape(()).cpu() if k == "step" else moments[f"{n}.{k}"])
                    for k in ("step", "exp_avg", "exp_avg_sq")}
                for i, n in enumerate(names) if moments}
    optimizer.load_state_dict({"state": by_index, "param_groups": optimizer.state_dict()["param_groups"]})
    return step, state.get("losses", [])


# ---------------------------------------------------------------- likelihood, guidance and reflow experiments
# Each trains small flows for several seeds and prints mean +- standard deviation (min .. max) over seeds.

def spread(values: list[float], digits: int = 3) -> str:
    """'mean +- sd (min .. max)' over seeds; sd is the sample standard deviation (0 for one seed)."""
    a = np.array(values, dtype=float)
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.{digits}f} +- {sd:.{digits}f} ({a.min():.{digits}f} .. {a.max():.{digits}f})"


def experiment_config(args: argparse.Namespace, **fixed: object) -> tuple[FlowConfig, list[int]]:
    """The --tiny or default preset with 2000 steps unless --steps, the fixed settings, and the seeds."""
    cfg = replace(config_from_args(args), **fixed)
    if args.steps is None and not args.tiny:
        cfg = replace(cfg, steps=2000)              # several trainings per seed in minutes on a 2-core CPU
    if args.seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {args.seeds}")
    return cfg, list(range(cfg.seed, cfg.seed + args.seeds))


def cmd_likelihood(args: argparse.Namespace, device: str, out_dir: Path) -> None:
    """Held-out NLL (nats per point) of I-CFM, OT-CFM and the VP path, N(0, I) -> moons, over seeds."""
    cfg, seeds = experiment_config(args, source="gaussian", target="moons")
    n = 500 if args.tiny else 2000
    x = sample_2d(cfg.target, n, step_generator(2 ** 20, 0, 0), device)          # never a training batch
    log_p0 = lambda z: log_density("gaussian", z)
    rows, t0, c0 = collections.defaultdict(list), time.perf_counter(), time.process_time()
    for seed in seeds:
        for method in ("icfm", "otcfm", "vp"):
            run_cfg = replace(cfg, method=method, seed=seed)
            model, _ = train(run_cfg, out_dir / f"{method}-seed{seed}", device, progress=False)
            model.eval()
            _, exact, nfe = log_likelihood(model, x, log_p0)
            _, hutch, _ = log_likelihood(model, x, log_p0, exact=False, generator=torch.Generator().manual_seed(seed))
            rows[method].append((-exact.mean().item(), -hutch.mean().item(), nfe))
            print(f"seed {seed} {NAMES[method]}: NLL {rows[method][-1][0]:.3f} nats (Hutchinson "
                  f"{rows[method][-1][1]:.3f}), NFE {nfe}", flush=True)
    floor = -log_density(cfg.target, x.cpu()).mean().item()
    print(f"\nheld-out NLL, N(0, I) -> {cfg.target}, {n} points, {cfg.steps} steps, batch {cfg.batch_size}, seeds "
          f"{seeds[0]}..{seeds[-1]} ({time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU):\n")
    print("| path | NLL, exact divergence (nats) | NLL, Hutchinson, 1 probe (nats) | dopri5 NFE (backward, mean) |\n"
          "|---|---:|---:|---:|")
    for method, r in rows.items():
        print(f"| {NAMES[method]} | {spread([a for a, _, _ in r])} | {spread([b for _, b, _ in r])} | "
              f"{np.mean([c for _, _, c in r]):.0f} |")
    print(f"\nthe data's own density on the same points (by quadrature): {floor:.3f} nats, the floor a perfect "
          f"model reaches up to sampling noise")
    write_json(out_dir / "metrics.json", {"floor": floor, "n": n, "seeds": seeds, "rows": rows})


def evaluate_guidance(model: ConditionalVelocityField, cfg: FlowConfig, weights: tuple, n: int,
                      device: str = "cpu", seed: int = 12345) -> dict:
    """Per guidance weight w: the share of samples whose Bayes class is the asked one, W2 to a sample of
    that class, and NFE; every class asked for n points, from the same source points for every w."""
    out, floor = {}, []
    refs = {c: sample_labelled(cfg.target, n, step_generator(seed, c, 1), torch.full((n,), c))[0].to(device)
            for c in range(model.num_classes)}
    for c in range(model.num_classes):
        other = sample_labelled(cfg.target, n, step_generator(seed, c, 2), torch.full((n,), c))[0].to(device)
        floor.append(wasserstein2(other, refs[c]))
    x0 = sample_2d(cfg.source, n, step_generator(seed, 0, 0), device)
    for w in weights:
        hits, w2, nfe = [], [], 0
        for c in range(model.num_classes):
            y = torch.tensor(c, device=device)
            xs, k = integrate(lambda t, x: guided_velocity(model, t, x, y, w), x0, "dopri5")
            hits.append((bayes_class(cfg.target, xs[-1].cpu()) == c).float().mean().item())
            w2.append(wasserstein2(xs[-1], refs[c]))
            nfe += k
        out[w] = {"hit": float(np.mean(hits)), "w2": float(np.mean(w2)), "nfe": nfe / model.num_classes}
    return {"floor": float(np.mean(floor)), "weights": out}


GUIDANCE_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def cmd_guidance(args: argparse.Namespace, device: str, out_dir: Path) -> None:
    """Classifier-free guidance, N(0, I) -> moons with 2 classes: a sweep over w, over seeds, and a picture."""
    cfg, seeds = experiment_config(args, method="icfm", source="gaussian", target="moons")
    n = 250 if args.tiny else 1000
    results, t0, c0 = [], time.perf_counter(), time.process_time()
    for seed in seeds:
        model = train_guided(replace(cfg, seed=seed), device=device)
        results.append(evaluate_guidance(model, cfg, GUIDANCE_WEIGHTS, n, device))
        print(f"seed {seed}: " + ", ".join(f"w {w:g}: {100 * r['hit']:.1f}% / W2 {r['w2']:.3f}"
                                           for w, r in results[-1]["weights"].items()), flush=True)
        if seed == seeds[0]:
            first = model
    floor = results[0]["floor"]
    print(f"\nguided flow, N(0, I) -> {cfg.target} ({CLASSES[cfg.target]} classes), label dropout 0.2, {cfg.steps} steps, "
          f"batch {cfg.batch_size}, seeds {seeds[0]}..{seeds[-1]}, {n} points per class, dopri5 "
          f"({time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU):\n")
    print("| w | in the asked class (%) | W2 to the asked class | W2 / floor (mean) | NFE per class |\n"
          "|---:|---:|---:|---:|---:|")
    for w in GUIDANCE_WEIGHTS:
        hit = [100 * r["weights"][w]["hit"] for r in results]
        w2 = [r["weights"][w]["w2"] for r in results]
        print(f"| {w:g} | {spread(hit, 1)} | {spread(w2)} | {np.mean(w2) / floor:.2f}x | "
              f"{np.mean([r['weights'][w]['nfe'] for r in results]):.0f} |")
    print(f"\nnoise floor W2(class sample, another class sample) = {floor:.3f} ({n} points, mean over classes); "
          f"the Bayes classifier (argmax_k p(x | k) by quadrature) judges the class")
    write_json(out_dir / "metrics.json", {"floor": floor, "seeds": seeds, "results": [
        {str(w): r for w, r in res["weights"].items()} for res in results]})
    for path in [out_dir / "guidance.png"] + ([args.figure] if args.figure else []):
        print(f"picture: {draw_figure(guidance_panels(first, cfg, device), path, size=240)}")


def guidance_panels(model: ConditionalVelocityField, cfg: FlowConfig, device: str = "cpu", n: int = 600,
                    weights: tuple = (0.0, 1.0, 2.0, 4.0)) -> list:
    """One column per w: samples asked for class 0 (blue) and class 1 (orange) over the target (grey)."""
    x0 = sample_2d(cfg.source, n, step_generator(777, 0, 0), device)
    target = sample_2d(cfg.target, 2 * n, step_generator(777, 0, 1)).cpu()
    columns = []
    for w in weights:
        points, colors = [], []
        for c in range(model.num_classes):
            y = torch.tensor(c, device=device)
            points.append(sample(lambda t, x: guided_velocity(model, t, x, y, w), x0).cpu())
            colors.append(torch.full((n,), c))
        hit = torch.cat([bayes_class(cfg.target, p) == c for c, p in enumerate(points)]).float().mean().item()
        columns.append((f"w = {w:g}", [(f"{100 * hit:.1f}% in the asked class", target, torch.cat(points), None,
                                        torch.cat(colors))]))
    return columns


def cmd_reflow(args: argparse.Namespace, device: str, out_dir: Path) -> None:
    """1-rectified (I-CFM, sigma 0), 2-rectified (reflow on its own ODE pairs) and OT-CFM, over seeds."""
    cfg, seeds = experiment_config(args, sigma=0.0)
    n_pairs = 2000 if args.tiny else 20000
    solvers = (("euler", 1), ("euler", 2), ("dopri5", None))
    rows = collections.defaultdict(lambda: collections.defaultdict(list))
    t0 = time.perf_counter()
    for seed in seeds:
        run = replace(cfg, seed=seed)
        for label, method in (("OT-CFM", "otcfm"), ("1-rectified (I-CFM, sigma 0)", "icfm")):
            c0 = time.process_time()
            model, _ = train(replace(run, method=method), out_dir / f"{method}-seed{seed}", device, progress=False)
            rows[label]["cpu"].append(time.process_time() - c0)
            record_flow(rows[label], model.eval(), run, solvers, device)
            if method == "icfm":
                first, first_cpu = model, rows[label]["cpu"][-1]
        c0 = time.process_time()
        x0, x1 = reflow_pairs(first, cfg.source, n_pairs, seed, device)
        pairs_cpu = time.process_time() - c0
        second = train_on_pairs(copy.deepcopy(first), run, x0, x1)
        label = "2-rectified (reflow)"
        rows[label]["cpu"].append(first_cpu + time.process_time() - c0)
        rows[label]["pairs"].append(pairs_cpu)
        record_flow(rows[label], second, run, solvers, device)
        print(f"seed {seed}: " + "; ".join(f"{k}: W2 1 / 2 Euler {r['euler1'][-1]:.3f} / {r['euler2'][-1]:.3f}, "
                                           f"S {r['straightness'][-1]:.3f}" for k, r in rows.items()), flush=True)
    print(f"\n{cfg.source} -> {cfg.target}, {cfg.steps} steps per training, batch {cfg.batch_size}, {n_pairs} reflow "
          f"pairs, seeds {seeds[0]}..{seeds[-1]} ({time.perf_counter() - t0:.0f} s wall):\n")
    print("| flow | training, CPU s | W2, 1 Euler step | W2, 2 Euler steps | W2, dopri5 | dopri5 NFE | straightness S |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {spread(r['cpu'], 1)} | {spread(r['euler1'])} | {spread(r['euler2'])} | "
              f"{spread(r['dopri5'])} | {np.mean(r['nfe']):.0f} | {spread(r['straightness'])} |")
    print(f"\nnoise floor W2 = {rows['OT-CFM']['floor'][0]:.3f} ({cfg.eval_n} points, mean of {cfg.eval_repeats} draws); "
          f"2-rectified's CPU time includes training the 1-rectified flow and solving its ODE for the pairs "
          f"({np.mean(rows['2-rectified (reflow)']['pairs']):.1f} s of it)")
    write_json(out_dir / "metrics.json", {k: dict(v) for k, v in rows.items()})


def record_flow(row: dict, model: nn.Module, cfg: FlowConfig, solvers: tuple, device: str) -> None:
    """Append one trained flow's W2 per solver, dopri5 NFE and straightness to `row` (lists per key)."""
    result = evaluate(model, cfg, device, solvers)
    for r in result["rows"]:
        row[r["solver"] + (str(r["steps"]) if r["steps"] else "")].append(r["w2"])
        if r["solver"] == "dopri5":
            row["nfe"].append(r["nfe"])
    row["floor"].append(result["floor"][0])
    x0 = sample_2d(cfg.source, cfg.eval_n, step_generator(99, 0, 0), device)
    row["straightness"].append(straightness(model, x0))


# ---------------------------------------------------------------- command line

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


def setup_distributed(device: str) -> tuple[str, bool]:
    """Join the torchrun process group when launched by torchrun; returns (device, created_here)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device, True


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


def config_from_args(args: argparse.Namespace) -> FlowConfig:
    """--tiny / --homework preset, then the flags given."""
    preset = FlowConfig.tiny if args.tiny else FlowConfig.homework if args.homework else FlowConfig
    overrides = {k: getattr(args, k) for k in ("method", "steps", "seed") if getattr(args, k) is not None}
    if overrides.get("method") in NOISE_SOURCE:
        overrides["source"] = "gaussian"            # their source is N(0, I) by definition
    if overrides.get("method") == "sbcfm":
        overrides["sigma"] = 1.0                    # torchcfm's default; SB-CFM needs a width > 0
    return preset(**overrides)


def run_and_report(cfg: FlowConfig, out_dir: Path, device: str, resume: bool = False,
                   figure: str | None = None) -> tuple[VelocityField, dict | None]:
    """Train one flow, evaluate it, print the table, draw out/samples.png (and `figure` if given)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    model, losses = train(cfg, out_dir, device, resume=resume)
    if dist_info()[0] != 0:
        return model, None
    print(f"\n{NAMES[cfg.method]} {cfg.source} -> {cfg.target}: {cfg.steps} steps, batch {cfg.batch_size}, "
          f"width {cfg.width}, lr {cfg.lr:g}; loss {losses[0][1]:.4f} (step {losses[0][0]}) -> "
          f"{losses[-1][1]:.4f} (step {losses[-1][0]}); training took {time.perf_counter() - t_wall:.1f} s")
    result = evaluate(model, cfg, device)
    write_json(Path(out_dir) / "metrics.json", result)
    columns = [(f"{NAMES[cfg.method]}: {cfg.source} -> {cfg.target}", method_panels(model, cfg, result, device))]
    for path in [Path(out_dir) / "samples.png"] + ([figure] if figure else []):
        draw_figure(columns, path)
    print(f"\n{results_table({NAMES[cfg.method]: result})}\n{quality_line(result)}")
    print(f"total {time.perf_counter() - t_wall:.1f} s wall, {time.process_time() - t_cpu:.1f} s CPU (this process)")
    return model, result


def cmd_train(args: argparse.Namespace, device: str, out_dir: Path) -> None:
    cfg = config_from_args(args)
    if args.resume and latest_name(out_dir) is not None:
        # the saved settings stand; --steps (a longer schedule) may change, other differences are refused
        saved, _ = load_config(latest_checkpoint(out_dir))
        given = {k: getattr(cfg, k) for k in ("method", "seed") if getattr(args, k) is not None}
        cfg = replace(saved, **given, **({"steps": args.steps} if args.steps else {}))
    run_and_report(cfg, out_dir, device, resume=args.resume, figure=args.figure)
    if dist_info()[0] == 0:
        print(f"\nwritten under {out_dir}/: {latest_name(out_dir)}/ (model.safetensors, config.json, train state), "
              f"latest, metrics.json, samples.png" + (f"; and {args.figure}" if args.figure else ""))


def cmd_compare(args: argparse.Namespace, device: str, out_dir: Path) -> None:
    """Train I-CFM and OT-CFM with the same settings and seed; one table and one picture for both."""
    cfg = config_from_args(args)
    models, results = {}, {}
    for method in ("icfm", "otcfm"):
        models[method], results[method] = run_and_report(replace(cfg, method=method), out_dir / method, device)
    if dist_info()[0] != 0:
        return
    print(f"\nI-CFM vs OT-CFM, same data, seed and steps:\n\n"
          f"{results_table({NAMES[m]: r for m, r in results.items()})}")
    columns = [(f"{NAMES[m]}: {cfg.source} -> {cfg.target}",
                method_panels(models[m], replace(cfg, method=m), results[m], device)) for m in models]
    for path in [out_dir / "icfm_vs_otcfm.png"] + ([args.figure] if args.figure else []):
        print(f"picture: {draw_figure(columns, path)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flow_matching.py",
        description="Conditional and optimal-transport flow matching on 2-D data.  Without a mode flag: a "
                    "seeded demo of a few seconds.",
        epilog="examples:  python flow_matching.py --train | --train --resume | --compare --figure "
               "assets/flow_matching_icfm_vs_otcfm.png | --compare-diffusion | --likelihood | --guidance --figure "
               "assets/flow_matching_guidance_moons.png | --reflow | "
               "torchrun --nproc_per_node 2 flow_matching.py --train")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="train one flow, evaluate it, draw it")
    mode.add_argument("--compare", action="store_true", help="train I-CFM and OT-CFM alike; table and picture")
    mode.add_argument("--compare-diffusion", dest="compare_diffusion", action="store_true",
                      help="train the VP diffusion path, FM's OT path and OT-CFM alike; W2 at 1/2/4/8 Euler steps")
    mode.add_argument("--likelihood", action="store_true",
                      help="held-out NLL of I-CFM, OT-CFM and the VP path by the change of variables, over --seeds")
    mode.add_argument("--guidance", action="store_true",
                      help="class-conditional flow with classifier-free guidance: sweep over w, over --seeds; picture")
    mode.add_argument("--reflow", action="store_true",
                      help="1- and 2-rectified flow vs OT-CFM: W2 at 1 and 2 Euler steps, straightness, CPU time")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of --likelihood / --guidance / --reflow, "
                   "counted from --seed (default 3)")
    p.add_argument("--method", choices=METHODS, default=None, help="the matcher --train uses (default otcfm; "
                   "fm and vp start from N(0, I); sbcfm uses sigma 1, torchcfm's default)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimizer steps (default 5000; --tiny 300; --compare-diffusion, --likelihood, "
                        "--guidance, --reflow 2000)")
    # the shared flags, in clip.py's words (tests/test_plumbing.py checks every file's --help says the same)
    p.add_argument("--tiny", action="store_true", help="the tiny preset (seconds): tests and quick checks")
    p.add_argument("--homework", action="store_true", help="the course's preset: lr 2e-4, batch 64, 100,000 steps")
    p.add_argument("--out", type=str, default=None,
                   help="run folder: checkpoints step-<k>/, metrics.json, pictures (default "
                        "runs/flow_matching/<demo|method|compare|diffusion>)")
    p.add_argument("--resume", action="store_true", help="with --train: continue from the latest checkpoint in --out")
    # default None, not 0: --resume keeps the saved seed unless --seed is given (cmd_train)
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", type=str, default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--figure", type=str, default=None,
                   help="also draw the picture to this path (how the README's assets are made)")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    created = False
    try:
        if args.tiny and args.homework:
            raise ValueError("--tiny and --homework are two presets; choose one")
        if args.resume and not args.train:
            raise ValueError("--resume continues a --train run")
        if args.figure and (args.likelihood or args.reflow):
            raise ValueError("--likelihood and --reflow print tables and draw no picture; drop --figure")
        device, created = setup_distributed(pick_device(args.device))
        if device == "cpu":
            # one intra-op thread per Python thread: the network's matrices are small, and the second
            # core is better spent on the OT pairing of the next batches (cfg.prefetch worker threads)
            torch.set_num_threads(1)
        root = Path("runs") / "flow_matching"
        if args.train:
            cmd_train(args, device, Path(args.out or root / (args.method or "otcfm")))
        elif args.compare:
            cmd_compare(args, device, Path(args.out or root / "compare"))
        elif args.compare_diffusion:
            cmd_compare_diffusion(args, device, Path(args.out or root / "diffusion"))
        elif args.likelihood:
            cmd_likelihood(args, device, Path(args.out or root / "likelihood"))
        elif args.guidance:
            cmd_guidance(args, device, Path(args.out or root / "guidance"))
        elif args.reflow:
            cmd_reflow(args, device, Path(args.out or root / "reflow"))
        else:
            out_dir = Path(args.out or root / "demo")
            print("flow_matching.py demo: OT-CFM, 8 Gaussians -> two moons, tiny network, 300 steps "
                  "(the full run is `python flow_matching.py --train`)")
            run_and_report(FlowConfig.tiny(seed=args.seed or 0), out_dir, device, figure=args.figure)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted: a checkpoint was saved; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------- pictures (pillow)

PALETTE = ((31, 119, 180, 170), (255, 127, 14, 170), (44, 160, 44, 170), (214, 39, 40, 170))


def draw_figure(columns: list, path: str | Path, size: int = 340) -> Path:
    """columns: list of (title, panels); each panel (caption, target (n, 2) or None, points (n, 2), paths
    (len(times), n, 2) or None[, class of each point (n,)]).  One column per method, one row per panel, saved as a PNG at `path`."""
    from PIL import Image, ImageDraw
    rows = max(len(panels) for _, panels in columns)
    head, caption_h, gap = 28, 24, 6
    image = Image.new("RGB", (size * len(columns) + gap * (len(columns) - 1), head + rows * (size + caption_h)),
                      "white")
    everything = torch.cat([p.reshape(-1, 2) for _, panels in columns for panel in panels
                            for p in panel[1:4] if p is not None])
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
        for r, (caption, target, points, paths, *colors) in enumerate(panels):
            panel = Image.new("RGB", (size, size), "white")       # its own canvas: nothing spills over
            draw = ImageDraw.Draw(panel, "RGBA")
            if target is not None:
                dots(draw, target, (170, 170, 170, 140))
            if paths is not None:
                for line in paths.transpose(0, 1):    # (len(times), n, 2) -> n polylines, a point per solver time
                    draw.line([tuple(p) for p in to_px(line)], fill=(128, 128, 0, 90), width=1)
                dots(draw, paths[0], (0, 0, 0, 200))
            if colors:                                # a 5th entry: a class per point, coloured by PALETTE
                for k in colors[0].unique().tolist():
                    dots(draw, points[colors[0] == k], PALETTE[k % len(PALETTE)])
            else:
                dots(draw, points, (31, 119, 180, 170))
            draw.rectangle([0, 0, size - 1, size - 1], outline=(190, 190, 190))
            oy = head + r * (size + caption_h)
            image.paste(panel, (ox, oy))
            centred_text(page, (ox + size / 2, oy + size + caption_h / 2), caption, 12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def centred_text(draw: Any, xy: tuple, text: str, size: int) -> None:
    """Text centred on xy; pillow's scalable default font when FreeType is there, its bitmap font if not."""
    from PIL import ImageFont
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2 - top), text, fill="black", font=font)


def method_panels(model: nn.Module, cfg: FlowConfig, result: dict, device: str = "cpu", n: int = 1500,
                  n_paths: int = 300, seed: int = 777) -> list:
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


if __name__ == "__main__":
    main()
    leave_distributed()

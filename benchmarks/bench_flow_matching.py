"""OT-CFM side by side with torchcfm 1.0.7: time per training step, and W2 after the same training.

Both sides get the same batches (our 8gaussians -> moons samplers, batch 256, same seeds), a 3-hidden-
layer MLP of the same width, AdamW with the same learning-rate schedule and the same number of steps;
they differ in the coupling and the network's time input:
  ours      exact OT permutation (scipy assignment, Sinkhorn-warm-started), pairs prepared `--prefetch`
            batches ahead on worker threads; MLP on [x, sin/cos time features], SiLU
  torchcfm  ExactOptimalTransportConditionalFlowMatcher: POT's exact plan, then B pairs drawn from it with
            replacement through numpy's global RNG (seeded here); its MLP on [x, t], SELU
Both are then sampled with the same solver code (torchdiffeq) from the same source points, and scored by
exact W2 against the same target samples, next to the noise floor.  The W2 comparison is repeated for
`--seeds` training seeds (network initialisation and batches both change with the seed) and reported as
mean, standard deviation, min and max over seeds: one run's gap says little when seeds differ by as much.

    python benchmarks/bench_flow_matching.py                # timings, then W2 over 3 seeds: about 8 minutes of CPU
    python benchmarks/bench_flow_matching.py --no-timing    # the W2 comparison alone
    python benchmarks/bench_flow_matching.py --quick        # fewer steps, a smoke test
"""
import argparse
import collections
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flow_matching as fm  # noqa: E402


class TorchCFMField(torch.nn.Module):
    """torchcfm's MLP behind our (t, x) signature, so both models share the sampler and the scorer."""

    def __init__(self, width):
        super().__init__()
        from torchcfm.models.models import MLP
        self.mlp = MLP(dim=2, w=width, time_varying=True)

    def forward(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(len(x))
        return self.mlp(torch.cat([x, t[:, None]], 1))


def torchcfm_trainer(cfg, method):
    """A step function running torchcfm's matcher as its README shows, on our batches."""
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)            # torchcfm draws OT pairs with numpy's global RNG
    matcher = {"otcfm": ExactOptimalTransportConditionalFlowMatcher, "icfm": ConditionalFlowMatcher}[method](0.0)
    model = TorchCFMField(cfg.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(k):
        g = fm.step_generator(cfg.seed, k, 1)
        x0, x1 = fm.sample_2d(cfg.source, cfg.batch_size, g), fm.sample_2d(cfg.target, cfg.batch_size, g)
        t = torch.rand(cfg.batch_size, generator=g)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1, t)
        for group in optimizer.param_groups:
            group["lr"] = fm.lr_at(k, cfg)
        loss = F.mse_loss(model(t, xt), ut)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, step


def our_trainer(cfg):
    """Our training loop (fm.paired_batches + fm.train_step), one step per call."""
    model = fm.build_model(cfg)
    optimizer = fm.make_optimizer(model, cfg)
    matcher = fm.make_matcher(cfg.method, cfg.sigma, cfg.ot)
    batches = zip(range(cfg.steps), fm.paired_batches(cfg, matcher, "cpu", 0, cfg.steps))

    def step(k):
        j, (x0, x1, t, g) = next(batches)
        fm.train_step(model, optimizer, matcher, x0, x1, t, fm.lr_at(j, cfg), g)
    return model, step


def timed_training(trainers, steps, block):
    """Run every trainer `steps` steps, interleaved in blocks so machine load hits all alike.
    Returns per trainer the median over blocks (the first is warm-up) of ms per step by three clocks:
    wall, CPU of every thread (our prefetch workers included) and CPU of the main thread alone."""
    times = collections.defaultdict(list)
    for start in range(0, steps, block):
        for name, (_, step) in trainers.items():
            n = min(block, steps - start)
            clocks = (time.perf_counter(), time.process_time(), time.thread_time())
            for k in range(start, start + n):
                step(k)
            if start > 0:
                now = (time.perf_counter(), time.process_time(), time.thread_time())
                times[name].append([(b - a) / n * 1e3 for a, b in zip(clocks, now)])
    return {name: np.median(np.array(v), axis=0).tolist() for name, v in times.items()}


def ot_pairing_times(cfg, repeats):
    """ms per coupling of one batch of 256: ours warm / cold, torchcfm's sample_plan (POT + resampling)."""
    from torchcfm.optimal_transport import OTPlanSampler
    pot = OTPlanSampler(method="exact")
    out = collections.defaultdict(list)
    for k in range(repeats):
        g = fm.step_generator(cfg.seed, k, 99)
        x0, x1 = fm.sample_2d(cfg.source, cfg.batch_size, g), fm.sample_2d(cfg.target, cfg.batch_size, g)
        for name, fn in (("ours (exact, warm start)", lambda: fm.exact_ot_permutation(x0, x1)),
                         ("ours (exact, cold start)", lambda: fm.exact_ot_permutation(x0, x1, warm_start=False)),
                         ("torchcfm sample_plan (POT emd + draws)", lambda: pot.sample_plan(x0, x1))):
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1e3)
    return {name: float(np.median(v)) for name, v in out.items()}


def train_untimed(trainer, steps):
    model, step = trainer
    for k in range(steps):
        step(k)
    return model


def w2_over_seeds(cfg, steps, seeds, trained, quick):
    """W2 of ours and torchcfm's OT-CFM after `steps` steps, for each seed; `trained` holds models already
    trained for cfg.seed (by the timing run).  The same evaluation draws score every model."""
    eval_cfg = replace(cfg, eval_repeats=4 if not quick else 1)
    solvers = (("dopri5", None), ("euler", 2))
    rows, floor = [], None
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        models = trained if seed == cfg.seed and trained else {
            "ours OT-CFM": train_untimed(our_trainer(seed_cfg), steps),
            "torchcfm OT-CFM": train_untimed(torchcfm_trainer(seed_cfg, "otcfm"), steps)}
        scores = {name: fm.evaluate(models[name], eval_cfg, solvers=solvers) for name in models}
        floor = scores["ours OT-CFM"]["floor"]
        rows.append({name: [r["w2"] for r in scores[name]["rows"]] for name in scores})
        rows[-1]["nfe"] = [scores[name]["rows"][0]["nfe"] for name in scores]
        print(f"seed {seed}: ours dopri5 / 2 Euler {rows[-1]['ours OT-CFM'][0]:.3f} / "
              f"{rows[-1]['ours OT-CFM'][1]:.3f}, torchcfm {rows[-1]['torchcfm OT-CFM'][0]:.3f} / "
              f"{rows[-1]['torchcfm OT-CFM'][1]:.3f} ({time.perf_counter() - t0:.0f} s wall, "
              f"{time.process_time() - c0:.0f} s CPU)", flush=True)
    print(f"\n| after {steps} steps, {len(seeds)} seeds | ours W2 mean +- sd (min .. max) | torchcfm W2 mean +- sd "
          f"(min .. max) | ours - torchcfm, mean +- sd (min .. max) |\n|---|---:|---:|---:|")
    for i, label in enumerate(("dopri5", "euler, 2 steps")):
        ours = np.array([r["ours OT-CFM"][i] for r in rows])
        ref = np.array([r["torchcfm OT-CFM"][i] for r in rows])
        cells = [f"{a.mean():.3f} +- {a.std(ddof=1) if len(a) > 1 else 0:.3f} ({a.min():.3f} .. {a.max():.3f})"
                 for a in (ours, ref, ours - ref)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    nfe = np.array([r["nfe"] for r in rows])
    print(f"\ndopri5 NFE, mean over seeds: ours {nfe[:, 0].mean():.0f}, torchcfm {nfe[:, 1].mean():.0f}; noise floor "
          f"W2(target, another target sample) = {floor[0]:.3f} +- {floor[1]:.3f} (n = {eval_cfg.eval_n}, mean "
          f"+- sd of {eval_cfg.eval_repeats} draws; the same draws score every model)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5000, help="training steps for both (default: our --train's)")
    p.add_argument("--quick", action="store_true", help="600 steps: checks the script, not the numbers")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both (default 1)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of the W2 comparison (default 3)")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="only the W2 comparison over seeds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 600 if args.quick else args.steps
    cfg = fm.FlowConfig(steps=steps)                     # our --train defaults: batch 256, width 128
    print(f"8gaussians -> moons, batch {cfg.batch_size}, width {cfg.width}, {steps} steps, lr {cfg.lr} cosine, "
          f"torch threads {args.threads}, torch {torch.__version__}")
    trained = {}
    if args.timing:
        trained = timing_tables(cfg, steps, args.quick)
    w2_over_seeds(cfg, steps, list(range(cfg.seed, cfg.seed + args.seeds)), trained, args.quick)


def timing_tables(cfg, steps, quick):
    """Pairing and training-step times; returns the two OT-CFM models it trained (seed cfg.seed)."""
    pairing = ot_pairing_times(cfg, 30 if quick else 100)
    print("\n| OT coupling of one batch of 256 | ms (median) | vs torchcfm |\n|---|---:|---:|")
    ref = pairing["torchcfm sample_plan (POT emd + draws)"]
    for name, ms in pairing.items():
        print(f"| {name} | {ms:.2f} | {ms / ref:.2f}x |")

    trainers = {"ours OT-CFM": our_trainer(cfg),
                "ours OT-CFM, inline (prefetch 0)": our_trainer(replace(cfg, prefetch=0)),
                "torchcfm OT-CFM": torchcfm_trainer(cfg, "otcfm"),
                "torchcfm I-CFM": torchcfm_trainer(cfg, "icfm")}
    t0 = time.perf_counter()
    ms = timed_training(trainers, steps, block=100 if quick else 250)
    print(f"\n(training all four took {time.perf_counter() - t0:.0f} s)")
    ref = ms["torchcfm OT-CFM"]
    print("\n| training step, ms (median of blocks) | wall | vs torchcfm OT-CFM | CPU, all threads | "
          "vs torchcfm | CPU, main thread | vs torchcfm |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, clocks in ms.items():
        print(f"| {name} | " + " | ".join(f"{c:.2f} | {c / r:.2f}x" for c, r in zip(clocks, ref)) + " |")
    print("(wall is what a run takes on this machine now; with a free core for the OT workers a step of ours "
          "takes about max(main thread, workers / free cores) instead of their sum)")
    return {name: trainers[name][0] for name in ("ours OT-CFM", "torchcfm OT-CFM")}


if __name__ == "__main__":
    main()

"""Specification of flow_matching.py: paths, couplings, sampler, training, checkpoints, DDP, errors.

Oracles: closed-form paths recomputed here, torchcfm's matchers on the same inputs, POT's exact plan,
brute force over all permutations, and exactly solvable ODEs.
"""
import itertools
import json
import math
import os
import sys

import pytest
import torch
from dataclasses import replace

import flow_matching as fm
from crash_hook import Crash, crash_after
from conftest import run_gloo_workers


def points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), 3 + 2 * torch.randn(n, 2, generator=g)


def brute_force_cost(x0, x1):
    """min over all n! permutations of sum_i |x0_i - x1_s(i)|^2."""
    C = fm.squared_distances(x0.double(), x1.double())
    return min(sum(C[i, s[i]].item() for i in range(len(s))) for s in itertools.permutations(range(len(x0))))


# ---------------------------------------------------------------- probability paths

def test_icfm_path_is_the_straight_interpolant():
    x0, x1 = points(5)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    t_out, xt, ut = fm.ConditionalFlowMatcher().sample_location_and_conditional_flow(x0, x1, t)
    assert torch.equal(t_out, t)
    assert torch.allclose(xt, t[:, None] * x1 + (1 - t[:, None]) * x0)
    assert torch.allclose(ut, x1 - x0)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[-1], x1[-1])   # the path's two ends


def test_icfm_with_sigma_matches_torchcfm():
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    x0, x1 = points(8, seed=1)
    t = torch.linspace(0.05, 0.95, 8)
    _, xt_ref, ut_ref, noise = ConditionalFlowMatcher(sigma=0.3).sample_location_and_conditional_flow(
        x0, x1, t, return_noise=True)
    xt, ut = fm.ConditionalFlowMatcher(0.3).path(x0, x1, t, noise=noise)
    assert torch.allclose(xt, xt_ref, atol=1e-6) and torch.allclose(ut, ut_ref, atol=1e-6)


def test_fm_path_is_lipmans_and_matches_torchcfm():
    from torchcfm.conditional_flow_matching import TargetConditionalFlowMatcher
    _, x1 = points(8, seed=2)
    t = torch.linspace(0.0, 0.9, 8)
    sigma_min = 0.01
    _, xt_ref, ut_ref, noise = TargetConditionalFlowMatcher(sigma=sigma_min).sample_location_and_conditional_flow(
        torch.zeros_like(x1), x1, t, return_noise=True)
    xt, ut = fm.TargetFlowMatcher(sigma_min).path(noise, x1, t)          # our x0 is Lipman's noise
    s = 1 - (1 - sigma_min) * t[:, None]                                  # sigma_t (Lipman et al. eq. 20)
    assert torch.allclose(xt, t[:, None] * x1 + s * noise, atol=1e-6)
    # eq. 21: u_t(x | x1) = (x1 - (1 - sigma_min) x) / (1 - (1 - sigma_min) t), evaluated at x = x_t
    assert torch.allclose(ut, (x1 - (1 - sigma_min) * xt) / s, atol=1e-5)
    assert torch.allclose(xt, xt_ref, atol=1e-6) and torch.allclose(ut, ut_ref, atol=1e-5)


def test_otcfm_path_is_icfm_on_the_optimal_pairs():
    x0, x1 = points(6, seed=3)
    t = torch.full((6,), 0.3)
    _, xt, ut = fm.make_matcher("otcfm").sample_location_and_conditional_flow(x0, x1, t)
    pairs_x1 = ut + x0                                                    # u_t = x1 - x0
    match = torch.cdist(pairs_x1, x1).argmin(1)                           # which x1 each x0 got
    assert sorted(match.tolist()) == list(range(6))                       # every x1 used exactly once
    assert torch.allclose(pairs_x1, x1[match], atol=1e-5)
    assert (pairs_x1 - x0).square().sum().item() == pytest.approx(brute_force_cost(x0, x1), rel=1e-5)
    assert torch.allclose(xt, 0.3 * pairs_x1 + 0.7 * x0, atol=1e-6)


def test_sbcfm_path_matches_torchcfm():
    from torchcfm.conditional_flow_matching import SchrodingerBridgeConditionalFlowMatcher
    x0, x1 = points(8, seed=8)
    t = torch.linspace(0.05, 0.95, 8)
    ref = SchrodingerBridgeConditionalFlowMatcher(sigma=0.7, ot_method="sinkhorn")
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    mu = t[:, None] * x1 + (1 - t[:, None]) * x0
    xt_ref = ref.sample_xt(x0, x1, t, noise)
    ut_ref = ref.compute_conditional_flow(x0, x1, t, xt_ref)
    xt, ut = fm.SchrodingerBridgeFlowMatcher(0.7).path(x0, x1, t, noise=noise)
    assert torch.allclose(xt, mu + 0.7 * (t * (1 - t)).sqrt()[:, None] * noise, atol=1e-6)   # Brownian bridge
    assert torch.allclose(xt, xt_ref, atol=1e-6) and torch.allclose(ut, ut_ref, atol=1e-5)
    assert ref.ot_sampler.ot_fn.keywords["reg"] == 2 * 0.7 ** 2                            # torchcfm's eps


def test_sbcfm_plan_is_pots_entropic_plan_with_eps_two_sigma_squared():
    import ot
    g = torch.Generator().manual_seed(9)
    x0, x1 = fm.sample_2d("8gaussians", 64, g), fm.sample_2d("moons", 64, g)
    sigma = 1.0
    plan = fm.entropic_plan(x0, x1, 2 * sigma ** 2, iters=200)
    M = fm.squared_distances(x0.double(), x1.double()).numpy()
    reference = torch.as_tensor(ot.sinkhorn(ot.unif(64), ot.unif(64), M, reg=2 * sigma ** 2, numItermax=10_000,
                                            stopThr=1e-12))
    assert torch.allclose(plan.double().sum(1), torch.full((64,), 1 / 64, dtype=torch.double), atol=1e-7)
    assert torch.allclose(plan.double(), reference, atol=1e-4 / 64)
    _, xt, ut = fm.SchrodingerBridgeFlowMatcher(sigma).sample_location_and_conditional_flow(
        x0, x1, generator=torch.Generator().manual_seed(0))
    assert xt.shape == ut.shape == (64, 2) and torch.isfinite(ut).all()


def test_vp_path_is_lipmans_diffusion_path():
    x0, x1 = points(6, seed=10)
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.95, 0.999])
    xt, ut = fm.vp_path(x0, x1, t)
    s = 1 - t
    alpha = torch.exp(-0.5 * (0.1 * s + 19.9 * s ** 2 / 2))[:, None]                # alpha_{1-t}, beta 0.1 .. 20
    assert torch.allclose(xt, alpha * x1 + (1 - alpha ** 2).sqrt() * x0, atol=1e-6)   # Lipman eq. 18
    dalpha = -0.5 * (0.1 + 19.9 * s)[:, None] * alpha
    assert torch.allclose(ut, dalpha / (1 - alpha ** 2) * (alpha * xt - x1), atol=1e-4)   # eq. 19
    assert alpha[0].item() == pytest.approx(math.exp(-5.025), rel=1e-5)              # t = 0: 0.0066 x1 + 0.99998 x0


@pytest.mark.parametrize("method", ["fm", "icfm", "sbcfm", "vp"])
def test_every_conditional_field_is_the_time_derivative_of_its_path(method):
    """u_t(x_t | z) = d x_t / dt for fixed (x0, x1, eps): the field moves the point along its path."""
    x0, x1 = points(5, seed=11)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    matcher = fm.make_matcher(method, sigma=0.5, sigma_min=0.1)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.double)
    xt_of = lambda t: matcher.path(x0.double(), x1.double(), t, noise=noise.double())[0]
    _, dxdt = torch.func.jvp(xt_of, (t,), (torch.ones_like(t),))
    assert torch.allclose(matcher.path(x0.double(), x1.double(), t, noise=noise.double())[1], dxdt, atol=1e-6)


# ---------------------------------------------------------------- optimal transport

@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_exact_ot_is_the_cheapest_permutation(n):
    for seed in range(3):
        x0, x1 = points(n, seed)
        cols = fm.exact_ot_permutation(x0, x1)
        assert sorted(cols.tolist()) == list(range(n))                  # a permutation
        cost = (x0.double() - x1.double()[cols]).square().sum().item()
        assert cost == pytest.approx(brute_force_cost(x0, x1), rel=1e-9, abs=1e-12)


def test_exact_ot_equals_pots_plan():
    import numpy as np
    import ot
    g = torch.Generator().manual_seed(4)
    x0, x1 = fm.sample_2d("8gaussians", 64, g), fm.sample_2d("moons", 64, g)
    plan = ot.emd(ot.unif(64), ot.unif(64), fm.squared_distances(x0.double(), x1.double()).numpy())
    cols = fm.exact_ot_permutation(x0, x1).numpy()
    assert np.allclose(plan[np.arange(64), cols], 1 / 64)                # POT's plan is our permutation / B


def test_warm_start_changes_speed_not_the_answer():
    g = torch.Generator().manual_seed(5)
    for n in (256, 600):                                                 # both warm-start schedules
        x0, x1 = fm.sample_2d("8gaussians", n, g), fm.sample_2d("moons", n, g)
        assert torch.equal(fm.exact_ot_permutation(x0, x1), fm.exact_ot_permutation(x0, x1, warm_start=False))


def test_wasserstein2_hand_cases_and_pot():
    import ot
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert fm.wasserstein2(a, a[[2, 0, 1]]) == pytest.approx(0.0, abs=1e-12)      # same set, any order
    assert fm.wasserstein2(a, a + torch.tensor([3.0, 4.0])) == pytest.approx(5.0)  # a translation by (3, 4)
    x0, x1 = points(200, seed=6)
    M = fm.squared_distances(x0.double(), x1.double()).numpy()
    assert fm.wasserstein2(x0, x1) == pytest.approx(math.sqrt(ot.emd2([], [], M)), rel=1e-9)


def test_sinkhorn_pairing_approaches_the_exact_plan():
    g = torch.Generator().manual_seed(7)
    x0, x1 = fm.sample_2d("8gaussians", 256, g), fm.sample_2d("moons", 256, g)
    exact = (x0 - x1[fm.exact_ot_permutation(x0, x1)]).square().sum(1).mean()
    independent = (x0 - x1).square().sum(1).mean()
    cols = fm.sinkhorn_pairing(x0, x1, reg=0.005, generator=torch.Generator().manual_seed(0))
    entropic = (x0 - x1[cols]).square().sum(1).mean()
    assert cols.min() >= 0 and cols.max() < 256
    # entropic OT costs a little more than exact OT and far less than random pairs
    assert exact <= entropic < exact + 0.1 * (independent - exact)


# ---------------------------------------------------------------- network and sampler

class Linear2D(torch.nn.Module):
    """dx/dt = A x: x(1) = expm(A) x0 in closed form; Euler with k steps gives (I + A / k)^k x0."""

    def __init__(self, a):
        super().__init__()
        self.a, self.calls = a, 0

    def forward(self, t, x):
        self.calls += 1
        return x * self.a


def test_fixed_step_solvers_count_and_match_hand_results():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    for method, per_step in (("euler", 1), ("midpoint", 2), ("rk4", 4)):
        for steps in (1, 2, 10):
            field = Linear2D(-1.0)
            xs, nfe = fm.integrate(field, x0, method, steps)
            assert nfe == field.calls == per_step * steps
    # Euler: x_{k+1} = (1 - h) x_k, h = 1/k, so x(1) = (1 - 1/k)^k x0
    for k in (1, 2, 10):
        assert torch.allclose(fm.sample(Linear2D(-1.0), x0, "euler", k), (1 - 1 / k) ** k * x0)


def test_dopri5_counts_every_network_call_and_is_accurate():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    field = Linear2D(-1.0)
    xs, nfe = fm.integrate(field, x0, "dopri5")
    assert nfe == field.calls and nfe >= 7                               # one accepted step costs 6 + 1 calls
    assert torch.allclose(xs[-1], math.exp(-1) * x0, atol=1e-5)


def test_velocity_field_takes_scalar_or_batched_time():
    model = fm.VelocityField(width=16, depth=2, time_features=4)
    x = torch.randn(5, 2)
    assert model(torch.tensor(0.3), x).shape == (5, 2)
    assert torch.allclose(model(torch.tensor(0.3), x), model(torch.full((5,), 0.3), x))


# ---------------------------------------------------------------- training, checkpoints, CLI

def latest(run_dir, name):
    return fm.latest_checkpoint(run_dir) / name


@pytest.mark.slow
def test_demo_training_lowers_loss_and_beats_an_untrained_model(tmp_path, capsys):
    fm.main(["--out", str(tmp_path), "--device", "cpu"])                 # the no-flag demo: the tiny preset
    out = capsys.readouterr().out
    assert "| euler, 2 steps |" in out and "noise floor" in out
    losses = json.loads(latest(tmp_path, "train_state.json").read_text())["losses"]
    assert losses[-1][1] < 0.5 * losses[0][1]
    cfg = fm.FlowConfig.tiny()
    trained = json.loads((tmp_path / "metrics.json").read_text())
    untrained = fm.evaluate(fm.build_model(cfg), cfg, solvers=(("dopri5", None),))
    assert trained["rows"][0]["solver"] == "dopri5"
    assert trained["rows"][0]["w2"] < 0.5 * untrained["rows"][0]["w2"]
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def test_a_saved_model_loads_and_samples(tmp_path):
    cfg = fm.FlowConfig.tiny(steps=20)
    trained, _ = fm.train(cfg, tmp_path, progress=False)
    model = fm.load_model(tmp_path)                                      # the run folder follows `latest`
    assert model.config == cfg and not model.training
    x0 = fm.sample_source(cfg.source, 100)
    assert torch.equal(fm.sample(model, x0, "euler", 2), fm.sample(trained.eval(), x0, "euler", 2))
    assert fm.load_model(fm.latest_checkpoint(tmp_path)).config == cfg   # and so does the step folder


def test_save_load_and_resume_round_trip(tmp_path):
    cfg = fm.FlowConfig.tiny(steps=40, ckpt_every=20, log_every=10)
    straight, _ = fm.train(cfg, tmp_path / "straight", progress=False)
    fm.train(cfg, tmp_path / "resumed", stop_at=20, progress=False)          # as if interrupted at step 20
    assert json.loads(latest(tmp_path / "resumed", "config.json").read_text())["step"] == 20
    resumed, _ = fm.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name                                   # bit for bit: data, AdamW moments, step
    logs = [json.loads(latest(tmp_path / d, "train_state.json").read_text())["losses"] for d in ("straight", "resumed")]
    assert logs[0] == logs[1]
    loaded = fm.load_model(tmp_path / "resumed")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()))
    assert loaded.config == cfg
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["latest", "step-00000040"]


def test_a_crash_after_any_file_of_a_save_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Kill the run after the i-th file a checkpoint save writes, for every i; resuming then ends
    exactly where an uninterrupted run ends (the `latest` pointer names only complete checkpoints)."""
    cfg = fm.FlowConfig.tiny(steps=6, ckpt_every=2, log_every=1, batch_size=32, width=16, prefetch=0)
    straight, _ = fm.train(cfg, tmp_path / "straight", progress=False)
    files = []
    monkeypatch.setattr(fm, "FILE_WRITTEN", files.append)
    fm.train(cfg, tmp_path / "count", progress=False)
    per_save = len(files) // 3                                          # saves at steps 2, 4 and 6
    assert per_save == 5 and files[per_save - 1].name == "latest"      # 4 files, then the pointer

    for i in range(1, 2 * per_save + 1):                                # every boundary of the first two saves
        run = tmp_path / f"crash{i}"
        monkeypatch.setattr(fm, "FILE_WRITTEN", crash_after(i, []))
        with pytest.raises(Crash):
            fm.train(cfg, run, progress=False)
        monkeypatch.setattr(fm, "FILE_WRITTEN", None)
        resumed, _ = fm.train(cfg, run, resume=True, progress=False)
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (i, name)
        assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000006"], i   # leftovers cleaned


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = fm.FlowConfig.tiny(steps=10, ckpt_every=5, batch_size=32, width=16)
    fm.train(cfg, tmp_path, stop_at=5, progress=False)
    good = fm.latest_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    monkeypatch.setattr(fm.ConditionalFlowMatcher, "path",
                        lambda self, x0, x1, t, noise=None, generator=None: (x0, torch.full_like(x0, math.nan)))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 6"):
        fm.train(cfg, tmp_path, resume=True, progress=False)
    assert fm.latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_a_weight_file_of_random_bytes_under_a_valid_header_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    fm.train(fm.FlowConfig.tiny(steps=2, width=16), tmp_path, progress=False)
    weights = latest(tmp_path, "model.safetensors")
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(0)
    noise = {k: torch.randint(0, 256, (v.numel() * 4,), dtype=torch.uint8, generator=g).view(torch.float32).reshape(v.shape)
             for k, v in tensors.items()}
    assert not all(torch.isfinite(v).all() for v in noise.values())    # random bits include NaN / inf patterns
    save_file(noise, weights)
    with pytest.raises(fm.CheckpointError, match=r"model\.safetensors holds non-finite values \(NaN or inf\) in \d+ tensor\(s\): \['net\."):
        fm.load_model(tmp_path)
    with pytest.raises(fm.CheckpointError, match="model.safetensors"):
        fm.train(fm.FlowConfig.tiny(steps=4, width=16), tmp_path, resume=True, progress=False)


def test_resume_from_the_command_line(tmp_path, capsys):
    fm.main(["--train", "--tiny", "--steps", "30", "--out", str(tmp_path), "--device", "cpu"])
    fm.main(["--train", "--tiny", "--resume", "--steps", "40", "--out", str(tmp_path)])
    assert json.loads(latest(tmp_path, "config.json").read_text())["step"] == 40
    assert "40 steps" in capsys.readouterr().out


def test_a_run_writes_only_under_out(tmp_path, monkeypatch):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = ["git", "-C", root, "status", "--porcelain", "--untracked-files=all"]
    before = subprocess.run(git, capture_output=True, text=True).stdout
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    fm.main(["--train", "--tiny", "--steps", "10", "--out", str(tmp_path / "out")])
    assert subprocess.run(git, capture_output=True, text=True).stdout == before
    assert list(work.iterdir()) == []
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"latest", "step-00000010", "metrics.json", "samples.png"}


def test_no_pickle_in_the_flow_matching_files():
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "..", "flow_matching.py"), __file__,
                 os.path.join(here, "..", "benchmarks", "bench_flow_matching.py")):
        text = open(path).read()
        for word in ("torch" + ".load(", "import " + "pickle", "allow_" + "pickle=True", "torch" + ".save("):
            assert word not in text, (path, word)


@pytest.mark.slow
def test_compare_writes_both_methods_side_by_side(tmp_path, capsys):
    figure = tmp_path / "cmp.png"
    fm.main(["--compare", "--tiny", "--steps", "30", "--out", str(tmp_path), "--figure", str(figure)])
    out = capsys.readouterr().out
    assert "I-CFM W2" in out and "OT-CFM W2" in out
    from PIL import Image
    assert Image.open(figure).size[0] == 2 * 340 + 6                      # two columns


@pytest.mark.slow
def test_compare_diffusion_prints_the_euler_table(tmp_path, capsys):
    fm.main(["--compare-diffusion", "--tiny", "--steps", "20", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("euler, 1 step |", "euler, 2 steps |", "euler, 4 steps |", "euler, 8 steps |"):
        assert row in out
    assert "VP path W2" in out and "FM OT path W2" in out and "OT-CFM W2" in out


def test_the_command_line_builds_a_valid_config_for_every_method():
    for method in fm.METHODS:
        cfg = fm.config_from_args(fm.build_parser().parse_args(["--train", "--tiny", "--method", method]))
        assert cfg.method == method and cfg.steps == fm.FlowConfig.tiny().steps
    assert fm.config_from_args(fm.build_parser().parse_args(["--method", "sbcfm"])).sigma == 1.0
    assert fm.config_from_args(fm.build_parser().parse_args(["--method", "vp"])).source == "gaussian"


# ---------------------------------------------------------------- bad input

def expect_cli_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        fm.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "flow_matching.py: error:" in err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    expect_cli_error(capsys, ["--train", "--method", "ddpm"], "invalid choice: 'ddpm'")
    expect_cli_error(capsys, ["--train", "--steps", "0", "--out", str(tmp_path)], "steps must be a positive integer")
    expect_cli_error(capsys, ["--device", "tpu"], "expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        expect_cli_error(capsys, ["--device", "cuda:1"], "--device cuda:1 was asked for, but torch sees no CUDA GPU")
    expect_cli_error(capsys, ["--resume"], "--resume continues a --train run")
    expect_cli_error(capsys, ["--reflow", "--seeds", "0", "--out", str(tmp_path)], "--seeds must be a positive")
    expect_cli_error(capsys, ["--likelihood", "--figure", str(tmp_path / "x.png")], "draw no picture")
    with pytest.raises(ValueError, match="unknown labelled target 'checkerboard'"):
        fm.train_guided(fm.FlowConfig.tiny(source="gaussian", target="checkerboard"))
    with pytest.raises(ValueError, match="source must be 'gaussian'"):
        fm.FlowConfig(method="fm", source="moons")
    with pytest.raises(ValueError, match="sbcfm needs sigma > 0"):
        fm.FlowConfig(method="sbcfm")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        fm.sample_2d("mnist", 10)
    with pytest.raises(ValueError, match="unknown method"):
        fm.make_matcher("ddpm")
    model = fm.VelocityField(width=8, depth=1, time_features=2)
    with pytest.raises(ValueError, match="positive integer number of steps"):
        fm.integrate(model, torch.zeros(3, 2), "euler", 0)
    with pytest.raises(ValueError, match="dopri5 chooses its own steps"):
        fm.integrate(model, torch.zeros(3, 2), "dopri5", 5)
    with pytest.raises(ValueError, match="same shape"):
        fm.wasserstein2(torch.zeros(3, 2), torch.zeros(4, 2))


def test_corrupt_or_incomplete_checkpoints_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    cfg = fm.FlowConfig.tiny(steps=5, width=16)
    fm.train(cfg, tmp_path, progress=False)
    folder = fm.latest_checkpoint(tmp_path)
    weights, config = folder / "model.safetensors", folder / "config.json"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "net.0.weight"}, weights)
    with pytest.raises(fm.CheckpointError, match=r"missing \['net.0.weight'\]"):
        fm.load_model(tmp_path)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(fm.CheckpointError, match="corrupt checkpoint file .*model.safetensors"):
        fm.load_model(tmp_path)
    expect_cli_error(capsys, ["--train", "--tiny", "--steps", "5", "--resume", "--out", str(tmp_path)],
                     "corrupt checkpoint file", "model.safetensors")
    good = config.read_bytes()
    for bad, what in ((b"{ truncated", "not valid UTF-8 JSON"), (b"\xff\xfe{}", "not valid UTF-8 JSON"),
                      (b"[]", "not a flow_matching checkpoint config"),
                      (good.replace(b'"width": 16', b'"width": "wide"'), "width must be a positive integer"),
                      (good.replace(b'"width": 16', b'"wdth": 16'), "unknown settings")):
        config.write_bytes(bad)
        with pytest.raises(fm.CheckpointError, match=f"config.json.*{what}|{what}") as info:
            fm.load_model(tmp_path)
        assert str(config) in str(info.value)
    (tmp_path / "latest").write_text("{")
    with pytest.raises(fm.CheckpointError, match="latest"):
        fm.load_model(tmp_path)
    fm.train(cfg, tmp_path / "ok", progress=False)
    with pytest.raises(fm.CheckpointError, match="width: saved 16, requested 32; lr: saved 0.003, requested 0.01"):
        fm.train(replace(cfg, width=32, lr=1e-2), tmp_path / "ok", resume=True, progress=False)
    # the parts of one checkpoint must carry one step
    folder = fm.latest_checkpoint(tmp_path / "ok")
    state = json.loads((folder / "train_state.json").read_text())
    (folder / "train_state.json").write_text(json.dumps({**state, "step": 3}))
    with pytest.raises(fm.CheckpointError, match="parts are from different steps"):
        fm.train(cfg, tmp_path / "ok", resume=True, progress=False)


# ---------------------------------------------------------------- DDP: 2 gloo processes == 1 process

GLOBAL_BATCH, DDP_STEPS = 64, 4


def fixed_global_batch(k):
    g = torch.Generator().manual_seed(1000 + k)
    return (fm.sample_2d("8gaussians", GLOBAL_BATCH, g), fm.sample_2d("moons", GLOBAL_BATCH, g),
            torch.rand(GLOBAL_BATCH, generator=g))


def train_on_fixed_batches(rank, world):
    """DDP_STEPS OT-CFM steps on fixed global batches; each rank feeds only its shard."""
    cfg = fm.FlowConfig.tiny(width=32)
    model = fm.build_model(cfg)
    optimizer = fm.make_optimizer(model, cfg)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    matcher = fm.make_matcher("otcfm")
    b = GLOBAL_BATCH // world
    shard = slice(rank * b, (rank + 1) * b)
    first_pairs = None
    for k in range(DDP_STEPS):
        x0, x1, t = fixed_global_batch(k)
        x0, x1 = fm.couple_global(matcher, fm.gather_global(x0[shard]), fm.gather_global(x1[shard]), b)
        first_pairs = x1 if first_pairs is None else first_pairs
        fm.train_step(net, optimizer, matcher, x0, x1, t[shard], lr=1e-2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, first_pairs


def ddp_worker(rank, world, tmp):
    state, first_pairs = train_on_fixed_batches(rank, world)
    from safetensors.torch import save_file
    save_file({**state, "first_pairs": first_pairs.contiguous()}, f"{tmp}/rank{rank}.safetensors")
    # and the real command line under DDP (what torchrun runs): joins the existing process group
    os.environ["WORLD_SIZE"] = str(world)
    fm.main(["--train", "--tiny", "--steps", "12", "--out", f"{tmp}/cli", "--device", "cpu"])


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path):
    assert run_gloo_workers(ddp_worker, 2, tmp_path) == [0, 0]
    single, single_pairs = train_on_fixed_batches(0, 1)
    for rank in range(2):
        from safetensors.torch import load_file
        ddp = load_file(tmp_path / f"rank{rank}.safetensors")
        for name, value in single.items():
            assert torch.allclose(ddp[name], value, atol=1e-6), (rank, name)
        # the coupling used the global batch: rank r's pairs are rows r*b.. of the single-process plan
        b = GLOBAL_BATCH // 2
        assert torch.equal(ddp["first_pairs"], single_pairs[rank * b:(rank + 1) * b])
    x0, x1, _ = fixed_global_batch(0)
    per_rank = x1[:32][fm.exact_ot_permutation(x0[:32], x1[:32])]        # what a per-rank OT would pair
    assert not torch.equal(per_rank, single_pairs[:32])
    assert json.loads(latest(tmp_path / "cli", "config.json").read_text())["step"] == 12


@pytest.mark.cuda
def test_training_and_sampling_on_cuda(tmp_path):
    for ot in ("exact", "sinkhorn"):
        cfg = fm.FlowConfig.tiny(steps=20, ot=ot)
        model, losses = fm.train(cfg, tmp_path / ot, device="cuda", progress=False)
        assert next(model.parameters()).is_cuda and math.isfinite(losses[-1][1])
        x0 = fm.sample_2d("8gaussians", 64, device="cuda")
        assert fm.sample(model, x0, "euler", 2).is_cuda
    assert fm.evaluate(fm.load_model(tmp_path / "exact", "cuda"), cfg, "cuda")["rows"][0]["w2"] > 0


# ---------------------------------------------------------------- likelihood (instantaneous change of variables)

def affine_flow(m, s):
    """The flow x_t = (1 - t + t s) x0 + t m, which carries N(0, I) to N(m, s^2 I): its field is
    v(t, x) = (s - 1) / a_t (x - t m) + m with a_t = 1 - t + t s, and div v = 2 (s - 1) / a_t."""
    def v(t, x):
        a = 1 - t + t * s
        return (s - 1) / a * (x - t * m) + m
    return v


def test_likelihood_of_an_affine_flow_is_the_closed_form():
    m, s = torch.tensor([1.0, -2.0]), 0.5
    x1 = m + s * torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 2    # also points off the bulk
    x0, log_p1, nfe = fm.log_likelihood(affine_flow(m, s), x1, lambda z: fm.log_density("gaussian", z),
                                        atol=1e-8, rtol=1e-8)
    closed = -(x1 - m).square().sum(1) / (2 * s * s) - math.log(2 * math.pi * s * s)   # log N(x1; m, s^2 I)
    assert torch.allclose(log_p1, closed, atol=1e-5)
    assert torch.allclose(x0, (x1 - m) / s, atol=1e-5)                                 # the source point it came from
    assert nfe > 0


def test_exact_divergence_is_the_trace_of_a_known_jacobian():
    A = torch.tensor([[0.3, -2.0], [1.5, -0.7]])
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    v = x @ A.t() + torch.sin(x[:, :1]) * torch.tensor([0.0, 1.0])     # dv2/dx1 = cos(x1): off the diagonal
    assert torch.allclose(fm.divergence_exact(v, x), torch.full((5,), 0.3 - 0.7), atol=1e-6)


def test_hutchinsons_estimate_is_unbiased():
    """Averaged over many Rademacher probes, e^T J e converges to the trace (E[e e^T] = I)."""
    torch.manual_seed(0)
    field = fm.VelocityField(width=32, depth=2)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    reps = 20000
    xr = x.repeat(reps, 1).requires_grad_(True)                                     # (3 reps, 2)
    v = field(torch.tensor(0.4), xr)
    exact = fm.divergence_exact(v, xr)[:3].detach()
    probe = torch.randint(0, 2, xr.shape, generator=torch.Generator().manual_seed(3)) * 2.0 - 1
    estimates = fm.divergence_hutchinson(v, xr, probe).detach().reshape(reps, 3)
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(reps)
    assert (stderr > 0).all()                                                     # one probe alone is noisy
    assert ((mean - exact).abs() < 4 * stderr + 1e-6).all(), (mean, exact, stderr)


def meta_flow_matching_solver():
    """Meta's ODESolver from the PyPI package `flow-matching`.  Its import name is also our root file's, so
    it is imported with the repository left off sys.path and our module set aside, then both restored."""
    root = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "flow_matching" or k.startswith("flow_matching.")}
    saved_path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    try:
        from flow_matching.solver import ODESolver
        return ODESolver
    except ImportError as e:
        pytest.skip(f"Meta's flow-matching package is not installed (pip install flow-matching==1.0.10): {e}")
    finally:
        for k in [k for k in sys.modules if k == "flow_matching" or k.startswith("flow_matching.")]:
            del sys.modules[k]
        sys.modules.update(ours)
        sys.path[:] = saved_path


def test_likelihood_matches_meta_flow_matching_on_a_trained_field(tmp_path):
    ODESolver = meta_flow_matching_solver()
    assert sys.modules["flow_matching"] is fm                                     # ours is back in place
    cfg = fm.FlowConfig.tiny(method="icfm", source="gaussian", steps=60)
    model, _ = fm.train(cfg, tmp_path, progress=False)
    model.eval()
    x = fm.sample_2d("moons", 64, torch.Generator().manual_seed(4))
    log_p0 = lambda z: fm.log_density("gaussian", z)
    _, ours, _ = fm.log_likelihood(model, x, log_p0, atol=1e-7, rtol=1e-7)
    # Meta's solver calls velocity_model(x=..., t=...) with t = 0 the source, as ours; it integrates 1 -> 0
    solver = ODESolver(velocity_model=lambda x, t: model(t, x))
    _, theirs = solver.compute_likelihood(x_1=x, log_p0=log_p0, step_size=None, method="dopri5", atol=1e-7,
                                          rtol=1e-7, exact_divergence=True)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_known_densities_are_normalised_and_classes_are_their_components():
    xs = torch.linspace(-7, 7, 141)                   # spacing 0.1, a third of the moons' blur 0.3
    h = (xs[1] - xs[0]).item()
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    for name in ("moons", "gaussian"):
        density = fm.class_log_density(name, grid, nodes=256).exp().mean(1)       # equal class weights
        assert (density.sum() * h * h).item() == pytest.approx(1.0, abs=2e-3)
    # 8gaussians: the mixture of eight N(c_k, 0.5^2 I), written out here
    x = torch.randn(7, 2) * 4
    centres = torch.tensor([[5 * math.cos(k * math.pi / 4), 5 * math.sin(k * math.pi / 4)] for k in range(8)])
    dens = torch.exp(-(x[:, None] - centres).square().sum(-1) / 0.5).sum(1) / 8 / (2 * math.pi * 0.25)
    assert torch.allclose(fm.log_density("8gaussians", x), dens.log(), atol=1e-4)
    # a labelled sample of class c is judged class c (the moons overlap a little: not always)
    for name, least in (("8gaussians", 1.0), ("moons", 0.99)):
        x, y = fm.sample_labelled(name, 2000, torch.Generator().manual_seed(5))
        assert (fm.bayes_class(name, x) == y).float().mean().item() >= least
    with pytest.raises(ValueError, match="checkerboard"):
        fm.log_density("checkerboard", x)


# ---------------------------------------------------------------- classifier-free guidance

def test_guidance_weight_one_is_the_conditional_field_and_zero_the_unconditional():
    torch.manual_seed(0)
    model = fm.ConditionalVelocityField(2, width=16, depth=2)
    x, t, y = torch.randn(5, 2), torch.tensor(0.3), torch.tensor(1)
    conditional, unconditional = model(t, x, y), model(t, x, torch.tensor(2))   # label 2 = the empty label
    assert torch.equal(model(t, x), unconditional)
    assert torch.allclose(fm.guided_velocity(model, t, x, y, 1.0), conditional)
    assert torch.allclose(fm.guided_velocity(model, t, x, y, 0.0), unconditional)
    # w = 3: (1 - 3) v(empty) + 3 v(c) = v(c) + 2 (v(c) - v(empty)), Meta's cfg_scale = 2
    assert torch.allclose(fm.guided_velocity(model, t, x, y, 3.0), 3 * conditional - 2 * unconditional, atol=1e-6)
    assert not torch.allclose(conditional, unconditional)


def test_label_dropout_trains_the_empty_label():
    """With p_uncond = 1 only the empty label's embedding gets a gradient; with 0 it gets none."""
    for p_uncond, empty_moves in ((1.0, True), (0.0, False)):
        torch.manual_seed(0)
        model = fm.ConditionalVelocityField(2, width=16, depth=2)
        before = model.label.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x0, x1 = torch.randn(32, 2), torch.randn(32, 2)
        fm.guided_train_step(model, optimizer, x0, x1, torch.randint(0, 2, (32,)), torch.rand(32), 0.1, p_uncond)
        moved = (model.label.weight.detach() != before).any(1)                       # (3,): class 0, 1, empty
        assert moved[2].item() is empty_moves and moved[:2].any().item() is not empty_moves


# ---------------------------------------------------------------- rectified flow and reflow

def test_reflow_pairs_come_from_the_trained_ode_and_repeat_for_a_seed():
    torch.manual_seed(0)
    model = fm.VelocityField(width=16, depth=2).eval()
    x0, x1 = fm.reflow_pairs(model, "8gaussians", 50, seed=3)
    again = fm.reflow_pairs(model, "8gaussians", 50, seed=3)
    assert torch.equal(x0, again[0]) and torch.equal(x1, again[1])
    assert not torch.equal(x0, fm.reflow_pairs(model, "8gaussians", 50, seed=4)[0])
    # x1 is where the flow's ODE carries x0: dopri5 at rtol 1e-5 on points up to |x| = 6 over about ten
    # steps, against 200 rk4 steps; and solving backward from x1 returns to x0
    assert torch.allclose(x1, fm.sample(model, x0, "rk4", 200), atol=2e-3)
    from torchdiffeq import odeint
    with torch.no_grad():
        back = odeint(model, x1, torch.tensor([1.0, 0.0]), atol=1e-7, rtol=1e-7)[-1]
    assert torch.allclose(back, x0, atol=1e-3)


def test_straightness_hand_cases():
    """S = 0 for a constant field; for the rotation v(x) = (-x2, x1), Z_t = R(t) Z_0 and
    S = E|Z_0|^2 - |(R(1) - I) Z_0|^2 = E|Z_0|^2 (2 cos 1 - 1)."""
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(6))
    assert fm.straightness(lambda t, x: torch.tensor([1.0, -2.0]).expand_as(x), x0) == pytest.approx(0, abs=1e-10)
    rotation = lambda t, x: torch.stack([-x[:, 1], x[:, 0]], 1)
    expected = x0.square().sum(1).mean().item() * (2 * math.cos(1) - 1)
    assert fm.straightness(rotation, x0, points=65) == pytest.approx(expected, rel=1e-3)


def test_reflow_on_straight_pairs_learns_a_nearly_straight_flow():
    """Pairs from an exactly straight map (x1 = x0 + c) teach a field whose one Euler step lands on x1."""
    cfg = fm.FlowConfig.tiny(source="gaussian", steps=300, width=32, lr=1e-2)
    x0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(7))
    x1 = x0 + torch.tensor([3.0, -1.0])
    torch.manual_seed(0)
    model = fm.train_on_pairs(fm.VelocityField(32, 3, 8), cfg, x0, x1)
    assert (fm.sample(model, x0[:100], "euler", 1) - x1[:100]).abs().max().item() < 0.1     # |c| = 3.2
    assert fm.straightness(model, x0[:100]) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--likelihood", "--guidance", "--reflow"])
def test_likelihood_guidance_and_reflow_commands_print_their_tables(mode, tmp_path, capsys):
    fm.main([mode, "--tiny", "--steps", "60", "--seeds", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert {"--likelihood": "NLL, exact divergence", "--guidance": "in the asked class",
            "--reflow": "2-rectified (reflow)"}[mode] in out
    assert (tmp_path / "metrics.json").is_file()

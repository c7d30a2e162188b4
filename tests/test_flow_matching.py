"""Specification of flow_matching.py: paths, couplings, sampler, training, checkpoints, DDP, errors.

Oracles: closed-form paths recomputed here, torchcfm's matchers on the same inputs, POT's exact plan,
brute force over all permutations, and exactly solvable ODEs.
"""
import itertools
import json
import math
import os

import pytest
import torch

import flow_matching as fm
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

@pytest.mark.slow
def test_demo_training_lowers_loss_and_beats_an_untrained_model(tmp_path, capsys):
    fm.main(["--out", str(tmp_path), "--device", "cpu"])                 # the no-flag demo: the tiny preset
    out = capsys.readouterr().out
    assert "| euler, 2 steps |" in out and "noise floor" in out
    losses = json.loads((tmp_path / "train_state.json").read_text())["losses"]
    assert losses[-1][1] < 0.5 * losses[0][1]
    cfg = fm.FlowConfig.tiny()
    trained = json.loads((tmp_path / "metrics.json").read_text())
    untrained = fm.evaluate(fm.build_model(cfg), cfg, solvers=(("dopri5", None),))
    assert trained["rows"][0]["solver"] == "dopri5"
    assert trained["rows"][0]["w2"] < 0.5 * untrained["rows"][0]["w2"]
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def test_sample_command_draws_from_a_saved_model(tmp_path, capsys):
    cfg = fm.FlowConfig.tiny(steps=20)
    fm.train(cfg, tmp_path, progress=False)
    fm.main(["--sample", "--out", str(tmp_path), "--solver", "euler", "--solver-steps", "2", "--n", "100"])
    assert "NFE 2" in capsys.readouterr().out
    from safetensors.torch import load_file
    drawn = load_file(tmp_path / "samples_euler2.safetensors")
    model = fm.load_model(tmp_path)
    assert torch.allclose(drawn["x1"], fm.sample(model, drawn["x0"], "euler", 2), atol=1e-6)


def test_save_load_and_resume_round_trip(tmp_path):
    cfg = fm.FlowConfig.tiny(steps=40, ckpt_every=20, log_every=10)
    straight, _ = fm.train(cfg, tmp_path / "straight", progress=False)
    fm.train(cfg, tmp_path / "resumed", stop_at=20, progress=False)          # as if interrupted at step 20
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["step"] == 20
    resumed, _ = fm.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name                                   # bit for bit: data, AdamW moments, step
    logs = [json.loads((tmp_path / d / "train_state.json").read_text())["losses"] for d in ("straight", "resumed")]
    assert logs[0] == logs[1]
    loaded = fm.load_model(tmp_path / "resumed")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()))
    assert loaded.config == cfg


def test_resume_from_the_command_line(tmp_path, capsys):
    args = ["--train", "--preset", "tiny", "--steps", "30", "--out", str(tmp_path)]
    fm.main(args)
    fm.main(["--train", "--resume", "--steps", "40", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 40
    assert "40 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_writes_both_methods_side_by_side(tmp_path, capsys):
    figure = tmp_path / "cmp.png"
    fm.main(["--compare", "--preset", "tiny", "--steps", "30", "--out", str(tmp_path), "--figure", str(figure)])
    out = capsys.readouterr().out
    assert "I-CFM W2" in out and "OT-CFM W2" in out
    from PIL import Image
    assert Image.open(figure).size[0] == 2 * 340 + 6                      # two columns


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
    expect_cli_error(capsys, ["--train", "--target", "mnist"], "invalid choice: 'mnist'")
    expect_cli_error(capsys, ["--train", "--steps", "0", "--out", str(tmp_path)], "steps must be a positive integer")
    expect_cli_error(capsys, ["--train", "--method", "fm", "--source", "moons"], "source must be 'gaussian'")
    expect_cli_error(capsys, ["--sample", "--out", str(tmp_path / "nothing")], "no checkpoint file")
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
    cfg = fm.FlowConfig.tiny(steps=5)
    fm.train(cfg, tmp_path, progress=False)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    missing = "net.0.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, weights)
    with pytest.raises(fm.CheckpointError, match=r"missing \['net.0.weight'\]"):
        fm.load_model(tmp_path)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(fm.CheckpointError, match="corrupt checkpoint file"):
        fm.load_model(tmp_path)
    expect_cli_error(capsys, ["--sample", "--out", str(tmp_path)], "corrupt checkpoint file", "model.safetensors")
    (tmp_path / "config.json").write_text("{ truncated")
    with pytest.raises(fm.CheckpointError, match="config.json"):
        fm.load_model(tmp_path)
    fm.train(cfg, tmp_path / "ok", progress=False)
    with pytest.raises(fm.CheckpointError, match="width"):
        fm.train(fm.FlowConfig.tiny(steps=10, width=32), tmp_path / "ok", resume=True, progress=False)


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
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    state, first_pairs = train_on_fixed_batches(rank, world)
    torch.save({"state": state, "first_pairs": first_pairs}, f"{tmp}/rank{rank}.pt")
    # and the real command line under DDP (what torchrun runs): joins the existing process group
    os.environ["WORLD_SIZE"] = str(world)
    fm.main(["--train", "--preset", "tiny", "--steps", "12", "--out", f"{tmp}/cli", "--device", "cpu"])
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path):
    assert run_gloo_workers(ddp_worker, 2, tmp_path) == [0, 0]
    single, single_pairs = train_on_fixed_batches(0, 1)
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in single.items():
            assert torch.allclose(ddp["state"][name], value, atol=1e-6), (rank, name)
        # the coupling used the global batch: rank r's pairs are rows r*b.. of the single-process plan
        b = GLOBAL_BATCH // 2
        assert torch.equal(ddp["first_pairs"], single_pairs[rank * b:(rank + 1) * b])
    x0, x1, _ = fixed_global_batch(0)
    per_rank = x1[:32][fm.exact_ot_permutation(x0[:32], x1[:32])]        # what a per-rank OT would pair
    assert not torch.equal(per_rank, single_pairs[:32])
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["step"] == 12


@pytest.mark.cuda
def test_training_and_sampling_on_cuda(tmp_path):
    for ot in ("exact", "sinkhorn"):
        cfg = fm.FlowConfig.tiny(steps=20, ot=ot)
        model, losses = fm.train(cfg, tmp_path / ot, device="cuda", progress=False)
        assert next(model.parameters()).is_cuda and math.isfinite(losses[-1][1])
        x0 = fm.sample_2d("8gaussians", 64, device="cuda")
        assert fm.sample(model, x0, "euler", 2).is_cuda
    assert fm.evaluate(fm.load_model(tmp_path / "exact", "cuda"), cfg, "cuda")["rows"][0]["w2"] > 0

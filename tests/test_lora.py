"""Specification of lora.py: the LoRA layer, injection, merging, peft's adapter format, QLoRA.

Oracles: peft 0.21 on the same transformers model (adapters saved by one load in the other with
identical logits, parameter counts), hand-written formulas for the layer (LoRA, rsLoRA, DoRA) and
torch autograd. Round trips use non-zero B: peft only warns about keys it cannot place and leaves
B at zero, which would hide a naming bug, so every round trip also checks that the adapter
changes the output.
"""
import copy
import json
import math

import pytest
import torch
from torch import nn

import lora
import nf4

# tiny tensors: one torch thread (tests/conftest.py says why)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, hidden=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


TOKENS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model, tokens=TOKENS):
    return model(input_ids=tokens).logits


@torch.no_grad()
def randomize_adapters(model, seed=1):
    """Non-zero B (and A, and magnitudes) so that a misplaced tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

def test_fast_in_place_forward_equals_the_written_formula():
    """LoRALinear's in-place forward is a speed-up of lora_linear(), not a different computation."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(12, 7), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()                                       # B = 0 would hide the adapter term
    x = torch.randn(2, 5, 12)
    want = lora.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, 2.0)
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("quantized", [False, True])
def test_layer_computes_the_lora_formula_and_its_gradients(quantized):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    if quantized:
        base = nf4.LinearNF4.from_linear(base)                     # QLoRA: W is the dequantized NF4
    W, b = lora.base_weight(base), base.bias
    layer = lora.LoRALinear(base, r=3, alpha=6)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3) and layer.scaling == 2.0
    randomize_adapters(layer)
    x = torch.randn(5, 12, requires_grad=True)
    # h = W x + b + (alpha / r) B A x
    formula = lambda: x @ W.T + b + (6 / 3) * (x @ layer.lora_A.T @ layer.lora_B.T)  # noqa: E731
    assert torch.allclose(layer(x), formula(), atol=1e-6)
    # gradients for A, B and the input agree with autograd through the written-out formula
    g = torch.randn(5, 7)
    ours = torch.autograd.grad(layer(x), (layer.lora_A, layer.lora_B, x), g)
    theirs = torch.autograd.grad(formula(), (layer.lora_A, layer.lora_B, x), g)
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(ours, theirs))
    rs = lora.LoRALinear(nn.Linear(12, 7), r=4, alpha=6, use_rslora=True)
    assert rs.scaling == 6 / math.sqrt(4)                      # rsLoRA: alpha / sqrt(r)


def test_init_is_kaiming_uniform_A_and_zero_B():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(300, 20), r=64, alpha=16)
    assert torch.count_nonzero(layer.lora_B) == 0
    # nn.init.kaiming_uniform_(a=sqrt(5)) on (r, in) draws from U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(300)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound


def test_lora_starts_as_the_base_model_and_only_adapters_train():
    base = tiny_llama()
    model = lora.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8)
    assert torch.equal(logits(model), logits(base))           # B = 0: exactly the base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * 2                          # 2 layers x (q, v) x (A, B)
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable)
    # at step 0, B = 0 so dL/dA = s B^T (...) = 0, and dL/dB is what starts training
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if n.endswith("lora_A"))
    assert all(torch.count_nonzero(g) > 0 for n, g in grads.items() if n.endswith("lora_B"))


def test_dora_layer_computes_magnitude_times_direction():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = lora.LoRALinear(base, r=2, alpha=4, use_dora=True)
    x = torch.randn(3, 10)
    assert torch.allclose(layer(x), base(x), atol=1e-6)          # m = ||W||_c: W' = W at init
    randomize_adapters(layer)
    # W' = m (W + s B A) / ||W + s B A||_c   (DoRA eq. 5), then y = W' x + b
    V = base.weight + 2.0 * layer.lora_B @ layer.lora_A
    W_prime = layer.lora_magnitude_vector.view(-1, 1) * V / V.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ W_prime.T + base.bias, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_merge_and_unmerge_are_exact(kind):
    torch.manual_seed(0)
    base = nn.Linear(40, 30)
    W = base.weight.detach().clone()
    layer = lora.LoRALinear(base, r=4, alpha=8, use_rslora=kind == "rslora", use_dora=kind == "dora")
    randomize_adapters(layer)
    x = torch.randn(6, 40)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)                                        # now only the (merged) base runs
        layer.unmerge()
    # merged: (W + dW) x vs W x + dW x differ only in float rounding of the sums
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
    if kind == "dora":
        assert torch.allclose(base.weight, W, atol=1e-6, rtol=1e-6)
        return
    # unmerge: fl(fl(W + dW) - dW) is within half an ulp of each of the two roundings of W
    W_merged = W + layer.delta_weight().detach()
    ulp = lambda t: (t.nextafter(torch.full_like(t, math.inf)) - t).abs()  # noqa: E731
    assert torch.all((base.weight - W).abs() <= (ulp(W_merged) + ulp(base.weight)) / 2)


def test_merge_without_unload_can_be_undone_for_the_whole_model():
    model = lora.apply_lora(tiny_llama(), "all-linear", r=4, alpha=8)
    randomize_adapters(model)
    before, weights = logits(model), {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    lora.merge_lora(model, unload=False)
    assert all(layer.merged for layer in lora.lora_layers(model).values())
    assert torch.allclose(logits(model), before, atol=1e-5)
    lora.unmerge_lora(model)
    assert all(torch.allclose(p, weights[n], atol=1e-6, rtol=0) for n, p in model.named_parameters() if "base_layer" in n)
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_merge_lora_leaves_plain_layers_with_the_same_output():
    model = lora.apply_lora(tiny_llama(), "all-linear", r=4, alpha=8)
    randomize_adapters(model)
    before = logits(model)
    report = lora.merge_lora(model)
    assert report == {} and not lora.lora_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("proj", "lm_head")))
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_merge_into_nf4_requantizes_and_reports_the_rounding():
    model = nf4.quantize_model(tiny_llama())
    lora.apply_lora(model, ["q_proj", "down_proj"], r=4, alpha=8)
    randomize_adapters(model)
    before = logits(model)
    fp = copy.deepcopy(model)
    with pytest.raises(ValueError, match="cannot be merged in place"):
        lora.lora_layers(model)["model.layers.0.self_attn.q_proj"].merge()
    report = lora.merge_lora(model)                               # re-quantized: still 4-bit
    assert set(report) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert isinstance(model.model.layers[0].self_attn.q_proj, nf4.LinearNF4)
    assert all(0 < r["rounding_rms"] and r["rounding_max"] > 0 for r in report.values())
    # without re-quantization the merged layer is exact (fp32 W_nf4 + dW)
    assert lora.merge_lora(fp, requantize=False) == {}
    assert type(fp.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(logits(fp), before, atol=1e-5)
    assert not torch.allclose(logits(model), before, atol=1e-5)  # re-quantization rounds


# ---------------------------------------------------------------------------------------------
# Injection and counting
# ---------------------------------------------------------------------------------------------

def test_targets_by_suffix_regex_and_all_linear():
    names = lambda m: sorted(lora.lora_layers(m))  # noqa: E731
    by_suffix = lora.apply_lora(tiny_llama(), ["q_proj"], r=2, alpha=2)
    assert names(by_suffix) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    by_regex = lora.apply_lora(tiny_llama(), r"model\.layers\.1\..*_proj", r=2, alpha=2)
    assert len(names(by_regex)) == 7 and all(".layers.1." in n for n in names(by_regex))
    everything = lora.apply_lora(tiny_llama(), "all-linear", r=2, alpha=2)
    assert len(names(everything)) == 14 and "lm_head" not in names(everything)


def test_parameter_count_matches_peft():
    peft = pytest.importorskip("peft")
    ours = lora.apply_lora(tiny_llama(), ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters(capsys):
    model = lora.apply_lora(tiny_llama(), ["q_proj"], r=2, alpha=2)
    trainable, total = lora.print_trainable_parameters(model)
    # q_proj is (64, 64): r * (in + out) = 2 * 128 per layer, 2 layers
    assert trainable == 2 * 2 * 128
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                               f"trainable%: {100 * trainable / total:.4f}")


def test_bad_input_gives_clear_errors(tmp_path):
    for r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="r must be a positive integer"):
            lora.LoRALinear(nn.Linear(4, 4), r=r, alpha=1)
    with pytest.raises(ValueError, match=r"matched no linear layer.*'k_proj'.*'q_proj'"):
        lora.apply_lora(tiny_llama(), ["query"], r=2, alpha=2)
    with pytest.raises(TypeError, match="wraps nn.Linear or nf4.LinearNF4"):
        lora.LoRALinear(nn.Conv1d(2, 2, 1), r=1, alpha=1)
    for alpha in (float("nan"), float("inf"), -1.0, 0, True):   # nan / inf would make every output non-finite
        with pytest.raises(ValueError, match="alpha must be a positive finite number"):
            lora.LoRALinear(nn.Linear(4, 4), r=2, alpha=alpha)
    for targets in (None, [], [""], "q_proj(", ["q_proj", 3]):
        with pytest.raises(ValueError, match="target_modules"):
            lora.apply_lora(tiny_llama(), targets, r=2, alpha=2)
    # an adapter whose shapes do not fit the model
    small = lora.apply_lora(tiny_llama(hidden=32), ["q_proj"], r=2, alpha=2)
    lora.save_adapter(small, str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"shapes do not fit.*q_proj.lora_A.weight: file \(2, 32\), model \(2, 64\)"):
        lora.load_adapter(tiny_llama(), str(tmp_path / "small"))
    # an adapter missing tensors the model expects
    other = lora.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=2)
    with pytest.raises(KeyError, match="missing.*v_proj.lora_A.weight"):
        lora.load_adapter(other, str(tmp_path / "small"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tiny_llama(), str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# peft's on-disk format, both directions
# ---------------------------------------------------------------------------------------------

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_trained_here_loads_in_peft(tmp_path, variant):
    peft = pytest.importorskip("peft")
    ours = lora.apply_lora(tiny_llama(), ["q_proj", "v_proj", "up_proj"], r=4, alpha=8, **VARIANTS[variant])
    randomize_adapters(ours)
    lora.save_adapter(ours, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "up_proj", "v_proj"] and config["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert not torch.allclose(logits(theirs), logits(tiny_llama()))   # B != 0 arrived
    if variant == "dora":
        assert torch.allclose(logits(theirs), logits(ours), atol=1e-5)  # B A formed in a different order
    else:
        assert torch.equal(logits(theirs), logits(ours))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_trained_in_peft_loads_here(tmp_path, variant):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj"], **VARIANTS[variant])
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = lora.load_adapter(tiny_llama(), str(tmp_path))
    assert sorted({n.rpartition(".")[2] for n in lora.lora_layers(ours)}) == ["gate_proj", "k_proj", "o_proj"]
    assert not torch.allclose(logits(ours), logits(tiny_llama()))
    if variant == "dora":
        assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    else:
        assert torch.equal(logits(ours), logits(theirs))


def test_adapter_of_some_layers_only_saves_their_full_names(tmp_path):
    peft = pytest.importorskip("peft")
    ours = lora.apply_lora(tiny_llama(), r"model\.layers\.0\.self_attn\.q_proj", r=2, alpha=4)
    randomize_adapters(ours)
    lora.save_adapter(ours, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert torch.equal(logits(theirs), logits(ours))


def test_adapter_file_with_nan_or_a_broken_header_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = lora.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=4)
    lora.save_adapter(ours, str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(weights))
    with pytest.raises(nf4.CheckpointError, match=rf"adapter_model\.safetensors holds non-finite .*{key}"):
        lora.load_adapter(tiny_llama(), str(tmp_path))
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(nf4.CheckpointError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        lora.load_adapter(tiny_llama(), str(tmp_path))


# ---------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------

def test_qlora_trains_and_lowers_the_loss(tmp_path):
    cfg = lora.DemoConfig.tiny(steps=40)
    model = nf4.quantize_model(lora.build_base(cfg, torch.device("cpu")))
    lora.apply_lora(model, "all-linear", r=8, alpha=16)
    packed_before = {n: b.clone() for n, b in model.named_buffers()}
    first, last = lora.train_adapters(model.train(), cfg, torch.device("cpu"), "qlora")
    assert last < first - 0.1
    # the 4-bit base did not move; only adapter parameters have gradients
    assert all(torch.equal(b, packed_before[n]) for n, b in model.named_buffers())
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
           {n for n, p in model.named_parameters() if "lora_" in n}
    lora.save_adapter(model, str(tmp_path))
    reloaded = lora.load_adapter(nf4.quantize_model(lora.build_base(cfg, torch.device("cpu"))), str(tmp_path))
    tokens = lora.progressions(2, cfg.seq_len, cfg.vocab_size, torch.Generator().manual_seed(5))
    assert torch.equal(logits(reloaded.eval(), tokens), logits(model.eval(), tokens))


@pytest.mark.slow
def test_qlora_adapter_runs_in_peft_on_a_transformers_4bit_model(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "fp32")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=bnb_config, device_map="cpu")
    hf.save_pretrained(tmp_path / "hf4")
    # our QLoRA model on the very same 4-bit weights, with a trained-looking adapter
    ours = nf4.quantize_model(tiny_llama(seed=3))
    ours.load_state_dict(load_file(str(tmp_path / "hf4" / "model.safetensors")))
    lora.apply_lora(ours, "all-linear", r=4, alpha=8)
    randomize_adapters(ours)
    lora.save_adapter(ours, str(tmp_path / "adapter"))
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    assert torch.equal(logits(theirs), logits(ours.eval()))


# ---------------------------------------------------------------------------------------------
# The demos
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_main_tiny_training_demo(tmp_path, capsys):
    results = lora.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert set(results) == {"LoRA", "QLoRA"}
    assert results["LoRA"]["merged_diff"] < 1e-4 and results["LoRA"]["reload_diff"] == 0.0
    assert (tmp_path / "qlora" / "adapter_model.safetensors").exists()
    assert "| QLoRA |" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_memory_table_of_the_benchmark(capsys):
    """benchmarks/bench_lora.py's memory table (full vs LoRA vs QLoRA, one step each in a fresh process)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_lora
    rows = {row["method"]: row for row in bench_lora.main(["--skip-speed", "--tiny", "--r", "16"])["memory"]}
    assert set(rows) == {"full", "lora", "qlora"}
    assert rows["lora"]["trainable"] == rows["qlora"]["trainable"] < rows["full"]["trainable"]
    # AdamW keeps two fp32 moments per trainable parameter, the gradient one
    for row in rows.values():
        assert row["optimizer"] == 2 * row["grads"] == 2 * 4 * row["trainable"]
    assert rows["qlora"]["weights"] < rows["lora"]["weights"]
    assert rows["full"]["peak"] > rows["full"]["baseline"] > 0
    assert "| qlora |" in capsys.readouterr().out


def test_main_reports_user_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora.main(["--r", "0", "--tiny"])
    assert exit_info.value.code == 2 and "r must be a positive integer" in capsys.readouterr().err


@pytest.mark.cuda
def test_qlora_step_on_cuda_matches_cpu():
    cpu = nf4.quantize_model(tiny_llama())
    lora.apply_lora(cpu, "all-linear", r=4, alpha=8)
    randomize_adapters(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    assert all(m.quant_state.absmax.is_cuda for m in gpu.modules() if isinstance(m, nf4.LinearNF4))
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        lora.lm_loss(model, TOKENS.to(device)).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad.cpu(), atol=1e-4, rtol=1e-3), name

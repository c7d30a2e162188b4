"""vlm_train.py with transformers parts from local folders (--lm hf:DIR, --vision hf:DIR) and the SmolVLM
recipe (--preset smolvlm): tiny random Llama- and Gemma-style LMs and CLIP / SigLIP vision towers,
saved with save_pretrained as real checkpoint folders are, plug in and train with full / LoRA /
QLoRA; the LoRA adapter loads in peft onto transformers' own LM with the same logits.
"""
import json
from dataclasses import replace

import pytest
import torch

import vlm_train as vt

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

CPU = torch.device("cpu")


def words():
    """Every word of the tiny shapes data's texts, and the prompts'."""
    data = vt.shapes_data(48, 0, "train", 32)
    texts = [c for _, c in data.captions] + [q + " " + a for _, q, a, _ in data.qa] + ["caption Describe this image"]
    return sorted({w for t in texts for w in t.split()})


def save_tiny_lm(path, kind="llama"):
    """A random 2-layer Llama (SmolLM's architecture, tied embeddings) or Gemma with a word-level
    tokenizer (tokenizers' WordLevel in a PreTrainedTokenizerFast), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + words()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    sizes = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **sizes)) if kind == "llama" else
             GemmaForCausalLM(GemmaConfig(head_dim=8, **sizes)))
    model.save_pretrained(path)
    return path


def save_tiny_vision(path, kind="clip"):
    """A random 2-layer CLIP or SigLIP vision tower on 32-pixel images (16 patches of 8 x 8)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)
    torch.manual_seed(1)
    model = (CLIPVisionModel(CLIPVisionConfig(**sizes)) if kind == "clip" else
             SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **sizes)))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"llama": save_tiny_lm(root / "llama"), "gemma": save_tiny_lm(root / "gemma", "gemma"),
            "clip": save_tiny_vision(root / "clip"), "siglip": save_tiny_vision(root / "siglip", "siglip"),
            "cache": root / "cache"}


def tiny(folders, lm="llama", vision="clip", **model):
    vcfg = vt.VLMConfig.tiny(lm=f"hf:{folders[lm]}" if lm else "", vision=f"hf:{folders[vision]}" if vision else "",
                             **model)
    return vcfg, vt.TrainConfig.tiny(stage1_steps=2, stage2_steps=2, itc_steps=2)


@pytest.mark.parametrize("lm, vision", [("llama", "clip"), ("gemma", "siglip"), ("llama", "siglip")])
@pytest.mark.parametrize("mode", vt.STAGE2_MODES)
def test_hf_parts_plug_in_and_one_step_trains_exactly_the_intended_parameters(folders, lm, vision, mode):
    from transformers import AutoModelForCausalLM
    vcfg, tcfg = tiny(folders, lm, vision)
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(folders["cache"], CPU, progress=False))
    assert isinstance(vlm.model, vt.HFVLM) and isinstance(vlm.model.vision, vt.FrozenHFVision)
    assert vlm.model.num_image_tokens == 16 // vcfg.patch_merge ** 2                 # 32 px / 8 px patches, 2 x 2 merged
    if mode != "full":
        vt.add_lora(vlm, quantize=mode == "qlora")
    params = vt.set_stage(vlm, 2, mode)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    batch = vt.make_batch(vlm, data, list(range(4)), "vqa")
    opt = vt.stage_optimizer(params, 1e-2, 0.0)
    loss = vt.vlm_loss(vlm.model.train(), batch)
    loss.backward()
    opt.step()
    assert loss == loss and loss > 0
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("connector.", "language_model.")) for n in changed)
    assert any(n.startswith("connector.") for n in changed)
    lm_changed = {n for n in changed if n.startswith("language_model.")}
    if mode == "full":
        assert lm_changed and not any("lora_" in n for n in lm_changed)
    else:        # only B moves on the first step: B = 0 makes A's gradient B^T (...) zero, B's is (...)(A x)^T
        assert lm_changed and all(".lora_B" in n for n in lm_changed)
    if mode == "qlora":
        assert any(type(m).__name__ == "LinearNF4" for m in vlm.model.language_model.modules())
    # the image tokens are the connector's output, in the LM's embedding space
    source = AutoModelForCausalLM.from_pretrained(folders[lm])
    assert vlm.model.connector(batch["image_inputs"]).shape[-1] == source.config.hidden_size



@pytest.mark.parametrize("mode", ["full", "lora"])
def test_activation_checkpointing_of_an_hf_lm_gives_the_same_gradients(folders, mode):
    vcfg, tcfg = tiny(folders, "llama", "clip")
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(folders["cache"], CPU, progress=False))
    if mode != "full":
        vt.add_lora(vlm)
    batch = vt.make_batch(vlm, data, list(range(4)), "vqa")

    def gradients():
        vlm.model.zero_grad(set_to_none=True)
        vt.vlm_loss(vlm.model.train(), batch).backward()
        return {n: p.grad.clone() for n, p in vlm.model.named_parameters() if p.grad is not None}

    tcfg = replace(tcfg, stage2=mode)
    vt.vqa_stage(vlm, data, tcfg)
    plain = gradients()
    vt.vqa_stage(vlm, data, replace(tcfg, grad_checkpointing=True))
    assert vlm.lm.is_gradient_checkpointing
    recomputed = gradients()
    assert plain.keys() == recomputed.keys() and any(n.startswith("language_model.") for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], rtol=1e-5, atol=1e-7), name

def test_features_match_the_towers_own_hidden_states(folders):
    """FrozenHFVision reads transformers' hidden states: CLIP's last layer after its post-LayerNorm
    with the class token first; SigLIP's (already normalised) with its patch mean in front."""
    from transformers import CLIPVisionModel, SiglipVisionModel
    x = torch.randn(2, 3, 32, 32)
    clip_tower = vt.load_hf_vision(f"hf:{folders['clip']}", all_layers=True)
    ref = CLIPVisionModel.from_pretrained(folders["clip"]).eval()
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        want = ref.post_layernorm(out.last_hidden_state)
    got = clip_tower(x)
    assert got.shape == (2, 3, 17, 32)                                    # L + 1 layers kept, 1 + 16 tokens
    torch.testing.assert_close(got[:, -1], want)
    torch.testing.assert_close(got[:, 0], out.hidden_states[0])
    sig = vt.load_hf_vision(f"hf:{folders['siglip']}", all_layers=False)
    ref = SiglipVisionModel.from_pretrained(folders["siglip"]).eval()
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
    got = sig(x)
    assert got.shape == (2, 1, 17, 32)
    torch.testing.assert_close(got[:, 0, 1:], want)
    torch.testing.assert_close(got[:, 0, 0], want.mean(1))
    assert sig.mean == (0.5, 0.5, 0.5) and clip_tower.mean != sig.mean  # each tower its own normalisation


def test_greedy_generation_with_the_kv_cache_equals_full_recomputation(folders):
    vcfg, tcfg = tiny(folders)
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(folders["cache"], CPU, progress=False))
    batch = vlm.processor(["how many shapes are there ?", "what colour is the circle ?"])
    pixels = vlm.image_inputs(data.images[:2])                            # the frozen tower's features
    gen = vlm.model.generate(batch["input_ids"], pixels, batch["attention_mask"], max_new_tokens=5,
                             eos_token_id=-5).tokens                      # no EOS: all 5 steps
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for t in range(5):                                                    # greedy, recomputing everything
        with torch.no_grad():
            logits = vlm.model(ids, pixels, mask).logits[:, -1]
        assert torch.equal(logits.argmax(-1), gen[:, t])
        ids, mask = torch.cat([ids, gen[:, t:t + 1]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.slow
def test_lora_adapter_of_an_hf_lm_loads_in_peft_with_the_same_logits(folders, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    vt.main(["--train", "--tiny", "--lm", f"hf:{folders['llama']}", "--vision", f"hf:{folders['clip']}",
             "--stage2", "lora", "--out", str(out), "--cache", str(folders["cache"]), "--device", "cpu"])
    model_dir = out / "model"
    adapter = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)       # keys of the LM alone
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert json.loads((model_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    ours = vt.load_vlm(out)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir / "lm"), model_dir / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()
    batch = ours.processor(["what colour is the circle ?", "how many shapes are there ?"], ["red", "two"], images=False)
    with torch.no_grad():
        want = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = ours.model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    assert (got - want)[keep].abs().max() < 1e-5
    assert (base - want)[keep].abs().max() > 1e-4                         # the adapter is not a no-op
    # the saved model answers as the trained one did, and nothing of it points back at the sources
    metrics = json.loads((out / "metrics.json").read_text())
    images = [vt.synthetic_vqa(1, seed=3, image_size=32)[0][0]]
    assert ours.answer(images[0], "how many shapes are there ?") == vt.load_vlm(out).answer(images[0], "how many shapes are there ?")
    assert metrics["after stage 2"]["test"]["all"]["n"] == 16


def test_full_tuning_saves_the_tuned_lm_in_transformers_format(folders, tmp_path):
    from transformers import AutoModelForCausalLM
    vcfg, tcfg = tiny(folders, "gemma", "siglip")
    tcfg = vt.replace(tcfg, stage2="full")
    _, vlm = vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "run", CPU, cache=folders["cache"], progress=False,
                                             evaluate=False))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model" / "lm").eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, vlm.model.language_model(input_ids=ids).logits)
    again = vt.load_vlm(tmp_path / "run")
    x = vlm.processor(["what colour is the circle ?"], ["red"])
    images = vt.shapes_data(1, 0, "train", 32).images
    with torch.no_grad():
        torch.testing.assert_close(again.model(x["input_ids"], again.image_inputs(images), x["attention_mask"]).logits,
                                   vlm.model(x["input_ids"], vlm.image_inputs(images), x["attention_mask"]).logits)


@pytest.mark.parametrize("argv, message", [
    (["--lm", "hf:/no/such/folder"], "is not a folder"),
    (["--lm", "models"], "expects hf:DIR"),
    (["--vision", "hf:LLAMA"], "expected a CLIP or SigLIP checkpoint"),
    (["--lm", "hf:CLIP"], "missing tokenizer.json or tokenizer.model"),
])
def test_bad_hf_folders_exit_with_a_clear_message(folders, argv, message, tmp_path, capsys):
    argv = [a.replace("LLAMA", str(folders["llama"])).replace("CLIP", str(folders["clip"])) for a in argv]
    with pytest.raises(SystemExit):
        vt.main(argv + ["--out", str(tmp_path), "--cache", str(folders["cache"])])
    assert message in capsys.readouterr().err


def test_smolvlm_preset_is_the_tutorials_recipe(folders, tmp_path):
    """Q-Former with an MLP adapter; stage 1 at lr 1e-4 with 10x on cross-attention and query tokens;
    stage 2 the adapter + LoRA r 64 / alpha 128 on every linear layer at 5e-4, Q-Former frozen, batch
    8 x 4 accumulation, prompt "Describe this image"; on a transformers LM here."""
    from argparse import Namespace
    args = Namespace(preset="smolvlm", connector=None, stage2=None, seed=0, data=None, steps=None, set=None,
                     tiny=True, train=True, memory_report=False, lm=f"hf:{folders['llama']}", vision=None)
    vcfg, tcfg = vt.configs_from_args(args)
    assert (vcfg.connector, vcfg.qformer_head, vcfg.num_queries, vcfg.lora_r, vcfg.lora_alpha) == ("qformer", "mlp", 32, 64, 128)
    assert set(vcfg.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (tcfg.itc_lr, tcfg.stage1_lr, tcfg.qformer_lr_scale, tcfg.stage2_lr) == (1e-4, 1e-4, 10.0, 5e-4)
    assert (tcfg.batch_size // tcfg.grad_accum, tcfg.grad_accum, tcfg.bf16) == (8, 4, True)
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(folders["cache"], CPU, progress=False))
    assert vlm.caption_prompt == "Describe this image"
    batch = vt.make_batch(vlm, data, [0, 1], "caption")
    assert vlm.processor.tokenizer.decode(batch["input_ids"][0][batch["token_type_ids"][0] == 0].clamp(min=0)
                                          [vlm.model.num_image_tokens + 1:]) == "Describe this image"
    # stage 1: lr x 10 exactly on the Q-Former's cross-attention and query tokens
    stage = [s for s in vt.align_stages(vlm, data, tcfg) if s.name == "stage1"][0]
    params, scaled = stage.params, stage.scaled
    assert {id(p) for p in scaled} == {id(p) for n, p in vlm.model.connector.named_parameters()
                                       if "crossattention" in n or "query_tokens" in n}
    opt = vt.stage_optimizer(params, tcfg.stage1_lr, 0.0, scaled, tcfg.qformer_lr_scale)
    fast = {id(p) for g in opt.param_groups if g["lr"] * g["lr_scale"] == pytest.approx(1e-3) for p in g["params"]}
    slow = {id(p) for g in opt.param_groups if g["lr"] * g["lr_scale"] == pytest.approx(1e-4) for p in g["params"]}
    assert fast == {id(p) for p in scaled} and slow == {id(p) for p in params} - fast and scaled
    # stage 2: the MLP adapter and the LM's adapters, never the Q-Former
    vt.add_lora(vlm)
    params = vt.set_stage(vlm, 2, "lora", tcfg.stage2_qformer)
    names = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("connector.head.") or ".lora_" in n for n in names)
    assert any(n.startswith("connector.head.") for n in names)


@pytest.mark.slow
def test_smolvlm_preset_runs_on_the_default_decoder(tmp_path, capsys):
    metrics = vt.main(["--preset", "smolvlm", "--out", str(tmp_path), "--device", "cpu"])
    assert metrics["config"]["model"]["qformer_head"] == "mlp"
    assert all(v[-1] == v[-1] for v in metrics["history"].values())       # finite losses in every stage
    assert "stage1a" in metrics["history"]


def test_the_default_run_never_imports_transformers(tmp_path):
    """transformers is imported only inside the functions that load hf: folders (and nothing imports
    vlm_train.py), so a copied vlm_train.py runs its demo on the card's core packages."""
    import subprocess
    import sys
    code = ("import sys, vlm_train as vt; vt.main(['--out', sys.argv[1], '--device', 'cpu']); "
            "print(sorted(m for m in ('transformers', 'peft', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=vt.Path(vt.__file__).parent, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    roots = [p for p in vt.Path(vt.__file__).parent.glob("*.py") if p.name != "vlm_train.py"]
    assert not [p.name for p in roots if "import vlm_train" in p.read_text()]

"""The specification of paligemma.py, checked against transformers' PaliGemmaForConditionalGeneration.

Every checkpoint here is a small random PaliGemma that transformers itself builds and saves in its
real on-disk format (config.json + safetensors, single file or sharded), with all weights drawn at
random (norms included) so that no layer can hide behind an identity initialisation.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import paligemma as pg

# transformers' own PaliGemmaProcessor trips a numpy 2 deprecation when it builds labels;
# bitsandbytes and peft emit deprecation notices of their own
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

N_IMG = 16          # (28 / 7)^2 image tokens
IMAGE_ID = 299
VOCAB = 300


def build_hf(path, kv_heads=1, gemma2=False, seed=0, shard=None, vocab=VOCAB, image_id=IMAGE_ID, max_pos=64,
             vision_head=False):
    """A random transformers PaliGemma, saved to `path`; returns the model (fp32, eval)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=kv_heads, head_dim=16, vocab_size=vocab, max_position_embeddings=max_pos)
    if gemma2:   # PaliGemma 2: soft-capping everywhere, and a local window shorter than the prompt
        text.update(model_type="gemma2", sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    config = PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=7, vision_use_head=vision_head),   # real ones: no head
        text_config=text, image_token_index=image_id, vocab_size=vocab, projection_dim=48, hidden_size=48)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


@pytest.fixture(scope="module")
def mqa(tmp_path_factory):
    path = tmp_path_factory.mktemp("mqa")
    return path, build_hf(path, kv_heads=1)


@pytest.fixture(scope="module")
def gqa_sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    return path, build_hf(path, kv_heads=2, seed=1, shard="40KB")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    return path, build_hf(path, kv_heads=2, gemma2=True, seed=2)


def inputs(batch=2, prompt_len=6, answer_len=4, seed=0):
    """pixel_values, input_ids = <image> x N + <bos> + prompt + answer, token_type_ids (answer = 1)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, 28, 28, generator=g) * 2 - 1
    text = torch.randint(3, IMAGE_ID, (batch, prompt_len + answer_len), generator=g)
    ids = torch.cat([torch.full((batch, N_IMG), IMAGE_ID), torch.full((batch, 1), 2), text], 1)
    types = torch.zeros_like(ids)
    types[:, ids.shape[1] - answer_len:] = 1
    return pixels, ids, types


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# --- hand-computed cases -----------------------------------------------------------------------

def test_prefix_lm_mask_by_hand():
    # 2 prefix tokens then 3 suffix tokens; the first column of row b is padding
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    key_ok = torch.tensor([[True] * 5, [False] + [True] * 4])
    mask = pg.prefix_lm_mask(types.cumsum(-1), key_ok, 0)[:, 0].int()
    expected = torch.tensor([[1, 1, 0, 0, 0],     # prefix rows see the whole prefix
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],     # suffix rows are causal
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]])
    assert torch.equal(mask[0], expected)
    padded = expected.clone()
    padded[1:, 0] = 0                             # nobody attends to the pad ...
    assert torch.equal(mask[1], padded)           # ... but the pad query keeps itself (no empty row)
    # all-prefix, unpadded: nothing is masked, so the fused kernel can run without a mask
    assert pg.prefix_lm_mask(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), 0) is None
    # a local window of 2: suffix rows drop keys 2+ back, prefix rows still see each other
    local = pg.prefix_lm_mask(types[:1].cumsum(-1), key_ok[:1], 0, window=2, is_prefix=types[:1] == 0)[0, 0].int()
    assert local.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_rms_norm_and_rope_by_hand():
    x = torch.tensor([[3.0, 4.0]])
    # rms = sqrt((9 + 16) / 2); weight stored as an offset: scale = 1 + w
    out = pg.rms_norm(x, torch.tensor([0.0, 1.0]), eps=0.0)
    rms = math.sqrt(12.5)
    assert torch.allclose(out, torch.tensor([[3 / rms, 2 * 4 / rms]]))
    # RoPE with d = 2 rotates (x0, x1) by angle = position
    cos, sin = pg.rope_cos_sin(torch.tensor([[1]]), head_dim=2, theta=10000.0, dtype=torch.float32)
    y = pg.apply_rope(torch.tensor([[[[1.0, 0.0]]]]), cos, sin)
    assert torch.allclose(y.flatten(), torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_top_p_matches_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper
    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    for p in (0.1, 0.5, 0.9):
        ours = pg.top_p_filter(logits, p)
        ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), p
    # hand case: probabilities 0.5, 0.3, 0.2; top_p = 0.6 keeps the two best (0.5 < 0.6 <= 0.8)
    kept = pg.top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.6)
    assert torch.isfinite(kept).tolist() == [[True, True, False]]
    # top_p -> 0 leaves only the argmax, so sampling is greedy
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pg.sample_next_token(logits, 1.0, 1e-6, g), logits.argmax(-1))


# --- parity with transformers ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mqa", "gqa_sharded", "gemma2"])
def test_prefill_logits_and_training_loss_match_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    if which == "gqa_sharded":
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    ours = pg.PaliGemma.from_pretrained(path)
    pixels, ids, types = inputs()
    labels = pg.suffix_labels(ids, types)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, token_type_ids=types, labels=labels)
        out = ours(ids, pixels, token_type_ids=types, labels=labels)
        prompt = ours(ids, pixels).logits                                  # no token types: all prefix
        # transformers needs the zeros spelled out: without token_type_ids it masks Gemma 2's local
        # layers (and padded rows) causally, while unpadded global layers attend both ways
        ref_prompt = hf(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids)).logits
    assert max_diff(out.logits, ref.logits) < 1e-4
    assert max_diff(prompt, ref_prompt) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    # the loss really is the suffix-only next-token cross-entropy
    n = int((labels[:, 1:] != -100).sum())
    logp = out.logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    assert n == 2 * 4 and abs(-(logp * (labels[:, 1:] != -100)).sum().item() / n - out.loss.item()) < 1e-5


@pytest.mark.parametrize("which", ["mqa", "gqa_sharded", "gemma2"])
def test_greedy_tokens_match_transformers_on_a_padded_batch(which, request):
    path, hf = request.getfixturevalue(which)
    ours = pg.PaliGemma.from_pretrained(path)
    pixels, ids, _ = inputs(prompt_len=8, answer_len=0, seed=3)
    ids[0, :3] = 0                                                          # row 0 is 3 tokens shorter:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                                         # left padding
    ids[0, 3:3 + N_IMG] = IMAGE_ID
    ids[0, 3 + N_IMG] = 2
    ids[0, 3 + N_IMG + 1:] = torch.randint(3, IMAGE_ID, (ids.shape[1] - 4 - N_IMG,))
    free = ours.generate(ids, pixels, mask, max_new_tokens=10, eos_token_id=[]).tokens
    eos = int(free[0, 3])                     # row 0 stops after 4 tokens (or earlier), row 1 may go on
    ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                      max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, pixels, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0).tokens
    assert got.tolist() == ref.tolist()
    assert eos in got[0].tolist() and len(set(free[1].tolist())) > 1   # EOS exercised, output not constant


def test_a_generated_image_token_is_text_as_in_transformers(mqa):
    """A model may write the <image> id itself (a random one, or a fine-tuned one early on): the next step
    embeds it as the token it is, as transformers does, instead of asking for a picture."""
    import copy
    path, hf = mqa
    ours, hf = pg.PaliGemma.from_pretrained(path), copy.deepcopy(hf)          # the fixture's model stays as it is
    pixels, ids, _ = inputs(prompt_len=8, answer_len=0, seed=3)
    with torch.no_grad():                      # make <image> the greedy choice: its tied output row, scaled up
        for model in (ours.language_model.model.embed_tokens, hf.get_input_embeddings()):
            model.weight[IMAGE_ID] *= 30
    got = ours.generate(ids, pixels, max_new_tokens=4, eos_token_id=[]).tokens
    ref = hf.generate(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids), max_new_tokens=4,
                      do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert (got == IMAGE_ID).any() and got.tolist() == ref.tolist()


def test_bf16_is_bit_identical_to_transformers_on_cpu(mqa):
    """The merge runs in fp32 and is cast once, so image rows round back to exactly the projector's
    output and text rows to E * bf16(sqrt(D)): bit for bit what transformers feeds its first layer."""
    path, hf = mqa
    ours = pg.PaliGemma.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    hf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16).eval()
    pixels, ids, types = inputs()
    seen = {}

    def grab_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    hook = hf16.model.language_model.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)
    with torch.no_grad():
        ref = hf16(input_ids=ids, pixel_values=pixels.bfloat16(), token_type_ids=types).logits
        x = ours.embed_inputs(ids, pixels.bfloat16())
        got = ours(ids, pixels.bfloat16(), token_type_ids=types).logits
        fp32 = hf(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
    hook.remove()
    assert torch.equal(x, seen["x"])
    # the layers then do the same bf16 operations in the same order (norms in fp32, cos/sin cast to
    # bf16 before the rotation, the same CPU attention kernel), so the logits agree bit for bit too,
    # while bf16 itself is far from the fp32 model
    assert torch.equal(got, ref)
    assert max_diff(ref, fp32) > 1e-2


@pytest.mark.slow
def test_original_and_older_key_layouts_load(mqa, tmp_path):
    path, hf = mqa
    tensors = load_file(str(path / "model.safetensors"))
    layouts = {
        # the original release (paligemma-3b-pt-224 on the hub)
        "original": {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()},
        # transformers 4.52 - 4.57 saved the wrapper's own names and an explicit lm_head
        "4.5x": {**{k.replace("language_model.model.", "model.language_model.", 1)
                    .replace("vision_tower.", "model.vision_tower.vision_model.", 1)
                    .replace("multi_modal_projector.", "model.multi_modal_projector.", 1): v
                    for k, v in tensors.items()},
                 "lm_head.weight": tensors["language_model.model.embed_tokens.weight"].clone()},
    }
    pixels, ids, types = inputs()
    with torch.no_grad():
        base = pg.PaliGemma.from_pretrained(path)(ids, pixels, token_type_ids=types).logits
    for name, renamed in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((path / "config.json").read_text())
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with torch.no_grad():
            logits = pg.PaliGemma.from_pretrained(folder)(ids, pixels, token_type_ids=types).logits
            ref = type(hf).from_pretrained(folder).eval()(input_ids=ids, pixel_values=pixels,
                                                          token_type_ids=types).logits
        assert torch.equal(logits, base), name
        assert max_diff(ref, base) < 1e-4, name     # transformers reads the same file the same way


def test_unused_siglip_head_is_tolerated_only_when_the_config_declares_it(tmp_path):
    """A SigLIP config built from a dict defaults to vision_use_head=True, and transformers then saves
    a pooling head that PaliGemma never runs: skip it, but only when the config says it is there."""
    hf = build_hf(tmp_path, vision_head=True, seed=6)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("vision_tower.head.") for k in tensors)
    pixels, ids, types = inputs()
    with torch.no_grad():
        got = pg.PaliGemma.from_pretrained(tmp_path)(ids, pixels, token_type_ids=types).logits
        want = hf(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
    assert max_diff(got, want) < 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(pg.CheckpointError, match=r"unexpected \(\d+\): vision_tower\.head\."):
        pg.PaliGemma.from_pretrained(tmp_path)


def test_save_pretrained_is_read_by_transformers(mqa, tmp_path):
    path, hf = mqa
    ours = pg.PaliGemma.from_pretrained(path)
    ours.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    back = type(hf).from_pretrained(tmp_path).eval()
    pixels, ids, types = inputs()
    with torch.no_grad():
        assert max_diff(back(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits,
                        ours(ids, pixels, token_type_ids=types).logits) < 1e-4


# --- invariants --------------------------------------------------------------------------------

def test_padded_batch_equals_unpadded_rows(mqa):
    ours = pg.PaliGemma.from_pretrained(mqa[0])
    pixels, ids, types = inputs(batch=2, prompt_len=6, answer_len=3, seed=5)
    short = torch.cat([ids[1, :N_IMG + 1], ids[1, N_IMG + 4:]])            # row 1 without 3 prompt tokens
    short_types = torch.cat([types[1, :N_IMG + 1], types[1, N_IMG + 4:]])
    batch_ids = torch.stack([ids[0], torch.cat([torch.zeros(3, dtype=torch.long), short])])
    batch_types = torch.stack([types[0], torch.cat([torch.zeros(3, dtype=torch.long), short_types])])
    mask = torch.ones_like(batch_ids)
    mask[1, :3] = 0
    labels = pg.suffix_labels(batch_ids, batch_types, mask)
    with torch.no_grad():
        batch = ours(batch_ids, pixels, mask, batch_types, labels=labels)
        rows = [ours(batch_ids[:1], pixels[:1], token_type_ids=batch_types[:1], labels=labels[:1]),
                ours(short[None], pixels[1:], token_type_ids=short_types[None], labels=labels[1:, 3:])]
    assert max_diff(batch.logits[0], rows[0].logits[0]) < 1e-5
    assert max_diff(batch.logits[1, 3:], rows[1].logits[0]) < 1e-5
    # the batch loss is the token-weighted mean of the row losses
    counts = [int((l[1:] != -100).sum()) for l in (labels[0], labels[1, 3:])]
    weighted = sum(r.loss * c for r, c in zip(rows, counts)) / sum(counts)
    assert abs(batch.loss.item() - weighted.item()) < 1e-5
    # and generation: the padded row decodes exactly as the row alone
    prompt_mask = mask[:, :-3]
    padded = ours.generate(batch_ids[:, :-3], pixels, prompt_mask, max_new_tokens=6, eos_token_id=[]).tokens
    alone = ours.generate(short[None, :-3], pixels[1:], max_new_tokens=6, eos_token_id=[]).tokens
    assert padded[1].tolist() == alone[0].tolist()


@pytest.mark.parametrize("which", ["gqa_sharded", "gemma2"])
def test_kv_cache_equals_recomputing_the_sequence(which, request):
    ours = pg.PaliGemma.from_pretrained(request.getfixturevalue(which)[0])
    pixels, ids, _ = inputs(prompt_len=5, answer_len=0, seed=7)
    g = torch.Generator().manual_seed(0)
    out = ours.generate(ids, pixels, max_new_tokens=12, temperature=1.5, top_p=0.95, eos_token_id=[],
                        generator=g, return_scores=True)
    full_ids = torch.cat([ids, out.tokens], 1)
    types = torch.cat([torch.zeros_like(ids), torch.ones_like(out.tokens)], 1)   # generated = suffix
    with torch.no_grad():
        full = ours(full_ids, pixels, token_type_ids=types).logits[:, ids.shape[1] - 1:-1]
    assert full_ids.shape[1] > 8 + 16   # longer than gemma2's window: the local mask is exercised
    assert max_diff(full, out.scores) < 1e-4


def test_generation_stops_at_eos_and_pads_finished_rows(mqa):
    ours = pg.PaliGemma.from_pretrained(mqa[0])
    pixels, ids, _ = inputs(prompt_len=4, answer_len=0, seed=9)
    free = ours.generate(ids, pixels, max_new_tokens=8, eos_token_id=[]).tokens
    eos = int(free[0, 2])                     # row 0's third token becomes the EOS
    stopped = ours.generate(ids, pixels, max_new_tokens=8, eos_token_id=eos, pad_token_id=0).tokens
    first = {b: free[b].tolist().index(eos) if eos in free[b].tolist() else None for b in range(2)}
    for b in range(2):
        end = first[b]
        if end is None:
            assert stopped[b].tolist() == free[b, :stopped.shape[1]].tolist()
        else:
            assert stopped[b, :end + 1].tolist() == free[b, :end + 1].tolist()
            assert set(stopped[b, end + 1:].tolist()) <= {0}
    if all(v is not None for v in first.values()):
        assert stopped.shape[1] == max(first.values()) + 1   # the loop ended once every row had stopped


def test_image_tokens_enter_at_the_projector_scale(mqa):
    ours = pg.PaliGemma.from_pretrained(mqa[0])
    pixels, ids, _ = inputs()
    with torch.no_grad():
        x = ours.embed_inputs(ids, pixels)
        u = ours.image_features(pixels)
    E = ours.language_model.model.embed_tokens.weight
    assert max_diff(x[:, :N_IMG], u) < 1e-6                                  # u / sqrt(D) * sqrt(D) = u
    assert max_diff(x[:, N_IMG:], E[ids[:, N_IMG:]] * math.sqrt(48)) < 1e-5  # text: E[id] sqrt(D)


def test_dense_connector_starts_equal_to_the_linear_model_and_can_learn(mqa):
    path = mqa[0]
    linear = pg.PaliGemma.from_pretrained(path)
    dense = pg.PaliGemma.from_pretrained(path, connector="dense", dense_groups=2)
    W = dense.multi_modal_projector.linear.weight
    assert W.shape == (48, 3 * 32)                          # [final ; mean(h_0, h_1) ; mean(h_2)]
    assert torch.equal(W[:, :32], linear.multi_modal_projector.linear.weight) and not W[:, 32:].any()
    pixels, ids, types = inputs()
    labels = pg.suffix_labels(ids, types)
    out = dense(ids, pixels, token_type_ids=types, labels=labels)
    assert max_diff(out.logits, linear(ids, pixels, token_type_ids=types).logits) < 1e-6
    out.loss.backward()
    assert W.grad[:, 32:].abs().sum() > 0                   # the new columns receive gradient


# --- 4-bit weights (nf4.py) and adapters (lora.py) --------------------------------------------

@pytest.mark.slow
def test_4bit_load_matches_transformers_bitsandbytes(mqa):
    """load_in_4bit quantizes every linear layer as transformers + bitsandbytes do: the same packed
    4-bit codes byte for byte, and the same double-quantized block constants except the few where
    bitsandbytes' C kernel picks a neighbouring 8-bit code (REFERENCE_NOTES: ~0.2% of them)."""
    import bitsandbytes.functional as bnb_f
    from transformers import BitsAndBytesConfig
    path, hf = mqa
    ours = pg.PaliGemma.from_pretrained(path, load_in_4bit=True)
    ref = type(hf).from_pretrained(path, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)).eval()
    mine = {n: m for n, m in ours.named_modules() if type(m).__name__ == "LinearNF4"}
    theirs = {pg.canonical_key(n + ".weight").removesuffix(".weight"): m
              for n, m in ref.named_modules() if type(m).__name__ == "Linear4bit"}
    assert set(mine) == set(theirs) and len(mine) == 3 * 6 + 2 * 7 + 1   # SigLIP, decoder, projector
    same_constants = total_constants = 0
    for name, layer in mine.items():
        other = theirs[name]
        assert torch.equal(layer.weight.view(-1), other.weight.data.view(-1)), name
        state = other.weight.quant_state
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        same_constants += int((layer.quant_state.absmax_fp32() == absmax).sum())
        total_constants += absmax.numel()
    assert same_constants >= 0.99 * total_constants
    pixels, ids, types = inputs()
    with torch.no_grad():
        got = ours(ids, pixels, token_type_ids=types).logits
        want = ref(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
        full = hf(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
    assert max_diff(got, want) * 10 < max_diff(got, full)   # nearer bitsandbytes than full precision


@pytest.mark.slow
def test_peft_adapter_trained_on_transformers_loads(mqa, tmp_path):
    from peft import LoraConfig, get_peft_model
    path, _ = mqa
    hf = type(mqa[1]).from_pretrained(path).eval()
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)     # B = 0 would make any loader look right
    peft_model.save_pretrained(tmp_path)
    pixels, ids, types = inputs()
    ours = pg.PaliGemma.from_pretrained(path, adapter=tmp_path)
    with torch.no_grad():
        want = peft_model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
        got = ours(ids, pixels, token_type_ids=types).logits
        base = pg.PaliGemma.from_pretrained(path)(ids, pixels, token_type_ids=types).logits
    assert max_diff(got, want) < 1e-4 and max_diff(base, want) > 1e-1
    # QLoRA: the same adapter on an NF4 base
    qlora = pg.PaliGemma.from_pretrained(path, adapter=tmp_path, load_in_4bit=True)
    layer = qlora.language_model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LoRALinear" and type(layer.base_layer).__name__ == "LinearNF4"


# --- processor ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A checkpoint folder with a tiny Gemma-style tokenizer (<image>, <locXXXX>, <segXXX> included),
    saved by transformers' PaliGemmaProcessor next to the weights, as real checkpoints ship it."""
    from transformers import AddedToken, GemmaTokenizer, PaliGemmaProcessor, SiglipImageProcessorPil
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{i:02X}>": 5 + i for i in range(256)})
    for piece in list("abcdefghijklmnopqrstuvwxyz\n") + ["\u2581", "ca", "cat", "\u2581a"]:
        vocab[piece] = len(vocab)
    vocab["<image>"] = image_id = len(vocab)
    extra = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    tok = GemmaTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t"), ("\u2581", "a")])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    images = SiglipImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.image_seq_length = N_IMG
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)   # adds the loc / seg tokens
    path = tmp_path_factory.mktemp("tok")
    processor.save_pretrained(path)
    vocab_size = len(vocab) + len(extra)
    build_hf(path, vocab=vocab_size, image_id=image_id, seed=4)
    return path, processor


def test_processor_matches_transformers(with_tokenizer):
    path, ref_processor = with_tokenizer
    ours = pg.PaliGemmaProcessor.from_pretrained(path)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (40, 50, 3), dtype=np.uint8)),
              Image.fromarray(rng.randint(0, 256, (30, 30), dtype=np.uint8))]      # grayscale -> RGB
    prompts, suffixes = ["detect cat <loc0005>", "caption en"], ["a cat", "cat<seg007>"]
    ref = ref_processor(images=images, text=prompts, suffix=suffixes, return_tensors="pt", padding="longest")
    got = ours(images, prompts, suffixes)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert got[key].tolist() == ref[key].tolist(), key
    assert max_diff(got["pixel_values"], ref["pixel_values"]) < 1e-6
    loc = ours.tokenizer.convert_tokens_to_ids("<loc0005>")
    assert loc in got["input_ids"][0].tolist()                   # loc tokens are single tokens
    ref_prompt = ref_processor(images=images, text=prompts, return_tensors="pt", padding="longest")
    assert ours(images, prompts)["input_ids"].tolist() == ref_prompt["input_ids"].tolist()


def test_cli_answers_like_transformers(with_tokenizer, tmp_path, capsys):
    path, ref_processor = with_tokenizer
    image = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (33, 45, 3), dtype=np.uint8)).save(image)
    pg.main(["--model", str(path), "--image", str(image), "--prompt", "caption en", "--max-new-tokens", "6",
             "--device", "cpu"])
    printed = capsys.readouterr().out.strip()
    from transformers import PaliGemmaForConditionalGeneration
    hf = PaliGemmaForConditionalGeneration.from_pretrained(path).eval()
    batch = ref_processor(images=[Image.open(image)], text=["caption en"], return_tensors="pt")
    ref = hf.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert printed == ref_processor.batch_decode(ref, skip_special_tokens=True)[0]


# --- bad input ---------------------------------------------------------------------------------

def test_missing_config_weights_or_tokenizer(tmp_path, mqa):
    with pytest.raises(FileNotFoundError, match="config.json"):
        pg.PaliGemma.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((mqa[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pg.PaliGemma.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        pg.PaliGemmaProcessor.from_pretrained(tmp_path)


def test_corrupt_config_and_weight_files_are_named_in_the_error(tmp_path, mqa):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{not utf-8")
    with pytest.raises(pg.CheckpointError, match=r"config.json is not valid UTF-8 JSON"):
        pg.PaliGemma.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"text_config": 3}')
    with pytest.raises(pg.CheckpointError, match=r"config.json is not a PaliGemma config"):
        pg.PaliGemma.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((mqa[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"{garbage")
    with pytest.raises(pg.CheckpointError, match=r"model.safetensors is not a safetensors file: its header is not JSON"):
        pg.PaliGemma.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(pg.CheckpointError, match=r"index.json is not a safetensors index"):
        pg.PaliGemma.from_pretrained(tmp_path)


def test_a_weight_file_with_nan_is_refused_naming_the_file_and_the_tensor(tmp_path, mqa):
    """A valid header over random bytes loads without complaint unless the values are checked: NaN or inf
    in any tensor is an error naming the file and the tensor, in the full-precision and the 4-bit load."""
    tensors = load_file(str(mqa[0] / "model.safetensors"))
    bad = "language_model.model.layers.0.self_attn.q_proj.weight"
    tensors[bad][0, 0] = float("nan")
    (tmp_path / "config.json").write_text((mqa[0] / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for four_bit in (False, True):
        with pytest.raises(pg.CheckpointError, match=rf"model\.safetensors holds non-finite values .*{bad}"):
            pg.PaliGemma.from_pretrained(tmp_path, load_in_4bit=four_bit)


def test_device_names_are_checked():
    assert pg.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        pg.pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            pg.pick_device("cuda")
    with pytest.raises(ValueError, match="cuda:99 was asked for"):
        pg.pick_device("cuda:99")


def test_missing_and_unexpected_tensors_are_listed(tmp_path, mqa):
    tensors = load_file(str(mqa[0] / "model.safetensors"))
    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    del tensors[gone]
    tensors["language_model.model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    tensors["vision_tower.post_layernorm.weight"] = torch.zeros(7)
    (tmp_path / "config.json").write_text((mqa[0] / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(pg.CheckpointError) as err:
        pg.PaliGemma.from_pretrained(tmp_path)
    message = str(err.value)
    assert f"checkpoint {tmp_path} does not match" in message                # the folder, then the tensors
    assert f"missing (1): {gone}" in message
    assert "unexpected (1): language_model.model.layers.1.mlp.extra.weight" in message
    assert "vision_tower.post_layernorm.weight: checkpoint (7,), model (32,)" in message


def test_bad_images_prompts_and_lengths(mqa, with_tokenizer):
    ours = pg.PaliGemma.from_pretrained(mqa[0])
    pixels, ids, _ = inputs()
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\).*got \(2, 1, 28, 28\)"):
        ours(ids, pixels[:, :1])                                            # one channel
    extra = ids.clone()
    extra[:, N_IMG + 1] = IMAGE_ID                                          # 17 <image> tokens, the model makes 16
    with pytest.raises(ValueError, match="exactly 16 <image> tokens"):
        ours(extra, pixels)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)
    long_ids = torch.cat([ids, torch.full((2, 64), 5)], 1)                  # context is 64 positions
    with pytest.raises(ValueError, match="longer than the context of 64"):
        ours(long_ids, pixels)
    with pytest.raises(ValueError, match="longer than the context of 64"):
        ours.generate(ids, pixels, max_new_tokens=60)
    with pytest.raises(ValueError, match="token_type_ids"):
        ours(ids, pixels, labels=ids)
    processor = pg.PaliGemmaProcessor.from_pretrained(with_tokenizer[0])
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*\(20, 20, 4\)"):
        processor([np.zeros((20, 20, 4), dtype=np.uint8)], ["caption en"])


def test_cli_reports_user_errors_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pg.main(["--model", str(tmp_path), "--image", "x.png"])
    assert exit_info.value.code == 2
    assert "paligemma.py: error: no config.json" in capsys.readouterr().err


# --- the demo ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_on_the_tiny_preset(tmp_path, capsys):
    pg.main(["--out", str(tmp_path / "tiny"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "prefix-LM mask" in out and "(2, 16, 64)" in out
    cache_diff = float(out.split("max |logit diff| = ")[1].split()[0])
    reload_diff = float(out.split("max |logit diff| = ")[2].split()[0])
    assert cache_diff < 1e-5 and reload_diff == 0.0
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == "paligemma"


def checkpointing_run(model, pixels, ids, types, on):
    """Gradients of the suffix loss and the bytes autograd keeps for backward during the forward pass."""
    model.language_model.model.gradient_checkpointing = on
    model.train().zero_grad()
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pixels, token_type_ids=types, labels=pg.suffix_labels(ids, types)).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(kept)


@pytest.mark.parametrize("which", ["mqa", "gemma2"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(which, request):
    path, _ = request.getfixturevalue(which)
    model = pg.PaliGemma.from_pretrained(path)
    pixels, ids, types = inputs(batch=4, prompt_len=12, answer_len=8)
    plain, plain_bytes = checkpointing_run(model, pixels, ids, types, on=False)
    ckpt, ckpt_bytes = checkpointing_run(model, pixels, ids, types, on=True)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), name
    # the decoder's insides are no longer kept: only the layer inputs (2 layers of 2) cross into backward
    assert ckpt_bytes < 0.7 * plain_bytes, (ckpt_bytes, plain_bytes)
    # nothing changes outside training: eval and the KV cache never recompute
    model.eval()
    with torch.no_grad():
        a = model(ids, pixels, token_type_ids=types).logits
        model.language_model.model.gradient_checkpointing = False
        assert torch.equal(a, model(ids, pixels, token_type_ids=types).logits)


@pytest.mark.cuda
def test_gradient_checkpointing_lowers_peak_cuda_memory():
    text = pg.TextConfig(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    model = pg.PaliGemma(pg.PaliGemmaConfig.tiny(text=text, projection_dim=512, image_token_index=999)).cuda()
    ids = torch.randint(3, 999, (8, 512), device="cuda")
    types = torch.zeros_like(ids)
    types[:, 256:] = 1
    peaks = {}
    for on in (False, True):
        model.language_model.model.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(ids, token_type_ids=types, labels=pg.suffix_labels(ids, types)).loss.backward()
        torch.cuda.synchronize()
        peaks[on] = torch.cuda.max_memory_allocated() - base
    assert peaks[True] < 0.6 * peaks[False], peaks


@pytest.mark.cuda
def test_bf16_on_cuda_matches_transformers(mqa):
    path, hf = mqa
    ours = pg.PaliGemma.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    hf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    pixels, ids, types = (t.cuda() for t in inputs())
    with torch.no_grad():
        ref = hf16(input_ids=ids, pixel_values=pixels.bfloat16(), token_type_ids=types).logits
        got = ours(ids, pixels.bfloat16(), token_type_ids=types).logits
        fp32 = hf.cuda()(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits
    assert max_diff(got, ref) <= max_diff(ref, fp32)
    g_ref = hf16.generate(input_ids=ids[:, :-4], pixel_values=pixels.bfloat16(), max_new_tokens=8, do_sample=False)
    assert ours.generate(ids[:, :-4], pixels.bfloat16(), max_new_tokens=8).tokens.tolist() == \
        g_ref[:, ids.shape[1] - 4:].tolist()


# --- the memory of fine-tuning: full, LoRA, QLoRA -----------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trained_on_cpu(path, mode, r):
    """The model memory_estimate describes, built the ordinary way: real bf16 weights on the CPU, the
    vision tower frozen, the decoder's linear layers in NF4 (nf4.py) for QLoRA, LoRA adapters (lora.py)."""
    import lora
    import nf4
    model = pg.PaliGemma.from_pretrained(path, dtype=torch.bfloat16).train()
    model.vision_tower.requires_grad_(False)
    if mode == "qlora":
        nf4.quantize_model(model.language_model, skip=("lm_head",))
    if mode != "full":
        lora.apply_lora(model.language_model, LORA_TARGETS, r, alpha=2 * r)
    return model


def training_batch(batch, prompt_len, answer_len):
    pixels, ids, types = inputs(batch=batch, prompt_len=prompt_len, answer_len=answer_len)
    return {"input_ids": ids, "pixel_values": pixels.bfloat16(), "attention_mask": torch.ones_like(ids),
            "token_type_ids": types, "labels": pg.suffix_labels(ids, types)}


@pytest.mark.parametrize("mode", pg.MODES)
@pytest.mark.parametrize("which", ["mqa", "gemma2"])
def test_activations_counted_on_meta_equal_those_of_a_real_cpu_model(which, mode, request):
    path, _ = request.getfixturevalue(which)
    batch = training_batch(3, prompt_len=6, answer_len=4)
    model, config = trained_on_cpu(path, mode, r=4), pg.read_config(path)
    kept = {}
    for checkpointing in (False, True):
        model.language_model.model.gradient_checkpointing = checkpointing
        kept[checkpointing] = pg.activation_bytes(model, batch)
        estimate = pg.memory_estimate(config, mode, 3, batch["input_ids"].shape[1] - N_IMG, checkpointing, lora_r=4)
        assert estimate["activations"] == kept[checkpointing], (checkpointing, estimate["activations"])
    assert kept[True] < 0.7 * kept[False], kept


def test_what_checkpointed_lora_training_keeps_by_hand(mqa):
    """LoRA with activation checkpointing on the 2-layer MQA model, tensor by tensor."""
    path, _ = mqa
    c = pg.read_config(path)
    batch = training_batch(3, prompt_len=6, answer_len=4)
    model = trained_on_cpu(path, "lora", r=4)
    model.language_model.model.gradient_checkpointing = True
    B, T = batch["input_ids"].shape
    N, Dv, D, d, V, L = N_IMG, c.vision.hidden_size, c.text.hidden_size, c.text.head_dim, VOCAB, 2
    expected = (B * N * Dv * 2          # the projector's input z (bf16): the projector is trained
                + 4                     # sqrt(D), the fp32 scalar the text embeddings are multiplied by
                + B * T                 # where the <image> tokens go (bool)
                + L * B * T * D * 2     # each decoder layer's input x, all a checkpointed layer keeps...
                + 2 * B * T * d * 2     # ...with the RoPE cos and sin (B, 1, T, d) it shares with the others
                + B * T * T             # ...and the prefix-LM mask (B, 1, T, S) (bool)
                + B * T * D * 4 + B * T * 4 + D * 4   # the final RMSNorm: x in fp32, 1 / rms(x), 1 + w in fp32
                + B * T * V * 2         # the logits (bf16); the frozen output layer keeps no input
                + B * (T - 1) * V * 4   # log-softmax of the shifted logits (fp32), kept by the cross-entropy
                + B * (T - 1) * 8       # the shifted labels (int64)
                + 4 + 4)                # the cross-entropy's total weight and the loss
    assert pg.activation_bytes(model, batch) == expected
    assert pg.memory_estimate(c, "lora", B, T - N, True, lora_r=4)["activations"] == expected


def test_smallest_gpu_and_the_memory_table_by_hand():
    GiB = 2**30
    assert pg.smallest_gpu(0) == "T4 16 GB"
    assert pg.smallest_gpu(14 * GiB - 1) == "T4 16 GB"          # 15360 MiB = 15 GiB > 14 GiB + the 1 GiB margin
    assert pg.smallest_gpu(14 * GiB) == "A10 24 GB"             # not strictly more: the next card
    assert pg.smallest_gpu(139 * GiB) == "H200 141 GB" and pg.smallest_gpu(140 * GiB) == "none"
    row = {"mode": "qlora", "grad_checkpointing": True, "trainable": 21_972_992, "weights": 3 * GiB,
           "grads": GiB // 2, "optimizer": 2 * GiB, "activations": 5 * GiB // 4, "total": 27 * GiB // 4}
    table = pg.memory_table([row, {**row, "mode": "full", "grad_checkpointing": False, "total": 90 * GiB}])
    lines = table.splitlines()
    assert lines[0] == ("| mode | trainable | weights GiB | grads GiB | AdamW GiB | activations GiB | total GiB "
                        "| smallest GPU |")
    assert lines[2] == "| qlora + checkpointing | 22.0 M | 3.00 | 0.50 | 2.00 | 1.25 | 6.75 | T4 16 GB |"
    assert lines[3].startswith("| full | 22.0 M |") and lines[3].endswith("| 90.00 | H200 141 GB |")
    assert "1.0 GiB" in lines[-1]
    with pytest.raises(ValueError, match="mode must be one of"):
        pg.memory_estimate(pg.PaliGemmaConfig.tiny(), "dora", 1, 8)


@pytest.mark.slow
def test_3b_estimate_follows_the_bytes_per_parameter_of_each_mode():
    config = pg.PaliGemmaConfig()                 # paligemma-3b-pt-224
    with torch.device("meta"):
        model = pg.PaliGemma(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vision, proj, lm = count(model.vision_tower), count(model.multi_modal_projector), count(model.language_model)
    # keras-hub's pali_gemma_3b_224 counts 2,923,335,408 with the tokenizer's 257,152-row embedding;
    # transformers' checkpoint (and this config) pads it to 257,216 rows of 2048
    assert vision + proj + lm == 2_923_335_408 + 64 * 2048
    assert config.num_image_tokens == 256
    linears = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 18 * 7                 # q, k, v, o, gate, up, down; the output layer is tied
    nf4_weights = sum(m.weight.numel() for m in linears)
    adapters = sum(16 * (m.in_features + m.out_features) for m in linears)
    est = {mode: pg.memory_estimate(config, mode, 1, 64) for mode in pg.MODES}
    assert est["full"]["params"] == vision + proj + lm and est["full"]["trainable"] == proj + lm
    for mode in ("lora", "qlora"):
        assert est[mode]["params"] == vision + proj + lm + adapters and est[mode]["trainable"] == proj + adapters
    for e in est.values():
        assert e["grads"] == 2 * e["trainable"] and e["optimizer"] == 8 * e["trainable"]
        assert e["total"] == e["weights"] + e["grads"] + e["optimizer"] + e["activations"]
    assert est["full"]["weights"] == 2 * (vision + proj + lm)
    assert est["lora"]["weights"] == 2 * (vision + proj + lm + adapters)
    bits = 4 + 8 / 64 + 32 / (64 * 256)
    assert est["qlora"]["weights"] == 2 * (vision + proj + lm - nf4_weights + adapters) + nf4_weights * bits / 8
    assert est["qlora"]["total"] < est["lora"]["total"] < est["full"]["total"]
    # NF4Matmul saves only its packed weight: QLoRA keeps exactly what LoRA keeps
    assert est["qlora"]["activations"] == est["lora"]["activations"] < est["full"]["activations"]
    # linear in the batch: a + b B, where a is what no row owns (the fp32 1 + w of each RMSNorm, sqrt(D)).
    # From B = 2 on: a single row's shifted labels are a view of the labels, several rows' a copy
    two, three, four = (pg.memory_estimate(config, "lora", b, 64)["activations"] for b in (2, 3, 4))
    assert four - three == three - two and 0 < two - 2 * (three - two) < 2**20


@pytest.mark.slow
def test_memory_report_cli_prints_the_3b_table(capsys):
    pg.main(["--memory-report", "--batch-size", "2", "--seq-len", "64"])
    out = capsys.readouterr().out
    assert "2,923,466,480 parameters" in out and "batch of 2 x (256 image + 64 text tokens)" in out
    assert "| smallest GPU |" in out and "total + 1.0 GiB" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "GiB |" not in line]
    assert [r[0].strip() for r in rows] == ["full", "full + checkpointing", "lora", "lora + checkpointing",
                                            "qlora", "qlora + checkpointing"]
    totals = [float(r[6]) for r in rows]
    assert totals[1] < totals[0] and totals[3] < totals[2] and totals[5] < totals[3] < totals[1]
    assert [r[7].strip() for r in rows] == [pg.smallest_gpu(t * 2**30) for t in totals]
    with pytest.raises(SystemExit) as exit_info:
        pg.main(["--memory-report", "--batch-size", "0"])
    assert exit_info.value.code == 2 and "batch_size and seq_len must be at least 1" in capsys.readouterr().err

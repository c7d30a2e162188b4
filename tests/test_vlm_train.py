"""The specification of vlm_train.py: which parameters each stage trains, what the loss scores, that a
killed run resumes to the same weights, that bad input is refused clearly, and that a PaliGemma
checkpoint fine-tuned here gives an adapter peft loads onto transformers' model with the same logits.

Everything runs on the tiny configuration (a random frozen tiny ViT, a one-layer Gemma decoder).
"""
import collections
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import clip
import lora
import paligemma as pg
import vlm_train as vt

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

CPU = torch.device("cpu")


def tiny(connector="mlp", **train):
    return vt.VLMConfig.tiny(connector=connector), vt.TrainConfig.tiny(**train)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (data, text-only LM) shared by the module's runs, as --cache shares it."""
    return tmp_path_factory.mktemp("cache")


def build(connector, cache, **train):
    vcfg, tcfg = tiny(connector, **train)
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(cache, CPU, progress=False))
    return vlm, data, vcfg, tcfg


# --- data -------------------------------------------------------------------------------------------

def test_synthetic_vqa_is_deterministic_and_keeps_pairs_apart():
    a, b = vt.synthetic_vqa(12, seed=3, split="test"), vt.synthetic_vqa(12, seed=3, split="test")
    assert [x[1:] for x in a] == [x[1:] for x in b]
    assert np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
    scenes, qas = vt.draw_scenes(200, 0, "train")
    assert not any((s.colour, s.kind) in clip.HELDOUT for sc in scenes for s in sc.shapes)
    held, _ = vt.draw_scenes(50, 0, "heldout")
    assert all(any((s.colour, s.kind) in clip.HELDOUT for s in sc.shapes) for sc in held)
    assert {k for qa in qas for _, _, k in qa} == set(vt.KINDS)
    # the existence questions are answered by the scene, not by the wording
    for scene, qa in zip(scenes, qas):
        present = {f"{s.colour} {s.kind}" for s in scene.shapes}
        for q, a, k in qa:
            if k == "existence":
                assert (q[len("is there a "):-1] in present) == (a == "yes")


def test_corrupt_images_are_counted_and_skipped(tmp_path):
    good = vt.synthetic_vqa(2, seed=0)
    bad_file = tmp_path / "broken.png"
    bad_file.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = vt.VQAData.from_iterables([good[0], (b"garbage", "how many shapes are there?", "one"),
                                      (str(bad_file), "how many shapes are there?", "two"), good[1]],
                                     captions=[(good[0][0], "a caption")])
    assert data.skipped == 2 and len(data.qa) == 2 and data.images.shape == (2, 48, 48, 3)
    assert data.captions == [(0, "a caption")]          # the same image is stored once
    with pytest.raises(ValueError, match="no readable image"):
        vt.VQAData.from_iterables([(b"x", "q", "a")])


# --- sequences and the loss -------------------------------------------------------------------------

def test_answer_only_masking_and_the_loss_it_gives(cache):
    vlm, data, _, _ = build("linear", cache)
    batch = vt.make_batch(vlm, data, [0, 5, 9], "vqa")
    tok = vlm.processor.tokenizer
    for b, i in enumerate([0, 5, 9]):
        answer = tok.encode(data.qa[i][2]) + [tok.eos_token_id]
        kept = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert kept == answer                                              # exactly the answer and <eos>
        assert batch["token_type_ids"][b].sum() == len(answer)
        n_image = (batch["input_ids"][b] == tok.image_token_id).sum()
        assert n_image == vlm.model.config.num_image_tokens
    logits = vlm.model(batch["input_ids"], batch["image_inputs"], batch["attention_mask"],
                       batch["token_type_ids"]).logits.detach().requires_grad_(True)
    # oracle: -mean log p(answer token | everything before it), written out position by position
    logp, terms = logits.log_softmax(-1), []
    for b in range(3):
        for t in range(logits.shape[1] - 1):
            if batch["token_type_ids"][b, t + 1] == 1:
                terms.append(-logp[b, t, batch["input_ids"][b, t + 1]])
    loss = pg.suffix_loss(logits, batch["labels"])
    assert torch.allclose(loss, torch.stack(terms).mean())
    loss.backward()
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != -100                       # positions that predict the answer
    assert logits.grad[~scored].abs().max() == 0 and logits.grad[scored].abs().sum() > 0


def test_prefix_suffix_batch_pads_on_the_left_and_labels_only_the_answer():
    batch = vt.prefix_suffix_batch([[5, 6], [7], [9, 9, 9]], [[8], [], [4, 3]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 8], [0, 0, 0, 0, 7], [9, 9, 9, 4, 3]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[-100] * 4 + [8], [-100] * 5, [-100] * 3 + [4, 3]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_split_by_length_cuts_where_the_least_padding_is_left():
    # rows of 3, 3, 3 and 8 tokens: one batch computes 4 x 8 = 32 tokens, the cut at 3 gives 3 x 3 + 8 = 17
    batch = vt.prefix_suffix_batch([[5, 6], [7, 7], [9, 9], [4] * 6], [[8], [8], [3], [2, 2]], pad_id=0)
    batch["image_inputs"] = torch.arange(4.0)[:, None].repeat(1, 3)          # anything indexed by row
    assert vt.split_by_length(batch, 0) == [batch] and vt.split_by_length(batch, 16) == [batch]   # never / not enough
    short, long = vt.split_by_length(batch, 15)
    assert short["input_ids"].tolist() == [[5, 6, 8], [7, 7, 8], [9, 9, 3]]   # left padding sliced off, order kept
    assert short["attention_mask"].tolist() == [[1, 1, 1]] * 3 and short["labels"].tolist() == [[-100, -100, 8]] * 2 + [[-100, -100, 3]]
    assert long["input_ids"].tolist() == [[4] * 6 + [2, 2]] and long["token_type_ids"].tolist() == [[0] * 6 + [1, 1]]
    assert short["image_inputs"][:, 0].tolist() == [0, 1, 2] and long["image_inputs"][:, 0].tolist() == [3]
    assert [short["token_share"].item(), long["token_share"].item()] == pytest.approx([3 / 5, 2 / 5])   # 3 and 2 answer tokens of 5
    batch["token_share"] = torch.tensor(1.5)                                 # torchrun: this rank's share, scaled alike
    assert [p["token_share"].item() for p in vt.split_by_length(batch, 15)] == pytest.approx([1.5 * 3 / 5, 1.5 * 2 / 5])
    same = vt.prefix_suffix_batch([[5, 6]] * 3, [[8]] * 3, pad_id=0)          # one length: nothing to cut
    assert vt.split_by_length(same, 1) == [same]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_parts_of_a_split_batch_give_the_whole_batch_loss_and_gradients(mode, cache):
    vlm, data, _, _ = build("linear", cache)
    if mode != "full":
        vt.add_lora(vlm)
        with torch.no_grad():                  # B = 0 would leave A without a gradient: give B values
            for layer in lora.lora_layers(vlm.lm).values():
                layer.lora_B.normal_(0.0, 0.1)
    params = vt.set_stage(vlm, 2, mode)
    named = [i for i, row in enumerate(data.qa) if row[3] == "position"][:3]   # ten-word answers among one-word ones
    batch = vt.make_batch(vlm, data, named + [i for i, row in enumerate(data.qa) if row[3] == "count"][:9], "vqa")
    parts = vt.split_by_length(batch, 1)
    assert len(parts) == 2 and sum(p["input_ids"].numel() for p in parts) < batch["input_ids"].numel()

    def gradients(batches):
        vlm.model.zero_grad(set_to_none=True)
        loss = sum(vt.vlm_loss(vlm.model.train(), b) for b in batches)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    (whole, g_whole), (split, g_split) = gradients([batch]), gradients(parts)
    assert torch.allclose(whole, split, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g_whole, g_split))
    assert sum(g.abs().sum() for g in g_whole) > 0


def test_a_run_that_splits_its_batches_resumes_after_a_kill_to_the_same_weights(cache, tmp_path, monkeypatch):
    vcfg, tcfg = tiny("linear", stage2="full", stage2_steps=5, length_split=1)
    split, parts = vt.split_by_length, []
    monkeypatch.setattr(vt, "split_by_length", lambda batch, n: parts.append(len(split(batch, n))) or split(batch, n))
    straight, _ = vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "a", CPU, cache=cache, progress=False, evaluate=False))
    assert parts[-5:] == [2] * 5                           # stage 2: every step in two parts (stages 0 and 1: one)
    assert set(parts[:-5]) == {1}
    padded, _ = vt.train_vlm(vcfg, replace_cfg(tcfg, length_split=0),
                             vt.Run(tmp_path / "c", CPU, cache=cache, progress=False, evaluate=False))
    # the same first loss, from the same weights (later steps move apart by rounding)
    assert straight["history"]["stage2"][0] == pytest.approx(padded["history"]["stage2"][0], rel=1e-6)
    with pytest.raises(vt.Killed):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "b", CPU, cache=cache, progress=False, evaluate=False,
                                        stop_after=("stage2", 3)))
    vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "b", CPU, resume=True, cache=cache, progress=False, evaluate=False))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- which parameters each stage trains ---------------------------------------------------------------

def grads_after_one_step(vlm, data, stage, mode, vcfg):
    if stage == 2 and mode != "full":
        vt.add_lora(vlm, quantize=mode == "qlora")                        # a step of its own, before stage 2
    params = vt.set_stage(vlm, stage, mode)
    phase = {0: "text_qa", 1: "caption", 2: "vqa"}[stage]
    batch = vt.make_batch(vlm, data, list(range(8)), phase)
    vlm.model.zero_grad(set_to_none=True)
    vt.vlm_loss(vlm.model.train(), batch).backward()
    got = {n for n, p in vlm.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return got, {n for n, p in vlm.model.named_parameters() if p.requires_grad}, params


@pytest.mark.parametrize("connector", vt.CONNECTORS)
@pytest.mark.parametrize("mode", vt.STAGE2_MODES)
def test_exactly_the_intended_parameters_get_gradients(connector, mode, cache):
    vlm, data, vcfg, _ = build(connector, cache)
    names = [n for n, _ in vlm.model.named_parameters()]
    # stage 0: the LM alone
    got, trainable, _ = grads_after_one_step(vlm, data, 0, mode, vcfg)
    assert got and all(n.startswith("language_model.") for n in got | trainable)
    # stage 1: the connector alone; vision and LM frozen
    got, trainable, _ = grads_after_one_step(vlm, data, 1, mode, vcfg)
    assert trainable == {n for n in names if n.startswith("connector.")}
    assert got and got <= trainable
    out_proj = {"qformer": "connector.qformer.language_projection.weight"}.get(connector, None)
    assert out_proj is None or out_proj in got
    # stage 2: connector + LM (full) or connector + LoRA's A and B only (LoRA, QLoRA)
    got, trainable, params = grads_after_one_step(vlm, data, 2, mode, vcfg)
    assert not any(n.startswith("vision.") for n in got | trainable)
    connector_names = {n for n in trainable if n.startswith("connector.")}
    assert connector_names == {n for n, _ in vlm.model.named_parameters() if n.startswith("connector.")}
    lm = trainable - connector_names
    if mode == "full":
        assert lm == {n for n, _ in vlm.model.named_parameters() if n.startswith("language_model.")}
    else:
        assert lm and all(n.endswith(("lora_A", "lora_B")) for n in lm)
        layer = vlm.model.language_model.model.layers[0].self_attn.q_proj
        assert type(layer.base_layer).__name__ == ("LinearNF4" if mode == "qlora" else "Linear")
        # LoRA starts with B = 0, so only B gets a gradient on the first step (dL/dA = B^T ... = 0)
        assert {n for n in got if n.startswith("language_model.")} <= lm
        assert any(n.endswith("lora_B") for n in got)
    assert got <= trainable and len(params) == len(trainable)


def test_vision_is_frozen_even_in_train_mode(cache):
    vlm, _, vcfg, _ = build("dense", cache)
    vlm.model.train()
    assert not vlm.model.vision.training
    assert not any(p.requires_grad for p in vlm.model.vision.parameters())


# --- connectors ---------------------------------------------------------------------------------------

def test_connector_shapes_and_the_perceiver_ignores_patch_order(cache):
    torch.manual_seed(0)
    feats = torch.randn(2, 1, 17, 48)                                     # (B, K, 1+N, Dv) of the tiny ViT: 4 x 4 patches
    for name, merge, m in (("linear", 1, 16), ("linear", 2, 4), ("mlp", 1, 16), ("mlp", 2, 4), ("qformer", 2, 4),
                           ("perceiver", 2, 4)):
        connector, M = vt.make_connector(vt.VLMConfig.tiny(connector=name, patch_merge=merge), 48, 1, 16, 32)
        assert connector(feats).shape == (2, m, 32) and M == m
    plain = dict(connector="perceiver", image_pos="none", query_prior="none")
    perceiver, _ = vt.make_connector(vt.VLMConfig.tiny(**plain), 48, 1, 16, 32)
    shuffled = feats[:, :, torch.randperm(17)]
    # without positions on its keys or a prior the latents attend to a set: reordering the patches cannot
    # change what they read
    assert torch.allclose(perceiver(feats), perceiver(shuffled), atol=1e-5)
    competing, _ = vt.make_connector(vt.VLMConfig.tiny(**plain, perceiver_attention="compete"), 48, 1, 16, 32)
    assert competing.layers[0].compete and torch.allclose(competing(feats), competing(shuffled), atol=1e-5)
    # dense: [last ; mean of each group of earlier layers] through one linear map (one token per patch)
    dense = vt.DenseConnector(8, 4, groups=2)
    stack = torch.randn(2, 5, 5, 8)                                        # h_0..h_3 and the last layer, 1+4 tokens
    manual = torch.cat([stack[:, 4], stack[:, 0:2].mean(1), stack[:, 2:4].mean(1)], -1)[:, 1:]
    assert torch.allclose(dense(stack), dense.linear(manual))


def test_local_prior_starts_each_query_on_its_own_place():
    prior = vt.LocalPrior(9, 6, extra=9)                                  # 3 x 3 queries over 6 x 6 patches, 9 latents
    table = prior().detach()
    assert table.shape == (9, 1 + 36 + 9) and (table[:, 0] == -10).all() and (table[:, 37:] == -10).all()
    b = table[:, 1:37].reshape(3, 3, 6, 6)
    for r in range(3):
        for c in range(3):                                                # logit 0 on its own 2 x 2 block
            assert b[r, c, 2 * r:2 * r + 2, 2 * c:2 * c + 2].abs().max() < 1e-5
            assert (b[r, c] < -1).sum() == 32
    # -|r - p|^2 / (2 sigma^2), sigma = 1/12 (half a patch), less its value at the nearest patch, by hand:
    # query (1, 1) at (1/2, 1/2), nearest patch at (5/12, 5/12), patch (1, 3) at (3/12, 7/12)
    assert b[1, 1, 1, 3].item() == pytest.approx(-72 * ((3 / 12 - 1 / 2) ** 2 + (7 / 12 - 1 / 2) ** 2 - 2 / 144))
    assert b.min() == -10                                                 # floored: far patches stay learnable
    weight = table[4].softmax(0)[1:37].reshape(6, 6)                      # the middle query: 96% on its own block
    assert weight[2:4, 2:4].sum() > 0.96
    with pytest.raises(vt.ConfigError, match="num_queries must be a square .* got 32"):
        vt.LocalPrior(32, 6)
    with pytest.raises(ValueError, match="query_prior must be 'none' or 'local' or 'window', got 'gauss'"):
        vt.VLMConfig(query_prior="gauss")


def test_a_windowed_prior_keeps_each_query_in_its_cell_however_its_logits_grow():
    """query_prior="window": the same learned logits plus a fixed mask, 0 on the query's own cell (its
    2 x 2 block of the 6 x 6 patches) and -inf on every other patch and the class token; a Perceiver
    latent's own keys stay open. However large the content logits q k^T grow, a one-layer Perceiver's
    latent reads nothing outside its cell."""
    window = vt.LocalPrior(9, 6, extra=9, window=True)
    table = window().detach()
    assert torch.isinf(table[:, 0]).all() and torch.isfinite(table[:, 37:]).all()
    b = table[:, 1:37].reshape(3, 3, 6, 6)
    for r in range(3):
        for c in range(3):
            inside = torch.zeros(6, 6, dtype=torch.bool)
            inside[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
            assert torch.isfinite(b[r, c][inside]).all() and torch.isinf(b[r, c][~inside]).all()
    assert torch.equal(window.bias, vt.LocalPrior(9, 6, extra=9).bias)      # the learned part is the same
    assert "window" not in window.state_dict()                              # rebuilt from the config, not saved
    cfg = vt.VLMConfig.tiny(connector="perceiver", query_prior="window", image_pos="none", perceiver_layers=1)
    perceiver, _ = vt.make_connector(cfg, 48, 1, 16, 32)
    with torch.no_grad():
        perceiver.layers[0].attn.in_proj_weight.mul_(30.0)                  # content logits in the hundreds
    torch.manual_seed(0)
    feats = torch.randn(1, 1, 17, 48)                                       # the tiny ViT's 4 x 4 patches
    far = feats.clone()
    far[:, :, 0] += 5.0                                                     # the class token
    far[:, :, 1 + 10:] += torch.randn(1, 1, 6, 48)                          # patches 10-15: the bottom half but 8, 9
    out, moved = perceiver(feats)[0], perceiver(far)[0]                     # latents 0, 1 own the top half
    assert torch.allclose(out[:2], moved[:2], atol=1e-5) and not torch.allclose(out[2:], moved[2:], atol=1e-3)
    out.square().sum().backward()
    grad = perceiver.prior.bias.grad
    outside = torch.isinf(perceiver.prior()[:, :17]).detach()                 # (Q, 1 + N)
    assert torch.isfinite(grad).all() and (grad[:, :17][outside] == 0).all() and grad[:, :17].abs().sum() > 0
    with pytest.raises(vt.ConfigError, match="49 queries make cells smaller than the 6 x 6 patches"):
        vt.LocalPrior(49, 6, window=True)
    assert torch.isfinite(vt.LocalPrior(36, 6, window=True)()[:, 1:].diagonal()).all()   # one patch each
    with pytest.raises(ValueError, match="query_prior='window' .* perceiver_attention='compete'"):
        vt.VLMConfig(connector="perceiver", query_prior="window", perceiver_attention="compete")


def test_query_merge_gives_each_query_its_whole_cell_as_one_key():
    """query_merge=2: the Q-Former's keys are the class token (4 times side by side) and merge_patches'
    2 x 2 blocks; the Perceiver's are the class token and W times those blocks (back to the width of its
    latents). With 9 queries and query_prior="window" each query's window holds one key, its whole cell,
    so a one-layer Perceiver's latent changes with its own cell's patches and no other's. A merge that
    does not divide the patch grid is refused."""
    torch.manual_seed(0)
    feats = torch.randn(2, 1, 37, 48)                                     # a 6 x 6 grid of patches + the class token
    cfg = vt.VLMConfig(connector="qformer", num_queries=9, query_prior="window", query_merge=2, image_pos="none",
                       perceiver_layers=1)
    qf, M = vt.make_connector(cfg, 48, 1, 36, 64)
    keys = qf.keys(feats)
    assert keys.shape == (2, 1 + 9, 4 * 48)
    assert torch.equal(keys[:, 0], feats[:, -1, 0].repeat(1, 4))
    assert torch.equal(keys[:, 1:], vt.merge_patches(feats[:, -1], 2))
    assert qf.qformer.qformer.encoder.layer[0].crossattention.attention.key.in_features == 4 * 48
    window = qf.qformer.cross_attention_bias.window                       # (9, 1 + 9)
    assert torch.equal(window[:, 1:].isfinite(), torch.eye(9, dtype=torch.bool)) and not window[:, 0].isfinite().any()
    assert M == 9 and qf(feats).shape == (2, 9, 64)

    pr, M = vt.make_connector(replace(cfg, connector="perceiver"), 48, 1, 36, 64)
    keys = pr.keys(feats)
    assert keys.shape == (2, 1 + 9, 48) and pr.merged.in_features == 4 * 48
    assert torch.equal(keys[:, 0], feats[:, -1, 0])
    assert torch.equal(keys[:, 1:], pr.merged(vt.merge_patches(feats[:, -1], 2)))
    window = pr.prior.window                                              # (9, 1 + 9 + 9): patches, then the latents
    assert torch.equal(window[:, 1:10].isfinite(), torch.eye(9, dtype=torch.bool)) and window[:, 10:].isfinite().all()
    changed = feats.clone()
    changed[:, :, 1 + 6 * 2 + 4:1 + 6 * 2 + 6] += 1.0                     # patches (row 2, cols 4-5): cell (1, 2), query 5
    out, out_changed = pr(feats), pr(changed)
    moved = (out - out_changed).abs().amax(dim=(0, 2))                    # (9,): how far each latent's token moved
    assert M == 9 and out.shape == (2, 9, 64) and moved[5] > 1e-3 and (moved[torch.arange(9) != 5] == 0).all()
    for connector in ("qformer", "perceiver"):
        with pytest.raises(vt.ConfigError, match="query_merge must divide the side of the 6 x 6 patch grid, got 4"):
            vt.make_connector(replace(cfg, connector=connector, query_merge=4), 48, 1, 36, 64)


def test_query_pos_adds_each_query_cell_row_and_column_to_its_output_token():
    """query_pos: the query connectors' output token q gets R[r] + C[c] of its cell (r, c) = divmod(q, s),
    drawn after every other weight of the connector, so the rest starts as it would without them."""
    feats = torch.randn(2, 1, 37, 64)
    for name in ("qformer", "perceiver"):
        torch.manual_seed(0)
        plain, _ = vt.make_connector(vt.VLMConfig(connector=name), 64, 1, 36, 64)
        torch.manual_seed(0)
        placed, _ = vt.make_connector(vt.VLMConfig(connector=name, query_pos=True), 64, 1, 36, 64)
        R, C = placed.query_pos.rows.weight, placed.query_pos.cols.weight  # (3, D) each
        by_hand = torch.stack([R[q // 3] + C[q % 3] for q in range(9)])
        assert torch.allclose(placed(feats) - plain(feats), by_hand.expand(2, -1, -1), atol=1e-5)
    with pytest.raises(vt.ConfigError, match="query_pos .* num_queries must be a square .* got 32"):
        vt.make_connector(vt.VLMConfig(connector="qformer", num_queries=32, query_prior="none", query_pos=True),
                          64, 1, 36, 64)


def test_the_query_connectors_read_places_by_default_and_the_paper_presets_keep_plain_queries():
    """By default both query connectors have 9 queries, one per cell of the scenes' 3 x 3 layout, each
    starting on a place of its own (and the Q-Former's listening to itself); BLIP-2's and the Q-Former
    tutorial's presets keep their papers' plain queries; query_prior="none" builds no prior."""
    for name in ("perceiver", "qformer"):
        connector, M = vt.make_connector(vt.VLMConfig(connector=name), 64, 1, 36, 64)
        prior = connector.prior if name == "perceiver" else connector.qformer.cross_attention_bias
        assert M == 9 and prior.bias.shape == (9, 1 + 36 + (9 if name == "perceiver" else 0))
    assert connector.qformer.query_attention_bias.bias.shape == (9, 9)
    for preset, queries in (("blip2", 16), ("smolvlm", 32)):
        vcfg, _ = vt.PRESETS[preset]
        qf, M = vt.make_connector(vt.VLMConfig(**vcfg), 64, 1, 36, 64)
        assert M == queries and qf.qformer.cross_attention_bias is None and qf.qformer.query_attention_bias is None
    plain, M = vt.make_connector(vt.VLMConfig(connector="perceiver", query_prior="none"), 48, 1, 36, 64)
    assert M == 9 and plain.prior is None


def test_a_query_connector_with_a_local_prior_reads_near_its_place(cache):
    """The prior is a trained parameter of both query connectors. Made a hard window (0 on a latent's own
    block, -1e4 elsewhere), a one-layer Perceiver's latent reads only its block: changing the image
    elsewhere leaves its output alone."""
    for name in ("perceiver", "qformer"):
        connector, _ = vt.make_connector(vt.VLMConfig.tiny(connector=name, query_prior="local"), 48, 1, 16, 32)
        prior = connector.prior if name == "perceiver" else connector.qformer.cross_attention_bias
        assert prior.bias.shape == (4, 1 + 16 + (4 if name == "perceiver" else 0))
        assert any(p is prior.bias for p in connector.parameters())
    own = connector.qformer.query_attention_bias.bias                     # the Q-Former's queries: 0 on the diagonal
    assert torch.equal(own, torch.tensor([[0.0 if i == j else -10.0 for j in range(4)] for i in range(4)]))
    assert any(p is own for p in connector.parameters())
    alone, _ = vt.make_connector(vt.VLMConfig.tiny(connector="qformer", query_prior="local", qformer_self_prior=False),
                                 48, 1, 16, 32)
    assert alone.qformer.query_attention_bias is None and alone.qformer.cross_attention_bias is not None
    torch.manual_seed(0)
    feats = torch.randn(1, 1, 17, 48)                                     # the tiny ViT's 4 x 4 patches
    far = feats.clone()
    far[:, :, 1 + 10:] += torch.randn(1, 1, 6, 48)                        # patches 10-15: the bottom half but 8, 9
    cfg = vt.VLMConfig.tiny(connector="perceiver", query_prior="local", image_pos="none", perceiver_layers=1)
    perceiver, _ = vt.make_connector(cfg, 48, 1, 16, 32)
    with torch.no_grad():
        b = perceiver.prior.bias
        b.copy_(torch.where(b > b.amax(-1, keepdim=True) - 1e-6, 0.0, -1e4))
    out, moved = perceiver(feats)[0], perceiver(far)[0]                   # (Q, D): latents 0, 1 read the top half
    assert torch.allclose(out[:2], moved[:2], atol=1e-5) and not torch.allclose(out[2:], moved[2:], atol=1e-3)


def test_qformer_zero_ffn_starts_each_query_feed_forward_as_the_identity():
    """qformer_zero_ffn: the queries' feed-forward output weights start at zero, so each post-norm layer
    LayerNorm(x + W2 GELU(W1 x + b1) + b2) passes on a LayerNorm output x unchanged, and W2 still learns."""
    torch.manual_seed(0)
    plain, _ = vt.make_connector(vt.VLMConfig(connector="qformer"), 64, 1, 36, 64)
    torch.manual_seed(0)
    zero, _ = vt.make_connector(vt.VLMConfig(connector="qformer", qformer_zero_ffn=True), 64, 1, 36, 64)
    x = torch.nn.functional.layer_norm(torch.randn(2, 9, 64), (64,))          # (B, Q, D), as a layer's queries
    for a, b in zip(plain.qformer.qformer.encoder.layer, zero.qformer.qformer.encoder.layer):
        assert (b.output_query.dense.weight == 0).all() and torch.equal(a.intermediate_query.dense.weight,
                                                                         b.intermediate_query.dense.weight)
        assert torch.allclose(b.output_query(b.intermediate_query(x), x), x, atol=1e-5)
        assert not torch.allclose(a.output_query(a.intermediate_query(x), x), x, atol=1e-2)
    zero(torch.randn(2, 1, 37, 64)).square().sum().backward()
    assert all(layer.output_query.dense.weight.grad.abs().sum() > 0 for layer in zero.qformer.qformer.encoder.layer)


@pytest.mark.parametrize("adapter_width, hidden", [(0, 64), (256, 256)])
def test_the_qformer_mlp_adapter_starts_as_its_linear_head_does(adapter_width, hidden):
    """qformer_head="mlp": both layers of the adapter are drawn as the Q-Former's linear head and every other
    layer of it (BERT's N(0, initializer_range^2) weights, zero biases), not with torch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose standard deviation here is 0.072 against 0.125. Its hidden
    layer is the LM's width (64) unless adapter_width says otherwise."""
    torch.manual_seed(0)
    cfg = vt.VLMConfig(connector="qformer", qformer_head="mlp", adapter_width=adapter_width)
    connector, _ = vt.make_connector(cfg, 64, 1, 36, 64)
    std = connector.qformer.config.initializer_range
    assert std == 64 ** -0.5
    assert connector.head[0].weight.shape == (hidden, 64) and connector.head[2].weight.shape == (64, hidden)
    assert connector(torch.randn(2, 1, 37, 64)).shape == (2, cfg.num_queries, 64)
    with pytest.raises(ValueError, match="adapter_width must be 0 .* got -1"):
        vt.VLMConfig(adapter_width=-1)
    for layer in (connector.head[0], connector.head[2]):
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert abs(layer.weight.std().item() / std - 1) < 0.05       # 4,096 draws: about 1% standard error


def test_stage2_with_the_qformer_frozen_still_trains_its_head(cache):
    """stage2_qformer=False freezes the Q-Former and what its queries read, and trains its head with the
    LM: the MLP adapter (qformer_head="mlp", tested with the smolvlm preset), or with BLIP-2's linear head
    the language_projection, which lives inside the Q-Former."""
    vlm, _, _, _ = build("qformer", cache)
    params = vt.set_stage(vlm, 2, "full", train_qformer=False)
    names = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert {n for n in names if n.startswith("connector.")} == {"connector.qformer.language_projection.weight",
                                                                 "connector.qformer.language_projection.bias"}
    assert {id(p) for p in params} == {id(p) for n, p in vlm.model.named_parameters() if n in names}
    assert {n for n in names if not n.startswith("connector.")} == {n for n, _ in vlm.lm.named_parameters(prefix="language_model")}


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_stage2_with_the_qformer_frozen_reads_its_outputs_computed_once(head, cache):
    """With stage2_qformer=False the stage's data hold the frozen Q-Former's query outputs (n, Q, Dq) instead of
    the ViT's features, and a step on them gives the loss and gradients that the live Q-Former gives; with the
    Q-Former trained, the data stay the ViT's."""
    vcfg, tcfg = vt.VLMConfig.tiny(connector="qformer", qformer_head=head), vt.TrainConfig.tiny(stage2="full")
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(cache, CPU, progress=False))
    vt.cache_features(vlm, data)
    assert vt.vqa_stage(vlm, data, tcfg).data is data                          # stage2_qformer=True: runs live
    stage = vt.vqa_stage(vlm, data, replace(tcfg, stage2_qformer=False))
    Q, Dq = vcfg.num_queries, vlm.connector.qformer.config.hidden_size
    assert stage.data.features.shape == (len(data.images), Q, Dq) and data.features.dim() == 4
    assert stage.data.images is data.images and stage.data.qa is data.qa
    rows = list(range(0, 2 * tcfg.batch_size, 2))
    results = []
    for d in (data, stage.data):
        vlm.model.zero_grad(set_to_none=True)
        loss = vt.vlm_loss(vlm.model, vt.make_batch(vlm, d, rows, "vqa"))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in stage.params]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for live, once in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(once, live, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in results[1][1][:4])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_query_priors_under_bf16_autocast(device):
    """The priors are float32 logits added to the scores of bf16 queries and keys when a stage runs under
    autocast (bf16=True on a GPU): the connectors must run, give what float32 gives to bf16's precision
    (8 bits of mantissa: a few tenths of a percent per operation, compounding over the layers; 4% of the
    largest output allows about ten), and pass gradients to the priors."""
    torch.manual_seed(0)
    feats = torch.randn(2, 1, 37, 64, device=device)                      # the default ViT's 6 x 6 patches
    for name, attention, prior in (("qformer", "softmax", "local"), ("perceiver", "softmax", "local"),
                                   ("perceiver", "compete", "local"), ("qformer", "softmax", "window"),
                                   ("perceiver", "softmax", "window")):
        cfg = vt.VLMConfig(connector=name, perceiver_attention=attention, query_prior=prior)
        connector, _ = vt.make_connector(cfg, 64, 1, 36, 64)
        connector.to(device)
        ref = connector(feats)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = connector(feats)
        assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.04 * ref.abs().max()
        out.float().square().sum().backward()
        priors = ([connector.prior.bias] if name == "perceiver" else
                  [connector.qformer.cross_attention_bias.bias, connector.qformer.query_attention_bias.bias])
        assert all(p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0 for p in priors)
    connector, _ = vt.make_connector(vt.make_configs({"connector": "qformer"}, {})[0], 64, 1, 36, 64)   # its defaults:
    connector.to(device)                                                  # one merged key per query
    ref = connector(feats)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = connector(feats)                                            # float32: + QueryPositions' float32 rows
    assert (out.float() - ref).abs().max() < 0.04 * ref.abs().max()
    out.float().square().sum().backward()
    read = connector.qformer.qformer.encoder.layer[0].crossattention.attention.value.weight    # (D, 4 Dv): merged keys
    for p in (connector.qformer.query_attention_bias.bias, read, connector.query_pos.rows.weight):
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


def test_competing_attention_with_one_latent_reads_the_mean_of_the_patches():
    """One latent has nothing to compete with: it takes every patch whole, and reads their mean value
    (then, as the plain layer, its own value; the two averaged)."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
    q, media = torch.randn(3, 1, 8), torch.randn(3, 5, 8)
    kv = torch.cat([media, q], dim=1)
    values = kv @ attn.in_proj_weight[16:].T                                # (B, 5 + 1, D), every head's values
    oracle = attn.out_proj((values[:, :5].mean(1, keepdim=True) + values[:, 5:]) / 2)
    assert torch.allclose(vt.competing_attention(attn, q, kv, 5), oracle, atol=1e-5)
    # Q latents read Q vectors
    latents = torch.randn(3, 4, 8)
    assert vt.competing_attention(attn, latents, torch.cat([media, latents], 1), 5).shape == (3, 4, 8)
    with pytest.raises(ValueError, match="perceiver_attention must be 'softmax' or 'compete', got 'slots'"):
        vt.VLMConfig(perceiver_attention="slots")


def test_merge_patches_concatenates_each_block_of_neighbours():
    g, m, C = 6, 2, 3
    z = torch.randn(2, 1 + g * g, C)                                       # class token, then patches in raster order
    grid = z[:, 1:].reshape(2, g, g, C)
    merged = vt.merge_patches(z, m)
    assert merged.shape == (2, (g // m) ** 2, m * m * C)
    for i in range(g // m):
        for j in range(g // m):                                            # block (i, j): rows 2i..2i+1, cols 2j..2j+1
            oracle = torch.cat([grid[:, m * i + a, m * j + b] for a in range(m) for b in range(m)], -1)
            assert torch.equal(merged[:, i * (g // m) + j], oracle)
    assert torch.equal(vt.merge_patches(z, 1), z[:, 1:])                  # m = 1: the patches, class token dropped
    with pytest.raises(vt.ConfigError, match="patch_merge 3 .* 16 patches"):
        vt.make_connector(vt.VLMConfig.tiny(connector="mlp", patch_merge=3), 48, 1, 16, 32)


def test_schedule_warms_up_then_decays_by_cosine():
    assert vt.schedule(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert vt.schedule(9, 1.0, 100, 10) == pytest.approx(1.0)
    assert vt.schedule(55, 1.0, 100, 10) == pytest.approx(0.5)             # half-way through the cosine
    assert vt.schedule(99, 1.0, 100, 0.1) == pytest.approx(0.5 * (1 + np.cos(np.pi * 89 / 90)))


# --- the stages learn; the demo runs ------------------------------------------------------------------

@pytest.mark.parametrize("connector", ["mlp", "qformer"])
def test_each_stage_lowers_its_loss(connector, cache, tmp_path):
    # each step draws a fresh batch, so single losses are noisy: compare the means of the first and
    # last quarter of each stage
    vcfg, tcfg = tiny(connector, pretrain_steps=32, itc_steps=32, stage1_steps=32, stage2_steps=32, save_every=50)
    metrics, _ = vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path, CPU, cache=tmp_path / "c", progress=False, evaluate=False))
    history = metrics["history"]
    phases = ["stage0", "stage1", "stage2"] + (["stage1a"] if connector == "qformer" else [])
    for phase in phases:
        h = history[phase]
        assert np.mean(h[-8:]) < np.mean(h[:8]), (phase, h)


def test_demo_runs_on_the_tiny_preset(tmp_path, capsys):
    vt.main(["--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "stage1: loss" in out and "stage2: loss" in out and "exact match" in out
    for name in ("metrics.json", "metrics.jsonl", "answers.png", "model/vlm.json", "model/adapter/adapter_config.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "metrics.json").read_text())["after stage 2"]["test"]["all"]["n"] == 16
    # the manifest names exactly the parts the folder holds (the default LM: weights + adapter)
    manifest = json.loads((tmp_path / "model" / "vlm.json").read_text())
    assert manifest["parts"] == ["model.safetensors", "adapter"] and manifest["stage2"] == "lora"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["adapter", "model.safetensors", "vlm.json"]
    # load_vlm gives back the trained model: its answers equal the in-memory model's
    vlm = vt.load_vlm(tmp_path)
    images = [im for im, _, _ in vt.synthetic_vqa(4, seed=7, image_size=32)]
    questions = [q for _, q, _ in vt.synthetic_vqa(4, seed=7, image_size=32)]
    answers = vlm.answer_batch(images, questions)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert vlm.answer(images[0], questions[0]) == answers[0]


def test_a_local_prior_is_trained_saved_and_loaded(tmp_path, capsys):
    """The Perceiver's prior and merged keys are saved and loaded; a manifest that names query_merge by its
    earlier name, qformer_merge, loads the same model, and one naming a field VLMConfig lacks is refused."""
    vt.main(["--out", str(tmp_path), "--device", "cpu", "--connector", "perceiver"])   # its default: the window
    loaded = vt.load_vlm(tmp_path).connector
    prior = loaded.prior.bias                                              # the tiny demo: 4 latents, 4 x 4 patches
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))       # merged into 2 x 2 keys
    assert torch.equal(saved["connector.prior.bias"], prior) and torch.equal(saved["connector.merged.weight"],
                                                                            loaded.merged.weight)
    assert not torch.allclose(prior, vt.LocalPrior(4, 2, extra=4, window=True).bias)   # stages 1 and 2 trained it
    manifest = tmp_path / "model" / "vlm.json"
    meta = json.loads(manifest.read_text())
    meta["model"]["qformer_merge"] = meta["model"].pop("query_merge")
    manifest.write_text(json.dumps(meta))
    again = vt.load_vlm(tmp_path)
    assert again.config.query_merge == 2 and torch.equal(again.connector.merged.weight, loaded.merged.weight)
    meta["model"]["perceiver_depth"] = 3
    manifest.write_text(json.dumps(meta))
    with pytest.raises(vt.CheckpointError, match=r"names model fields this vlm_train.py does not have: \['perceiver_depth'\]"):
        vt.load_vlm(tmp_path)


# --- checkpoints: kill, resume, refuse --------------------------------------------------------------

def final_weights(out):
    tensors = load_file(str(out / "model" / "model.safetensors"))
    adapter = out / "model" / "adapter" / "adapter_model.safetensors"
    return {**tensors, **(load_file(str(adapter)) if adapter.exists() else {})}


@pytest.mark.parametrize("connector,mode,kill", [("mlp", "lora", ("stage2", 4)), ("qformer", "full", ("stage1", 2))])
def test_resume_after_a_kill_reaches_the_uninterrupted_weights(connector, mode, kill, cache, tmp_path):
    vcfg, tcfg = tiny(connector, stage2=mode, stage2_steps=7)
    straight, _ = vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "a", CPU, cache=cache, progress=False, evaluate=False))
    with pytest.raises(vt.Killed):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "b", CPU, cache=cache, progress=False, evaluate=False, stop_after=kill))
    assert not (tmp_path / "b" / "model").exists()
    vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "b", CPU, resume=True, cache=cache, progress=False, evaluate=False))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_config_is_refused(cache, tmp_path):
    vcfg, tcfg = tiny("linear")
    with pytest.raises(vt.Killed):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path, CPU, cache=cache, progress=False, evaluate=False, stop_after=("stage1", 3)))
    with pytest.raises(vt.ConfigError, match=r"train\.stage1_lr: checkpoint 0\.01, now 0\.02"):
        vt.train_vlm(vcfg, replace_cfg(tcfg, stage1_lr=0.02), vt.Run(tmp_path, CPU, resume=True, cache=cache,
                                                                     progress=False, evaluate=False))


def stage0_lm(cache, connector, **run):
    """(the text-only LM after stage 0 of a tiny run whose cache is `cache`, trained there or read back;
    the folder it lives in)."""
    vcfg, tcfg = tiny(connector)
    r = vt.Run(cache, CPU, progress=False, **run)
    vlm, train = vt.build_vlm(vcfg, tcfg, r)
    stage = vt.text_stage(vlm, train, tcfg)
    vt.train_stage(vlm, stage, tcfg, r)
    return {k: v.clone() for k, v in vlm.lm.state_dict().items()}, r.folder(stage)


def test_runs_sharing_a_cache_each_get_the_stage0_lm_their_configuration_builds(tmp_path):
    """ShapesVLM draws the connector's weights from the seed before the LM's, so the text-only LM depends
    on the connector: a run sharing --cache with another connector's run trains its own, the one it
    would train alone; a run given Run.lm_dir reads that LM whatever its connector (the benchmark's
    shared stage 0)."""
    shared = tmp_path / "shared"
    mlp, mlp_folder = stage0_lm(shared, "mlp")
    perceiver, folder = stage0_lm(shared, "perceiver")
    alone, _ = stage0_lm(tmp_path / "alone", "perceiver")
    assert folder != mlp_folder and folder.parent == mlp_folder.parent == shared
    assert all(torch.equal(perceiver[k], alone[k]) for k in alone)
    assert not all(torch.equal(perceiver[k], mlp[k]) for k in mlp)                 # the two LMs do differ
    given, _ = stage0_lm(tmp_path / "reader", "perceiver", lm_dir=mlp_folder)
    assert all(torch.equal(given[k], mlp[k]) for k in mlp)


def replace_cfg(cfg, **changes):
    from dataclasses import replace
    return replace(cfg, **changes)


def test_a_torn_or_non_finite_checkpoint_is_refused(cache, tmp_path):
    vcfg, tcfg = tiny("linear")
    with pytest.raises(vt.Killed):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path, CPU, cache=cache, progress=False, evaluate=False, stop_after=("stage1", 3)))
    step = tmp_path / "stage1" / "step-000003"
    meta = json.loads((step / "trainer.json").read_text())
    (step / "trainer.json").write_text(json.dumps({**meta, "step": 2}))
    with pytest.raises(vt.CheckpointError, match="mixes parts of different steps"):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path, CPU, resume=True, cache=cache, progress=False, evaluate=False))


def test_a_checkpoint_of_another_layout_is_refused(cache, tmp_path):
    from safetensors.torch import save_file
    vcfg, tcfg = tiny("linear")
    with pytest.raises(vt.Killed):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path, CPU, cache=cache, progress=False, evaluate=False, stop_after=("stage1", 3)))
    weights = tmp_path / "stage1" / "step-000003" / "trainer.safetensors"
    tensors = {k.replace("param.", "param/"): v for k, v in load_file(str(weights)).items() if k != "rng.torch"}
    save_file(tensors, str(weights), metadata={"step": "3"})         # parameters under other names, no RNG state
    with pytest.raises(vt.CheckpointError, match="not a vlm_train.py stage checkpoint"):
        vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path, CPU, resume=True, cache=cache, progress=False, evaluate=False))


def test_a_non_finite_loss_stops_without_overwriting_the_checkpoint(cache, tmp_path):
    vlm, data, vcfg, tcfg = build("linear", cache)
    run = vt.Run(tmp_path, CPU, cache=cache, progress=False)
    stage = vt.Stage("stage1", ("caption",), data, vt.vlm_loss, vt.set_stage(vlm, 1), 3, 1e-2, 0.03, {"x": 1})
    vt.train_stage(vlm, stage, tcfg, run)
    folder = tmp_path / "stage1"
    before = (folder / "step-000003" / "trainer.safetensors").read_bytes()
    with torch.no_grad():
        for p in vlm.model.connector.parameters():
            p.fill_(float("nan"))
    with pytest.raises(clip.NonFiniteLossError, match="the last checkpoint is kept"):
        vt.train_stage(vlm, replace_cfg(stage, steps=6), tcfg, run)
    assert (folder / "latest").read_text().strip() == "step-000003"
    assert (folder / "step-000003" / "trainer.safetensors").read_bytes() == before


# --- bad input from the command line ------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--connector", "resnet"], "invalid choice"),
    (["--preset", "gpt4"], "invalid choice"),
    (["--stage2", "half"], "invalid choice"),
    (["--device", "cuda:7"], "--device cuda:7 was asked for"),
    (["--train", "--tiny", "--init", "paligemma:/no/such/folder"], "is not a folder"),
    (["--train", "--tiny", "--init", "llama:/tmp"], "expects paligemma:DIR"),
    (["--set", "lm_depth=3"], "KEY a field of VLMConfig or TrainConfig"),
    (["--set", "patch_merge=two"], "--set patch_merge: expected a int like 2, got 'two'"),
    (["--set", "bf16=maybe"], "--set bf16: expected a bool"),
    (["--set", "patch_merge=3"], "patch_merge 3 needs a square grid"),
    (["--set", "image_pos=3d"], "image_pos must be 'none' or '2d'"),
    (["--set", "grid_questions=column,diagonal"], "grid_questions must name 'column', 'row' or 'cell'"),
])
def test_bad_command_lines_exit_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vt.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_set_overrides_any_field_with_its_type():
    import argparse
    args = argparse.Namespace(preset=None, connector=None, seed=3, stage2=None, steps=None, tiny=False, train=True,
                              memory_report=False, set=["patch_merge=1", "lm_layers=3", "stage2_lr=1e-3", "bf16=false",
                                                        "lora_targets=q_proj,v_proj"])
    vcfg, tcfg = vt.configs_from_args(args)
    assert (vcfg.patch_merge, vcfg.lm_layers, vcfg.lora_targets) == (1, 3, ("q_proj", "v_proj"))
    assert (tcfg.stage2_lr, tcfg.bf16, tcfg.seed) == (1e-3, False, 3)


def test_the_query_connectors_take_their_own_defaults_under_set_and_blip2s_preset_takes_none(cache):
    """--connector qformer / perceiver (and the benchmark's rows) start from CONNECTOR_DEFAULTS: one cell
    per query, read as one merged key; the Q-Former's also positions on its output tokens, feed-forward
    layers starting at zero, 10% warm-up in stages 1 and 2; --set overrides them; the per-patch
    connectors and BLIP-2's preset are unchanged (the smolvlm preset takes them on the default decoder); stage 0
    warms up over pretrain_warmup whatever the connector, so every connector reads the same text-only LM."""
    import argparse

    def configs(connector=None, preset=None, *settings, tiny=False):
        return vt.configs_from_args(argparse.Namespace(preset=preset, connector=connector, seed=0, stage2=None, steps=None,
                                                       tiny=tiny, train=True, memory_report=False, set=list(settings)))
    vcfg, tcfg = configs("qformer")
    assert (vcfg.query_merge, vcfg.query_prior, vcfg.query_pos, vcfg.qformer_zero_ffn, tcfg.warmup) == (2, "window", True,
                                                                                                     True, 0.1)
    vcfg, tcfg = configs("qformer", None, "query_prior=local", "warmup=0.03")
    assert (vcfg.query_prior, vcfg.query_pos, tcfg.warmup) == ("local", True, 0.03)
    vcfg, tcfg = configs("perceiver")
    assert (vcfg, tcfg) == (vt.VLMConfig(connector="perceiver", query_merge=2, query_prior="window"), vt.TrainConfig())
    assert configs("perceiver", None, "query_merge=1")[0].query_merge == 1
    for connector in ("mlp", "linear", "dense"):
        vcfg, tcfg = configs(connector)
        assert (vcfg, tcfg) == (vt.VLMConfig(connector=connector), vt.TrainConfig())
    vcfg, tcfg = configs(None, "blip2")
    assert (vcfg.query_merge, vcfg.query_prior, vcfg.query_pos, vcfg.qformer_zero_ffn, tcfg.warmup) == (1, "none", False,
                                                                                                     False, 0.03)
    # the smolvlm preset (the tutorial's, tested in test_vlm_hf.py with --lm hf:) on the default decoder: its
    # structure over the Q-Former's defaults, the recipe's numbers, an adapter 256 wide inside and 1.5x the stage-2
    # steps (6,000, as measured)
    vcfg, tcfg = configs(None, "smolvlm")
    assert vcfg == vt.make_configs({"connector": "qformer", "qformer_head": "mlp", "adapter_width": 256}, {})[0]
    assert tcfg == vt.make_configs({"connector": "qformer"}, {"stage2": "lora", "stage2_qformer": False,
                                                              "stage2_steps": 6000})[1]
    # the demo and --tiny keep their own step counts under a preset, but not a stage that the preset skips
    tiny = {preset: configs(None, preset, tiny=True)[1] for preset in ("smolvlm", "blip2", "paligemma-homework")}
    assert tiny["smolvlm"].stage2_steps == tiny["blip2"].stage2_steps == vt.TrainConfig.tiny().stage2_steps
    assert tiny["blip2"].itc_steps == vt.TrainConfig.tiny().itc_steps > 0 and tiny["paligemma-homework"].stage1_steps == 0
    vcfg, tcfg = vt.make_configs({"connector": "qformer"}, {"stage2": "full", "stage2_steps": 50,
                                                         "pretrain_steps": 40}, tiny=True)
    assert vcfg.query_prior == "window" and tcfg.warmup == 0.1
    vlm, data = vt.build_vlm(vcfg, tcfg, vt.Run(cache, CPU, progress=False))
    stage0 = vt.text_stage(vlm, data, tcfg)
    assert (stage0.warmup, vt.vqa_stage(vlm, data, tcfg).warmup) == (tcfg.pretrain_warmup, 0.1)
    assert "warmup" not in stage0.config["lm"] and stage0.config["lm"]["pretrain_warmup"] == 0.03
    mlp, mlp_data, _, mlp_tcfg = build("mlp", cache, stage2="full", stage2_steps=50, pretrain_steps=40)   # warmup 0.03
    assert vt.text_stage(mlp, mlp_data, mlp_tcfg).config["lm"] == stage0.config["lm"]
    assert [round(vt.schedule(s, 1.0, 50, 0.1), 2) for s in (0, 4)] == [0.2, 1.0]   # 5 warm-up steps of 50


def test_an_incomplete_init_folder_lists_what_is_missing(tmp_path, capsys):
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        vt.main(["--train", "--tiny", "--init", f"paligemma:{tmp_path / 'pg'}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "incomplete" in err and "model.safetensors" in err and "tokenizer.json" in err


# --- --init paligemma:DIR on a tiny random PaliGemma that transformers saves ---------------------------

def tiny_paligemma_checkpoint(path):
    """transformers' PaliGemma (random, 28-px images) with a small Gemma tokenizer that knows the
    shapes words, saved with save_pretrained as a real checkpoint folder is."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{i:02X}>": 5 + i for i in range(256)})
    for piece in list("abcdefghijklmnopqrstuvwxyz\n?") + ["\u2581"] + ["\u2581" + w for w in clip.ShapesTokenizer.WORDS]:
        vocab.setdefault(piece, len(vocab))
    return save_tiny_paligemma(path, vocab)


def save_tiny_paligemma(path, vocab, merges=(), edit=None):
    """A random transformers PaliGemma (28-px images, 16 image tokens, 2 + 2 layers of width 32) saved with
    its processor: a GemmaTokenizer over `vocab` (+ <image>) and `merges`. edit(model, vocab), if given,
    changes the weights before they are saved. Returns the tokenizer."""
    from transformers import (AddedToken, GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessorPil)
    vocab = dict(vocab)
    vocab["<image>"] = image_id = len(vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=list(merges))
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    images = SiglipImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.image_seq_length = 16
    PaliGemmaProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    vocab_size = len(vocab) + 1024 + 128                                   # + the <loc> and <seg> tokens
    config = PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7, vision_use_head=False),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8, vocab_size=vocab_size, max_position_embeddings=256),
        image_token_index=image_id, vocab_size=vocab_size, projection_dim=32, hidden_size=32)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config)
    if edit is not None:
        edit(model, vocab)
    model.save_pretrained(path)
    return tok


def test_init_keeps_the_checkpoints_projector(tmp_path, capsys):
    tiny_paligemma_checkpoint(tmp_path / "pg")
    for extra in (["--connector", "mlp"], ["--connector", "linear", "--set", "image_pos=2d"]):
        with pytest.raises(SystemExit):
            vt.main(["--train", "--tiny", "--init", f"paligemma:{tmp_path / 'pg'}", "--out", str(tmp_path / "o"), *extra])
        assert "uses the checkpoint's own projector" in capsys.readouterr().err


@pytest.mark.slow
def test_init_paligemma_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration
    ckpt = tmp_path / "pg"
    tiny_paligemma_checkpoint(ckpt)
    out = tmp_path / "run"
    vt.main(["--train", "--tiny", "--init", f"paligemma:{ckpt}", "--connector", "linear", "--stage2", "lora",
             "--out", str(out), "--device", "cpu"])
    ours = vt.load_vlm(out)
    # the same manifest as every other model's; the parts here are a transformers PaliGemma and its adapter
    manifest = json.loads((out / "model" / "vlm.json").read_text())
    assert manifest["parts"] == ["base", "adapter"] and manifest["init"] == str(ckpt)
    adapter = load_file(str(out / "model" / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    base = PaliGemmaForConditionalGeneration.from_pretrained(out / "model" / "base").eval()
    peft = PeftModel.from_pretrained(base, out / "model" / "adapter").eval()
    images = [im for im, _, _ in vt.synthetic_vqa(2, seed=5, image_size=28)]
    batch = ours.processor(["answer en what colour is the circle?", "answer en how many shapes are there?"],
                           ["red", "two"])
    pixels = ours.processor.pixels(torch.from_numpy(np.stack([np.asarray(im) for im in images])))
    with torch.no_grad():
        want = peft(input_ids=batch["input_ids"], pixel_values=pixels, attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"]).logits
        got = ours.model(batch["input_ids"], pixels, batch["attention_mask"], batch["token_type_ids"]).logits
        plain = PaliGemmaForConditionalGeneration.from_pretrained(out / "model" / "base").eval()(
            input_ids=batch["input_ids"], pixel_values=pixels, attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"]).logits
    keep = batch["attention_mask"].bool()
    assert (got - want)[keep].abs().max() < 1e-4
    assert (plain - want)[keep].abs().max() > 1e-3                        # the adapter is not a no-op
    # paligemma.py's own loader reads the same folder pair
    again = pg.PaliGemma.from_pretrained(out / "model" / "base", adapter=out / "model" / "adapter")
    with torch.no_grad():
        assert (again(batch["input_ids"], pixels, batch["attention_mask"], batch["token_type_ids"]).logits - want)[keep].abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_init_on_a_bf16_device_trains_bf16_weights(tmp_path, monkeypatch, mode):
    """On a bf16 device (a CUDA GPU with bf16; here the CPU, told it is one) --init loads every weight in
    bf16, half of fp32's memory, and stage 2 trains under bf16 autocast: the run goes through, the
    adapters move, and the saved model loads and answers."""
    monkeypatch.setattr(vt, "bf16_device", lambda device, enabled=True: enabled)
    ckpt, out = tmp_path / "pg", tmp_path / "run"
    tiny_paligemma_checkpoint(ckpt)
    metrics = vt.main(["--train", "--tiny", "--init", f"paligemma:{ckpt}", "--connector", "linear", "--stage2", mode,
                       "--out", str(out), "--device", "cpu"])
    assert all(math.isfinite(v) for v in metrics["history"]["stage2"])
    adapter = load_file(str(out / "model" / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {torch.bfloat16}
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    monkeypatch.undo()
    again = vt.load_vlm(out)
    image = vt.synthetic_vqa(1, seed=5, image_size=28)[0][0]
    assert isinstance(again.answer(image, "what colour is the circle?"), str)


# --- memory -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_measured_memory_orders_qlora_below_lora_below_full():
    """benchmarks/bench_vlm_train.py --memory: one stage-2 step per mode, each in a fresh process."""
    rows = {r["mode"]: r for r in bench().main(["--memory", "--tiny", "--batch-size", "8"])}
    assert rows["qlora"]["state"] < rows["lora"]["state"] < rows["full"]["state"]
    assert rows["qlora"]["trainable"] == rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert all(r["activations"] > 0 and r["peak"] >= r["baseline"] for r in rows.values())


def test_memory_report_estimates_paligemma_per_mode_for_the_3b_config_and_an_init_checkpoint(tmp_path, capsys):
    """--memory-report: paligemma.memory_estimate per stage-2 mode, with and without checkpointing, for
    PaliGemma-3B's config (no weights anywhere) and for an --init checkpoint's own config.json."""
    tiny_paligemma_checkpoint(tmp_path / "pg")
    rows = vt.main(["--memory-report", "--preset", "paligemma-homework", "--init", f"paligemma:{tmp_path / 'pg'}"])
    config = pg.read_config(tmp_path / "pg")
    want = pg.memory_estimate(config, "qlora", 16 // 4, 128, True, 8)
    assert [(r["mode"], r["grad_checkpointing"]) for r in rows] == [(m, c) for m in vt.STAGE2_MODES for c in (False, True)]
    assert rows[-1] == want
    totals = {(r["mode"], r["grad_checkpointing"]): r["total"] for r in rows}
    assert totals[("qlora", False)] < totals[("lora", False)] < totals[("full", False)]
    assert all(totals[(m, True)] < totals[(m, False)] for m in vt.STAGE2_MODES)
    out = capsys.readouterr().out
    assert "smallest GPU" in out and str(tmp_path / "pg") in out and "micro-batch 4" in out


def test_grid_positions_add_a_row_and_a_column_vector_to_each_token_in_raster_order():
    torch.manual_seed(0)
    inner = vt.MLPConnector(16, 8, 2)
    pos = vt.GridPositions(inner, 3, 8)
    feats = torch.randn(2, 1, 37, 16)                                      # (B, Lk, 1+N, Dv), N = 6 x 6 patches
    u, plain = pos(feats), inner(feats)
    assert u.shape == plain.shape == (2, 9, 8)
    for r in range(3):
        for c in range(3):
            assert torch.allclose(u[:, 3 * r + c] - plain[:, 3 * r + c], pos.rows.weight[r] + pos.cols.weight[c])
    with torch.no_grad():                                                  # R = C = 0: the connector alone
        pos.rows.weight.zero_(), pos.cols.weight.zero_()
    assert torch.equal(pos(feats), plain)
    with pytest.raises(ValueError, match="image_pos must be"):
        vt.VLMConfig(image_pos="3d")


@pytest.mark.parametrize("connector", ["qformer", "perceiver"])
def test_key_positions_add_a_row_and_a_column_vector_to_what_the_queries_read(connector):
    feats = torch.randn(2, 1, 37, 16)                                      # (B, Lk, 1+N, Dv), N = 6 x 6 patches
    torch.manual_seed(0)
    plain, M = vt.make_connector(vt.VLMConfig.tiny(connector=connector, image_pos="none"), 16, 2, 36, 8)
    torch.manual_seed(0)
    placed, M2 = vt.make_connector(vt.VLMConfig.tiny(connector=connector, image_pos="2d"), 16, 2, 36, 8)
    assert M == M2 and isinstance(placed.key_pos, vt.KeyPositions) and isinstance(plain.key_pos, torch.nn.Identity)
    z = placed.key_pos(feats[:, -1])
    assert torch.equal(z[:, 0], feats[:, -1, 0])                           # the class token keeps its value
    for r in range(6):
        for c in range(6):
            want = feats[:, -1, 1 + 6 * r + c] + (placed.key_pos.rows.weight[r] + placed.key_pos.cols.weight[c])
            assert torch.equal(z[:, 1 + 6 * r + c], want)
    placed.load_state_dict({k: v for k, v in plain.state_dict().items()} | {
        k: torch.zeros_like(v) for k, v in placed.state_dict().items() if k.startswith("key_pos.")})
    assert torch.equal(placed(feats), plain(feats))                        # R = C = 0: the connector alone


def test_named_position_answers_show_their_work_and_are_scored_by_their_last_word():
    a, b = clip.Shape("circle", "red", "large", 0.1, 0.1), clip.Shape("square", "blue", "small", 0.9, 0.5)
    question = "where is the red circle relative to the blue square?"
    assert vt.named_position_answer(clip.Scene((a, b)), question, "left") == \
        "red circle top left, blue square middle right: left"
    data = vt.VQAData(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [(0, question, "left", "position"),
                                                                    (1, "how many shapes are there?", "two", "count")], [])
    said = ["red circle top left blue square middle right left", "two left"]
    named = SimpleNamespace(config=vt.VLMConfig(position_answer="named"))
    scores, _ = vt.evaluate_vqa(named, data, predictions=said)
    assert scores["position"]["exact"] == 100 and scores["count"]["exact"] == 0      # only position's last word
    plain, _ = vt.evaluate_vqa(SimpleNamespace(config=vt.VLMConfig(position_answer="word")), data, predictions=said)
    assert plain["position"]["exact"] == 0


def test_grid_questions_by_hand():
    shapes = (clip.Shape("circle", "red", "large", 0.1, 0.1), clip.Shape("square", "blue", "small", 0.9, 0.5),
              clip.Shape("triangle", "green", "small", 0.5, 0.9), clip.Shape("triangle", "green", "large", 0.9, 0.9))
    assert vt.grid_questions(clip.Scene(shapes), ("column", "row")) == [     # the two green triangles: no name picks one
        ("which column is the red circle in?", "left", "column"), ("which row is the red circle in?", "top", "row"),
        ("which column is the blue square in?", "right", "column"), ("which row is the blue square in?", "middle", "row")]
    cells = vt.grid_questions(clip.Scene(shapes), ("cell",))
    assert cells[:2] == [("what colour is the shape in the top left?", "red", "cell"),
                         ("what shape is in the top left?", "circle", "cell")]
    assert ("what shape is in the bottom right?", "triangle", "cell") in cells and len(cells) == 8
    shared = (shapes[0], clip.Shape("square", "blue", "small", 0.2, 0.2))                # two shapes in one cell
    assert vt.grid_questions(clip.Scene(shared), ("cell",)) == []
    assert vt.grid_questions(clip.Scene(shapes), ()) == []


def test_position_training_writes_named_answers_and_appends_grid_questions():
    tcfg = vt.TrainConfig.tiny(n_train=12, grid_questions=("column", "row"))
    data = vt.shapes_data(12, 0, "train", 16)
    scenes, _ = vt.draw_scenes(12, 0, "train")
    out = vt.position_training(data, tcfg, named=True)
    assert out.qa[: len(data.qa)] == [(i, q, vt.named_position_answer(scenes[i], q, a) if k == "position" else a, k)
                                      for i, q, a, k in data.qa]
    grid = [(i, q, a, k) for i, s in enumerate(scenes) for q, a, k in vt.grid_questions(s, ("column", "row"))]
    assert out.qa[len(data.qa):] == grid and {k for *_, k in grid} == {"column", "row"}
    plain = vt.position_training(data, replace(tcfg, grid_questions=()), named=False)
    assert plain.qa == data.qa and out.images is data.images


def test_stage2_draws_each_kind_and_with_balance_position_each_relation_equally_often():
    data = vt.position_training(vt.shapes_data(200, 0, "train", 16), vt.TrainConfig.tiny(n_train=200, grid_questions=()),
                                named=True)
    relation = lambda row: row[2].split()[-1]          # noqa: E731  (a named answer's last word)

    def shares(weights, rows, key):
        total = collections.Counter()
        for w, row in zip(weights, rows):
            total[key(row)] += w
        return {k: v / sum(total.values()) for k, v in total.items()}

    natural = collections.Counter(relation(r) for r in data.qa if r[3] == "position")
    assert natural["left"] > 2 * natural["above"]                         # the scenes' own imbalance
    plain, balanced = vt.kind_weights(data.qa).tolist(), vt.kind_weights(data.qa, balance_position=True).tolist()
    assert plain == torch.tensor([1.0 / sum(r[3] == row[3] for r in data.qa) for row in data.qa]).tolist()
    for weights in (plain, balanced):                                      # six kinds, a sixth of the draws each
        assert all(abs(v - 1 / 6) < 1e-6 for v in shares(weights, data.qa, lambda r: r[3]).values())
    position = [(w, r) for w, r in zip(balanced, data.qa) if r[3] == "position"]
    by_relation = shares([w for w, _ in position], [r for _, r in position], relation)
    assert sorted(by_relation) == ["above", "below", "left", "right"]
    assert all(abs(v - 0.25) < 1e-6 for v in by_relation.values())
    same = [(p, b) for p, b, r in zip(plain, balanced, data.qa) if r[3] != "position"]
    assert all(p == b for p, b in same)                                   # the other kinds' rows keep their weights


def test_a_tiny_run_trains_with_the_position_levers_and_the_scratchpad_table_sorts_its_errors(tmp_path, monkeypatch):
    vt.main(["--train", "--tiny", "--out", str(tmp_path), "--set", "position_answer=named", "--set", "image_pos=2d",
             "--set", "grid_questions=column,row,cell", "--set", "balance_position=true"])
    vlm = vt.load_vlm(tmp_path / "model")
    assert isinstance(vlm.connector, vt.GridPositions) and vlm.config.position_answer == "named"
    words = set(vlm.processor.tokenizer.stoi)
    assert {"top", "middle", "bottom", "centre"} <= words and {"which", "column", "row", "in"} <= words
    # answer_batch: room for the work (10 tokens), a position question answered by the work's last word
    images = [im for im, _, _ in vt.synthetic_vqa(2, seed=7, image_size=vlm.processor.image_size)]
    questions, planted, asked = ["where is the red circle relative to the blue square?", "how many shapes are there?"], \
        ["red circle top left blue square top right left", "three"], []
    monkeypatch.setattr(vt, "generate_answers", lambda vlm, pixels, prompts, n: asked.append(n) or planted)
    assert vlm.answer_batch(images, questions) == ["left", "three"] and asked == [10]
    assert vlm.answer_batch(images, questions, work=True) == planted
    assert vlm.answer_batch(images, questions[1:] * 2) == planted and asked[-1] == 4     # no position question
    assert vlm.answer_batch(images, ["what is this?", questions[1]]) == planted      # a free question: its whole text
    with pytest.raises(ValueError, match="not a shapes question"):
        vt.question_kind("what is this?")                                            # where a kind is needed
    # planted answers: the truth's work for every question, then three kinds of error
    scenes, qa = vt.position_scenes(16, 1)                   # the tiny run's split: n_eval 16, seed 0 + 1
    truth = [vt.named_position_answer(scenes[i], q, a) for i, q, a, _ in qa]
    flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
    said = [t.replace(",", "").replace(":", "") for t in truth]
    said[0] = said[0].rsplit(" ", 1)[0] + " " + flip[qa[0][2]]            # cells right, relation flipped
    w = said[1].split()                                                   # b written in a's cell: "same cell"
    said[1] = " ".join(w[:6] + w[2:4] + ["above"])                        # and a relation that does not follow
    monkeypatch.setattr(vt, "answer_questions", lambda vlm, data, *a, **k: said)
    counts = bench().scratchpad_table(tmp_path)
    assert counts[("cells right", "relation right", "follows from the cells written")] == 14
    assert counts[("cells right", "relation wrong", "does not follow")] == 1
    assert counts[("a cell wrong", "relation wrong", "does not follow")] == 1
    assert counts[f"relation {qa[0][2]} wrong"] == 1


def bench():
    """benchmarks/bench_vlm_train.py as a module."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_vlm_train
    return bench_vlm_train


def test_the_probe_recovers_a_planted_signal_and_reports_chance_on_a_planted_non_signal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)                  # a linear function of x: signal
    r = bench().ridge_probe(x[:2000], y[:2000], x[2000:], y[2000:])
    assert r["n"] == 1000 and r["chance"] < 40 and r["acc"] > 85
    noise = torch.randint(0, 4, (3000,), generator=g)                    # independent of x: no signal
    r = bench().ridge_probe(x[:2000], noise[:2000], x[2000:], noise[2000:])
    assert 20 < r["acc"] < r["chance"] + 4 and r["chance"] == pytest.approx(25, abs=4)


def test_the_probe_command_runs_on_a_trained_run(tmp_path, capsys):
    vt.main(["--train", "--tiny", "--out", str(tmp_path), "--device", "cpu"])
    rows = bench().main(["--probe", str(tmp_path), "--probe-scenes", "200,100"])
    lm = [r for r in rows if r["features"].startswith("LM layer")]
    assert {r["target"] for r in lm} == {"answer", "a column", "b column"} and len(lm) == 3 * vt.VLMConfig.tiny().lm_layers
    assert all(0 <= r["acc"] <= 100 and 0 < r["chance"] <= 100 and r["n"] > 0 for r in rows)
    assert "| features | target | accuracy | chance | n |" in capsys.readouterr().out


def test_the_qformer_layer_probe_reads_every_sub_layer_and_each_read_of_the_image(cache, capsys):
    """--probe on a 9-query Q-Former also probes each query's state after every sub-layer: the hooks
    catch the states the Q-Former computes (the last one is its output), and each cross-attention's
    weights, recomputed by hand, are a distribution whose share on the query's own cell is reported."""
    vcfg = vt.VLMConfig.tiny(connector="qformer", num_queries=9, query_prior="window")
    vlm, _ = vt.build_vlm(vcfg, vt.TrainConfig.tiny(), vt.Run(cache, CPU, progress=False))
    scenes = vt.draw_scenes(20, 0, "train")[0]
    states, reads = bench().qformer_states(vlm, scenes)
    layers = len(vlm.connector.qformer.qformer.encoder.layer)
    assert len(states) == 1 + 2 * layers + len(reads) and len(reads) == (layers + 1) // 2   # 1: the ViT's mean
    feats = vlm.image_inputs(vt.rendered(scenes, [], vlm.processor.image_size).images)
    with torch.no_grad():
        out = vlm.connector.qformer(vlm.connector.keys(feats))                       # (S, 9, Dq)
    assert torch.allclose(list(states.values())[-1], out, atol=1e-6)
    weights, logits = reads[0]                                                          # (S, H, 9, 1+N)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    outside = vt.LocalPrior(9, 4, window=True).window.isinf()                           # the tiny ViT's 4 x 4 patches
    assert (weights[..., outside] == 0).all() and torch.isfinite(logits).all()
    rows = bench().qformer_layer_table(vlm, 40, 20)
    assert len(rows) == 2 * len(states) and all(0 <= r["acc"] <= 100 and r["n"] == 20 * 9 for r in rows)
    assert "| read 1 | 100.0% (" in capsys.readouterr().out                           # the window: all on its cell


def test_the_probe_labels_each_cell_and_each_position_question_by_hand():
    a, b = clip.Shape("circle", "red", "large", 0.8, 0.1), clip.Shape("square", "blue", "small", 0.1, 0.5)   # cells 2, 3
    colour, kind = bench().cell_labels([clip.Scene((a, b))])
    assert ("red", "circle") in clip.HELDOUT and ("blue", "square") not in clip.HELDOUT
    assert bench().heldout_cells(colour, kind).nonzero().tolist() == [[0, 2]]            # the red circle's cell only
    empty = [c for c in range(9) if c not in (2, 3)]
    assert colour[0, 2] == list(clip.COLOURS).index("red") and kind[0, 3] == clip.SHAPES.index("square")
    assert (colour[0, empty] == len(clip.COLOURS)).all() and (kind[0, empty] == len(clip.SHAPES)).all()
    rows = bench().position_rows([clip.Scene((a, b))], seed=0)
    (i, question, answer, cell_a, cell_b), = rows
    first = question.split()[3:5] == ["red", "circle"]
    assert answer == ("right" if first else "left") and (cell_a, cell_b) == ((2, 3) if first else (3, 2))


# --- type hints ---------------------------------------------------------------------------------------

def test_every_public_function_has_type_hints():
    # vlm_train.py keeps no byte-identical copy of another file's helper (test_plumbing.py): nothing exempt
    from test_clip import unannotated                             # one checker for clip.py, qformer.py and this file
    assert unannotated(vt) == []


def test_position_evaluation_is_balanced_and_scored_beside_its_majority_baseline():
    data = vt.position_data(40, seed=3, image_size=32)
    answers = [a for _, _, a, _ in data.qa]
    assert {a: answers.count(a) for a in set(answers)} == {"left": 10, "right": 10, "above": 10, "below": 10}
    assert all(k == "position" and q.startswith("where is the") for _, q, _, k in data.qa)
    assert sorted(i for i, *_ in data.qa) == list(range(40)) and data.images.shape == (40, 32, 32, 3)
    again = vt.position_data(40, seed=3, image_size=32)
    assert again.qa == data.qa and torch.equal(again.images, data.images)
    assert data.qa != vt.position_data(40, seed=4, image_size=32).qa          # another seed, other scenes
    # always answering "right" scores the majority baseline, 25% on this balanced set
    scores = vt.score_answers(["right"] * 40, answers, ["position"] * 40)["position"]
    assert scores["exact"] == 25.0 and scores["majority"] == 25.0 and scores["answers"] == {"right": 100.0}
    # by hand: 2 of 4 right, the most common truth ("left") is half of them, "right" given 3 times in 4
    s = vt.score_answers(["left", "right", "right", "right"], ["left", "left", "right", "above"], ["position"] * 4)
    assert s["all"]["exact"] == 50.0 and s["all"]["majority"] == 50.0
    assert s["all"]["answers"] == {"right": 75.0, "left": 25.0}



@pytest.mark.parametrize("mode", vt.STAGE2_MODES)
def test_activation_checkpointing_in_stage_2_gives_the_same_gradients(mode, cache):
    vlm, data, _, _ = build("mlp", cache)
    if mode != "full":
        vt.add_lora(vlm, quantize=mode == "qlora")
        with torch.no_grad():                  # B = 0 would leave A without a gradient: give B values
            for layer in lora.lora_layers(vlm.lm).values():
                layer.lora_B.normal_(0.0, 0.1)
    batch = vt.make_batch(vlm, data, list(range(8)), "vqa")

    def gradients():
        vlm.model.zero_grad(set_to_none=True)
        vt.vlm_loss(vlm.model.train(), batch).backward()
        return {n: p.grad.clone() for n, p in vlm.model.named_parameters() if p.grad is not None}

    tcfg = vt.TrainConfig.tiny(stage2=mode)
    vt.vqa_stage(vlm, data, tcfg)
    plain = gradients()
    assert not vlm.lm.model.gradient_checkpointing
    vt.vqa_stage(vlm, data, replace(tcfg, grad_checkpointing=True))
    assert vlm.lm.model.gradient_checkpointing
    recomputed = gradients()
    assert plain.keys() == recomputed.keys() and any(n.startswith("language_model.") for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], rtol=1e-5, atol=1e-7), name


def test_the_benchmark_rows_take_set_fields():
    args = SimpleNamespace(set=["position_answer=named", "grid_questions=", "stage2_steps=7"], tiny=True)
    vcfg, tcfg = bench().row_configs(args, connector="qformer", stage2="lora", seed=3)
    assert (vcfg.connector, vcfg.position_answer, vcfg.lm_width) == ("qformer", "named", vt.VLMConfig.tiny().lm_width)
    assert (tcfg.grid_questions, tcfg.stage2_steps, tcfg.stage2, tcfg.seed) == ((), 7, "lora", 3)


@pytest.mark.slow
def test_the_benchmark_runs_each_row_once_per_seed_and_gives_min_and_mean(tmp_path, capsys):
    """--seeds: each seed trains its own stage-0 LM, stage 1 and stage 2, and a row's min / mean are those
    of its seeds' scores."""
    rows = bench().main(["--tiny", "--out", str(tmp_path), "--connectors", "linear", "--modes", "full,lora",
                         "--seeds", "0,1", "--jobs", "2"])
    assert [(r["connector"], r["mode"], r["seeds"]) for r in rows] == [("linear", "full", [0, 1]), ("linear", "lora", [0, 1])]
    for row in rows:
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for key in ("test", "heldout", "position"):
            scores = [r[key] for r in row["runs"]]
            assert row[key] == (min(scores), sum(scores) / 2) and all(0 <= x <= 100 for x in scores)
    assert len(list((tmp_path / "cache").glob("lm-*"))) == 2                          # one stage-0 LM per seed
    for seed in (0, 1):                                                                 # one stage 1 per seed,
        assert (tmp_path / f"linear-seed{seed}" / "stage1").is_dir()                    # read by both modes
    weights = [load_file(tmp_path / f"linear-full-seed{seed}" / "model" / "model.safetensors") for seed in (0, 1)]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])      # two runs, not one twice
    out = capsys.readouterr().out
    assert "| exact match min / mean |" in out and "| linear | lora |" in out
    for bad in ("1,1", "a,2"):
        with pytest.raises(SystemExit, match="--seeds expects"):
            bench().main(["--tiny", "--out", str(tmp_path / "bad"), "--seeds", bad])

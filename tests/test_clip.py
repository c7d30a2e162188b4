"""clip.py against the lecture's pseudo-code, transformers' CLIPModel, hand-made matrices and the data."""
import inspect
import json
import math
import random
import typing

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from crash_hook import Crash, crash_after
from conftest import run_gloo_workers

# tiny tensors: one torch thread (tests/conftest.py says why)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------

def pseudo_code_loss(I_f, T_f, t):
    """Radford et al. 2021, Figure 3, in numpy, line by line (t = ln(1/tau), the log of the logit scale)."""
    I_e = I_f / np.linalg.norm(I_f, axis=1, keepdims=True)
    T_e = T_f / np.linalg.norm(T_f, axis=1, keepdims=True)
    logits = I_e @ T_e.T * np.exp(t)
    n = len(logits)

    def cross_entropy(x, labels, axis):       # mean over the other axis of -log softmax at the label
        x = np.moveaxis(x, axis, 1)
        logp = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
        return -logp[np.arange(n), labels].mean()

    labels = np.arange(n)
    return (cross_entropy(logits, labels, 1) + cross_entropy(logits, labels, 0)) / 2


def test_clip_loss_equals_the_papers_pseudo_code_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = 2.1
    ours = clip.clip_loss(image, text, torch.tensor(t, dtype=torch.float64).exp())
    assert abs(ours.item() - pseudo_code_loss(image.numpy(), text.numpy(), t)) < 1e-12
    assert abs(ours.item() - clip.clip_loss(text, image, math.exp(t)).item()) < 1e-12    # swapping the towers


def test_clip_loss_is_log_n_for_uninformative_and_zero_for_aligned_features():
    n = 6
    same = torch.ones(n, 4)
    assert abs(clip.clip_loss(same, same, 14.3).item() - math.log(n)) < 1e-6
    aligned = torch.eye(n)                        # orthogonal unit vectors, each caption equal to its image
    assert clip.clip_loss(aligned, aligned, 100.0).item() < 1e-30 + 6 * math.exp(-100) * 2


def test_logit_scale_t_is_log_of_one_over_tau_starts_at_tau_0_07_and_is_clamped_to_0_ln100():
    model = clip.CLIP(clip.CLIPConfig.tiny())
    t = model.logit_scale
    assert abs(t.item() - 2.6593) < 1e-4                      # ln(1/0.07) = ln 100 - ln 7
    assert abs(math.exp(-t.item()) - 0.07) < 1e-7             # tau = exp(-t); qformer's temp_init is tau
    for start, clamped in ((10.0, math.log(100)), (-3.0, 0.0), (1.0, 1.0)):
        with torch.no_grad():
            t.fill_(start)
        model.clamp_logit_scale_()
        assert abs(t.item() - clamped) < 1e-6                 # 1 <= exp(t) <= 100, i.e. 0.01 <= tau <= 1


def test_siglip_loss_equals_the_pairwise_sum():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    scale, bias = 10.0, -10.0
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (scale * float(xn[i] @ yn[j]) + bias))))
    assert abs(clip.siglip_loss(x, y, scale, bias).item() - total / 5) < 1e-10


# ---------------------------------------------------------------------------------------------
# Parity with transformers' CLIPModel on a small random checkpoint in the real format
# ---------------------------------------------------------------------------------------------

def hf_config(eos_token_id=98, **text):
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config={**dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=12, eos_token_id=eos_token_id,
                            bos_token_id=97, pad_token_id=0), **text},
        vision_config=dict(image_size=24, patch_size=8, hidden_size=48, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16, logit_scale_init_value=2.3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import CLIPModel
    torch.manual_seed(0)
    model = CLIPModel(hf_config()).eval()
    with torch.no_grad():                         # random LayerNorms and biases, so none is left untested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(path)
    return path


def padded_text():
    """Right-padded rows of different lengths, each with its end-of-text token (98)."""
    rows = [[97, 5, 17, 33, 98], [97, 44, 98], [97, 3, 3, 7, 12, 61, 8, 98]]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def test_from_pretrained_matches_transformers_embeddings_and_logits(hf_dir):
    from transformers import CLIPModel
    ref = CLIPModel.from_pretrained(hf_dir).eval()
    ours = clip.CLIP.from_pretrained(hf_dir)
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    ids, mask = padded_text()
    with torch.no_grad():
        assert (ours.encode_image(pixels) - ref.get_image_features(pixel_values=pixels).pooler_output).abs().max() < 1e-4
        assert (ours.encode_text(ids, mask)
                - ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output).abs().max() < 1e-4
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        per_image, per_text = ours(pixels, ids, mask)
    assert per_image.shape == (2, 3) and per_text.shape == (3, 2)
    assert (per_image - out.logits_per_image).abs().max() < 1e-4
    assert (per_text - out.logits_per_text).abs().max() < 1e-4
    # a padded row gives what the same text gives alone, unpadded
    alone = ours.encode_text(ids[1:2, :3], mask[1:2, :3])
    assert (alone - ours.encode_text(ids, mask)[1:2]).abs().max() < 1e-5


def test_length_buckets_give_transformers_embeddings_on_a_long_padded_batch(hf_dir):
    """40 captions of 3 to 12 tokens: encode_text runs them in 4 groups cut to their own lengths."""
    from transformers import CLIPModel
    ref = CLIPModel.from_pretrained(hf_dir).eval()
    ours = clip.CLIP.from_pretrained(hf_dir)
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(3, 13, (40,), generator=g)
    ids = torch.randint(1, 97, (40, 12), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids[torch.arange(40), lengths - 1] = 98
    ids = ids * mask                                                   # padding id 0 after the text
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        assert (ours.encode_text(ids, mask) - want).abs().max() < 1e-4
        assert (ours.encode_text(ids, mask) - ours.encode_text(ids, mask, buckets=1)).abs().max() < 1e-5


def test_legacy_eos_rule_and_sharded_checkpoint(tmp_path):
    """Configs with eos_token_id 2 read the highest id out (transformers' rule); shards load too."""
    from transformers import CLIPModel
    torch.manual_seed(1)
    ref = CLIPModel(hf_config(eos_token_id=2)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = clip.CLIP.from_pretrained(tmp_path)
    ids, mask = padded_text()                     # 98 is each row's highest id
    with torch.no_grad():
        assert (ours.encode_text(ids, mask)
                - ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output).abs().max() < 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import CLIPModel
    torch.manual_seed(3)
    ours = clip.CLIP(clip.CLIPConfig.tiny()).eval()
    ours.save_pretrained(tmp_path)
    ref = CLIPModel.from_pretrained(tmp_path).eval()
    tok = clip.ShapesTokenizer(ours.cfg.context_length)
    ids, mask = tok.encode(["a red circle", "a photo of a large blue square above a small red circle"])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, _ = ours(pixels, ids, mask)
        b = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
    assert (a - b).abs().max() < 1e-4
    again = clip.CLIP.from_pretrained(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), ours.state_dict().values()))


def test_initialisation_has_transformers_clip_scales():
    # CLIPModel(config) draws its weights with CLIPPreTrainedModel._init_weights; ours must draw every
    # tensor from the same distribution: compare the standard deviation (and mean) tensor by tensor
    import transformers
    cfg = clip.CLIPConfig(vision_width=96, vision_mlp=192, vision_layers=3, text_width=64, text_mlp=128,
                          text_layers=2, embed_dim=48)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(**clip.config_to_hf(cfg))).state_dict()   # initializer_factor 1
    ours = clip.CLIP(cfg).state_dict()
    assert set(ours) == set(ref) - {k for k in ref if k.endswith("position_ids")}
    checked = 0
    for name, value in ours.items():
        want = ref[name].float()
        if name == "logit_scale":
            assert value.item() == pytest.approx(want.item())
        elif want.std() == 0:                     # biases 0, LayerNorm gains 1
            assert torch.equal(value, want), name
        else:                                     # sampling error of a std from n draws: about 1/sqrt(2n)
            n = value.numel()
            assert value.std().item() == pytest.approx(want.std().item(), rel=4 / math.sqrt(2 * n)), name
            assert abs(value.mean().item()) < 4 * want.std().item() / math.sqrt(n), name
            checked += 1
    assert checked >= 20
    # the ablation scheme of `--init gpt2`: std 0.02 for every weight matrix
    small = clip.CLIP(cfg)
    clip.init_weights(small, "gpt2")
    assert small.vision_model.encoder.layers[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="'clip' or 'gpt2'"):
        clip.init_weights(small, "xavier")


# ---------------------------------------------------------------------------------------------
# Zero-shot and retrieval on hand-made numbers
# ---------------------------------------------------------------------------------------------

class Stub(nn.Module):
    """A 'CLIP' whose image embedding is the pixel vector and whose text embedding is a lookup."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def encode_image(self, pixels):
        return pixels

    def encode_text(self, ids, mask):
        return self.table[ids[:, 0]]


def test_zero_shot_with_a_prompt_ensemble_by_hand():
    # prompt "x {label}" -> row 2k, "y {label}" -> row 2k+1 of the table
    table = torch.tensor([[1.0, 0.2], [1.0, -0.2], [0.0, 1.0], [0.4, 1.0]])
    labels = ["cat", "dog"]
    index = {"x cat": 0, "y cat": 1, "x dog": 2, "y dog": 3}

    def tokenize(texts):
        return torch.tensor([[index[t]] for t in texts]), torch.ones(len(texts), 1, dtype=torch.long)

    classifier = clip.text_classifier(Stub(table), tokenize, labels, templates=("x {}", "y {}"))
    cat = F.normalize(F.normalize(table[0], dim=0) + F.normalize(table[1], dim=0), dim=0)
    assert torch.allclose(classifier[0], cat, atol=1e-6)                 # (1, 0) direction
    images = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.9]])
    # cos to cat = x / |v|; cos to dog ~ (0.2 x + y) / |v| / 1.02: the third image is slightly nearer dog
    assert clip.zero_shot(Stub(table), images, classifier).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="at least one label"):
        clip.text_classifier(Stub(table), tokenize, [])


def test_recall_at_k_and_median_rank_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.3],      # image 0: its text ranks 1st
                        [0.8, 0.2, 0.5],      # image 1: its text (0.2) ranks 3rd
                        [0.1, 0.0, 0.4]])     # image 2: 1st
    r = clip.recall_at_k(sim, ks=(1, 2))
    assert r["i2t R@1"] == pytest.approx(200 / 3) and r["i2t R@2"] == pytest.approx(200 / 3)
    assert r["i2t median rank"] == 1
    # columns: text 0 -> image 0 (0.9) first; text 1 -> image 1 (0.2) first; text 2 -> image 2 (0.4) behind 0.5
    assert r["t2i R@1"] == pytest.approx(200 / 3) and r["t2i R@2"] == pytest.approx(100.0)
    # two right texts for image 1: the best right one counts
    correct = torch.eye(3, dtype=torch.bool)
    correct[1, 2] = True
    assert clip.recall_at_k(sim, correct, ks=(1,))["i2t R@1"] == pytest.approx(200 / 3)
    assert clip.recall_at_k(sim, correct, ks=(2,))["i2t R@2"] == pytest.approx(100.0)
    # ties count against: scores that cannot tell the texts apart retrieve nothing
    flat = clip.recall_at_k(torch.zeros(3, 3), ks=(1, 3))
    assert flat["i2t R@1"] == 0 and flat["i2t median rank"] == 3 and flat["t2i R@3"] == 100


# ---------------------------------------------------------------------------------------------
# The shapes data set
# ---------------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_seeds_matter():
    a, b = clip.ShapesDataset(20, seed=5), clip.ShapesDataset(20, seed=5)
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] and a[i][2] == b[i][2]
    c = clip.ShapesDataset(20, seed=6)
    assert any(a[i][1] != c[i][1] for i in range(20))


def parse(caption):
    """(colour, kind) pairs named by a full caption, in order."""
    words = clip.ShapesTokenizer.words(caption)
    return [(words[i - 1], w) for i, w in enumerate(words) if w in clip.SHAPES]


def test_captions_match_their_scenes_and_the_pixels():
    rng = random.Random(0)
    for _ in range(200):
        scene = clip.random_scene(rng)
        text = clip.caption(scene, "a photo of ")
        assert parse(text) == [(s.colour, s.kind) for s in scene.shapes]
        assert all(s.size in text for s in scene.shapes)
        if len(scene.shapes) == 2:
            assert clip.relation(*scene.shapes) in text
    # a one-shape scene's pixels carry its colour: inside the shape (edges are blended) it is the fill
    scene = clip.Scene((clip.Shape("square", "blue", "large", 0.5, 0.5),))
    img = np.asarray(clip.render(scene, 48)).reshape(-1, 3)
    inside = img[(np.abs(img.astype(int) - clip.BACKGROUND).sum(1) > 60)]
    assert tuple(np.median(inside, axis=0)) == clip.COLOURS["blue"]
    assert 0.06 < len(inside) / len(img) < 0.1     # a large square covers (0.30 * 0.85)^2 = 0.065, plus blended edges
    # relation words follow the positions
    left = clip.Shape("circle", "red", "small", 0.15, 0.5)
    right = clip.Shape("square", "blue", "small", 0.85, 0.5)
    assert clip.caption(clip.Scene((left, right))) == "a small red circle to the left of a small blue square"


def test_rim_puts_a_red_circles_edge_into_every_channel():
    # drawn plain, a pure red circle is invisible in the green channel (red and background both have G = 40)
    scene = clip.Scene((clip.Shape("circle", "red", "large", 0.5, 0.5),))
    plain = np.asarray(clip.render(scene, 48, rim=False)).astype(int)
    rimmed = np.asarray(clip.render(scene, 48)).astype(int)        # rims are the default
    assert (plain[..., 1] == clip.BACKGROUND[1]).all()
    # with the rim, the green channel holds a ring: raised pixels around the edge, the centre and the
    # background untouched, and the fill still red where the rim is not
    ring = rimmed[..., 1] > clip.BACKGROUND[1] + 20
    ys, xs = np.nonzero(ring)
    radius = np.hypot(ys + 0.5 - 24, xs + 0.5 - 24)
    assert len(ys) > 30 and (np.abs(radius - 0.30 * 48 / 2) < 1.5).all()
    assert tuple(rimmed[24, 24]) == clip.COLOURS["red"] and tuple(rimmed[0, 0]) == clip.BACKGROUND
    changed = (plain != rimmed).any(-1)
    assert (changed == ring).mean() > 0.99        # what the rim changes is the ring
    # the data set passes the rim on to every image it renders
    a = clip.ShapesDataset(4, rim=False)[0][0]
    b = clip.to_pixel_values([clip.render(clip.ShapesDataset(4).scene(0)[0], 48, rim=False)])[0]
    assert torch.equal(a, b) and not torch.equal(a, clip.ShapesDataset(4)[0][0])


def test_held_out_pairs_never_appear_in_training_scenes():
    train = clip.ShapesDataset(400, "train", hard_negatives=True)
    held = clip.ShapesDataset(100, "heldout")
    assert not any((s.colour, s.kind) in clip.HELDOUT for i in range(400) for s in train.scene(i)[0].shapes)
    assert all(any((s.colour, s.kind) in clip.HELDOUT for s in held.scene(i)[0].shapes) for i in range(100))
    single = clip.ShapesDataset(50, "heldout", max_shapes=1)      # what the zero-shot evaluation uses
    assert all((single.scene(i)[0].shapes[0].colour, single.scene(i)[0].shapes[0].kind) in clip.HELDOUT for i in range(50))
    # every held-out colour and kind is seen in training with other partners
    seen = {(s.colour, s.kind) for i in range(400) for s in train.scene(i)[0].shapes}
    assert {c for c, _ in clip.HELDOUT} <= {c for c, _ in seen} and {k for _, k in clip.HELDOUT} <= {k for _, k in seen}


def test_questions_are_answered_by_the_scene():
    a = clip.Shape("circle", "red", "large", 0.2, 0.2)
    b = clip.Shape("square", "green", "small", 0.8, 0.2)
    qa = dict(clip.questions(clip.Scene((a, b))))
    assert qa["how many shapes are there?"] == "two"
    assert qa["what colour is the circle?"] == "red" and qa["what shape is the green object?"] == "square"
    assert qa["where is the red circle relative to the green square?"] == "left"
    assert qa["is there a red circle?"] == "yes"


def test_tokenizer_round_trip_and_too_long_text():
    tok = clip.ShapesTokenizer(context_length=8)
    ids, mask = tok.encode(["a red circle"])
    assert tok.decode(ids[0]) == "a red circle" and mask.sum() == 5
    assert ids[0, 4] == tok.eos_token_id == tok.vocab_size - 1
    with pytest.raises(ValueError, match="context length 8"):
        tok.encode(["a large red circle to the left of a small blue square"])


# ---------------------------------------------------------------------------------------------
# Training: the loss falls; two processes equal one with the global batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_short_training_lowers_the_loss_below_chance_and_resumes(tmp_path):
    cfg = clip.TrainConfig.tiny()
    model, losses = clip.train(cfg, clip.CLIPConfig.tiny(), tmp_path, progress=False)
    # log B is what features that carry no information score; the tiny model must get well below it
    assert losses[-1][1] < math.log(cfg.batch_size) - 0.4 < losses[0][1]
    # a run is resumed on the images it was trained on: with or without rims, as it started
    with pytest.raises(ValueError, match="with rims"):
        clip.train(clip.TrainConfig.tiny(steps=160, rim=False), clip.CLIPConfig.tiny(), tmp_path, resume=True,
                   progress=False)
    # --resume continues where it stopped: 10 more steps from the saved state, the log kept
    more, losses2 = clip.train(clip.TrainConfig.tiny(steps=160), clip.CLIPConfig.tiny(), tmp_path, resume=True,
                               progress=False)
    assert losses2[:len(losses)] == losses and losses2[-1][0] == 160


def train_fixed(rank, world, steps=3):
    cfg = clip.TrainConfig.tiny(steps=steps, batch_size=8, n_train=32, log_every=1, save_every=1000)
    model, losses = clip.train(cfg, clip.CLIPConfig.tiny(), f"/tmp/clip_ddp_unused_{rank}_{world}", progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def ddp_worker(rank, world, tmp):
    state, losses = train_fixed(rank, world)
    torch.save({"state": state, "losses": losses}, f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path):
    assert run_gloo_workers(ddp_worker, 2, tmp_path) == [0, 0]
    single, single_losses = train_fixed(0, 1)
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)   # tensors and floats: no pickle
        assert [l for _, l in ddp["losses"]] == pytest.approx([l for _, l in single_losses], abs=1e-5)
        for name, value in single.items():
            # q.(k + b) = q.k + q.b adds the same number to every key of a query's row, and softmax ignores
            # it: the key bias has zero gradient, and what it holds is rounding noise that Adam scales up
            # to steps of up to lr. It never changes an output, so it is left out of the comparison.
            if not name.endswith("k_proj.bias"):
                assert torch.allclose(ddp["state"][name], value, atol=1e-5), (rank, name)


# ---------------------------------------------------------------------------------------------
# Bad input and the command line
# ---------------------------------------------------------------------------------------------

def test_wrong_images_and_text_are_refused_clearly():
    model = clip.CLIP(clip.CLIPConfig.tiny())
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\).*got \(2, 3, 20, 20\)"):
        model.encode_image(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        model.encode_image(torch.randn(2, 1, 32, 32))
    too_long = torch.full((1, model.cfg.context_length + 1), 3)
    with pytest.raises(ValueError, match="longer than the context length"):
        model.encode_text(too_long)
    no_eos = torch.tensor([[clip.ShapesTokenizer.sot_token_id, 5, 6]])
    with pytest.raises(ValueError, match="no end-of-text token"):
        model.encode_text(no_eos)
    eos, V = clip.ShapesTokenizer.eos_token_id, model.cfg.vocab_size
    with pytest.raises(ValueError, match=rf"must lie in \[0, {V}\); got \[3, {V}\]"):
        model.encode_text(torch.tensor([[3, V, eos]]))


def test_the_forward_pass_reads_no_tensor_values():
    """No GPU -> CPU sync per call: on the meta device tensors have shapes but no values, so any bool(),
    int() or .item() inside encode_image, encode_text or forward would raise here. The value checks run
    only where ids come in on the CPU (the test above)."""
    model = clip.CLIP(clip.CLIPConfig.tiny()).to("meta")
    T = model.cfg.context_length
    pixels = torch.empty(3, 3, 32, 32, device="meta")
    ids = torch.empty(40, T, dtype=torch.long, device="meta")           # long enough to be bucketed on a CPU
    mask = torch.empty(40, T, dtype=torch.long, device="meta")
    per_image, per_text = model(pixels, ids, mask)
    assert per_image.shape == (3, 40) and per_text.shape == (40, 3)


def test_folders_that_are_not_clip_checkpoints(tmp_path, hf_dir):
    with pytest.raises(clip.CheckpointError, match="not a folder"):
        clip.CLIP.from_pretrained(tmp_path / "nope")
    with pytest.raises(clip.CheckpointError, match="no config.json"):
        clip.CLIP.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(clip.CheckpointError, match="not a CLIPModel"):
        clip.CLIP.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(clip.CheckpointError, match="no model.safetensors"):
        clip.CLIP.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(clip.CheckpointError, match="not a readable safetensors"):
        clip.CLIP.from_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(hf_dir / "model.safetensors")
    tensors.pop("visual_projection.weight")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(clip.CheckpointError, match=r"does not match the CLIP it is loaded into: "
                                                   r"missing \['visual_projection.weight'\], unexpected \['extra.weight'\]"):
        clip.CLIP.from_pretrained(tmp_path)


def write_char_tokenizer(folder):
    """A CLIP BPE tokenizer with no merges (one token per character), built offline."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def test_command_line_zero_shot_on_an_image_file(tmp_path, capsys):
    from PIL import Image
    from transformers import CLIPModel
    torch.manual_seed(0)
    n = write_char_tokenizer(tmp_path)
    CLIPModel(hf_config(eos_token_id=n - 1, vocab_size=n, max_position_embeddings=40)).save_pretrained(tmp_path)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "x.png")
    clip.main(["--model", str(tmp_path), "--image", str(tmp_path / "x.png"), "--labels", "cat,dog,car", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[-1] for line in lines) == ["car", "cat", "dog"]
    assert sum(float(line.split()[0].rstrip("%")) for line in lines) == pytest.approx(100, abs=0.05)
    for argv, message in ((["--labels", ","], "at least one label"), (["--labels", "a"], None)):
        args = ["--model", str(tmp_path), "--image", str(tmp_path / "x.png"), *argv]
        if message:
            with pytest.raises(SystemExit) as e:
                clip.main(args)
            assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(SystemExit):
        clip.main(["--model", str(tmp_path), "--image", str(tmp_path / "x.png"), "--labels", "a,b"])
    assert "no tokenizer files" in capsys.readouterr().err


def test_demo_runs(capsys, tmp_path):
    clip.main(["--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "uninformative features (all equal)  2.079" in out and "tiny CLIP" in out


# ---------------------------------------------------------------------------------------------
# Checkpoints survive a crash at any moment, and bad files are named in their errors
# ---------------------------------------------------------------------------------------------

def tiny_run(folder, resume=False, **overrides):
    cfg = clip.TrainConfig.tiny(**{"steps": 6, "batch_size": 8, "n_train": 32, "log_every": 1, "save_every": 3,
                                   **overrides})
    return clip.train(cfg, clip.CLIPConfig.tiny(), folder, resume=resume, progress=False)


@pytest.mark.slow
def test_a_crash_at_every_write_boundary_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    reference, reference_losses = tiny_run(tmp_path / "reference")
    boundaries = []
    monkeypatch.setattr(clip, "CHECKPOINT_HOOK", crash_after(0, boundaries))
    tiny_run(tmp_path / "count")
    # each of the two saves: config.json, model.safetensors, trainer.safetensors, trainer.json, then `latest`
    assert [p.name for p in boundaries] == ["config.json", "model.safetensors", "trainer.safetensors",
                                            "trainer.json", "latest"] * 2
    for n in range(1, len(boundaries) + 1):
        run = tmp_path / f"crash{n}"
        monkeypatch.setattr(clip, "CHECKPOINT_HOOK", crash_after(n, []))
        with pytest.raises(Crash):
            tiny_run(run)
        monkeypatch.setattr(clip, "CHECKPOINT_HOOK", None)
        # what `latest` names is complete; a crash before the first switch leaves nothing to resume
        resumable = clip.latest_checkpoint(run) is not None
        assert resumable == (n >= 5)
        model, losses = tiny_run(run, resume=resumable)
        assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000006"]        # the crash's debris is gone
        assert losses == reference_losses
        for name, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), (n, name)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def nan_from_step_5(image_features, text_features, logit_scale):
        calls.append(1)
        loss = clip.symmetric_cross_entropy(logit_scale * F.normalize(image_features, dim=-1)
                                            @ F.normalize(text_features, dim=-1).t())
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(clip, "clip_loss", nan_from_step_5)
    with pytest.raises(clip.NonFiniteLossError, match="at step 5.*step-000003"):
        tiny_run(tmp_path)
    assert clip.latest_checkpoint(tmp_path).name == "step-000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003"]
    clip.CLIP.from_pretrained(tmp_path)                              # finite weights: loads


def random_bytes_after_the_header(path):
    """Keep a safetensors header (8-byte length + JSON) and fill every tensor with random bytes."""
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    path.write_bytes(raw[:start] + np.random.default_rng(0).bytes(len(raw) - start))


def test_corrupt_and_non_finite_files_are_named_in_their_errors(tmp_path):
    clip.CLIP(clip.CLIPConfig.tiny()).save_pretrained(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_bytes()
    random_bytes_after_the_header(weights)                           # a valid header, random tensor bytes
    with pytest.raises(clip.CheckpointError, match=r"model\.safetensors holds non-finite values"):
        clip.CLIP.from_pretrained(tmp_path)
    weights.write_bytes(good_weights[:len(good_weights) // 2])      # truncated
    with pytest.raises(clip.CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        clip.CLIP.from_pretrained(tmp_path)
    weights.write_bytes(good_weights)
    config.write_bytes(b"\xff\xfe" + good_config)                  # not UTF-8
    with pytest.raises(clip.CheckpointError, match=r"config\.json is not UTF-8"):
        clip.CLIP.from_pretrained(tmp_path)
    config.write_bytes(good_config[:20])                             # truncated JSON
    with pytest.raises(clip.CheckpointError, match=r"config\.json is not valid JSON"):
        clip.CLIP.from_pretrained(tmp_path)


def test_resume_refuses_mixed_steps_other_configs_and_broken_pointers(tmp_path):
    tiny_run(tmp_path, steps=3)
    step = tmp_path / "step-000003"
    with pytest.raises(clip.CheckpointError, match=r"another configuration; differing fields: lr: checkpoint 0\.003, "
                                                   r"now 0\.001; seed: checkpoint 0, now 1"):
        tiny_run(tmp_path, resume=True, lr=1e-3, seed=1)
    with pytest.raises(clip.CheckpointError, match=r"model text_width: checkpoint 48, now 64"):
        clip.train(clip.TrainConfig.tiny(steps=6, batch_size=8, n_train=32, log_every=1, save_every=3),
                   clip.CLIPConfig.tiny(text_width=64), tmp_path, resume=True, progress=False)
    # a trainer state from another step, as a crash between two unguarded saves would have left
    trainer_json = json.loads((step / "trainer.json").read_text())
    (step / "trainer.json").write_text(json.dumps({**trainer_json, "step": 6}))
    with pytest.raises(clip.CheckpointError, match="mixes parts of different steps"):
        tiny_run(tmp_path, resume=True)
    (step / "trainer.json").write_text("{\"step\": 3, ")
    with pytest.raises(clip.CheckpointError, match=r"trainer\.json is not valid JSON"):
        tiny_run(tmp_path, resume=True)
    (tmp_path / "latest").write_text("step-000099\n")
    with pytest.raises(clip.CheckpointError, match="should name a step-<k> checkpoint folder"):
        tiny_run(tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to continue from"):
        tiny_run(tmp_path / "empty", resume=True)


def test_load_or_train_only_trusts_a_finished_run_of_the_default_config(tmp_path):
    tiny_run(tmp_path / "tiny", steps=3)
    with pytest.raises(clip.CheckpointError, match=r"not a checkpoint of `python clip\.py --train`.*batch_size"):
        clip.load_or_train(tmp_path / "tiny")
    clip.CLIP(clip.CLIPConfig.tiny()).save_pretrained(tmp_path / "loose")     # weights, but no training run
    with pytest.raises(clip.CheckpointError, match="no latest checkpoint pointer"):
        clip.load_or_train(tmp_path / "loose")


def test_pick_device_refuses_cuda_that_is_not_there():
    assert clip.pick_device("cpu") == "cpu"
    assert clip.pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device cuda:99 was asked for"):
        clip.pick_device("cuda:99")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        clip.pick_device("gpu")


# ---------------------------------------------------------------------------------------------
# One notation: type hints on every public function and method
# ---------------------------------------------------------------------------------------------

def unannotated(module, exempt=()):
    """Public functions and methods defined in `module` with a parameter (self, cls, *args and **kwargs
    aside) or a return value (__init__ aside) that has no type hint."""
    missing = []

    def check(name, fn):
        fn = inspect.unwrap(fn)
        if name in exempt or fn.__code__.co_filename != module.__file__:    # dataclass-made, or imported
            return
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if (any(p.annotation is p.empty for p in params)
                or (sig.return_annotation is sig.empty and not name.endswith("__init__"))):
            missing.append(name)
        else:
            typing.get_type_hints(fn)                                       # every hint names something real

    private = lambda name: name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    for name, obj in vars(module).items():
        if private(name):
            continue
        if inspect.isfunction(obj):
            check(name, obj)
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in vars(obj).items():
                member = getattr(member, "__func__", getattr(member, "fget", member))   # class/static, property
                if not private(attr) and inspect.isfunction(member):
                    check(f"{name}.{attr}", member)
    return missing


def test_every_public_function_has_type_hints():
    assert unannotated(clip) == []

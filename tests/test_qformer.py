"""Specification of qformer.py: the BLIP-2 Q-Former, its three masks, losses and checkpoints.

Oracles: hand-drawn masks and hand-computed losses; transformers' Blip2ForImageTextRetrieval on a
small random checkpoint saved in its real on-disk format; invariants (what a token may not see cannot
change it; a joint ITC pass equals the two uni-modal passes; a negative is never the positive; two gloo
processes with half the batch each take one process's step).
"""
import json

import pytest
import torch

import qformer
from conftest import run_gloo_workers
from crash_hook import Crash, crash_after
from qformer import QFormer, QFormerConfig, build_attention_mask


# tiny tensors: one torch thread (tests/conftest.py says why) (4000 hard-negative draws: 0.1 s vs 8 s)
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# The three masks, position by position
# ------------------------------------------------------------------------------------------------

# Q = 2 queries, T = 3 text tokens, the last one padding (columns: q1 q2 t1 t2 t3-pad)
HAND_DRAWN = {
    "itc": [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0]],
    "itm": [[1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0]],
    "itg": [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0]],
}


@pytest.mark.parametrize("kind", ["itc", "itm", "itg"])
def test_mask_matches_the_drawing(kind):
    mask = build_attention_mask(kind, 2, torch.tensor([[1, 1, 0]]))
    assert mask.dtype == torch.bool and mask.shape == (1, 5, 5)
    assert mask[0].int().tolist() == HAND_DRAWN[kind]


def visible(kind, i, j, Q, real):
    """The paper's rule for one (row i, column j), written independently of build_attention_mask."""
    if j >= Q and not real[j - Q]:
        return False                          # padding is seen by nobody
    i_query, j_query = i < Q, j < Q
    if kind == "itm":
        return True                           # bidirectional
    if kind == "itc":
        return i_query == j_query             # uni-modal: each modality sees only itself
    if i_query:
        return j_query                        # ITG: queries see queries, never the text
    return j_query or j <= i                  # ITG: text sees all queries and text up to itself


@pytest.mark.parametrize("kind", ["itc", "itm", "itg"])
def test_mask_every_position_follows_the_rule(kind):
    Q = 3
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    mask = build_attention_mask(kind, Q, text_mask)
    for b, real in enumerate(text_mask.tolist()):
        for i in range(Q + 5):
            for j in range(Q + 5):
                assert bool(mask[b, i, j]) == visible(kind, i, j, Q, real), (kind, b, i, j)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return QFormer(QFormerConfig.tiny(**overrides)).eval()


def tiny_inputs(config, B=3, T=6, N=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, config.encoder_hidden_size, generator=g)
    ids = torch.randint(4, config.vocab_size, (B, T), generator=g)
    ids[:, 0] = config.cls_token_id
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    ids[mask == 0] = config.pad_token_id
    return image, ids, mask


@torch.no_grad()
def test_masks_decide_what_changes_what():
    """Change the last real word of caption 0: under ITC and ITG the queries cannot notice; under
    ITM they do. Under ITG, earlier text cannot notice either; change the image and the ITC text
    cannot notice, the ITG text can (through the queries)."""
    model = tiny_model()
    image, ids, mask = tiny_inputs(model.config)
    Q, t = model.config.num_query_tokens, 4
    other = ids.clone()
    other[0, t] = 4 if ids[0, t] != 4 else 5
    image2 = image + torch.randn_like(image)
    run = lambda kind, im=image, x=ids: model(im, x, mask, mask_kind=kind)
    for kind in ("itc", "itg"):
        assert torch.equal(run(kind)[:, :Q], run(kind, x=other)[:, :Q]), kind
    assert not torch.allclose(run("itm")[0, :Q], run("itm", x=other)[0, :Q])
    assert torch.allclose(run("itg")[:, Q:Q + t], run("itg", x=other)[:, Q:Q + t], atol=1e-6)
    assert not torch.allclose(run("itg")[0, Q + t], run("itg", x=other)[0, Q + t])
    assert torch.allclose(run("itc")[:, Q:], run("itc", im=image2)[:, Q:], atol=1e-6)
    assert not torch.allclose(run("itg")[:, Q:], run("itg", im=image2)[:, Q:])


@torch.no_grad()
def test_joint_itc_pass_equals_the_two_unimodal_passes():
    model = tiny_model()
    image, ids, mask = tiny_inputs(model.config)
    Q = model.config.num_query_tokens
    joint = model(image, ids, mask, mask_kind="itc")
    assert torch.allclose(joint[:, :Q], model(image), atol=1e-5)
    assert torch.allclose(joint[:, Q:][mask.bool()], model(input_ids=ids, attention_mask=mask)[mask.bool()], atol=1e-5)


def test_cross_attention_every_freq_layers_and_separate_ffns():
    model = QFormer(QFormerConfig.tiny(num_hidden_layers=5, cross_attention_freq=2))
    has_cross = [layer.crossattention is not None for layer in model.qformer.encoder.layer]
    assert has_cross == [True, False, True, False, True]
    layer = model.qformer.encoder.layer[0]
    assert layer.intermediate.dense.weight is not layer.intermediate_query.dense.weight
    assert layer.crossattention.attention.key.in_features == model.config.encoder_hidden_size


class TableBias(torch.nn.Module):
    """A fixed logit table in the place of a learned prior (vlm_train.LocalPrior, SelfPrior)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self) -> torch.Tensor:
        return self.table


def test_a_cross_attention_bias_is_added_to_every_cross_attentions_logits():
    torch.manual_seed(0)
    model = QFormer(QFormerConfig.tiny(num_hidden_layers=3, cross_attention_freq=1)).eval()
    Q, N = model.config.num_query_tokens, 5
    image = torch.randn(2, N, model.config.encoder_hidden_size)
    plain = model(image)

    model.cross_attention_bias = TableBias(torch.zeros(Q, N))
    assert torch.equal(model(image), plain)                           # a zero bias: BLIP-2's Q-Former
    # -inf on every key but the first: each query reads image token 0 alone, in every cross-attention
    model.cross_attention_bias = TableBias(torch.full((Q, N), float("-inf")).index_fill(1, torch.tensor([0]), 0.0))
    other = torch.cat([image[:, :1], torch.randn(2, N - 1, image.shape[-1])], dim=1)
    assert torch.allclose(model(image), model(other), atol=1e-6) and not torch.allclose(model(image), plain)
    model.cross_attention_bias = None
    assert not torch.allclose(model(image), model(other), atol=1e-3)


def test_a_query_attention_bias_is_added_to_the_queries_logits_among_themselves():
    """Zeros: BLIP-2's Q-Former in every pass (queries alone, queries + text under ITM's and ITG's masks).
    -inf off the diagonal: each query attends to itself alone among the queries, so changing query j's
    learned token leaves every other query's output alone; the text still attends to every query."""
    torch.manual_seed(0)
    model = QFormer(QFormerConfig.tiny(num_hidden_layers=3, cross_attention_freq=1)).eval()
    Q = model.config.num_query_tokens
    image = torch.randn(2, 5, model.config.encoder_hidden_size)
    ids = torch.randint(4, model.config.vocab_size, (2, 6))
    passes = [dict(), dict(input_ids=ids, mask_kind="itm"), dict(input_ids=ids, mask_kind="itg")]
    plain = [model(image, **kw) for kw in passes]

    model.query_attention_bias = TableBias(torch.zeros(Q, Q))
    assert all(torch.allclose(model(image, **kw), p, atol=1e-6) for kw, p in zip(passes, plain))
    model.query_attention_bias = TableBias(torch.full((Q, Q), float("-inf")).fill_diagonal_(0.0))
    before, before_itm = model(image), model(image, input_ids=ids, mask_kind="itm")
    with torch.no_grad():
        model.query_tokens[:, 1] += torch.randn(model.config.hidden_size)        # (LayerNorm: not a constant)
    after = model(image)
    assert torch.allclose(before[:, [0, *range(2, Q)]], after[:, [0, *range(2, Q)]], atol=1e-6)
    assert not torch.allclose(before[:, 1], after[:, 1], atol=1e-3)
    after_itm = model(image, input_ids=ids, mask_kind="itm")                     # (B, Q+T, D)
    assert not torch.allclose(before_itm[:, Q:], after_itm[:, Q:], atol=1e-3)    # the text reads query 1
    model.query_attention_bias = None
    assert not torch.allclose(model(image)[:, 0], before[:, 0], atol=1e-3)       # plain: the queries mix


# ------------------------------------------------------------------------------------------------
# Losses and hard negatives, hand-computed
# ------------------------------------------------------------------------------------------------

def test_itc_similarity_is_the_max_over_queries():
    image_feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],      # image 0: two queries
                                [[0.6, 0.8], [0.8, -0.6]]])     # image 1
    text_feats = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # image 0: text 0 -> max(1, 0) = 1; text 1 -> max(0, -1) = 0
    # image 1: text 0 -> max(0.6, 0.8) = 0.8; text 1 -> max(-0.8, 0.6) = 0.6
    expected = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    assert torch.allclose(qformer.itc_similarity(image_feats, text_feats), expected)


def test_itc_loss_by_hand():
    sim, temp = torch.tensor([[0.5, 0.1], [0.2, 0.3]]), 0.5
    # rows: -log softmax([1.0, 0.2])[0], -log softmax([0.4, 0.6])[1]; columns: [1.0, 0.4], [0.2, 0.6]
    lse = lambda a, b: torch.logsumexp(torch.tensor([a, b]), 0)
    rows = ((lse(1.0, 0.2) - 1.0) + (lse(0.4, 0.6) - 0.6)) / 2
    cols = ((lse(1.0, 0.4) - 1.0) + (lse(0.2, 0.6) - 0.6)) / 2
    assert torch.allclose(qformer.itc_loss(sim, temp), (rows + cols) / 2)


def test_temp_is_tau_itself_clips_t_is_its_log_inverse_and_training_clamps_it_as_lavis():
    import clip
    model = QFormer(QFormerConfig.tiny())
    assert abs(model.temp.item() - 0.07) < 1e-7                   # tau itself; clip.py starts t = ln(1/0.07)
    s = torch.randn(6, 6)
    t = torch.log(1 / model.temp.detach())                        # clip.py's parameter for the same tau
    assert torch.allclose(qformer.itc_loss(s, model.temp.detach()), clip.symmetric_cross_entropy(t.exp() * s))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)       # no update: only the clamp acts
    batch = qformer.toy_data(model.config, 4, torch.Generator().manual_seed(0))
    for start, clamped in ((5.0, 0.5), (1e-6, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            model.temp.fill_(start)
        qformer.train_step(model, optimizer, batch, lr=0.0)
        assert abs(model.temp.item() - clamped) < 1e-7           # tau in [0.001, 0.5]: logits <= 1000 x cosine


def test_itg_loss_predicts_the_next_token_and_skips_padding():
    V = 5
    logits = torch.randn(2, 4, V)
    ids = torch.tensor([[3, 1, 2, 4], [3, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logp = logits.log_softmax(-1)
    # targets: row 0 predicts 1, 2, 4 at positions 0, 1, 2; row 1 predicts only 2 at position 0
    expected = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 2, 4] + logp[1, 0, 2]) / 4
    assert torch.allclose(qformer.itg_loss(logits, ids, mask), expected)


def test_hard_negatives_never_pick_the_positive():
    B = 6
    sim = torch.eye(B) * 10 + 0.01 * torch.randn(B, B)     # the positive is by far the most similar
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert not (qformer.sample_hard_negatives(sim, 0.07, generator=g) == torch.arange(B)).any()
    forbidden = torch.zeros(B, B, dtype=torch.bool)
    forbidden[0, 1] = forbidden[1, 0] = True                 # 0 and 1 share a caption
    for _ in range(200):
        pick = qformer.sample_hard_negatives(sim, 0.07, forbidden, generator=g)
        assert not (pick == torch.arange(B)).any() and pick[0] != 1 and pick[1] != 0


def test_hard_negatives_follow_the_softmax_of_similarity():
    sim = torch.tensor([[0.9, 0.5, 0.3, 0.1]] * 4)
    temp, draws = 0.2, 4000
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([qformer.sample_hard_negatives(sim, temp, generator=g) for _ in range(draws)])  # (draws, 4)
    for row in range(4):
        others = [j for j in range(4) if j != row]
        p = torch.softmax(sim[row, others] / temp, 0)            # the positive (column row) is left out
        freq = torch.bincount(picks[:, row], minlength=4).float() / draws
        assert freq[row] == 0
        assert torch.all((freq[others] - p).abs() < 5 * (p * (1 - p) / draws).sqrt())   # 5 binomial sigmas


def test_hard_negatives_fall_back_when_every_caption_is_the_same():
    pick = qformer.sample_hard_negatives(torch.zeros(3, 3), 0.07, torch.ones(3, 3, dtype=torch.bool))
    assert not (pick == torch.arange(3)).any()
    with pytest.raises(ValueError, match="at least 2"):
        qformer.sample_hard_negatives(torch.zeros(1, 1), 0.07)


def test_rerank_scores_only_the_top_k_and_recall_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.6]])
    logp = torch.tensor([[-2.0, -0.5, 0.0], [-0.1, -3.0, -0.2]])     # ITM log p(match) per pair
    scores = qformer.rerank_top_k(sim, 2, lambda r, c: logp[r, c], temp=0.5)
    inf = float("-inf")
    # row 0: top 2 by ITC are columns 0, 1: -2 + 1.8 = -0.2, -0.5 + 1.6 = 1.1 (re-ranked: 1 beats 0)
    # row 1: columns 1, 2: -3 + 1.4 = -1.6, -0.2 + 1.2 = 1.0; column 0 is outside the top 2
    assert torch.allclose(scores, torch.tensor([[-0.2, 1.1, inf], [inf, -1.6, 1.0]]))
    correct = torch.tensor([[False, True, False], [True, False, False]])
    assert qformer.recall_at_k(sim, correct, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}
    assert qformer.recall_at_k(scores, correct, (1,)) == {1: 0.5}


# ------------------------------------------------------------------------------------------------
# The losses of a batch: one process as written in the paper; torchrun's ranks equal one process
# ------------------------------------------------------------------------------------------------

def losses_by_the_paper(model, image_embeds, ids, mask, matches, generator):
    """QFormer.losses on one process, written out from the pure functions: the three losses on all B pairs."""
    c, Q, B = model.config, model.config.num_query_tokens, ids.shape[0]
    h = model(image_embeds, ids, mask, mask_kind="itc")
    image_feats = torch.nn.functional.normalize(model.vision_projection(h[:, :Q]), dim=-1)
    text_feats = torch.nn.functional.normalize(model.text_projection(h[:, Q]), dim=-1)
    similarity = qformer.itc_similarity(image_feats, text_feats)
    itc = qformer.itc_loss(similarity, model.temp, c.label_smoothing)
    matches = (ids[:, None] == ids[None]).all(-1) if matches is None else matches
    hard_text = qformer.sample_hard_negatives(similarity, model.temp, matches, generator)
    hard_image = qformer.sample_hard_negatives(similarity.t(), model.temp, matches.t(), generator)
    logits = model.itm_logits(torch.cat([image_embeds, image_embeds, image_embeds[hard_image]]),
                              torch.cat([ids, ids[hard_text], ids]), torch.cat([mask, mask[hard_text], mask]))
    itm = qformer.itm_loss(logits, torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = c.dec_token_id
    itg = qformer.itg_loss(model.itg_logits(image_embeds, decoder_ids, mask), decoder_ids, mask, c.label_smoothing)
    return {"itc": itc, "itm": itm, "itg": itg}


def ranks_model():
    # tau = 0.5 (LAVIS's upper clamp) spreads the hard-negative draws over the batch: a caption equal to the
    # positive would be drawn often if `matches` were ignored
    return tiny_model(seed=3, label_smoothing=0.1, temp_init=0.5)


def global_batch(config):
    """8 pairs, 4 per rank of 2, of five captions A..E: [A B C A | B C D E]. A, B and C come twice (B and C on
    both ranks, padded to different lengths there), so `matches` decides many draws. Rank 0's captions are at
    most 5 tokens long, rank 1's 7."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 4, 7, 6])                                   # of A..E
    captions = torch.randint(4, config.vocab_size, (5, 7), generator=g)
    captions[:, 0] = config.cls_token_id
    captions *= torch.arange(7) < lengths[:, None]                          # right padding
    which = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])
    ids = captions[which]
    return torch.randn(8, 6, config.encoder_hidden_size, generator=g), ids, (ids != config.pad_token_id).long()


def also_forbidden(ids):
    """An explicit global `matches`: equal captions, and every pair (i, j) with i + j a multiple of 3 as if
    they matched too (a third of the batch: ignoring them would change many draws)."""
    i = torch.arange(len(ids))
    return qformer.same_caption(ids) | ((i[:, None] + i[None]) % 3 == 0)


def losses_and_gradients(model, feats, ids, mask, matches):
    """Two calls of `losses` (default matches and torch's global RNG; the given matches and a generator),
    backward of their sum. Returns the losses, the ITM batches of the two calls and the RNG states after."""
    itm_batches, itm_logits = [], model.itm_logits

    def recorded(images, texts, masks):                                      # the ITM pairs, negatives included
        itm_batches.append((images, texts, masks))
        return itm_logits(images, texts, masks)

    model.itm_logits = recorded
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(9)
    first = model.losses(feats, ids, mask)
    second = model.losses(feats, ids, mask, matches, generator)
    sum(first.values()).backward()
    sum(second.values()).backward()
    losses = torch.stack([torch.stack(list(x.values())) for x in (first, second)]).detach()   # (2, 3)
    return losses, itm_batches, (torch.get_rng_state(), generator.get_state())


def test_one_process_losses_are_the_papers_bit_for_bit():
    feats, ids, mask = global_batch(QFormerConfig.tiny())
    models = [ranks_model(), ranks_model()]
    for matches, seed in ((None, None), (also_forbidden(ids), 4)):
        values, states = [], []
        for model, compute in zip(models, (QFormer.losses, losses_by_the_paper)):
            torch.manual_seed(11)
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            losses = compute(model, feats, ids, mask, matches, generator)
            sum(losses.values()).backward()
            values.append(losses)
            states.append(torch.get_rng_state() if generator is None else generator.get_state())
        assert all(torch.equal(values[0][k], values[1][k]) for k in ("itc", "itm", "itg"))
        assert torch.equal(states[0], states[1])                             # the same draws consumed
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_itc_of_each_ranks_rows_averages_to_the_whole_batchs():
    similarity, temp, B = torch.randn(6, 6), 0.1, 6
    whole = qformer.itc_loss(similarity, temp, 0.1)
    rows = torch.arange(B)
    assert torch.allclose(qformer.itc_loss_of_rows(similarity, similarity.t(), rows, temp, 0.1), whole)
    # 3 ranks of 2 pairs: rank r's images against all captions, its captions against all images
    parts = [qformer.itc_loss_of_rows(similarity[r], similarity.t()[r], r, temp, 0.1) for r in rows.view(3, 2)]
    assert torch.allclose(torch.stack(parts).mean(), whole)


def ddp_worker(rank, world, tmp):
    """One rank of 2: its half of the global batch, cut to its own longest caption; the gradients averaged
    over ranks as DDP averages them; then the two mistakes that must be refused on every rank."""
    import torch.distributed as dist
    model = ranks_model()
    feats, ids, mask = global_batch(model.config)
    b = len(ids) // world
    mine = slice(rank * b, (rank + 1) * b)
    T = int(mask[mine].sum(1).max())
    losses, itm_batches, rng = losses_and_gradients(model, feats[mine], ids[mine, :T], mask[mine, :T],
                                                     also_forbidden(ids))
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world                                     # DDP's mean
    errors = []
    for rows, matches in ((b - rank, None), (b, qformer.same_caption(ids[mine]))):   # unequal b; a local matches
        try:
            model.losses(feats[:rows], ids[:rows], mask[:rows], matches)
        except ValueError as e:
            errors.append(str(e))
    torch.save({"losses": losses, "grads": grads, "itm": itm_batches, "rng": rng, "errors": errors},
               f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_losses_gradients_and_negatives(tmp_path):
    assert run_gloo_workers(ddp_worker, 2, tmp_path) == [0, 0]
    model = ranks_model()
    feats, ids, mask = global_batch(model.config)
    one_losses, one_itm, one_rng = losses_and_gradients(model, feats, ids, mask, also_forbidden(ids))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the mean over ranks of each loss is one process's loss on the whole batch
    assert torch.allclose((ranks[0]["losses"] + ranks[1]["losses"]) / 2, one_losses, atol=1e-5)
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in ranks[0]["grads"]), name
        if p.grad is not None:
            assert torch.allclose(ranks[0]["grads"][name], p.grad, atol=1e-5), name
    # rank r's ITM pairs (matched, image + hard caption, hard image + caption) are one process's rows r b .. r b + b - 1
    # of each third, captions padded to the longest rank's length: the same negatives were drawn
    G, b = len(ids), len(ids) // 2
    for r, rank in enumerate(ranks):
        assert rank["rng"][0].equal(one_rng[0]) and rank["rng"][1].equal(one_rng[1])   # RNGs used alike
        for call in range(2):
            for mine, one in zip(rank["itm"][call], one_itm[call]):
                expected = torch.cat([one[k * G + r * b:k * G + (r + 1) * b] for k in range(3)])
                assert torch.equal(mine.detach(), expected.detach()), (r, call)
        assert "same number of pairs" in rank["errors"][0] and "(8, 8)" in rank["errors"][1]
        # no negative is a match of the global batch: matches[i, j], caption j describes image i
        for call, matches in enumerate((qformer.same_caption(ids), also_forbidden(ids))):
            images, texts, _ = rank["itm"][call]
            for i in range(r * b, (r + 1) * b):
                k = i - r * b
                captions = [j for j in range(G) if torch.equal(ids[j], texts[b + k])]          # equal captions
                image = [j for j in range(G) if torch.equal(feats[j], images[2 * b + k])]
                assert not matches[i, captions].any() and not matches[image, i].any(), (r, call, i)


# ------------------------------------------------------------------------------------------------
# Parity with transformers' Blip2ForImageTextRetrieval
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        qformer_config=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
                            vocab_size=60, max_position_embeddings=12, use_qformer_text_input=True),
        num_query_tokens=5, image_text_hidden_size=24)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():   # transformers starts queries at 0 and LayerNorms at identity: shake everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(path)
    return path, model


@torch.no_grad()
def test_parity_with_transformers_itc_and_itm_on_padded_text(blip2_dir):
    path, reference = blip2_dir
    ours = QFormer.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(4, 3, 16, 16, generator=g)
    ids = torch.randint(3, 60, (4, 9), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:], mask[2, 3:] = 0, 0
    ids[mask == 0] = 0
    # both start from the same image features: the reference model's own vision tower
    image_embeds = reference.vision_model(pixel_values=pixel_values).last_hidden_state
    ref_itc = reference(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits_per_image
    ref_itm = reference(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                        use_image_text_matching_head=True).logits_per_image
    itc, itm = ours.itc_logits(image_embeds, ids, mask), ours.itm_logits(image_embeds, ids, mask)
    assert itc.shape == (4, 4) and itm.shape == (4, 2)
    assert (itc - ref_itc).abs().max() < 1e-4
    assert (itm - ref_itm).abs().max() < 1e-4
    # a different number of images and texts: (n_images, n_texts)
    assert torch.allclose(ours.itc_logits(image_embeds[:2], ids, mask), ref_itc[:2], atol=1e-4)


def test_from_pretrained_keeps_what_transformers_lacks_fresh(blip2_dir):
    path, reference = blip2_dir
    ours = QFormer.from_pretrained(path, lm_hidden_size=20)
    assert torch.equal(ours.query_tokens, reference.query_tokens)
    assert ours.config.encoder_hidden_size == 32 and ours.config.embed_dim == 24
    assert ours.language_model_inputs(torch.randn(2, 17, 32)).shape == (2, 5, 20)


def test_own_checkpoint_round_trip(tmp_path):
    model = tiny_model(lm_hidden_size=7)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qformer"
    loaded = QFormer.from_pretrained(tmp_path).eval()
    image, ids, mask = tiny_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded.itm_logits(image, ids, mask), model.itm_logits(image, ids, mask))
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------
# Bad input gets a clear error
# ------------------------------------------------------------------------------------------------

def test_image_features_of_the_wrong_width():
    model = tiny_model()
    _, ids, mask = tiny_inputs(model.config)
    with pytest.raises(ValueError, match=r"\(B, N, 24\).*got \(3, 5, 30\)"):
        model.itm_logits(torch.randn(3, 5, 30), ids, mask)


def test_text_longer_than_the_position_table():
    model = tiny_model()
    image, _, _ = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="17 tokens.*max_position_embeddings=16"):
        model.itc_logits(image, torch.ones(3, 17, dtype=torch.long), None)


def test_left_padding_and_mismatched_batches_are_refused():
    model = tiny_model()
    image, ids, mask = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="right-padded"):
        model.itm_logits(image, ids, mask.flip(1))
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        model.itm_logits(image, ids[:2], mask[:2])


def test_checkpoint_without_qformer_weights(tmp_path, blip2_dir):
    from safetensors.torch import load_file, save_file
    path, _ = blip2_dir
    tensors = load_file(str(path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k.startswith("vision_model.")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(qformer.CheckpointError, match="holds no Q-Former weights"):
        QFormer.from_pretrained(tmp_path)
    # one layer short: the missing tensors are named
    save_file({k: v for k, v in tensors.items() if ".layer.2." not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(qformer.CheckpointError, match=r"missing: qformer\.encoder\.layer\.2\."):
        QFormer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        QFormer.from_pretrained(tmp_path / "nowhere")
    # a Blip2ForConditionalGeneration-style Q-Former: queries only, no text embeddings to load
    config = json.loads((path / "config.json").read_text())
    config["qformer_config"]["use_qformer_text_input"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(qformer.CheckpointError, match="no text weights"):
        QFormer.from_pretrained(tmp_path)


def test_main_reports_user_errors_like_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        qformer.main(["--train", "--clip-dir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "qformer.py: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Training lowers all three losses (the default demo: tiny Q-Former, toy frozen features)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_training_lowers_all_three_losses():
    result = qformer.main(["--device", "cpu"])
    first, last = result["first"], result["last"]
    assert last["itc"] < 0.5 * first["itc"]
    assert last["itg"] < 0.5 * first["itg"]
    # ITM's prior alone (1 match in 3) gives 0.636; learning must go well below it
    assert last["itm"] < 0.5 < first["itm"]
    assert result["itm_accuracy"] > 0.65


# ------------------------------------------------------------------------------------------------
# --train's checkpoints survive a crash at any moment; bad files and configs are named
# ------------------------------------------------------------------------------------------------

def toy_train_set():
    """train_shapes' input from the toy world: frozen features, ids, masks, one description per caption."""
    feats, ids, mask = qformer.toy_data(QFormerConfig.tiny(), 64, torch.Generator().manual_seed(0))
    description = torch.unique(ids, dim=0, return_inverse=True)[1]
    return {"image_embeds": feats, "input_ids": ids, "attention_mask": mask, "description": description}


def toy_run(folder, resume=False, config=None, **overrides):
    cfg = qformer.TrainConfig.tiny(**{"steps": 6, "batch_size": 8, "n_train": 64, "save_every": 3, **overrides})
    return qformer.train_shapes(cfg, config or QFormerConfig.tiny(), toy_train_set(), folder, "cpu", resume)


@pytest.mark.slow
def test_a_crash_at_every_write_boundary_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    reference, history = toy_run(tmp_path / "reference")
    boundaries = []
    monkeypatch.setattr(qformer.clip, "CHECKPOINT_HOOK", crash_after(0, boundaries))
    toy_run(tmp_path / "count")
    assert [p.name for p in boundaries] == ["config.json", "model.safetensors", "trainer.safetensors",
                                            "trainer.json", "latest"] * 2
    for n in range(1, len(boundaries) + 1):
        run = tmp_path / f"crash{n}"
        monkeypatch.setattr(qformer.clip, "CHECKPOINT_HOOK", crash_after(n, []))
        with pytest.raises(Crash):
            toy_run(run)
        monkeypatch.setattr(qformer.clip, "CHECKPOINT_HOOK", None)
        resumable = qformer.clip.latest_checkpoint(run) is not None
        assert resumable == (n >= 5)
        model, resumed = toy_run(run, resume=resumable)
        assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000006"]
        assert resumed == history[len(history) - len(resumed):]       # the same losses, step for step
        for name, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), (n, name)
        assert torch.equal(QFormer.from_pretrained(run).query_tokens, reference.query_tokens)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    losses, calls = QFormer.losses, []

    def nan_from_step_5(self, *args, **kwargs):
        calls.append(1)
        out = losses(self, *args, **kwargs)
        return {**out, "itm": out["itm"] * float("nan")} if len(calls) >= 5 else out

    monkeypatch.setattr(QFormer, "losses", nan_from_step_5)
    with pytest.raises(qformer.clip.NonFiniteLossError, match="at step 5"):
        toy_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003"]
    QFormer.from_pretrained(tmp_path)                                # the good checkpoint, finite


def test_corrupt_files_and_other_configs_are_named_in_their_errors(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_bytes()
    start = 8 + int.from_bytes(good_weights[:8], "little")           # keep the header, randomise the tensors
    weights.write_bytes(good_weights[:start] + torch.randint(0, 256, (len(good_weights) - start,),
                                                             dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(qformer.CheckpointError, match=r"model\.safetensors holds non-finite values"):
        QFormer.from_pretrained(tmp_path)
    weights.write_bytes(good_weights[:100])
    with pytest.raises(qformer.CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        QFormer.from_pretrained(tmp_path)
    weights.write_bytes(good_weights)
    config.write_bytes(good_config[:30])
    with pytest.raises(qformer.CheckpointError, match=r"config\.json is not valid JSON"):
        QFormer.from_pretrained(tmp_path)
    config.write_text(json.dumps({**json.loads(good_config), "hidden_size": 30}))
    with pytest.raises(qformer.CheckpointError, match=r"config\.json does not describe a Q-Former"):
        QFormer.from_pretrained(tmp_path)
    # --resume with another configuration: the differing fields, listed
    toy_run(tmp_path / "run", steps=3)
    with pytest.raises(qformer.CheckpointError, match=r"differing fields: batch_size: checkpoint 8, now 16; "
                                                      r"model num_query_tokens: checkpoint 4, now 2"):
        toy_run(tmp_path / "run", resume=True, config=QFormerConfig.tiny(num_query_tokens=2), batch_size=16)


def test_shared_plumbing_is_clips():
    import clip
    assert qformer.CheckpointError is clip.CheckpointError and qformer._atomic_write is clip.atomic_write
    assert qformer.get_lr is clip.lr_at
    s, temp = torch.randn(5, 5), 0.1
    assert torch.equal(qformer.itc_loss(s, temp), clip.symmetric_cross_entropy(s / temp))
    with pytest.raises(ValueError, match="cuda:99"):
        qformer.pick_device("cuda:99")


def test_a_caption_is_right_for_every_scene_it_is_true_of():
    import clip
    red_circle = clip.Shape("circle", "red", "large", 0.2, 0.5)
    blue_square = clip.Shape("square", "blue", "small", 0.8, 0.5)
    truths = qformer.true_captions(clip, clip.Scene((red_circle, blue_square)))
    for text in ("a photo of a red shape to the left of a blue shape", "a square to the right of a circle",
                 "a large red circle to the left of a small blue square", "an image of a circle to the left of a square"):
        assert qformer.caption_is_true(clip, text, truths), text
    for text in ("a red shape to the right of a blue shape", "a blue circle to the left of a red square", "a red circle"):
        assert not qformer.caption_is_true(clip, text, truths), text
    # on the data set: every caption is true of its own scene, and "same description" implies "true"
    data = clip.ShapesDataset(200, "test", seed=3)
    scenes, captions = zip(*(data.scene(i) for i in range(200)))
    true_of = torch.tensor([[qformer.caption_is_true(clip, c, qformer.true_captions(clip, s)) for c in captions]
                            for s in scenes])
    described = [clip.caption(s) for s in scenes]
    same = torch.tensor([[a == b for b in described] for a in described])
    assert true_of.diagonal().all() and (true_of | ~same).all()
    assert true_of.sum() > same.sum()                       # partial captions are true of more scenes


def test_every_public_function_has_type_hints():
    from test_clip import unannotated                             # one checker for both files
    assert unannotated(qformer) == []

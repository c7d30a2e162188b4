"""vlm_train.py's five connectors x three stage-2 modes on the same shapes VQA task, in one table.

Every run shares one cache (the shapes ViT of clip.py, the rendered data) and one text-only LM, the
one the MLP connector's configuration trains (`Run.lm_dir`: every connector reads the same
pretrained LM, as they would read one downloaded LM), and the three stage-2 modes of a connector
share its stage 1. Each (connector, mode) runs in a fresh process
(forked from a server that imported vlm_train once), so its peak RSS is its own. By default every run
uses `vlm_train.py --train`'s schedule, so the "mlp / full" row is `--train --connector mlp`; --stage1-steps /
--stage2-steps shorten it. --jobs 2 runs two rows at a time, one thread each (a 2-core machine): the
first mode of every connector first (it trains the connector's stage 1), then the others.

    python benchmarks/bench_vlm_train.py --out DIR --jobs 2    # CPU, the default model: over an hour on 2 cores
    python benchmarks/bench_vlm_train.py --tiny --out /tmp/b   # seconds: the tiny model (a smoke test)

One seed is one draw: --seeds runs every row once per seed, each seed with its own stage-0 LM (the MLP
configuration's, as above), stage 1 and training scenes, and the table gives each row's min and mean
over the seeds beside every seed's scores:

    python benchmarks/bench_vlm_train.py --out DIR --jobs 2 --seeds 0,1,2   # three times one seed's time

--memory measures instead one stage-2 step of the default model per mode (full, LoRA, QLoRA), each in a
fresh process: weights, gradients and AdamW state counted tensor by tensor, the tensors autograd keeps
for backward (activations), and the process's peak RSS (glibc told to hand freed memory back, so the
peak is the step's own):

    python benchmarks/bench_vlm_train.py --memory              # batch 64, about a minute

--probe DIR asks where a trained model (a `vlm_train.py --train --out DIR`) keeps, and loses, what sits
where: linear probes fit on frozen features of training scenes and scored on scenes of a seed no run
saw, each beside its chance level (always the test rows' most common class), on the ViT's tokens, the
connector's output tokens and the LM's hidden states where the answer to a position question is
predicted. On a 9-query Q-Former (query q = cell q) it also probes each query's state after every
sub-layer for its own cell's colour and kind, and reports where each cross-attention's weight falls:

    python benchmarks/bench_vlm_train.py --probe DIR           # a minute or two on one thread

--scratchpad DIR reads back the shown work of a run trained with position_answer=named: on its balanced
position split, how often the two shapes' cells are written right and how often the final relation is
right, and whether a wrong relation follows from the cells written (a lookup error) or not (a comparison
error):

    python benchmarks/bench_vlm_train.py --scratchpad DIR      # seconds
"""
import argparse
import math
import multiprocessing as mp
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vlm_train as vt  # noqa: E402


def row_configs(args, connector=None, **train):
    """A row's VLMConfig and TrainConfig: --tiny's or the defaults with the connector's own
    (vlm_train.make_configs), then every --set KEY=VALUE, then the row's connector and TrainConfig fields."""
    vcfg_over, tcfg_over = vt.split_settings(args.set)
    return vt.make_configs({**vcfg_over, **({"connector": connector} if connector else {})}, {**tcfg_over, **train},
                           args.tiny)


def one_run(connector, mode, seed, args):
    """Stage 1 (shared per connector and seed), stage 2, evaluation; returns the row of the table."""
    import lora
    torch.set_num_threads(args.threads)
    # no lora.return_freed_memory_to_the_os() here: its fixed mmap threshold sends every block over
    # 128 KiB through mmap / munmap and doubled the stage-2 time (half of it in the kernel). So the
    # peak RSS below includes glibc's slack; `vlm_train.py --memory-report` measures memory exactly.
    start_rss = lora.peak_rss_bytes()
    vcfg, tcfg = row_configs(args, connector=connector, stage2=mode, seed=seed)
    if args.stage1_steps is not None:
        tcfg = replace(tcfg, stage1_steps=args.stage1_steps, itc_steps=args.stage1_steps if tcfg.itc_steps else 0)
    if args.stage2_steps is not None:
        tcfg = replace(tcfg, stage2_steps=args.stage2_steps)
    if args.n_eval is not None:
        tcfg = replace(tcfg, n_eval=args.n_eval)
    out = Path(args.out)
    tag = f"-seed{seed}" if len(args.seed_list) > 1 else ""      # one seed: the folders of a single-seed table
    t0 = time.time()
    run = vt.Run(out / f"{connector}-{mode}{tag}", torch.device(args.device), cache=out / "cache", progress=False,
                 evaluate_stage1=False, stage1_dir=out / f"{connector}{tag}" / "stage1", lm_dir=args.lm_dirs[seed])
    metrics, _ = vt.train_vlm(vcfg, tcfg, run)
    after = metrics["after stage 2"]
    return {"connector": connector, "mode": mode, "seed": seed, "test": after["test"]["all"]["exact"],
            "heldout": after["heldout"]["all"]["exact"], "rougeL": after["test"]["all"]["rougeL"],
            "position": after["position"]["all"]["exact"], "position majority": after["position"]["all"]["majority"],
            "trainable": metrics["trainable parameters"], "stage2 s": metrics["seconds"]["stage 2"],
            "total s": time.time() - t0, "peak MiB": (lora.peak_rss_bytes() - start_rss) / 2**20,
            "stage1_steps": tcfg.stage1_steps, "stage2_steps": tcfg.stage2_steps, "n_eval": tcfg.n_eval}


def memory_child(mode, vcfg, batch_size, vocab_size):
    """One stage-2 step of `mode` in this (fresh) process: bytes of weights, gradients, AdamW state,
    the tensors autograd saved for backward (activations), and the process's peak RSS."""
    import clip
    import lora
    lora.return_freed_memory_to_the_os()
    baseline = lora.peak_rss_bytes()
    torch.manual_seed(0)
    vit = clip.CLIP(clip.CLIPConfig.tiny() if vcfg.tiny_vision else clip.CLIPConfig()).vision_model
    words = vt.WordTokenizer([f"w{i}" for i in range(vocab_size - len(vt.SPECIALS))])
    vlm = vt.assemble_vlm(vcfg, vt.FrozenViT(vit, vcfg.connector == "dense"), "", words)
    data = vt.shapes_data(batch_size, 0, "train", vit.cfg.image_size, all_questions=False)
    if mode != "full":
        vt.add_lora(vlm, quantize=mode == "qlora")
    params = vt.set_stage(vlm, 2, mode)
    optimizer = vt.stage_optimizer(params, 1e-3, 0.0)
    batch = vt.make_batch(vlm, data, list(range(batch_size)), "vqa")
    saved = {}

    def pack(t):      # every tensor autograd keeps for backward, counted once per storage
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vt.vlm_loss(vlm.model.train(), batch)
    loss.backward()
    optimizer.step()
    out = lora.training_state_bytes(vlm.model, optimizer)
    out.update(mode=mode, activations=sum(saved.values()), peak=lora.peak_rss_bytes(), baseline=baseline,
               trainable=sum(p.numel() for p in params))
    out["state"] = out["weights"] + out["grads"] + out["optimizer"]
    return out


def memory_table(ctx, vcfg, batch_size, vocab_size=64):
    """Each mode's step in a fresh process; prints the table, returns its rows."""
    rows = []
    for mode in vt.STAGE2_MODES:
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(memory_child, (mode, vcfg, batch_size, vocab_size)))
    mib = lambda b: f"{b / 2**20:,.2f}"  # noqa: E731
    print(f"\n## one stage-2 step, batch {batch_size}, connector {vcfg.connector} (measured, each in a fresh process)\n")
    print("| mode | trainable | weights MiB | grads MiB | AdamW MiB | training state MiB | activations MiB "
          "| peak RSS MiB | peak - start MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} | {mib(r['weights'])} | {mib(r['grads'])} | {mib(r['optimizer'])} "
              f"| {mib(r['state'])} | {mib(r['activations'])} | {mib(r['peak'])} | {mib(r['peak'] - r['baseline'])} |")
    return rows


# -- probes ---------------------------------------------------------------------------------------------

def ridge_probe(x_train, y_train, x_test, y_test, lams=(1e-2, 1e-1, 1.0, 10.0, 100.0)):
    """A linear classifier, closed form: standardise the features, add a bias, W = (X^T X + lam I)^-1 X^T Y
    on one-hot targets Y, predict the argmax; lam picked on the last fifth of the training rows. Returns
    {"acc", "chance", "n"} in % on the test rows; chance: always the test rows' most common class."""
    x_train, x_test = x_train.double().flatten(1), x_test.double().flatten(1)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    classes = torch.unique(y_train)

    def prep(x):
        return torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def fit(x, y, lam):
        onehot = (y[:, None] == classes[None]).double()
        return torch.linalg.solve(x.T @ x + lam * len(x) / 100 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ onehot)

    def accuracy(w, x, y):
        return 100 * (classes[(x @ w).argmax(1)] == y).double().mean().item()

    xtr, xte = prep(x_train), prep(x_test)
    k = int(0.8 * len(xtr))
    lam = max(lams, key=lambda la: accuracy(fit(xtr[:k], y_train[:k], la), xtr[k:], y_train[k:]))
    chance = max((y_test == c).double().mean().item() for c in torch.unique(y_test))
    return {"acc": accuracy(fit(xtr, y_train, lam), xte, y_test), "chance": 100 * chance, "n": len(y_test)}


def cell_labels(scenes):
    """(S, 9) colour and kind of each cell of the 3 x 3 grid (raster order); an empty cell is the last class."""
    import clip
    colours, kinds = list(clip.COLOURS), list(clip.SHAPES)
    colour = torch.full((len(scenes), 9), len(colours))
    kind = torch.full((len(scenes), 9), len(kinds))
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            colour[i, shape.row * 3 + shape.col] = colours.index(shape.colour)
            kind[i, shape.row * 3 + shape.col] = kinds.index(shape.kind)
    return colour, kind


def heldout_cells(colour, kind):
    """(S, 9) True where cell_labels' colour and kind are one of clip.HELDOUT's pairs."""
    import clip
    pairs = [(list(clip.COLOURS).index(c), list(clip.SHAPES).index(k)) for c, k in clip.HELDOUT]
    return torch.stack([(colour == c) & (kind == k) for c, k in pairs]).any(0)


def position_rows(scenes, seed):
    """One relative-position question per scene that has one: (scene, question, answer, cell of a, cell of b)."""
    import random
    import clip
    rng, rows = random.Random(f"probe-{seed}"), []
    for i, scene in enumerate(scenes):
        qa = [(q, a) for q, a in clip.questions(scene) if vt.question_kind(q) == "position"]
        if qa:
            q, a = rng.choice(qa)
            words = q.rstrip("?").split()           # where is the C1 K1 relative to the C2 K2
            cell = {(x.colour, x.kind): x.row * 3 + x.col for x in scene.shapes}
            rows.append((i, q, a, cell[words[3], words[4]], cell[words[-2], words[-1]]))
    return rows


@torch.no_grad()
def probe_features(vlm, scenes, seed, lm=True):
    """What the probes read for a set of scenes: the ViT's cell tokens (each cell's 2 x 2 patches merged),
    the connector's output tokens, and (lm) each LM layer's output at the last prompt token of a position
    question about the scene, with that question's answer and the columns of its two shapes."""
    images = vt.rendered(scenes, [], vlm.processor.image_size).images                  # (S, I, I, C) uint8
    feats = torch.cat([vlm.image_inputs(images[i:i + 500]) for i in range(0, len(images), 500)])   # (S, Lk, 1+N, Dv)
    vit = vt.merge_patches(feats[:, -1], 2)                                      # (S, 9, 4 Dv)
    connector = vlm.connector(feats)                                             # (S, M, D)
    if not lm:
        return {"vit": vit, "connector": connector, "cells": cell_labels(scenes)}
    rows = position_rows(scenes, seed)
    index = torch.tensor([r[0] for r in rows])
    got, states = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: got.append(o[:, -1].clone()))
             for layer in vlm.lm.model.layers]
    try:
        for s in range(0, len(rows), 256):
            got.clear()
            batch = vlm.processor([vlm.question_prefix + r[1] for r in rows[s:s + 256]])
            vlm.model(batch["input_ids"], feats[index[s:s + 256]], batch["attention_mask"])
            states.append(torch.stack(got, 1))                                   # (B, L, D)
    finally:
        for h in hooks:
            h.remove()
    relation = {"left": 0, "right": 1, "above": 2, "below": 3}
    return {"vit": vit, "connector": connector, "cells": cell_labels(scenes), "lm": torch.cat(states),
            "answer": torch.tensor([relation[r[2]] for r in rows]), "a column": torch.tensor([r[3] % 3 for r in rows]),
            "b column": torch.tensor([r[4] % 3 for r in rows])}


def probe_table(vlm, n_train=2000, n_test=1000, test_seed=12345):
    """Every probe, trained on n_train training scenes (seed 0) and scored on n_test scenes of test_seed
    (the cell probes also on the held-out pairs' cells of n_test held-out scenes of test_seed)."""
    tr, te = (probe_features(vlm, vt.draw_scenes(n, seed, "train" if seed == 0 else "test")[0], seed)
              for n, seed in ((n_train, 0), (n_test, test_seed)))
    ho = probe_features(vlm, vt.draw_scenes(n_test, test_seed, "heldout")[0], test_seed, lm=False)
    unseen = heldout_cells(*ho["cells"])
    rows, cells = [], torch.arange(9)
    empty = tr["cells"][0].max()                     # cell_labels' class of an empty cell (no colour drawn as it)
    occupied = tr["cells"][0] < empty, te["cells"][0] < empty
    for name, key in (("ViT, last layer: a cell's own token", "vit"), ("connector output: a cell's own token", "connector")):
        if tr[key].shape[1] != 9:
            continue                                 # 16 plain queries: tokens that belong to no one cell
        for what, i in (("colour of the cell", 0), ("kind of the cell", 1)):
            rows.append((name, what, ridge_probe(tr[key].flatten(0, 1), tr["cells"][i].flatten(),
                                                 te[key].flatten(0, 1), te["cells"][i].flatten())))
        for what, label in (("column of an occupied cell", cells % 3), ("row of an occupied cell", cells // 3)):
            ytr, yte = label.expand_as(occupied[0])[occupied[0]], label.expand_as(occupied[1])[occupied[1]]
            rows.append((name, what, ridge_probe(tr[key][occupied[0]], ytr, te[key][occupied[1]], yte)))
        # the same cell probes on the cells of held-out colour-shape pairs (never in a training image)
        for what, i in (("colour of a held-out pair's cell", 0), ("kind of a held-out pair's cell", 1)):
            rows.append((name, what, ridge_probe(tr[key].flatten(0, 1), tr["cells"][i].flatten(),
                                                 ho[key][unseen], ho["cells"][i][unseen])))
    for name, xtr, xte in (("ViT, last layer: mean of all tokens", tr["vit"].mean(1), te["vit"].mean(1)),
                           ("connector output: all tokens, concatenated", tr["connector"].flatten(1),
                            te["connector"].flatten(1))):
        for what, i in (("colour of each cell (9 probes, mean)", 0), ("kind of each cell (9 probes, mean)", 1)):
            r = [ridge_probe(xtr, tr["cells"][i][:, c], xte, te["cells"][i][:, c]) for c in range(9)]
            rows.append((name, what, {k: sum(x[k] for x in r) / 9 for k in ("acc", "chance")} | {"n": sum(x["n"] for x in r)}))
    for layer in range(tr["lm"].shape[1]):
        for what in ("answer", "a column", "b column"):
            rows.append((f"LM layer {layer + 1}, last prompt token of a position question", what,
                         ridge_probe(tr["lm"][:, layer], tr[what], te["lm"][:, layer], te[what])))
    return print_probes(f"linear probes: fit on {n_train} training scenes, scored on {n_test} scenes of seed {test_seed}",
                        rows)


def print_probes(title, rows):
    """Prints (features, target, ridge_probe result) rows as a markdown table; returns them as dicts."""
    print(f"\n## {title}\n")
    print("| features | target | accuracy | chance | n |")
    print("|---|---|---:|---:|---:|")
    for features, target, r in rows:
        print(f"| {features} | {target} | {r['acc']:.1f}% | {r['chance']:.1f}% | {r['n']} |")
    return [{"features": f, "target": t, **r} for f, t, r in rows]


def own_cells(num_patches):
    """(9, N): True where patch n lies in query q's cell of the 3 x 3 grid (query_prior="window"'s cells)."""
    return vt.LocalPrior(9, math.isqrt(num_patches), window=True).window[:, 1:].isfinite()


@torch.no_grad()
def qformer_states(vlm, scenes):
    """A 9-query Q-Former's query states after every sub-layer of every layer, (S, 9, D) each (first, for
    reference, each cell's frozen ViT tokens side by side and their mean), and for each
    cross-attention the weights of its queries on the 1+N keys, (S, H, 9, 1+N), with its content logits
    q k^T / sqrt(d) alone (the prior left out)."""
    images = vt.rendered(scenes, [], vlm.processor.image_size).images
    states, reads, hooks = {}, [], []

    def attention_weights(module, args):                  # MultiHeadAttention(x, context, mask), by hand
        x, context, mask = args
        heads = lambda t: t.unflatten(-1, (module.num_heads, -1)).transpose(1, 2)   # noqa: E731
        logits = heads(module.query(x)) @ heads(module.key(context)).transpose(-1, -2) / (x.shape[-1] // module.num_heads) ** 0.5
        reads.append(((logits if mask is None else logits + mask[:, None]).softmax(-1), logits))

    for i, layer in enumerate(vlm.connector.qformer.qformer.encoder.layer):
        for name, what in (("attention", "self-attention"), ("crossattention", "cross-attention (a read of the image)"),
                           ("output_query", "feed-forward")):
            if getattr(layer, name) is not None:
                key = f"Q-Former layer {i + 1}, after its {what}: a query's token"
                hooks.append(getattr(layer, name).register_forward_hook(
                    lambda m, a, out, key=key: states.setdefault(key, []).append(out[:, :9])))
        if layer.crossattention is not None:
            hooks.append(layer.crossattention.attention.register_forward_pre_hook(attention_weights))
    patches = []
    try:
        for s in range(0, len(images), 500):
            feats = vlm.image_inputs(images[s:s + 500])
            patches.append(feats[:, -1, 1:])                                    # (B, N, Dv): what the queries read
            vlm.connector(feats)
    finally:
        for h in hooks:
            h.remove()
    # what a read can keep: a cell's patch tokens side by side (as merge_patches gives a per-patch
    # connector) and their mean (what a read that weighs them evenly gets)
    patches = torch.cat(patches)
    own = own_cells(patches.shape[1])
    cells = {"ViT, last layer: the mean of a cell's patch tokens": (own.double() / own.sum(1, keepdim=True)) @ patches.double()}
    if len(set(own.sum(1).tolist())) == 1:                                      # every cell holds as many patches
        cells["ViT, last layer: a cell's patch tokens side by side"] = patches[:, own.nonzero()[:, 1].view(9, -1)].flatten(2)
    n_reads = len(reads) // len(range(0, len(images), 500))
    return ({**cells, **{k: torch.cat(v) for k, v in states.items()}},
            [(torch.cat([w for w, _ in reads[r::n_reads]]), torch.cat([c for _, c in reads[r::n_reads]]))
             for r in range(n_reads)])


def qformer_layer_table(vlm, n_train=2000, n_test=1000, test_seed=12345):
    """Where a 9-query Q-Former (query q = cell q of the scenes' 3 x 3 layout) keeps and loses what is in
    its cell, sub-layer by sub-layer: each query's state probed for its cell's colour and kind, and the
    share of each cross-attention's weight that falls on the query's own 2 x 2 block of patches."""
    scenes = [vt.draw_scenes(n, seed, "train" if seed == 0 else "test")[0] for n, seed in ((n_train, 0), (n_test, test_seed))]
    (tr, _), (te, reads) = (qformer_states(vlm, x) for x in scenes)
    cells_tr, cells_te = (cell_labels(x) for x in scenes)
    rows = [(key, what, ridge_probe(tr[key].flatten(0, 1), cells_tr[i].flatten(), te[key].flatten(0, 1),
                                    cells_te[i].flatten()))
            for key in tr for what, i in (("colour of its cell", 0), ("kind of its cell", 1))]
    rows = print_probes(f"the Q-Former's queries, sub-layer by sub-layer: fit on {n_train} training scenes, scored "
                        f"on {n_test} scenes of seed {test_seed}", rows)
    own = own_cells(reads[0][0].shape[-1] - 1)                                   # (9, N)
    print("\n| cross-attention | weight on the query's own cell (its share of the patches) | on the class token "
          "| content logits' spread, max - min over the keys (mean over queries and heads) |")
    print("|---|---:|---:|---:|")
    for r, (weights, logits) in enumerate(reads):
        share = (weights[..., 1:] * own).sum(-1).mean().item()
        spread = (logits.amax(-1) - logits.amin(-1)).mean().item()
        print(f"| read {r + 1} | {100 * share:.1f}% ({100 * own.double().mean().item():.1f}%) | {100 * weights[..., 0].mean().item():.1f}% "
              f"| {spread:.1f} |")
    return rows


def scratchpad_table(out):
    """Where a named-answer run's wrong position answers go wrong: the balanced position split of its
    evaluation (vlm_train.position_scenes, the run's seed + 1), each answer's shown work against the
    truth's (vlm_train.named_position_answer)."""
    import collections
    import json
    from types import SimpleNamespace
    import clip
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    n, seed = metrics["config"]["train"]["n_eval"], metrics["config"]["train"]["seed"] + 1   # split_data's position split
    vlm = vt.load_vlm(Path(out) / "model")
    if vlm.config.position_answer != "named":
        raise SystemExit(f"--scratchpad reads named position answers; {out} was trained with position_answer="
                         f"{vlm.config.position_answer!r}")
    scenes, qa = vt.position_scenes(n, seed)
    data = vt.cache_features(vlm, vt.rendered(scenes, qa, vlm.processor.image_size))
    counts = collections.Counter()
    for (i, q, a, _), said in zip(qa, vt.answer_questions(vlm, data)):
        truth, words = (clip.ShapesTokenizer.words(t) for t in (vt.named_position_answer(scenes[i], q, a), said))
        cells = words[:-1] == truth[:-1]
        implied = None
        if len(words) == 9 and {words[2], words[6]} <= set(vt.ROWS) and {words[3], words[7]} <= set(vt.COLUMNS):
            x, y = (SimpleNamespace(row=vt.ROWS.index(words[k]), col=vt.COLUMNS.index(words[k + 1])) for k in (2, 6))
            implied = clip.relation(x, y).replace("to the ", "").replace(" of", "")     # as clip.questions words it
        counts[("cells right" if cells else "a cell wrong", "relation right" if words[-1:] == [a] else
                "relation wrong", "follows from the cells written" if implied == words[-1] else "does not follow")] += 1
        counts["relation " + a + (" right" if words[-1:] == [a] else " wrong")] += 1
    print(f"\n## shown work on {len(qa)} balanced position questions (seed {seed}), {out}\n")
    print("| cells written | final relation | relation vs the cells written | answers |")
    print("|---|---|---|---:|")
    for key, count in sorted((k, v) for k, v in counts.items() if isinstance(k, tuple)):
        print(f"| {' | '.join(key)} | {count} |")
    print("\nright per true relation: " + ", ".join(
        f"{r} {counts['relation ' + r + ' right']} / {counts['relation ' + r + ' right'] + counts['relation ' + r + ' wrong']}"
        for r in ("left", "right", "above", "below")))
    return counts


def fill_cache(args, seed):
    """The ViT, the data and the text-only LM (the one the MLP connector's configuration trains),
    made once into the shared cache before the runs start, so that parallel runs never train them side
    by side."""
    torch.set_num_threads(max(args.threads, args.jobs))
    vcfg, tcfg = row_configs(args, connector="mlp", seed=seed)
    if args.n_eval is not None:
        tcfg = replace(tcfg, n_eval=args.n_eval)
    cache = Path(args.out) / "cache"
    run = vt.Run(cache, torch.device(args.device), progress=False)
    vlm, train = vt.build_vlm(vcfg, tcfg, run)
    vt.cache_features(vlm, train)
    stage0 = vt.text_stage(vlm, train, tcfg)
    vt.train_stage(vlm, stage0, tcfg, run)                                    # stage 0, into cache/lm-HASH
    vt.eval_sets(cache, tcfg, vlm.processor.image_size)
    return run.folder(stage0)


def seed_list(args):
    """--seeds N,N,... as distinct ints, or [--seed]."""
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds expects one or more distinct integers, got {args.seeds!r}")
    return seeds


def caption(r0, args):
    """The line above a table: the schedule, the seeds when there are several, what is scored, how it ran."""
    seeds = args.seed_list
    several = (f"seeds {', '.join(map(str, seeds))} (each its own stage-0 LM, stage 1 and data), "
               if len(seeds) > 1 else "")
    return (f"\nshapes VQA, {r0['stage1_steps']} stage-1 and {r0['stage2_steps']} stage-2 steps (--train uses "
            f"{vt.TrainConfig().stage1_steps} and {vt.TrainConfig().stage2_steps}), {several}exact match of greedy "
            f"answers on {r0['n_eval']} unseen scenes (one question each), on {r0['n_eval']} scenes with held-out "
            f"colour-shape pairs and on the balanced position split (always one answer: "
            f"{r0['position majority']:.1f}%){', min / mean over the seeds' if several else ''}; {args.threads} "
            f"thread(s) per run, {args.jobs} run(s) at a time, {args.device}\n")


def seeds_table(groups, args):
    """One row per (connector, mode): min and mean over its seeds of each score, each seed's scores
    beside them (a mean alone would hide the weak seed). Prints the table, returns its rows."""
    seeds = args.seed_list
    print(caption(groups[0][0], args))
    print("| connector | stage 2 | exact match min / mean | held-out pairs min / mean | position min / mean "
          "| per seed: exact / held-out / position | trainable params | stage-2 time s, mean |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    rows = []
    for runs in groups:
        row = {"connector": runs[0]["connector"], "mode": runs[0]["mode"], "seeds": seeds, "runs": runs,
               **{k: (min(r[k] for r in runs), sum(r[k] for r in runs) / len(runs))
                  for k in ("test", "heldout", "position")}}
        rows.append(row)
        cells = " | ".join(f"{row[k][0]:.1f} / {row[k][1]:.1f}%" for k in ("test", "heldout", "position"))
        each = "; ".join(f"{r['test']:.1f} / {r['heldout']:.1f} / {r['position']:.1f}" for r in runs)
        print(f"| {row['connector']} | {row['mode']} | {cells} | {each} | {runs[0]['trainable']:,} | "
              f"{sum(r['stage2 s'] for r in runs) / len(runs):.0f} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default="runs/bench_vlm_train")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--connectors", type=str, default=",".join(vt.CONNECTORS))
    parser.add_argument("--modes", type=str, default=",".join(vt.STAGE2_MODES))
    parser.add_argument("--stage1-steps", type=int, default=None, help="default: --train's")
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: --train's")
    parser.add_argument("--n-eval", type=int, default=None, help="default: --train's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=str, default=None, metavar="N,N,...",
                        help="every row once per seed (each with its stage-0 LM and stage 1); the table gives "
                             "min / mean over them. Default: --seed alone")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a VLMConfig / TrainConfig field for every row, as vlm_train.py --set")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--memory", action="store_true", help="the memory table instead (one step per mode)")
    parser.add_argument("--batch-size", type=int, default=64, help="--memory: rows per step")
    parser.add_argument("--probe", type=str, default=None, metavar="DIR", help="the probe table of a trained run")
    parser.add_argument("--probe-scenes", type=str, default="2000,1000", help="--probe: training, test scenes")
    parser.add_argument("--scratchpad", type=str, default=None, metavar="DIR",
                        help="where a position_answer=named run's wrong position answers go wrong")
    args = parser.parse_args(argv)
    if args.scratchpad:
        torch.set_num_threads(args.threads)
        return scratchpad_table(args.scratchpad)
    if args.probe:
        torch.set_num_threads(args.threads)
        n_train, n_test = (int(x) for x in args.probe_scenes.split(","))
        vlm = vt.load_vlm(args.probe)
        rows = probe_table(vlm, n_train, n_test)
        if isinstance(vlm.connector, vt.QFormerConnector) and vlm.config.num_queries == 9:
            rows += qformer_layer_table(vlm, n_train, n_test)
        return rows
    if args.tiny:
        args.stage1_steps, args.stage2_steps, args.n_eval = None, None, None
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["vlm_train"])
    if args.memory:
        return memory_table(ctx, row_configs(args)[0], args.batch_size)
    connectors, modes = args.connectors.split(","), args.modes.split(",")
    args.seed_list = seed_list(args)
    with ctx.Pool(1) as pool:
        args.lm_dirs = {seed: pool.apply(fill_cache, (args, seed)) for seed in args.seed_list}
    # the first mode of each connector trains its stage 1 (one per seed), which the other modes then read
    waves = [[(c, modes[0], s) for c in connectors for s in args.seed_list],
             [(c, m, s) for c in connectors for m in modes[1:] for s in args.seed_list]]
    done = {}
    for wave in waves:
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:       # a fresh process per row
            pending = [(key, pool.apply_async(one_run, (*key, args))) for key in wave]
            for key, result in pending:
                r = done[key] = result.get()
                print(f"{key[0]:9s} {key[1]:5s} seed {key[2]}  test {r['test']:5.1f}%  held-out {r['heldout']:5.1f}%  "
                      f"position {r['position']:5.1f}%  "
                      f"{r['total s']:.0f} s", file=sys.stderr, flush=True)
    if len(args.seed_list) > 1:
        return seeds_table([[done[(c, m, s)] for s in args.seed_list] for c in connectors for m in modes], args)
    rows = [done[(c, m, args.seed_list[0])] for c in connectors for m in modes]
    print(caption(rows[0], args))
    print("| connector | stage 2 | exact match | held-out pairs | position | ROUGE-L | trainable params | stage-2 time s "
          "| run time s | peak RSS above start MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['connector']} | {r['mode']} | {r['test']:.1f}% | {r['heldout']:.1f}% | {r['position']:.1f}% | {r['rougeL']:.1f} | "
              f"{r['trainable']:,} | {r['stage2 s']:.0f} | {r['total s']:.0f} | {r['peak MiB']:.0f} |")
    return rows


if __name__ == "__main__":
    main()

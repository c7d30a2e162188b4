"""The specification of vlm_train.py's data on disk (`--data KIND:PATH`): each layout read from a tiny
folder the test writes with pillow yields the expected rows; a corrupt image and a malformed line are
skipped and counted; a missing or empty folder is a clear error; a caption folder trains end to end;
under torchrun, 2 gloo processes train to one process's weights and resume to their own uninterrupted run.
"""
import csv
import json

import pytest
import torch
from PIL import Image

import vlm_train as vt

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30),
       "purple": (140, 30, 160), "orange": (250, 140, 20)}


def picture(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, RGB[colour]).save(path)


def corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")


def caption_folder(root, n=20, vqa=False, csv_file=False, broken=False):
    """n one-colour images with a caption (or a question and answer) each, as jsonl or csv."""
    rows = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        picture(root / "img" / f"{i:03d}.jpg", colour)
        rows.append({"image": f"img/{i:03d}.jpg", **({"question": "what colour is it?", "answer": colour} if vqa
                                                      else {"caption": f"a {colour} picture"})})
    if csv_file:
        with open(root / "captions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if broken:
            with open(root / "captions.csv", "a") as f:
                f.write("img/000.jpg\nimg/broken.jpg,a broken picture\n")   # no caption; a corrupt image
    else:
        lines = [json.dumps(r) for r in rows] + (["{not json", json.dumps({"image": "img/broken.jpg", "caption": "x"})]
                                                 if broken else [])
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    if broken:
        corrupt(root / "img" / "broken.jpg")
    return rows


def read(spec, split="train", n=100):
    return vt.read_folder(spec, split, n)


# --- each layout ---------------------------------------------------------------------------------------

def test_captions_jsonl_and_csv_give_the_same_rows(tmp_path):
    caption_folder(tmp_path / "j")
    caption_folder(tmp_path / "c", csv_file=True)
    vqa, caps, bad = read(f"captions:{tmp_path / 'j'}")
    assert vqa == [] and bad == 0
    # every 10th image (positions 9, 19) is held out for evaluation
    assert [c[1] for c in caps] == [f"a {COLOURS[i % 6]} picture" for i in range(20) if i % 10 != 9]
    assert caps[0][0] == str(tmp_path / "j" / "img" / "000.jpg")
    _, held, _ = read(f"captions:{tmp_path / 'j'}", "eval")
    assert [c[1] for c in held] == ["a yellow picture", "a green picture"]           # images 9 and 19
    _, caps_csv, _ = read(f"captions:{tmp_path / 'c'}")
    assert [c[1] for c in caps_csv] == [c[1] for c in caps]


def test_caption_folder_with_questions_gives_vqa_triples(tmp_path):
    caption_folder(tmp_path, n=12, vqa=True, csv_file=True)
    vqa, caps, _ = read(f"captions:{tmp_path}")
    assert caps == [] and len(vqa) == 11
    assert vqa[1] == (str(tmp_path / "img" / "001.jpg"), "what colour is it?", "green", "question")


def clevr_folder(root, broken=False):
    """CLEVR v1.0's layout: two train images with two questions each, one val image."""
    def q(image, question, answer, function):
        return {"image_filename": image, "question": question, "answer": answer,
                "program": [{"function": "scene", "inputs": [], "value_inputs": []},
                            {"function": function, "inputs": [0], "value_inputs": []}]}
    for split, images in (("train", ["CLEVR_train_000000.png", "CLEVR_train_000001.png"]),
                          ("val", ["CLEVR_val_000000.png"])):
        for i, name in enumerate(images):
            picture(root / "images" / split / name, COLOURS[i], (48, 32))
        questions = [x for name in images for x in
                     (q(name, "How many things are there?", 3, "count"),
                      q(name, "Is the cube the same colour as the ball?", "no", "equal_color"))]
        if broken and split == "train":
            questions.append({"question": "no image here", "answer": "yes"})
            questions.append(q("CLEVR_train_000009.png", "What colour is it?", "red", "query_color"))
            corrupt(root / "images" / "train" / "CLEVR_train_000009.png")
        (root / "questions").mkdir(parents=True, exist_ok=True)
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(
            json.dumps({"info": {"split": split}, "questions": questions}))


def test_clevr_reads_its_own_layout_with_question_types(tmp_path):
    clevr_folder(tmp_path)
    vqa, caps, bad = read(f"clevr:{tmp_path}")
    image = str(tmp_path / "images" / "train" / "CLEVR_train_000000.png")
    assert caps == [] and bad == 0 and len(vqa) == 4
    assert vqa[0] == (image, "How many things are there?", "3", "count")            # answers as strings
    assert vqa[1] == (image, "Is the cube the same colour as the ball?", "no", "compare_attribute")
    val, _, _ = read(f"clevr:{tmp_path}", "eval")
    assert {v[0] for v in val} == {str(tmp_path / "images" / "val" / "CLEVR_val_000000.png")}
    assert vt.clevr_kind({"answer": "yes"}) == "yes/no" and vt.clevr_kind({"answer": 2}) == "count"


def img2dataset_folder(root, n=12, broken=False):
    for i in range(n):
        shard = root / f"{i // 5:05d}"
        picture(shard / f"{i:09d}.jpg", COLOURS[i % 6])
        (shard / f"{i:09d}.txt").write_text(f"a {COLOURS[i % 6]} square\n")
        (shard / f"{i:09d}.json").write_text("{}")                   # img2dataset's metadata, ignored
    if broken:
        picture(root / "00000" / "000000100.jpg", "red")              # no caption file
        corrupt(root / "00000" / "000000101.jpg")
        (root / "00000" / "000000101.txt").write_text("a broken picture")


def test_img2dataset_shards_are_read_in_order(tmp_path):
    img2dataset_folder(tmp_path)
    vqa, caps, bad = read(f"img2dataset:{tmp_path}")
    assert vqa == [] and bad == 0
    assert [c[1] for c in caps] == [f"a {COLOURS[i % 6]} square" for i in range(12) if i != 9]
    assert caps[5][0] == str(tmp_path / "00001" / "000000005.jpg")
    _, first, _ = read(f"img2dataset:{tmp_path}", n=3)                # at most n images: stops reading
    assert len(first) == 3


# --- what is skipped and counted, what is refused ------------------------------------------------------

@pytest.mark.parametrize("layout", ["jsonl", "csv", "clevr", "img2dataset"])
def test_corrupt_images_and_malformed_lines_are_counted_and_skipped(tmp_path, layout):
    if layout == "clevr":
        clevr_folder(tmp_path, broken=True)
        spec, lines, good = f"clevr:{tmp_path}", 1, 2
    elif layout == "img2dataset":
        img2dataset_folder(tmp_path, broken=True)
        spec, lines, good = f"img2dataset:{tmp_path}", 1, 11
    else:
        caption_folder(tmp_path, csv_file=layout == "csv", broken=True)
        spec, lines, good = f"captions:{tmp_path}", 1, 18
    data = vt.load_data(spec, "train", 100, 16, tmp_path / "cache")
    assert data.malformed == lines and data.skipped >= 1
    assert len(data.images) == good and data.images.shape[1:] == (16, 16, 3)
    # cached: the second read comes from cache/data and counts the same
    again = vt.load_data(spec, "train", 100, 16, tmp_path / "cache")
    assert torch.equal(again.images, data.images) and (again.skipped, again.malformed) == (data.skipped, lines)


def test_caption_only_data_is_asked_for_its_caption(tmp_path):
    caption_folder(tmp_path)
    data = vt.load_data(f"captions:{tmp_path}", "train", 100, 16, tmp_path / "cache")
    assert data.qa[0] == (0, "caption", "a red picture", "caption") and len(data.qa) == len(data.captions) == 18


@pytest.mark.parametrize("kind", ["clevr", "captions", "img2dataset"])
def test_missing_or_empty_folder_is_a_clear_error(tmp_path, kind):
    with pytest.raises(vt.FolderError, match=r"(?s)does not exist.*Accepted layouts.*clevr:DIR.*captions\.jsonl"):
        vt.load_data(f"{kind}:{tmp_path / 'nowhere'}", "train", 10, 16, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(vt.FolderError, match=rf"(?s){tmp_path / 'empty'}.*Accepted layouts"):
        vt.load_data(f"{kind}:{tmp_path / 'empty'}", "train", 10, 16, tmp_path / "cache")
    # the right files, but nothing readable in them
    (tmp_path / "bad" / "questions").mkdir(parents=True)
    (tmp_path / "bad" / "00000").mkdir()
    (tmp_path / "bad" / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(vt.FolderError, match=str(tmp_path / "bad")):
        vt.load_data(f"{kind}:{tmp_path / 'bad'}", "train", 10, 16, tmp_path / "cache")
    with pytest.raises(SystemExit):
        vt.main(["--train", "--tiny", "--data", f"{kind}:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")])
    with pytest.raises(vt.ConfigError, match="KIND:PATH"):
        vt.read_folder(f"laion:{tmp_path}", "train", 10)


# --- end to end ------------------------------------------------------------------------------------------

def test_train_on_a_caption_folder_end_to_end(tmp_path, capsys):
    caption_folder(tmp_path / "data", n=30, vqa=True, broken=True)
    out = tmp_path / "run"
    metrics = vt.main(["--train", "--tiny", "--data", f"captions:{tmp_path / 'data'}", "--out", str(out)])
    assert metrics["malformed_lines"] == 1 and metrics["skipped_images"] >= 1
    assert set(metrics["after stage 2"]) == {"test"}
    assert metrics["after stage 2"]["test"]["all"]["n"] == 3                       # images 9, 19, 29
    assert "question" in metrics["after stage 2"]["test"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["malformed_lines"] == 1 and saved["config"]["train"]["data"].startswith("captions:")
    printed = capsys.readouterr().out
    assert "1 malformed lines" in printed and "| test | captions evaluation split | question |" in printed
    vlm = vt.load_vlm(out)
    assert "green" in vlm.processor.tokenizer.stoi                                  # the vocabulary is the data's
    assert isinstance(vlm.answer(tmp_path / "data" / "img" / "001.jpg", "what colour is it?"), str)


def test_the_qformer_recipe_trains_on_long_captions_of_a_folder(tmp_path):
    """The Q-Former's text side has a 24-token context: captions of 40 words (most of them outside its
    shapes vocabulary) keep their first 22 words there, and the smolvlm recipe runs through all stages."""
    rows = caption_folder(tmp_path / "data", n=20)
    long = " ".join(["a photograph showing"] + [f"word{i}" for i in range(36)] + ["at dusk"])
    (tmp_path / "data" / "captions.jsonl").write_text("\n".join(json.dumps({**r, "caption": r["caption"] + " " + long})
                                                                for r in rows) + "\n")
    ids, mask = vt.qformer_text(vt.clip.ShapesTokenizer(), [rows[0]["caption"] + " " + long])
    assert int(mask.sum()) == 24 and ids.shape == (1, 24)
    metrics = vt.main(["--train", "--tiny", "--preset", "smolvlm", "--data", f"captions:{tmp_path / 'data'}",
                       "--out", str(tmp_path / "run"), "--set", "itc_steps=2", "--set", "stage1_steps=2",
                       "--set", "stage2_steps=2"])
    assert {"stage1a", "stage1", "stage2"} <= set(metrics["history"])
    assert all(v == v for losses in metrics["history"].values() for v in losses)


SYNONYMS = {"red": "crimson", "green": "emerald", "blue": "sapphire", "yellow": "lemon", "purple": "violet",
            "orange": "tangerine"}


def test_the_qformer_text_side_speaks_the_words_of_a_caption_folder(tmp_path):
    """Captions in words the shapes vocabulary lacks: the Q-Former's tokenizer is built from the folder's
    captions, so almost no caption word is <unk>, and a short stage 1a of ITC + ITM + ITG retrieves the
    right caption far above chance. Given a vocabulary without those words (the shapes one, say), every
    colour word is <unk>, the captions are alike to it, and retrieval stays at chance."""
    rows = []
    for i in range(300):                             # every 10th image is held out: all six colours there too
        colour = COLOURS[(i // 10 + i) % 6]
        picture(tmp_path / "data" / "img" / f"{i:03d}.jpg", colour)
        rows.append({"image": f"img/{i:03d}.jpg", "caption": f"a snapshot tinted {SYNONYMS[colour]} all over"})
    (tmp_path / "data" / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def run(name, *extra):
        argv = ["--train", "--tiny", "--connector", "qformer", "--data", f"captions:{tmp_path / 'data'}", "--out",
                str(tmp_path / name), "--cache", str(tmp_path / "cache"), "--set", "n_train=300", "--set", "n_eval=30",
                "--set", "itc_steps=100", "--set", "stage1_steps=1", "--set", "stage2_steps=1", "--set", "batch_size=16"]
        return vt.main(argv + list(extra))["retrieval after stage 1"]

    ours = run("folder-words")
    assert set(SYNONYMS.values()) <= set(vt.load_vlm(tmp_path / "folder-words").connector.tokenizer.stoi)
    assert ours["unk %"] < 2
    assert ours["chance R@1"] == pytest.approx(100 / 6, abs=0.1)                   # 30 images, 5 of each colour
    assert ours["i2t R@1"] > 3 * ours["chance R@1"] and ours["t2i R@1"] > 3 * ours["chance R@1"]
    blind = run("shapes-words", "--set", "qformer_vocab=" + ",".join(vt.clip.ShapesTokenizer.WORDS))
    assert blind["unk %"] > 30
    assert blind["i2t R@1"] < 2 * blind["chance R@1"]


# --- torchrun: 2 gloo processes == 1 process on the same global batch; resume under 2 processes -----------

from conftest import run_gloo_workers  # noqa: E402

CPU = torch.device("cpu")


def tiny_configs():
    # stage 2 "full": every weight of the LM moves, so any difference between the runs would show. No image
    # positions: their N(0, 1) rows swamp this tiny connector's output, its gradients sit near float noise
    # (sqrt of AdamW's v ~ 3e-6), and AdamW's division by sqrt(v) turns the ranks' other summation order
    # into weight differences of ~3e-4 there, while the losses still agree to 5e-7. length_split=1: stage 2
    # splits each rank's rows, and the one process's, by length wherever a row is shorter than another
    # (split_by_length), so the parts' token shares are checked across ranks too
    return vt.VLMConfig.tiny(connector="mlp", image_pos="none"), vt.TrainConfig.tiny(stage2="full", length_split=1)


def ddp_worker(rank, world, tmp):
    """One rank: an uninterrupted run; then a run stopped after stage 2's step-3 checkpoint, resumed by
    the command line (`--resume`, as torchrun would start it: it joins the existing process group)."""
    import os
    vcfg, tcfg = tiny_configs()
    vt.train_vlm(vcfg, tcfg, vt.Run(f"{tmp}/ddp", CPU, cache=f"{tmp}/cache", progress=False, evaluate=False))
    try:
        vt.train_vlm(vcfg, tcfg, vt.Run(f"{tmp}/resumed", CPU, cache=f"{tmp}/cache", progress=False, evaluate=False,
                                        stop_after=("stage2", 3)))
    except vt.Killed:
        pass
    os.environ["WORLD_SIZE"] = str(world)
    vt.main(["--train", "--tiny", "--connector", "mlp", "--stage2", "full", "--set", "image_pos=none", "--set", "length_split=1", "--out", f"{tmp}/resumed",
             "--cache", f"{tmp}/cache", "--resume", "--device", "cpu"])


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_and_resume_equals_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file
    assert run_gloo_workers(ddp_worker, 2, tmp_path, timeout=900) == [0, 0]
    vcfg, tcfg = tiny_configs()
    vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "one", CPU, cache=tmp_path / "one-cache", progress=False, evaluate=False))
    one, ddp, resumed = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "ddp", "resumed"))
    for name, value in one.items():
        # the losses agree to 1e-6; AdamW divides by sqrt(v), so where a gradient is ~0 the float noise of
        # summing in another order moves a weight by up to ~3e-5 (on weights of size ~0.2), 4e-8 on average
        assert torch.allclose(ddp[name], value, atol=1e-4), name
        assert (ddp[name] - value).abs().mean() < 1e-6, name
        assert torch.equal(resumed[name], ddp[name]), name
    runs = {run: json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "ddp", "resumed")}
    assert runs["ddp"]["processes"] == 2 and runs["one"]["processes"] == 1
    for stage, losses in runs["one"]["history"].items():
        assert runs["ddp"]["history"][stage] == pytest.approx(losses, rel=1e-4, abs=1e-5), stage
    assert runs["resumed"]["history"]["stage2"] == runs["ddp"]["history"]["stage2"]
    # rank 0 alone logs: every step once in the uninterrupted run's metrics.jsonl
    steps = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for s in steps if s["phase"] == "stage2") == tcfg.stage2_steps


def qformer_configs():
    # the shapes captions repeat, so ITM's "never a negative that matches" spans ranks here; BLIP-2's plain
    # queries, as in the presets that run stage 1a (blip2, smolvlm)
    return vt.VLMConfig.tiny(connector="qformer", query_prior="none"), vt.TrainConfig.tiny(stage2="full")


def qformer_ddp_worker(rank, world, tmp):
    """One rank: the whole Q-Former recipe (stage 1a's ITC + ITM + ITG with negatives from both ranks);
    then the one-process run's model scored with the questions split over the ranks (Run.score)."""
    vcfg, tcfg = qformer_configs()
    vt.train_vlm(vcfg, tcfg, vt.Run(f"{tmp}/ddp", CPU, cache=f"{tmp}/cache", progress=False))
    vlm = vt.load_vlm(f"{tmp}/one")
    data = vt.cache_features(vlm, vt.eval_sets(f"{tmp}/one-cache", tcfg, vlm.processor.image_size)["test"])
    scores, answers = vt.Run(f"{tmp}/eval-{rank}", CPU, progress=False).score(vlm, data)
    vt.write_json(f"{tmp}/eval-{rank}.json", {"scores": scores, "answers": answers})


@pytest.mark.slow
def test_two_gloo_processes_train_the_qformer_and_score_as_one_process(tmp_path):
    vcfg, tcfg = qformer_configs()
    one, _ = vt.train_vlm(vcfg, tcfg, vt.Run(tmp_path / "one", CPU, cache=tmp_path / "one-cache", progress=False))
    assert run_gloo_workers(qformer_ddp_worker, 2, tmp_path, timeout=900) == [0, 0]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["processes"] == 2
    for stage, losses in one["history"].items():                                 # stage 1a's ITC + ITM + ITG too
        assert ddp["history"][stage] == pytest.approx(losses, rel=1e-5), stage
    # The Q-Former after stage 1a. Its key biases are left out: q . (k + b) adds the same q . b to every
    # score of a query, which softmax ignores, so their gradient is zero but for rounding, and AdamW's
    # g / sqrt(v) turns that rounding into steps of the learning rate's size, in both runs alike.
    one_1a, ddp_1a = (vt.clip.read_trainer_state(vt.clip.latest_checkpoint(tmp_path / run / "stage1" / "itc"))[1]
                      for run in ("one", "ddp"))
    params = [k for k in one_1a if k.startswith("param.")]
    assert len(params) > 20 and one_1a.keys() == ddp_1a.keys()
    for name in params:
        if not name.endswith("key.bias"):
            assert torch.allclose(one_1a[name], ddp_1a[name], atol=1e-4), name
    # evaluation split over two ranks: every answer, so every score, is the one process's
    model = vt.load_vlm(tmp_path / "one")
    data = vt.cache_features(model, vt.eval_sets(tmp_path / "one-cache", tcfg, model.processor.image_size)["test"])
    scores, answers = vt.evaluate_vqa(model, data, model.question_prefix)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"eval-{rank}.json").read_text())
        assert got["answers"] == answers and got["scores"] == json.loads(json.dumps(scores))
    assert len(answers) == tcfg.n_eval and ddp["after stage 2"]["test"]["all"]["n"] == tcfg.n_eval

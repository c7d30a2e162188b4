"""The course homework as one command: fine-tune a PaliGemma checkpoint on CLEVR with QLoRA and score
exact match and ROUGE per CLEVR question type before and after,

    python vlm_train.py --train --preset paligemma-homework --init paligemma:DIR --data clevr:DIR \\
        --stage2 qlora --out OUT

run end to end on a tiny random PaliGemma that transformers saves with its processor and a CLEVR v1.0
folder written here (scenes drawn with pillow, questions with CLEVR's programs, one corrupt image).
Its numbers are then checked against the reference libraries: the scores before and after, recomputed
from transformers' greedy answers with Google's rouge-score; the adapter it saves, which peft loads onto
transformers' PaliGemma quantized to NF4 by bitsandbytes, giving the logits our loaded model gives.
"""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vlm_train as vt
from test_vlm_train import save_tiny_paligemma

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# CLEVR's attribute values (Johnson et al. 2017, sec. 3) and its five question types, named as
# vlm_train.clevr_kind names them from the last function of a question's program
SIZES, COLOURS = ("small", "large"), ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES, MATERIALS = ("cube", "sphere", "cylinder"), ("rubber", "metal")
TYPES = ("exist", "count", "compare_integer", "query_attribute", "compare_attribute")
RGB = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
       "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}


# --- a CLEVR v1.0 folder -------------------------------------------------------------------------------

def draw_scene(rng):
    """Three objects, one of each shape (so "the cube" names one object), other attributes at random."""
    return [{"shape": s, "color": rng.choice(COLOURS), "size": rng.choice(SIZES), "material": rng.choice(MATERIALS)}
            for s in rng.sample(SHAPES, 3)]


def render(scene, path):
    """A 48 x 32 picture of the scene: cubes as squares, spheres as discs, cylinders as triangles."""
    image = Image.new("RGB", (48, 32), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for i, o in enumerate(scene):
        r, x, y = (6 if o["size"] == "large" else 3), 8 + 16 * i, 16
        box = (x - r, y - r, x + r, y + r)
        if o["shape"] == "cube":
            draw.rectangle(box, fill=RGB[o["color"]])
        elif o["shape"] == "sphere":
            draw.ellipse(box, fill=RGB[o["color"]])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=RGB[o["color"]])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def step(function, *inputs, value=None):
    return {"function": function, "inputs": list(inputs), "value_inputs": [] if value is None else [value]}


def clevr_question(scene, kind, rng):
    """(question, answer, program) of one CLEVR question type about the scene; programs in CLEVR's
    own functional form, nodes reading earlier nodes by index."""
    a, b = rng.sample(scene, 2)
    if kind == "exist":
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        answer = any(o["color"] == colour and o["shape"] == shape for o in scene)
        program = [step("scene"), step("filter_color", 0, value=colour), step("filter_shape", 1, value=shape),
                   step("exist", 2)]
        return f"Is there a {colour} {shape}?", "yes" if answer else "no", program
    if kind == "count":
        size = rng.choice(SIZES)
        program = [step("scene"), step("filter_size", 0, value=size), step("count", 1)]
        return f"How many {size} things are there?", str(sum(o["size"] == size for o in scene)), program
    if kind == "compare_integer":
        count = {m: sum(o["material"] == m for o in scene) for m in MATERIALS}
        program = [step("scene"), step("filter_material", 0, value="metal"), step("count", 1), step("scene"),
                   step("filter_material", 3, value="rubber"), step("count", 4), step("greater_than", 2, 5)]
        return "Are there more metal things than rubber things?", "yes" if count["metal"] > count["rubber"] else "no", program
    if kind == "query_attribute":
        program = [step("scene"), step("filter_shape", 0, value=a["shape"]), step("unique", 1), step("query_color", 2)]
        return f"What color is the {a['shape']}?", a["color"], program
    program = [step("scene"), step("filter_shape", 0, value=a["shape"]), step("unique", 1), step("query_color", 2),
               step("scene"), step("filter_shape", 4, value=b["shape"]), step("unique", 5), step("query_color", 6),
               step("equal_color", 3, 7)]
    return f"Is the {a['shape']} the same color as the {b['shape']}?", "yes" if a["color"] == b["color"] else "no", program


def clevr_v1_folder(root, n_train=8, n_val=5, seed=0):
    """CLEVR v1.0's layout: questions/CLEVR_{train,val}_questions.json, images/{train,val}/*.png. Every
    image gets one question of each type; val image i asks type i mod 5 first (an evaluation keeps the
    first question of each image, so five val images cover the five types). One train question points
    at a corrupt PNG. Returns the val questions."""
    rng = random.Random(f"clevr-{seed}")
    val = []
    for split, n in (("train", n_train), ("val", n_val)):
        questions = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            scene = draw_scene(rng)
            render(scene, root / "images" / split / name)
            for kind in TYPES[i % 5:] + TYPES[:i % 5]:
                q, a, program = clevr_question(scene, kind, rng)
                questions.append({"image_index": i, "image_filename": name, "split": split, "question": q,
                                  "answer": a, "program": program})
            if split == "train" and i == n // 2:
                broken = f"CLEVR_{split}_{n:06d}.png"
                (root / "images" / split / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
                questions.append({"image_index": n, "image_filename": broken, "split": split,
                                  "question": "How many large things are there?", "answer": "1",
                                  "program": [step("scene"), step("filter_size", 0, value="large"), step("count", 1)]})
        (root / "questions").mkdir(parents=True, exist_ok=True)
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(
            json.dumps({"info": {"split": split, "version": "1.0"}, "questions": questions}))
        val = questions
    return val


# --- a tiny PaliGemma with a tokenizer that knows CLEVR's words ----------------------------------------

CLEVR_WORDS = ("answer en caption is are there a an any the more than how many things what color same as of yes "
               "no").split() + list(SIZES + COLOURS + SHAPES + MATERIALS) + ["Is", "Are", "How", "What"]


def tiny_clevr_paligemma(path):
    """transformers' PaliGemma (random, 28-px images, 16 image tokens) saved with its processor, as
    tests/test_vlm_train.py's tiny_paligemma_checkpoint, but its Gemma tokenizer gets BPE merges that
    build each CLEVR word, after a space ("\u2581cube") or opening a text ("yes"), as one token, as Gemma's
    real vocabulary does: a vocabulary entry without merges that reach it is never produced, and an
    answer spelled letter by letter would not fit the evaluation's generation budget (the answer's
    words + 1 tokens)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{i:02X}>": 5 + i for i in range(256)})
    for piece in list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n?") + ["\u2581"]:
        vocab.setdefault(piece, len(vocab))
    # merges of every word after a space first, so that each such chain completes before any merge of a
    # bare word (a text's first word: the prompt's "answer", an answer) can split it
    merges = []
    for word in ["\u2581" + w for w in CLEVR_WORDS] + CLEVR_WORDS:
        for k in range(2, len(word) + 1):        # "\u2581" + "c" -> "\u2581c", "\u2581c" + "u" -> "\u2581cu", ...
            if word[:k] not in vocab:
                vocab[word[:k]] = len(vocab)
                merges.append((word[:k - 1], word[k - 1]))

    def yes_no_only(model, vocab):
        # A random model with tied embeddings repeats its last input token ("\n", which decodes to nothing)
        # or lands on one of the 1152 <loc> / <seg> tokens (skipped when decoding), so every answer would be
        # empty and every score a trivial 0. With the rows of all tokens but "yes", "no" and <eos> zero, their
        # logits are 0 and greedy answers are made of yes and no: right or wrong, and scored, for three types.
        keep = [vocab["<eos>"]] + [vocab[w] for w in ("yes", "no", "\u2581yes", "\u2581no")]
        with torch.no_grad():
            embedding = model.get_input_embeddings().weight                   # (V, D), tied to the output layer
            zero = torch.ones(embedding.shape[0], dtype=torch.bool)
            zero[keep] = False
            embedding[zero] = 0

    return save_tiny_paligemma(path, vocab, merges, yes_no_only)


# --- the homework, end to end -------------------------------------------------------------------------

def first_questions(val):
    """The evaluation's rows: the first question of each val image (vlm_train.load_data keeps one)."""
    first = {}
    for q in val:
        first.setdefault(q["image_filename"], q)
    return list(first.values())


def greedy_answers(model, tok, batch, pixels, max_new_tokens=4):
    """Greedy answers of a transformers PaliGemma, each token from a full forward pass over the prompt and
    the answer so far (no KV cache): the prompt is prefix (token type 0), the answer suffix (1, causal).
    Decoded as vlm_train decodes: up to <eos>, special tokens dropped, whitespace stripped. Four new
    tokens, what evaluate_vqa allows for one-word answers."""
    ids, mask, types = batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["input_ids"])
    new = torch.empty(ids.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.cat([ids, new], 1), pixel_values=pixels,
                           attention_mask=torch.cat([mask, torch.ones_like(new)], 1),
                           token_type_ids=torch.cat([types, torch.ones_like(new)], 1)).logits
            new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)                  # (B, t + 1)
    rows = [row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in new.tolist()]
    return [tok.decode(row, skip_special_tokens=True).strip() for row in rows]


def nf4_weights(model, prefix):
    """{"layers.I.self_attn.q_proj": dequantized (out, in) weight} of every 4-bit layer under `prefix`."""
    import bitsandbytes.functional as bnb_f
    weights = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "LinearNF4":
            weights[name.removeprefix(prefix).removesuffix(".base_layer")] = m.dequantize(torch.float32)
        elif type(m).__name__ == "Linear4bit":
            w = bnb_f.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            weights[name.removeprefix(prefix).removesuffix(".base_layer")] = w
    return weights


@pytest.mark.slow
def test_homework_qlora_on_clevr_scores_before_and_after_and_its_adapter_loads_in_peft_on_bitsandbytes(
        tmp_path, capsys):
    from peft import PeftModel
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import BitsAndBytesConfig, PaliGemmaForConditionalGeneration
    ckpt, data, out = tmp_path / "paligemma", tmp_path / "CLEVR_v1.0", tmp_path / "run"
    tok = tiny_clevr_paligemma(ckpt)
    assert tok.tokenize("answer en Is the cube the same color as the sphere?") == \
        ["answer"] + ["\u2581" + w for w in "en Is the cube the same color as the sphere".split()] + ["?"]
    assert tok.tokenize("purple") == ["purple"]                          # an answer: a text's first word
    val = first_questions(clevr_v1_folder(data))
    assert sorted(vt.clevr_kind(q) for q in val) == sorted(TYPES)

    # the homework's command line, made tiny: 9 train images (one corrupt), 5 val images, 4 QLoRA steps
    # of 4 rows in 4 micro-batches (the preset's grad_accum); the preset has no stage 1, so "after stage 1"
    # is the checkpoint itself, the homework's "before"
    metrics = vt.main(["--train", "--preset", "paligemma-homework", "--init", f"paligemma:{ckpt}",
                       "--data", f"clevr:{data}", "--stage2", "qlora", "--out", str(out), "--device", "cpu",
                       "--steps", "4", "--set", "n_train=9", "--set", "n_eval=5", "--set", "batch_size=4"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after stage 2"] == metrics["after stage 2"]
    train = saved["config"]["train"]
    assert (train["stage2"], train["stage2_lr"], train["grad_accum"], train["weight_decay"]) == ("qlora", 2e-5, 4, 1e-6)
    assert saved["config"]["model"]["lora_r"] == 8 and saved["config"]["model"]["connector"] == "linear"
    assert saved["history"]["stage1"] == [] and len(saved["history"]["stage2"]) == 4
    assert saved["skipped_images"] == 1 and saved["malformed_lines"] == 0     # the corrupt PNG's question
    assert "skipped: 1 rows with an unreadable image" in printed
    # ... and what this model needs in memory, per mode (paligemma.memory_estimate on its config.json)
    assert f"fine-tuning the checkpoint {ckpt}" in printed and "| qlora + checkpointing |" in printed

    # before and after, per CLEVR question type, each against an independent recomputation: greedy answers
    # of transformers' PaliGemma (the source checkpoint; after stage 2 the saved base under bitsandbytes'
    # NF4 with peft's adapter) scored by Google's rouge-score
    ours = vt.load_vlm(out)
    images = torch.from_numpy(np.stack([np.asarray(Image.open(data / "images" / "val" / q["image_filename"])
                                                   .convert("RGB")) for q in val]))
    pixels = ours.processor.pixels(images)                                # (5, 3, 28, 28)
    prompts = ours.processor(["answer en " + q["question"] for q in val])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32,
                             # our QLoRA quantizes the decoder's linear layers only (vlm_train.quantize_lm)
                             llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    base4 = PaliGemmaForConditionalGeneration.from_pretrained(out / "model" / "base", quantization_config=bnb,
                                                              device_map="cpu").eval()
    peft = PeftModel.from_pretrained(base4, out / "model" / "adapter").eval()
    source = PaliGemmaForConditionalGeneration.from_pretrained(ckpt).eval()
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    for stage, model in (("after stage 1", source), ("after stage 2", peft)):
        answers = greedy_answers(model, tok, prompts, pixels)
        scores = saved[stage]["test"]
        assert set(scores) == {"all", *TYPES} and scores["all"]["n"] == 5
        for q, answer in zip(val, answers):
            kind, reference = vt.clevr_kind(q), scorer.score(q["answer"], answer)
            assert scores[kind]["n"] == 1 and scores[kind]["answers"] == {answer: 100.0}, (stage, kind, answer)
            assert scores[kind]["exact"] == 100.0 * (answer == q["answer"])
            for name in ("rouge1", "rouge2", "rougeL"):
                assert scores[kind][name] == pytest.approx(100 * reference[name].fmeasure), (stage, kind, name)
        for name in ("exact", "rouge1", "rouge2", "rougeL"):
            assert scores["all"][name] == pytest.approx(np.mean([scores[k][name] for k in TYPES]))
        assert scores["all"]["rouge1"] > 0                              # some answer overlaps: not a vacuous check
    # the printed summary: the before / after table, one row per type
    before, after = saved["after stage 1"]["test"], saved["after stage 2"]["test"]
    assert "| exact after stage 1 | exact after stage 2 |" in printed
    for kind in ("all", *TYPES):
        b, a = before[kind], after[kind]
        assert (f"| test | clevr evaluation split | {kind} | {a['n']} | {b['exact']:.1f}% | {a['exact']:.1f}% | "
                f"{a['majority']:.1f}% | {b['rouge1']:.1f} -> {a['rouge1']:.1f} | {b['rougeL']:.1f} -> "
                f"{a['rougeL']:.1f} |") in printed, kind

    # the saved adapter on transformers' NF4 model gives our loaded model's numbers
    batch = ours.processor(["answer en " + q["question"] for q in val], [q["answer"] for q in val])
    inputs = dict(input_ids=batch["input_ids"], pixel_values=pixels, attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"])             # token types: the answer attends causally
    mine, theirs = nf4_weights(ours.lm, "model."), nf4_weights(peft, "base_model.model.model.language_model.")
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 7        # the decoder's 7 linear layers, twice
    for name in mine:                                                  # nf4.py = bitsandbytes, code and constant
        assert torch.equal(mine[name], theirs[name]), name
    # all but 5 columns of the logits are 0 here (see tiny_clevr_paligemma), so the decoder's last hidden
    # states (B, T, D), after its final norm, are compared as well
    hidden = []
    hooks = [ours.model.language_model.model.register_forward_hook(lambda m, i, o: hidden.append(o)),
             peft.get_base_model().model.language_model.register_forward_hook(
                 lambda m, i, o: hidden.append(o.last_hidden_state))]
    with torch.no_grad():
        got = ours.model(batch["input_ids"], pixels, batch["attention_mask"], batch["token_type_ids"]).logits
        want = peft(**inputs).logits
        for hook in hooks:
            hook.remove()
        with peft.disable_adapter():
            without = peft(**inputs).logits
        plain = PaliGemmaForConditionalGeneration.from_pretrained(out / "model" / "base").eval()(**inputs).logits
    keep = batch["attention_mask"].bool()
    diff = lambda a, b: (a - b)[keep].abs().max().item()  # noqa: E731
    # The dequantized weights are equal (above), so the two differ only in float32 rounding: other kernels
    # and summation orders (attention, the 4-bit matmul, where LoRA's term is added), a few ulps per
    # operation through 2 layers of width <= 64. The hidden states reach ~4, where an ulp is 2.4e-7: ~1e-6
    # at worst. 1e-5 allows that ten times over and stays 100x below the adapter's effect, asserted next.
    assert diff(got, want) < 1e-5 and diff(hidden[0], hidden[1]) < 1e-5
    assert diff(without, want) > 1e-3                                  # the adapter is not a no-op on NF4
    assert diff(plain, want) > 1e-3                                    # nor on the float base (NF4 differs too)

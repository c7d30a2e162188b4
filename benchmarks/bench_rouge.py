"""rouge.py vs rouge-score 0.1.2 on the same 2,000 summary pairs, in one process.

The setting papers report: rouge1, rouge2, rougeL and rougeLsum together, with stemming, on
multi-sentence summaries of realistic length. References are 3-4 consecutive English sentences of
10-40 words (one per line) from the docstrings and comments of Python's standard library, real
prose with a real vocabulary; predictions are edited copies (words replaced, dropped, inflected,
sentences reordered or swapped for another), so the texts overlap as real system outputs do.

Each timed run builds a fresh scorer, so rouge.py's stem cache starts empty and fills only from
the words of that run, as it would on a new corpus. The scores of the two libraries must be equal
to 1e-9 (asserted); the table reports the median of --repeats runs.

    python benchmarks/bench_rouge.py            # 2,000 pairs, 3 repeats
"""
import argparse
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rouge  # noqa: E402

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

def corpus_sentences():
    """English sentences of 10-40 words from the docstrings and comments of Python's standard
    library: real prose with a real vocabulary (about 18,000 words), on every machine."""
    root = Path(os.__file__).parent
    sentences = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        source = path.read_text(encoding="utf-8", errors="replace")
        comments = re.sub(r"\n\s*#\s*", " ", "\n".join(re.findall(r"(?:^[ \t]*#.*\n)+", source, re.M)))
        for block in re.findall(r'"""([\s\S]*?)"""', source) + comments.split("\n"):
            for sentence in rouge.split_sentences(" ".join(block.split())):
                words = sentence.split()
                if 10 <= len(words) <= 40 and sum(w.isalpha() for w in words) >= 0.8 * len(words):
                    sentences.append(sentence)
    return sentences


def edit_sentence(rng, vocabulary, sentence):
    """A system-like rewrite: about a third of the words replaced, dropped, inflected or added."""
    out = []
    for word in sentence.split():
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice(vocabulary))
        elif r < 0.18:
            continue
        elif r < 0.26:
            out.append(word.rstrip(".,;:!?") + rng.choice(["s", "ed", "ing"]))
        else:
            out.append(word)
        if rng.random() < 0.05:
            out.append(rng.choice(vocabulary))
    return " ".join(out)


def make_pairs(n, seed=0):
    """n (reference, prediction) pairs: 3-4 corpus sentences, one per line, and an edited copy
    (sometimes reordered, sometimes with one sentence the reference does not have)."""
    rng = random.Random(seed)
    sentences = corpus_sentences()
    vocabulary = [w for s in sentences for w in s.split()]      # frequency-weighted draws
    pairs = []
    for _ in range(n):
        start = rng.randrange(len(sentences) - 4)
        reference = sentences[start: start + rng.randint(3, 4)]
        prediction = [edit_sentence(rng, vocabulary, s) for s in reference]
        if rng.random() < 0.3:
            rng.shuffle(prediction)
        if rng.random() < 0.3:
            prediction[-1] = rng.choice(sentences)
        pairs.append(("\n".join(reference), "\n".join(prediction)))
    return pairs


def run(make_scorer, pairs):
    scorer = make_scorer()
    start = time.perf_counter()
    scores = [scorer.score(reference, prediction) for reference, prediction in pairs]
    return time.perf_counter() - start, scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from rouge_score import rouge_scorer

    pairs = make_pairs(args.pairs, args.seed)
    ours = lambda: rouge.RougeScorer(TYPES, use_stemmer=True)                 # noqa: E731
    theirs = lambda: rouge_scorer.RougeScorer(TYPES, use_stemmer=True)        # noqa: E731
    run(ours, pairs[:50]), run(theirs, pairs[:50])                           # warm-up: imports, caches
    times = {"rouge.py": [], "rouge-score 0.1.2": []}
    for _ in range(args.repeats):
        t_ours, s_ours = run(ours, pairs)
        t_theirs, s_theirs = run(theirs, pairs)
        times["rouge.py"].append(t_ours)
        times["rouge-score 0.1.2"].append(t_theirs)
    worst = max(abs(a - b) for x, y in zip(s_ours, s_theirs) for t in TYPES for a, b in zip(x[t], y[t]))
    assert worst <= 1e-9, f"scores differ from rouge-score by {worst}"

    tokens = sum(len(rouge.tokenize(r)) + len(rouge.tokenize(p)) for r, p in pairs)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{len(pairs)} pairs ({tokens / len(pairs):.0f} tokens per pair), {', '.join(TYPES)}, "
          f"use_stemmer=True; median of {args.repeats} runs; max |score difference| = {worst:.1e}\n")
    print("| library | time (s) | pairs / s | speed-up |")
    print("|---|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {t:.3f} | {len(pairs) / t:,.0f} | {median['rouge-score 0.1.2'] / t:.1f}x |")
    return median


if __name__ == "__main__":
    main()

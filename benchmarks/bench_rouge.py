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
    python benchmarks/bench_rouge.py --memory   # peak memory of rougeL / rougeLsum on long texts

--memory scores one long reference against one long prediction (an edited copy) of 1e4, 1e5 and
1e6 words, each case in a fresh process, and reports the process's peak resident memory
(ru_maxrss) and its growth over the memory the texts and tokens already take. The last column is
what the previous rouge.py kept for the same pair: all |a| + 1 bit rows of |b| bits (rouge-score's
own table of (|a|+1)(|b|+1) Python ints is 64 times larger still).
"""
import argparse
import json
import resource
import subprocess
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


# --memory cases: rouge type and words per line ("\n" every 25 words: sentences; 0: one line,
# so rougeLsum's single reference sentence is the whole text, its worst case)
MEMORY_CASES = {"rougeL": ("rougeL", 25), "rougeLsum": ("rougeLsum", 25),
                "rougeLsum-one-line": ("rougeLsum", 0)}


def long_text_pair(n_words, words_per_line, seed=0):
    """A reference of n_words corpus words (frequency-weighted draws) and an edited copy of it."""
    rng = random.Random(seed)
    vocabulary = [w for s in corpus_sentences() for w in s.split()]
    words = [rng.choice(vocabulary) for _ in range(n_words)]
    reference = " ".join(words)
    prediction = edit_sentence(rng, vocabulary, reference)
    if words_per_line:
        def lines(text):
            w = text.split()
            return "\n".join(" ".join(w[i: i + words_per_line]) for i in range(0, len(w), words_per_line))
        reference, prediction = lines(reference), lines(prediction)
    return reference, prediction


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux: KiB


def memory_case(case, n_words):
    """Run in a fresh process: score one pair, report peak RSS before and after scoring."""
    rouge_type, words_per_line = MEMORY_CASES[case]
    reference, prediction = long_text_pair(n_words, words_per_line)
    scorer = rouge.RougeScorer([rouge_type])
    scorer._prepare(reference), scorer._prepare(prediction)          # tokens exist before we measure
    before = peak_rss_mib()
    start = time.perf_counter()
    score = scorer.score(reference, prediction)[rouge_type]
    seconds = time.perf_counter() - start
    tokens = (len(rouge.tokenize(reference)), len(rouge.tokenize(prediction)))
    print(json.dumps({"case": case, "words": n_words, "tokens": tokens, "seconds": seconds,
                      "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(), "f": score.fmeasure}))


def run_memory(cases, sizes):
    print("| case | words | reference x prediction tokens | time (s) | peak RSS (MiB) | growth while "
          "scoring (MiB) | all bit rows (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--memory-case", case, "--words", str(n)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            m, k = r["tokens"]
            table_gib = (m + 1) * k / 8 / 2**30              # |a| + 1 rows of |b| bits
            print(f"| {case} | {n:,} | {m:,} x {k:,} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} | {table_gib:,.1f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of rougeL / rougeLsum on long texts instead of speed")
    parser.add_argument("--cases", type=str, nargs="+", default=list(MEMORY_CASES),
                        choices=list(MEMORY_CASES), help="--memory: which cases")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="--memory: text lengths in words")
    parser.add_argument("--memory-case", type=str, choices=list(MEMORY_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--words", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        return memory_case(args.memory_case, args.words)
    if args.memory:
        return run_memory(args.cases, args.sizes)
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

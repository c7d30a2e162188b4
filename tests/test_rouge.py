"""Specification of rouge.py: parity with rouge-score 0.1.2 and nltk 3.10, hand-checked ROUGE-W /
S / SU examples from Lin (2004) and ROUGE-1.5.5, bootstrap intervals, the CLI, and bad input."""
import itertools
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from nltk.stem.porter import PorterStemmer as NltkPorterStemmer
from rouge_score import rouge_scorer, scoring
from rouge_score import tokenize as rs_tokenize

import rouge

ALL_RS_TYPES = [f"rouge{n}" for n in range(1, 10)] + ["rougeL", "rougeLsum"]
# Few distinct words, so that equally long LCSs abound and the backtracking tie-break matters;
# inflections and irregular forms, so that stemming matters; punctuation and non-ASCII to drop.
WORDS = ("the a cat cats dog dogs running runs ran jumped jumping jumps happy happiness relational "
         "conditional the. of, and! flies dies dying skies news generalization hopeful hopefulness "
         "sky Café über naïve 123 4.5 x-ray e-mail don't AT&T").split()
SPECIAL = ["", " ", "\n", "\n\n", "...", "!!! ??? ...", "—", "café über naïve", "12 34", "a\nb\n\nc"]


def random_text(rng, max_words=40):
    """A text of 0..max_words words from a small vocabulary, with newlines as sentence breaks."""
    vocabulary = WORDS[: rng.randint(3, len(WORDS))]
    parts = []
    for _ in range(rng.randint(0, max_words)):
        parts += [rng.choice(vocabulary), rng.choice([" "] * 6 + ["\n", "\n\n", " ... ", ", "])]
    return "".join(parts)


def generated_pairs(seed, n, max_words=40):
    rng = random.Random(seed)
    pairs = [(rng.choice(SPECIAL + [random_text(rng)]), rng.choice(SPECIAL + [random_text(rng)]))
             for _ in range(n // 4)]
    pairs += [(random_text(rng, max_words), random_text(rng, max_words)) for _ in range(n - len(pairs))]
    return pairs


def assert_same_scores(ours, theirs, types):
    assert set(ours) == set(theirs) == set(types)
    for name in types:
        for a, b in zip(ours[name], theirs[name]):
            assert abs(a - b) <= 1e-9, (name, ours[name], theirs[name])


# ------------------------------------------------------------------------------------------------
# Parity with rouge-score
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_stemmer", [False, True])
def test_score_matches_rouge_score_on_generated_pairs(use_stemmer):
    ours = rouge.RougeScorer(ALL_RS_TYPES, use_stemmer=use_stemmer)
    theirs = rouge_scorer.RougeScorer(ALL_RS_TYPES, use_stemmer=use_stemmer)
    for target, prediction in generated_pairs(seed=int(use_stemmer), n=300):
        assert_same_scores(ours.score(target, prediction), theirs.score(target, prediction), ALL_RS_TYPES)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_score_multi_matches_rouge_score(use_stemmer):
    ours = rouge.RougeScorer(ALL_RS_TYPES, use_stemmer=use_stemmer)
    theirs = rouge_scorer.RougeScorer(ALL_RS_TYPES, use_stemmer=use_stemmer)
    rng = random.Random(10 + use_stemmer)
    for _ in range(60):
        targets = [random_text(rng) for _ in range(rng.randint(1, 4))]
        prediction = random_text(rng)
        assert_same_scores(ours.score_multi(targets, prediction), theirs.score_multi(targets, prediction),
                           ALL_RS_TYPES)


def test_long_texts_match_rouge_score():
    types = ["rouge1", "rouge2", "rouge4", "rougeL", "rougeLsum"]
    ours, theirs = rouge.RougeScorer(types, use_stemmer=True), rouge_scorer.RougeScorer(types, use_stemmer=True)
    for target, prediction in generated_pairs(seed=2, n=4, max_words=700):
        assert_same_scores(ours.score(target, prediction), theirs.score(target, prediction), types)


@pytest.mark.parametrize("types", [["rougeLsum"], ["rougeL"], ["rouge2", "rougeLsum"]])
def test_subsets_of_types_match_rouge_score(types):
    ours, theirs = rouge.RougeScorer(types), rouge_scorer.RougeScorer(types)
    for target, prediction in generated_pairs(seed=3, n=40):
        assert_same_scores(ours.score(target, prediction), theirs.score(target, prediction), types)


def test_custom_tokenizer_is_used_as_in_rouge_score():
    class Whitespace:
        def tokenize(self, text):
            return text.split()

    types = ["rouge1", "rougeL", "rougeLsum"]
    ours = rouge.RougeScorer(types, tokenizer=Whitespace())
    theirs = rouge_scorer.RougeScorer(types, tokenizer=Whitespace())
    for target, prediction in generated_pairs(seed=4, n=40):
        assert_same_scores(ours.score(target, prediction), theirs.score(target, prediction), types)


def test_tokenizer_matches_rouge_score_on_unicode_edge_cases():
    stemmer = rouge.PorterStemmer()
    texts = ["İstanbul KELVIN \u212a", "ﬁnal ŉ ǰ", "Straße café", "tab\tnew\nline\r\n", "x_y-z", "Ⅻ ½ ²",
             "next\x85line\u2028sep\x1cfile", "İ\nİ\n\n", "\udcff lone surrogate"]
    for text in texts + [t for pair in generated_pairs(seed=5, n=40) for t in pair]:
        for use_stemmer in (False, True):
            theirs = NltkPorterStemmer() if use_stemmer else None
            ours = rouge.DefaultTokenizer(use_stemmer)
            assert rouge.tokenize(text, stemmer if use_stemmer else None) == rs_tokenize.tokenize(text, theirs)
            assert ours.tokenize(text) == rs_tokenize.tokenize(text, theirs)
            assert ours.tokenize_lines(text) == [rs_tokenize.tokenize(line, theirs)
                                                 for line in text.split("\n") if line]


# ------------------------------------------------------------------------------------------------
# Porter stemmer vs nltk on a large vocabulary
# ------------------------------------------------------------------------------------------------
SUFFIXES = ("s es ies ied ed eed ing ly y e ement ment ational tional enci anci izer bli alli entli eli "
            "ousli ization ation ator alism iveness fulness ousness aliti iviti biliti fulli logi icate "
            "ative alize iciti ical ful ness al ance ence er ic able ible ant ent ion sion tion ou ism ate "
            "iti ous ive ize ll sses ss at bl iz yy ying yed").split()


def stemmer_vocabulary():
    """Every word of the standard library's top-level modules (prose and identifiers alike), each
    of 2,000 of them with Porter's suffixes attached, random letter strings, and every 1-4 letter
    string over a, e, y, b, s, t (the y-as-vowel cases)."""
    words = set()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        words.update(re.findall(r"[a-z0-9]+", path.read_text(encoding="utf-8", errors="replace").lower()))
    rng = random.Random(0)
    bases = rng.sample(sorted(w for w in words if w.isalpha() and 3 <= len(w) <= 10), 2000)
    words.update(b + s for b in bases for s in SUFFIXES)
    letters = "aeiouybcdlmnrstwxzgpkh"
    words.update("".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) + rng.choice(SUFFIXES)
                 for _ in range(30000))
    words.update("".join(t) for n in range(1, 5) for t in itertools.product("aeybst", repeat=n))
    return sorted(words)


@pytest.mark.slow
def test_porter_stemmer_equals_nltk_on_a_large_vocabulary():
    vocabulary = stemmer_vocabulary()
    assert len(vocabulary) > 100_000
    nltk_stemmer = NltkPorterStemmer()
    mismatches = [(w, rouge.porter_stem(w), nltk_stemmer.stem(w)) for w in vocabulary
                  if rouge.porter_stem(w) != nltk_stemmer.stem(w)]
    assert not mismatches, mismatches[:20]


def test_porter_stemmer_textbook_examples():
    # Porter (1980)'s own examples, and nltk's irregular forms and extensions
    cases = {"caresses": "caress", "ponies": "poni", "cats": "cat", "agreed": "agre", "plastered": "plaster",
             "motoring": "motor", "hopping": "hop", "falling": "fall", "filing": "file", "happy": "happi",
             "relational": "relat", "conditional": "condit", "hopefulness": "hope", "generalization": "gener",
             "dying": "die", "skies": "sky", "news": "news", "dies": "die", "spied": "spi", "geology": "geolog",
             "controlling": "control", "roll": "roll"}
    assert {w: rouge.porter_stem(w) for w in cases} == cases
    assert {w: NltkPorterStemmer().stem(w) for w in cases} == cases


# ------------------------------------------------------------------------------------------------
# LCS: bit-parallel length and rouge-score's exact backtracking
# ------------------------------------------------------------------------------------------------
def random_sequences(rng, alphabet, max_len):
    return ([rng.choice(alphabet) for _ in range(rng.randint(0, max_len))],
            [rng.choice(alphabet) for _ in range(rng.randint(0, max_len))])


def test_bit_parallel_lcs_length_equals_the_dp_table():
    rng = random.Random(0)
    for alphabet in ("ab", "abc", "abcdefgh"):
        for _ in range(300):
            a, b = random_sequences(rng, alphabet, 70)
            assert rouge.lcs_length(a, b) == rouge.lcs_table(a, b)[-1][-1] == rouge_scorer._lcs_table(a, b)[-1][-1]


def test_lcs_indices_and_union_follow_rouge_score_tie_break():
    rng = random.Random(1)
    for alphabet in ("ab", "abc", "abcdef"):
        for _ in range(300):
            a, b = random_sequences(rng, alphabet, 40)
            assert rouge.lcs_indices(a, b) == rouge_scorer.lcs_ind(a, b)
            sentences = [random_sequences(rng, alphabet, 12)[0] for _ in range(rng.randint(0, 4))]
            expected = rouge_scorer._find_union([rouge_scorer.lcs_ind(a, s) for s in sentences])
            assert rouge.union_lcs(a, rouge.side_by_side(sentences)) == expected


def test_tie_break_decides_rougeLsum_hand_example():
    # ref "a b" vs pred "b a": both "a" and "b" are LCSs of length 1. rouge-score's walk goes up on
    # the tie and keeps "a"; then pred sentence 2 "a" covers "a" again, so the union is {a}: 1 hit.
    ours = rouge.RougeScorer(["rougeLsum"]).score("a b", "b a\na")["rougeLsum"]
    theirs = rouge_scorer.RougeScorer(["rougeLsum"]).score("a b", "b a\na")["rougeLsum"]
    assert rouge.lcs_indices(["a", "b"], ["b", "a"]) == [0]
    assert ours.recall == theirs.recall == 1 / 2 and ours.precision == theirs.precision == 1 / 3


def test_lcs_path_on_the_full_table_is_rouge_scores_walk():
    rng = random.Random(3)
    for _ in range(200):
        a, b = random_sequences(rng, "abc", 30)
        assert rouge.lcs_path(rouge.lcs_table(a, b), a, b) == rouge_scorer.lcs_ind(a, b) == rouge.lcs_indices(a, b)


def test_memory_saving_paths_give_rouge_scores_numbers(monkeypatch):
    # Tiny strips, groups and row budget push short texts through every path that long texts take:
    # carries between strips (rougeL), checkpointed rows, several groups of predicted sentences,
    # sentences longer than a group, and longer than a strip, whose masks are built on demand from
    # a cache too small to keep them (rougeLsum).
    monkeypatch.setattr(rouge, "STRIP_BITS", 7)
    monkeypatch.setattr(rouge, "MASK_CACHE_BITS", 64)
    monkeypatch.setattr(rouge, "GROUP_BITS", 12)
    monkeypatch.setattr(rouge, "ROW_BUDGET_BITS", 1)
    rng = random.Random(4)
    for alphabet in ("ab", "abcdef"):
        for _ in range(150):
            a, b = random_sequences(rng, alphabet, 60)
            assert rouge.lcs_length(a, b) == rouge_scorer._lcs_table(a, b)[-1][-1]
            assert rouge.lcs_indices(a, b) == rouge_scorer.lcs_ind(a, b)
            sentences = [random_sequences(rng, alphabet, 20)[0] for _ in range(rng.randint(0, 6))]
            expected = rouge_scorer._find_union([rouge_scorer.lcs_ind(a, s) for s in sentences])
            assert rouge.union_lcs(a, rouge.side_by_side(sentences)) == expected
    types = ["rougeL", "rougeLsum"]
    ours, theirs = rouge.RougeScorer(types, use_stemmer=True), rouge_scorer.RougeScorer(types, use_stemmer=True)
    for target, prediction in generated_pairs(seed=5, n=80):
        assert_same_scores(ours.score(target, prediction), theirs.score(target, prediction), types)


def test_checkpointed_rows_equal_all_rows():
    rng = random.Random(6)
    a, b = random_sequences(rng, "abcd", 200)
    masks, full = rouge.match_masks(b), (1 << len(b)) - 1
    rows, saved = rouge.lcs_rows(a, masks, full), rouge.CheckpointedRows(a, masks, full)
    assert [saved[i] for i in reversed(range(len(a) + 1))] == rows[::-1]
    assert len(saved.checkpoints) <= len(a) ** 0.5 + 2 and len(saved.cache) <= 2


def traced_peak(function, *args):
    import tracemalloc
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_linearly_not_with_the_table(monkeypatch):
    """All bit rows of two n-word texts take n^2 / 8 bytes (rouge-score's table: n^2 cells). rougeL
    keeps one row and one strip's masks: tripling n at most triples its peak and stays far below
    the rows. rougeLsum on the same texts as single sentences, with the row budget lowered so that
    its checkpoints are used, stays well under the rows too."""
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(1000)]
    text = lambda n: [rng.choice(vocabulary) for _ in range(n)]             # noqa: E731
    small, large = (text(6_000), text(6_000)), (text(18_000), text(18_000))
    small_peak, large_peak = traced_peak(rouge.lcs_length, *small), traced_peak(rouge.lcs_length, *large)
    assert large_peak < 3.5 * small_peak and large_peak < 18_000 ** 2 / 8 / 5, (small_peak, large_peak)
    monkeypatch.setattr(rouge, "ROW_BUDGET_BITS", 1 << 20)
    lsum_peak = traced_peak(rouge.summary_level_lcs, [small[0]], [small[1]])
    assert lsum_peak < 6_000 ** 2 / 8 / 2, lsum_peak


# ------------------------------------------------------------------------------------------------
# Hand-checked ROUGE-N and ROUGE-L
# ------------------------------------------------------------------------------------------------
def test_rouge_n_and_l_hand_example():
    scores = rouge.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(
        "The cat sat on the mat.", "The cat was sitting on the mat!")
    # 6 reference and 7 predicted words; the, the, cat, on, mat match: R = 5/6, P = 5/7
    assert scores["rouge1"][:2] == pytest.approx((5 / 7, 5 / 6))
    # bigrams "the cat", "on the", "the mat" of 5 and 6
    assert scores["rouge2"][:2] == pytest.approx((3 / 6, 3 / 5))
    # LCS "the cat on the mat"
    assert scores["rougeL"][:2] == pytest.approx((5 / 7, 5 / 6))
    assert scores["rougeL"].fmeasure == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))


def test_clipping_counts_a_repeated_word_once_per_reference_occurrence():
    score = rouge.RougeScorer(["rouge1"]).score("the cat", "the the the")["rouge1"]
    assert (score.precision, score.recall) == (1 / 3, 1 / 2)


def test_stemming_changes_the_score():
    target, prediction = "the dogs jumped", "the dog jumps"
    plain = rouge.RougeScorer(["rouge1"]).score(target, prediction)["rouge1"]
    stemmed = rouge.RougeScorer(["rouge1"], use_stemmer=True).score(target, prediction)["rouge1"]
    assert plain.recall == 1 / 3 and stemmed.recall == 1.0     # "dogs"/"dog": 3 letters are not stemmed


def test_rougeL_ignores_newlines_but_rougeLsum_uses_them():
    scorer = rouge.RougeScorer(["rougeL", "rougeLsum"])
    one_line = scorer.score("a b c d", "c d a b")
    assert one_line["rougeL"] == one_line["rougeLsum"]          # no newline: Lsum is L
    split = scorer.score("a b\nc d", "c d\na b")
    assert split["rougeL"].recall == 1 / 2 and split["rougeLsum"].recall == 1.0


# ------------------------------------------------------------------------------------------------
# ROUGE-W, ROUGE-S, ROUGE-SU, worked by hand (Lin 2004; ROUGE-1.5.5.pl)
# ------------------------------------------------------------------------------------------------
X, Y1, Y2 = "a b c d e f g", "a b c d h i k", "a h b k c i d"


def test_wlcs_table_value_is_lins_example():
    # Lin 2004, section 4, with f(k) = k^2: one run of 4 scores 16, four runs of 1 score 4
    assert rouge.wlcs(X.split(), Y1.split(), weight=2) == 16
    assert rouge.wlcs(X.split(), Y2.split(), weight=2) == 4
    assert rouge.lcs_length(X.split(), Y1.split()) == rouge.lcs_length(X.split(), Y2.split()) == 4


def test_rougeW_by_hand_with_weight_2():
    scorer = rouge.RougeScorer(["rougeW-2"])
    # reference Y2 "a h b k c i d", prediction X: the path marks reference words 0, 2, 4, 6, four
    # runs of 1: hit = 4 * 1^2 = 4; reference base f(f(7)) = 49^2 = 2401 (ROUGE-1.5.5 weights the
    # reference length twice); prediction base f(7) = 49.  R = sqrt(4/2401) = 2/49, P = sqrt(4/49) = 2/7
    s = scorer.score(Y2, X)["rougeW-2"]
    assert s.recall == pytest.approx(2 / 49) and s.precision == pytest.approx(2 / 7)
    # reference Y1, prediction X: one run "a b c d": hit = 16; R = 4/49, P = 4/7, F = 1/7
    s = scorer.score(Y1, X)["rougeW-2"]
    assert (s.recall, s.precision, s.fmeasure) == pytest.approx((4 / 49, 4 / 7, 1 / 7))
    # reference X, prediction Y2: ROUGE-1.5.5 counts runs along the reference only, so "a b c d",
    # consecutive in X but scattered in Y2, is one run of 4, just as for Y1
    assert scorer.score(X, Y2)["rougeW-2"] == pytest.approx(scorer.score(X, Y1)["rougeW-2"])


def test_rougeW_default_weight_on_identical_text():
    # hit = f(7) = 7^1.2, recall base f(f(7)) = 7^1.44: R = (7^1.2 / 7^1.44)^(1/1.2) = 7^-0.2; P = 1
    s = rouge.RougeScorer(["rougeW"]).score(X, X)["rougeW"]
    assert s.recall == pytest.approx(7 ** -0.2) and s.precision == pytest.approx(1.0)


def test_rougeW_two_sentences_by_hand():
    # reference sentences "a b" and "c"; prediction "a b c" (one sentence), weight 2.
    # "a b" is one run (f = 4), "c" one run (f = 1): hit = 5; base f(f(2) + f(1)) = 5^2 = 25;
    # prediction base f(3) = 9.  R = sqrt(5/25), P = sqrt(5/9)
    s = rouge.RougeScorer(["rougeW-2"]).score("a b\nc", "a b c")["rougeW-2"]
    assert s.recall == pytest.approx((5 / 25) ** 0.5) and s.precision == pytest.approx((5 / 9) ** 0.5)


S1, S2, S3, S4, S5 = ("police killed the gunman", "police kill the gunman", "the gunman kill police",
                      "the gunman police killed", "gunman the killed police")


def test_rougeS_lins_examples():
    # Lin 2004, section 5: S1 has C(4,2) = 6 skip-bigrams; S2 shares 3 ("police the", "police
    # gunman", "the gunman"), S3 shares 1 ("the gunman"), S4 shares 2 ("police killed", "the gunman")
    scorer = rouge.RougeScorer(["rougeS"])
    for prediction, hits in ((S2, 3), (S3, 1), (S4, 2)):
        s = scorer.score(S1, prediction)["rougeS"]
        assert s.recall == s.precision == s.fmeasure == pytest.approx(hits / 6)


def test_rougeSU_counts_unigrams_as_rouge_155_does():
    # S5 reverses S1: no skip-bigram in common. ROUGE-1.5.5 adds unigrams for every word but the
    # last: S1 gives {police, killed, the} + 6 pairs = 9 units, S5 {gunman, the, killed} + 6 = 9;
    # shared: "killed", "the". R = P = 2/9
    s = rouge.RougeScorer(["rougeSU"]).score(S1, S5)["rougeSU"]
    assert s.recall == s.precision == pytest.approx(2 / 9)
    assert rouge.RougeScorer(["rougeS"]).score(S1, S5)["rougeS"].recall == 0


def test_rouge_s_gap_limit():
    # at most 1 word between: "a b c d" -> ab ac bc bd cd (5), not ad
    assert set(rouge.skip_bigram_counts("a b c d".split(), max_gap=1)) == {
        ("a", "b"), ("a", "c"), ("b", "c"), ("b", "d"), ("c", "d")}
    s = rouge.RougeScorer(["rougeS1", "rougeSU1"]).score("a b c d", "a x d b")
    # prediction pairs (gap <= 1): ax ad xd xb db -> shares none with ab ac bc bd cd
    assert s["rougeS1"].recall == 0
    # with unigrams a b c | a x d: shared a -> R = 1/(5+3), P = 1/(5+3)
    assert s["rougeSU1"].recall == s["rougeSU1"].precision == pytest.approx(1 / 8)


# Golden values printed by Lin's ROUGE-1.5.5.pl itself (sentence per line, no stemming, one
# reference), with `-a -z SPL -x -n 1 -w 1.2 -2 -1 -U -d` for rougeW, rougeS*, rougeSU* and `-2 4`
# for rougeS4, rougeSU4. It prints R and P rounded to 5 decimals and F from the rounded values.
ROUGE_155_GOLDEN = [
    ('a e d\nc b on b mat\na a b d d on mat a', 'on cat d sat mat\na c cat the e c\nthe b b cat b',
     {"rougeW": (0.31509, 0.44825, 0.37006), "rougeS": (0.23333, 0.23333, 0.23333), "rougeSU": (0.26667, 0.26667, 0.26667), "rougeS4": (0.23077, 0.23077, 0.23077), "rougeSU4": (0.28750, 0.28750, 0.28750)}),
    ('mat e a sat on b cat\non e mat', 'b a d e b\nb cat e sat the',
     {"rougeW": (0.23958, 0.33703, 0.28007), "rougeS": (0.24444, 0.24444, 0.24444), "rougeSU": (0.31481, 0.31481, 0.31481), "rougeS4": (0.22857, 0.22857, 0.22857), "rougeSU4": (0.31818, 0.31818, 0.31818)}),
    ('the d e b mat c on', 'c sat cat e on\nthe a d a the\ne b d mat the d sat cat',
     {"rougeW": (0.54180, 0.31095, 0.39513), "rougeS": (0.57143, 0.07843, 0.13793), "rougeSU": (0.66667, 0.10588, 0.18274), "rougeS4": (0.60000, 0.16000, 0.25263), "rougeSU4": (0.69231, 0.19565, 0.30508)}),
    ('c e c d on on e mat cat\nthe d c on sat b a b\nc cat mat b', 'mat sat on e on a b on\nthe b e cat c sat',
     {"rougeW": (0.26133, 0.58558, 0.36138), "rougeS": (0.30952, 0.71429, 0.43189), "rougeSU": (0.33913, 0.75000, 0.46707), "rougeS4": (0.33333, 0.54545, 0.41379), "rougeSU4": (0.39091, 0.63235, 0.48315)}),
    ('on c on b e on', 'c the c on on\nmat the\na b the e d a d mat b',
     {"rougeW": (0.58236, 0.31250, 0.40674), "rougeS": (0.66667, 0.08333, 0.14814), "rougeSU": (0.75000, 0.11111, 0.19355), "rougeS4": (0.40000, 0.09231, 0.15000), "rougeSU4": (0.55000, 0.13750, 0.22000)}),
    ('b on c c sat on c e on', 'd on d e cat the sat on\nb d d b the a mat on d\na b a d b',
     {"rougeW": (0.24131, 0.15320, 0.18742), "rougeS": (0.27778, 0.04329, 0.07491), "rougeSU": (0.34091, 0.05952, 0.10135), "rougeS4": (0.16667, 0.05263, 0.08000), "rougeSU4": (0.26316, 0.08621, 0.12987)}),
    ('b on d e sat d on', 'd sat cat d b b cat the cat',
     {"rougeW": (0.26163, 0.30031, 0.27964), "rougeS": (0.14286, 0.08333, 0.10526), "rougeSU": (0.25926, 0.15909, 0.19718), "rougeS4": (0.15000, 0.10000, 0.12000), "rougeSU4": (0.26923, 0.18421, 0.21875)}),
    ('a b a cat the b d d d\nc cat c e sat d b sat on', 'on a',
     {"rougeW": (0.06379, 0.89090, 0.11906), "rougeS": (0.00000, 0.00000, 0.00000), "rougeSU": (0.00000, 0.00000, 0.00000), "rougeS4": (0.00000, 0.00000, 0.00000), "rougeSU4": (0.00000, 0.00000, 0.00000)}),
    ('c cat sat sat d', 'c cat\ncat e',
     {"rougeW": (0.28991, 0.50000, 0.36702), "rougeS": (0.10000, 0.16667, 0.12500), "rougeSU": (0.21429, 0.33333, 0.26087), "rougeS4": (0.10000, 0.16667, 0.12500), "rougeSU4": (0.21429, 0.33333, 0.26087)}),
    ('cat on sat c d e\na mat on a the', 'mat sat',
     {"rougeW": (0.11507, 0.89090, 0.20381), "rougeS": (0.00000, 0.00000, 0.00000), "rougeSU": (0.01538, 0.50000, 0.02984), "rougeS4": (0.00000, 0.00000, 0.00000), "rougeSU4": (0.02000, 0.50000, 0.03846)}),
    ('police killed the gunman', 'the gunman police killed',
     {"rougeW": (0.37893, 0.50000, 0.43113), "rougeS": (0.33333, 0.33333, 0.33333), "rougeSU": (0.44444, 0.44444, 0.44444), "rougeS4": (0.33333, 0.33333, 0.33333), "rougeSU4": (0.44444, 0.44444, 0.44444)}),
    ('a b c d e f g', 'a h b k c i d',
     {"rougeW": (0.38721, 0.57143, 0.46162), "rougeS": (0.28571, 0.28571, 0.28571), "rougeSU": (0.33333, 0.33333, 0.33333), "rougeS4": (0.25000, 0.25000, 0.25000), "rougeSU4": (0.30769, 0.30769, 0.30769)}),
]


@pytest.mark.parametrize("target, prediction, expected", ROUGE_155_GOLDEN)
def test_rougeW_S_SU_match_rouge_155_golden_values(target, prediction, expected):
    scores = rouge.RougeScorer(list(expected)).score(target, prediction)
    for name, (recall, precision, f) in expected.items():
        assert scores[name].recall == pytest.approx(recall, abs=5e-6)
        assert scores[name].precision == pytest.approx(precision, abs=5e-6)
        assert scores[name].fmeasure == pytest.approx(f, abs=2e-5)


def test_rougeS0_is_rouge2():
    scorer = rouge.RougeScorer(["rougeS0", "rouge2"])
    for target, prediction in generated_pairs(seed=6, n=60):
        s = scorer.score(target, prediction)
        assert s["rougeS0"] == pytest.approx(s["rouge2"])


# ------------------------------------------------------------------------------------------------
# Tokenizers and the sentence splitter
# ------------------------------------------------------------------------------------------------
def test_unicode_tokenizer_scores_non_english_text():
    default = rouge.RougeScorer(["rouge1"])
    unicode_scorer = rouge.RougeScorer(["rouge1"], tokenizer=rouge.UnicodeTokenizer())
    # Chinese: one token per character; 我 是 人 all appear in the 5-character reference
    assert default.score("我是一個人", "我是人")["rouge1"].fmeasure == 0
    s = unicode_scorer.score("我是一個人", "我是人")["rouge1"]
    assert (s.precision, s.recall) == (1.0, 3 / 5)
    # German: NFKC + case folding, "Straße" = "STRASSE"; rouge-score would see "stra" and "e"
    assert rouge.UnicodeTokenizer().tokenize("Die STRASSE, die Straße!") == ["die", "strasse", "die", "strasse"]
    assert rouge.UnicodeTokenizer().tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]   # vowel signs stay


def test_unicode_tokenizer_equals_default_on_ascii_text():
    for use_stemmer in (False, True):
        ours, default = rouge.UnicodeTokenizer(use_stemmer), rouge.DefaultTokenizer(use_stemmer)
        for pair in generated_pairs(seed=7, n=40):
            for text in pair:
                text = text.encode("ascii", "ignore").decode()
                assert ours.tokenize(text) == default.tokenize(text)


def test_sentence_splitter_rules():
    text = ('Dr. Smith met J. K. Rowling in Washington. She said "hello." Was it 3.14? Yes... and no... '
            'Really! e.g. this stays one sentence.')
    assert rouge.split_sentences(text) == [
        "Dr. Smith met J. K. Rowling in Washington.", 'She said "hello."', "Was it 3.14?",
        "Yes... and no...", "Really!", "e.g. this stays one sentence."]
    assert rouge.split_sentences("") == [] and rouge.split_sentences("no end") == ["no end"]
    assert rouge.split_sentences("Line one\nline two. Three") == ["Line one\nline two.", "Three"]


def test_split_summaries_equals_newline_separated_sentences():
    target, prediction = "The cat sat. The dog ran away! Birds sing.", "The dog sat. Birds ran away."
    split = rouge.RougeScorer(["rougeLsum"], split_summaries=True).score(target, prediction)
    lines = rouge.RougeScorer(["rougeLsum"]).score(
        "\n".join(rouge.split_sentences(target)), "\n".join(rouge.split_sentences(prediction)))
    assert split == lines and split["rougeLsum"] != rouge.RougeScorer(["rougeLsum"]).score(target, prediction)


# ------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# ------------------------------------------------------------------------------------------------
def collect_scores(n=80, seed=8):
    scorer = rouge.RougeScorer(["rouge1", "rougeL"])
    return [scorer.score(t, p) for t, p in generated_pairs(seed, n)]


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    all_scores = collect_scores()
    aggregator = rouge.BootstrapAggregator(seed=3)
    for scores in all_scores:
        aggregator.add_scores(scores)
    result = aggregator.aggregate()
    for name in ("rouge1", "rougeL"):
        mean = np.mean([s[name] for s in all_scores], axis=0)
        low, mid, high = result[name]
        for k in range(3):
            assert low[k] <= mean[k] <= high[k] and low[k] < high[k]
            assert abs(mid[k] - mean[k]) < 0.02              # mid: the median of the resampled means
    assert aggregator.aggregate() == result                    # same seed, same interval
    other = rouge.BootstrapAggregator(seed=4)
    for scores in all_scores:
        other.add_scores(scores)
    assert other.aggregate() != result


def test_bootstrap_equals_rouge_score_with_the_same_numpy_seed():
    all_scores = collect_scores(n=40, seed=9)
    ours = rouge.BootstrapAggregator(seed=5)
    theirs = scoring.BootstrapAggregator()
    for scores in all_scores:
        ours.add_scores(scores)
        theirs.add_scores(scores)
    np.random.seed(5)
    expected = theirs.aggregate()
    for name, agg in ours.aggregate().items():
        for part in range(3):
            assert np.allclose(agg[part], expected[name][part], rtol=0, atol=1e-12)


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ValueError, match="confidence_interval"):
        rouge.BootstrapAggregator(confidence_interval=1.5)
    with pytest.raises(ValueError, match="n_samples"):
        rouge.BootstrapAggregator(n_samples=0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_non_string_input_is_a_clear_type_error():
    scorer = rouge.RougeScorer(["rouge1"])
    with pytest.raises(TypeError, match="prediction must be a str, got NoneType"):
        scorer.score("a b", None)
    with pytest.raises(TypeError, match="target must be a str, got list"):
        scorer.score(["a b"], "a")
    with pytest.raises(TypeError, match="targets must be a list of str, got str"):
        scorer.score_multi("a b", "a")
    with pytest.raises(ValueError, match="at least one reference"):
        scorer.score_multi([], "a")
    with pytest.raises(TypeError, match="rouge_types must be a list"):
        rouge.RougeScorer("rouge1")
    with pytest.raises(TypeError, match="tokenize"):
        rouge.RougeScorer(["rouge1"], tokenizer=str)


@pytest.mark.parametrize("name", ["rougeX", "rouge0", "rouge10", "rougel", "rougeW-0.5", "rougeS-1"])
def test_unknown_rouge_type_is_rejected_with_the_valid_names(name):
    with pytest.raises(ValueError, match="rouge1 .. rouge9|weight must be > 1"):
        rouge.RougeScorer(["rouge1", name])


# ------------------------------------------------------------------------------------------------
# Command line and demo
# ------------------------------------------------------------------------------------------------
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_cli_scores_files_and_writes_json(tmp_path, capsys):
    pairs = generated_pairs(seed=11, n=30)
    escape = lambda text: text.replace("\n", "\\n")                       # noqa: E731
    refs = write_lines(tmp_path / "refs.txt", [escape(t) for t, _ in pairs])
    preds = write_lines(tmp_path / "preds.txt", [escape(p) for _, p in pairs])
    out = tmp_path / "out" / "scores.json"
    rouge.main(["--references", refs, "--predictions", preds, "--stem", "--tiny", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| rougeLsum |" in table and "over 30 examples" in table
    data = json.loads(out.read_text())
    assert data["n_examples"] == 30 and data["config"]["n_samples"] == 100
    reference = rouge_scorer.RougeScorer(list(rouge.DEFAULT_TYPES), use_stemmer=True)
    for (target, prediction), row in zip(pairs, data["per_example"]):
        expected = reference.score(target, prediction)                # "\n" escapes become breaks
        for name in rouge.DEFAULT_TYPES:
            assert row[name]["fmeasure"] == pytest.approx(expected[name].fmeasure, abs=1e-9)
    for name, agg in data["aggregate"].items():
        assert agg["low"]["fmeasure"] <= agg["mid"]["fmeasure"] <= agg["high"]["fmeasure"]


def test_cli_takes_the_best_of_several_reference_files(tmp_path, capsys):
    refs1 = write_lines(tmp_path / "r1.txt", ["the cat sat", "a b c"])
    refs2 = write_lines(tmp_path / "r2.txt", ["the dog ran", "x y z"])
    preds = write_lines(tmp_path / "p.txt", ["the dog ran", "a b c"])
    result = rouge.main(["--references", refs1, refs2, "--predictions", preds, "--types", "rouge1", "--tiny"])
    assert result["rouge1"].mid.fmeasure == 1.0


def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        rouge.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    refs = write_lines(tmp_path / "refs.txt", ["a b", "c d", "e f"])
    preds = write_lines(tmp_path / "preds.txt", ["a b", "c d"])
    err = cli_error(capsys, ["--references", refs, "--predictions", preds])
    assert f"rouge.py: error: line counts differ: {preds} has 2 lines but {refs} has 3" in err
    err = cli_error(capsys, ["--references", str(tmp_path / "missing.txt"), "--predictions", preds])
    assert "rouge.py: error: no such file" in err and "missing.txt" in err
    err = cli_error(capsys, ["--references", preds, "--predictions", preds, "--types", "rougeQ"])
    assert "unknown ROUGE type 'rougeQ'" in err
    err = cli_error(capsys, ["--predictions", preds])
    assert "--references and --predictions go together" in err
    empty = write_lines(tmp_path / "empty.txt", [])
    assert "no examples" in cli_error(capsys, ["--references", empty, "--predictions", empty])


def test_demo_walks_through_the_worked_example(capsys):
    rouge.main([])
    out = capsys.readouterr().out
    assert "  the                ref 2  pred 2  -> 2" in out and "  on the             ref 1  pred 1  -> 1" in out
    assert "R = hits / reference 1-grams  = 5/6 = 0.8333" in out
    assert "LCS (* above) = 'the cat on the mat', length 5" in out
    assert "WLCS with f(k)=k^2: 16" in out and "WLCS with f(k)=k^2: 4" in out


# ------------------------------------------------------------------------------------------------
# Drop-in: rouge-score's own test files, run unchanged on rouge.py through a module that renames
# ------------------------------------------------------------------------------------------------
RS_PACKAGE = Path(rouge_scorer.__file__).parent        # the installed rouge_score, tests included

# rouge-score's tests read testdata/ files that its package does not ship. The shim's test_util
# points at stand-ins of the same shape (two records per line file, four ":"-delimited records), so
# that the tests that only need some text run; the tests that compare with ROUGE-1.5.5 numbers
# computed from the real files are skipped. Point ROUGE_SCORE_TESTDATA at a copy of rouge-score's
# testdata/ folder (from its source repository) and every file found there replaces its stand-in
# and un-skips the tests that need it.
RS_TESTDATA = os.environ.get("ROUGE_SCORE_TESTDATA")
NEEDS_REAL_DATA = "compares with ROUGE-1.5.5 numbers computed from testdata/{}, which rouge-score does not ship"
SKIPPED = {                                             # test -> the real file it needs
    "rouge_scorer_test": {
        **{name: "target.txt" for name in (
            "testRouge1AgainstRouge155", "testRouge1AgainstRouge155WithStemming",
            "testRouge2AgainstRouge155", "testRouge2AgainstRouge155WithStemming",
            "testRougeLAgainstRouge155")},
        "testRougeLSumAgainstRouge155WithStemming": "pyrouge_files/target_multi.0.txt",
        "testRougeLsumLarge": "target_large.txt"},
    "scoring_test": {
        "testConfidenceIntervalsAgainstRouge155": "target_large.txt",
        "testConfidenceIntervalsAgainstRouge155WithStemming": "target_large.txt",
        "testConfidenceIntervalsAgainstRouge155WithStemmingMultiLine": "pyrouge_files/target_multi.249.txt"},
    "io_test": {"testAssertsOnInvalidRougeTypes": None},
    "tokenize_test": {},
    "tokenizers_test": {},
}
BY_DESIGN = ("rouge.py rejects 'rougex' when the scorer is built, a line before the test's "
             "assertRaises (rouge-score fails at the first score); it also reads testdata/target.txt")


def has_real(relative):
    return RS_TESTDATA is not None and relative is not None and (Path(RS_TESTDATA) / relative).is_file()


def skip_reason(test_file, test_name):
    if test_name not in SKIPPED[test_file]:
        return None
    needed = SKIPPED[test_file][test_name]
    if needed is None:
        return BY_DESIGN
    return None if has_real(needed) else NEEDS_REAL_DATA.format(needed)


def standin_test_util(folder):
    """rouge_score.test_util with its data paths pointing at the real files where
    ROUGE_SCORE_TESTDATA has them, and at stand-in files in folder otherwise."""
    import types
    lines = ["The quick brown fox jumps over the lazy dog.", "Police killed the gunman on Tuesday."]
    edited = ["A quick brown dog jumped over the fox.", "The gunman was shot by police."]
    standins = {"target.txt": lines, "prediction.txt": edited,
                "target_large.txt": lines * 3, "prediction_large.txt": edited * 3}
    module = types.ModuleType("rouge_score.test_util")
    paths = {}
    for name, records in standins.items():
        paths[name] = Path(RS_TESTDATA) / name if has_real(name) else folder / name
        if not has_real(name):
            paths[name].write_text("".join(r + "\n" for r in records))
    paths["delimited.txt"] = Path(RS_TESTDATA) / "delimited.txt" if has_real("delimited.txt") else folder / "delimited.txt"
    if not has_real("delimited.txt"):
        paths["delimited.txt"].write_text("one record:two\nlines:three:four:")
    module.TARGETS_FILE, module.PREDICTIONS_FILE = str(paths["target.txt"]), str(paths["prediction.txt"])
    module.LARGE_TARGETS_FILE = str(paths["target_large.txt"])
    module.LARGE_PREDICTIONS_FILE = str(paths["prediction_large.txt"])
    module.DELIMITED_FILE = str(paths["delimited.txt"])
    module.PYROUGE_DIR = str(Path(RS_TESTDATA or folder) / "pyrouge_files")
    module.get_text = lambda path: Path(path).read_text()
    return module


def renaming_shim(folder):
    """{module name: module} for a fake rouge_score package whose names are rouge.py's objects."""
    import types
    names = {
        "rouge_scorer": {"RougeScorer": rouge.RougeScorer, "_lcs_table": rouge.lcs_table,
                         "_backtrack_norec": rouge.lcs_path, "lcs_ind": rouge.lcs_indices,
                         "_find_union": rouge.find_union, "_union_lcs": rouge.union_lcs_words,
                         "_summary_level_lcs": rouge.summary_level_lcs, "_score_lcs": rouge.score_lcs},
        "scoring": {"Score": rouge.Score, "AggregateScore": rouge.AggregateScore,
                    "BootstrapAggregator": rouge.BootstrapAggregator, "fmeasure": rouge.fmeasure},
        "tokenize": {"tokenize": rouge.tokenize},
        "tokenizers": {"Tokenizer": rouge.Tokenizer, "DefaultTokenizer": rouge.DefaultTokenizer},
        "io": {"compute_scores_and_write_to_csv": rouge.compute_scores_and_write_to_csv},
    }
    package = types.ModuleType("rouge_score")
    package.__path__ = []
    modules = {"rouge_score": package, "rouge_score.test_util": standin_test_util(folder)}
    for name, attributes in names.items():
        module = types.ModuleType(f"rouge_score.{name}")
        module.__dict__.update(attributes)
        modules[f"rouge_score.{name}"] = module
    for full_name, module in modules.items():
        if full_name != "rouge_score":
            setattr(package, full_name.split(".")[1], module)
    return modules


@pytest.mark.parametrize("test_file", sorted(SKIPPED))
def test_rouge_scores_own_tests_pass_on_rouge_py(test_file, tmp_path, monkeypatch):
    import importlib.util
    import io as std_io
    import sys
    import unittest
    pytest.importorskip("absl.testing.absltest")
    for name, module in renaming_shim(tmp_path).items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(f"rouge_score_{test_file}", RS_PACKAGE / f"{test_file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)                             # its imports resolve to the shim
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    expected_skips = set()
    for case in (c for group in suite for c in group):
        reason = skip_reason(test_file, case._testMethodName)
        if reason:
            setattr(case, case._testMethodName, unittest.skip(reason)(getattr(case, case._testMethodName)))
            expected_skips.add(case._testMethodName)
    result = unittest.TextTestRunner(stream=std_io.StringIO(), verbosity=0).run(suite)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors]
    assert not problems, "\n".join(problems)
    assert {test._testMethodName for test, _ in result.skipped} == expected_skips
    assert result.testsRun > len(result.skipped)


# ------------------------------------------------------------------------------------------------
# rouge-score's io and command line: the same CSV bytes
# ------------------------------------------------------------------------------------------------
def write_corpus(folder, pairs_per_file=(7, 5), delimiter="\n", seed=20):
    """Target and prediction files (two of each, paired by sorted name), as rouge-score reads them."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(pairs_per_file):
        pairs = generated_pairs(seed=rng.randrange(1000), n=n)
        clean = lambda text: text.replace(delimiter, " ")                # noqa: E731  one record each
        (folder / f"part{k}.targets").write_text("".join(clean(t) + delimiter for t, _ in pairs))
        (folder / f"part{k}.decodes").write_text("".join(clean(p) + delimiter for _, p in pairs))
    return str(folder / "*.targets"), str(folder / "*.decodes")


@pytest.mark.parametrize("aggregate", [True, False])
@pytest.mark.parametrize("delimiter", ["\n", ":"])
def test_csv_is_byte_identical_to_rouge_scores(tmp_path, aggregate, delimiter):
    from rouge_score import io as rs_io
    targets, predictions = write_corpus(tmp_path / "data", delimiter=delimiter)
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    rouge.compute_scores_and_write_to_csv(
        targets, predictions, str(ours), rouge.RougeScorer(types, use_stemmer=True),
        rouge.BootstrapAggregator(n_samples=200, seed=3) if aggregate else None, delimiter=delimiter)
    np.random.seed(3)                   # rouge-score's aggregator draws from numpy's global RNG
    rs_io.compute_scores_and_write_to_csv(
        targets, predictions, str(theirs), rouge_scorer.RougeScorer(types, use_stemmer=True),
        scoring.BootstrapAggregator(n_samples=200) if aggregate else None, delimiter=delimiter)
    assert ours.read_text() == theirs.read_text()
    assert ours.read_text().count("\n") == (1 + 3 * len(types) if aggregate else 1 + 12)


def test_command_line_of_rouge_score_runs_as_a_script(tmp_path):
    """`python rouge.py --target_filepattern ...` writes the CSV rouge-score's function writes with
    the same flags; the absl spellings --use_stemmer=true and --noaggregate work too."""
    import subprocess
    import sys
    from rouge_score import io as rs_io
    targets, predictions = write_corpus(tmp_path / "data")
    out = tmp_path / "out.csv"
    root = Path(rouge.__file__).resolve().parent
    subprocess.run([sys.executable, str(root / "rouge.py"), "--target_filepattern", targets,
                    "--prediction_filepattern", predictions, "--output_filename", str(out),
                    "--use_stemmer", "--rouge_types", "rouge1,rougeLsum", "--samples", "100", "--seed", "4"],
                   check=True, capture_output=True, cwd=tmp_path)
    np.random.seed(4)
    rs_io.compute_scores_and_write_to_csv(targets, predictions, str(tmp_path / "theirs.csv"),
                                          rouge_scorer.RougeScorer(["rouge1", "rougeLsum"], use_stemmer=True),
                                          scoring.BootstrapAggregator(n_samples=100))
    assert out.read_text() == (tmp_path / "theirs.csv").read_text()
    per_example = tmp_path / "per_example.csv"
    scores = rouge.main(["--target_filepattern", targets, "--prediction_filepattern", predictions,
                         "--output_filename", str(per_example), "--use_stemmer=false", "--noaggregate"])
    assert len(scores) == 12 and per_example.read_text().startswith("id,rouge1-P,rouge1-R,rouge1-F,rouge2-P")
    assert scores[0] == rouge.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(
        *(Path(sorted(Path(tmp_path / "data").glob(f"*.{kind}"))[0]).read_text().split("\n")[0]
          for kind in ("targets", "decodes")))


def test_split_summaries_flag_reaches_the_scorer(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("First sentence. Second sentence.\n")
    (tmp_path / "p.txt").write_text("Second sentence. First sentence.\n")
    common = ["--target_filepattern", str(tmp_path / "t.txt"), "--prediction_filepattern",
              str(tmp_path / "p.txt"), "--rouge_types", "rougeLsum", "--noaggregate"]
    split = rouge.main(common + ["--output_filename", str(tmp_path / "a.csv"), "--split_summaries"])
    plain = rouge.main(common + ["--output_filename", str(tmp_path / "b.csv")])
    assert split[0]["rougeLsum"].fmeasure == 1.0 and plain[0]["rougeLsum"].fmeasure == 0.5


def test_tokenizer_base_class_is_the_contract(tmp_path):
    class Words(rouge.Tokenizer):
        def tokenize(self, text):
            return text.split()

    assert isinstance(rouge.DefaultTokenizer(), rouge.Tokenizer)
    assert isinstance(rouge.UnicodeTokenizer(), rouge.Tokenizer)
    scorer = rouge.RougeScorer(["rouge1"], tokenizer=Words())
    assert scorer.score("Cat sat", "cat sat")["rouge1"].fmeasure == 0.5          # case kept
    with pytest.raises(TypeError):
        type("NoTokenize", (rouge.Tokenizer,), {})()                            # abstract method


def test_file_pattern_errors_are_clear(tmp_path, capsys):
    targets, predictions = write_corpus(tmp_path / "data")
    out = str(tmp_path / "out.csv")
    err = cli_error(capsys, ["--target_filepattern", str(tmp_path / "nothing*"),
                             "--prediction_filepattern", predictions, "--output_filename", out])
    assert "no target files match" in err and "nothing*" in err
    err = cli_error(capsys, ["--target_filepattern", targets, "--prediction_filepattern",
                             str(tmp_path / "data" / "part0.decodes"), "--output_filename", out])
    assert "2 target files match" in err and "1 prediction files match" in err
    (tmp_path / "data" / "part1.decodes").write_text("one record\n")
    err = cli_error(capsys, ["--target_filepattern", targets, "--prediction_filepattern", predictions,
                             "--output_filename", out])
    assert "record counts differ" in err and "part1.targets has 5" in err and "part1.decodes has 1" in err
    err = cli_error(capsys, ["--target_filepattern", targets, "--output_filename", out])
    assert "missing --prediction_filepattern" in err
    err = cli_error(capsys, ["--target_filepattern", targets, "--prediction_filepattern", predictions,
                             "--output_filename", out, "--references", targets])
    assert "not both" in err
    err = cli_error(capsys, ["--target_filepattern", targets, "--prediction_filepattern", predictions,
                             "--output_filename", out, "--use_stemmer=maybe"])
    assert "expected true or false, got 'maybe'" in err
    assert not os.path.exists(out)

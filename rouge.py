"""ROUGE, the overlap metric for generated text (Lin, 2004), as a drop-in for Google's rouge-score.

ROUGE ("Recall-Oriented Understudy for Gisting Evaluation") scores a generated text, the
prediction, against a human reference, the target, by counting the words they share. Every variant
is a pair (recall R, precision P) over some unit of overlap, combined as F = 2 P R / (P + R):

    ROUGE-N    R = sum_g min(c_ref(g), c_pred(g)) / sum_g c_ref(g)     g: n-grams     (Lin 2004, eq. 1)
               P = the same numerator / sum_g c_pred(g)
               c(g): how often n-gram g occurs; the min clips the counts (Lin's Count_match), so
               a predicted n-gram matches at most as often as the reference has it
    ROUGE-L    R = LCS(ref, pred) / |ref|,  P = LCS(ref, pred) / |pred|               (section 3.1)
    ROUGE-Lsum R = sum_i |union_j LCS(ref_i, pred_j)| / |ref|, over sentences i, j    (section 3.2)
    ROUGE-W    LCS weighted by f(k) = k^1.2, so that consecutive matches count more   (section 4)
    ROUGE-S    overlap of skip-bigrams (ordered word pairs, optionally at most d apart) (section 5)
    ROUGE-SU   ROUGE-S plus unigrams                                                  (section 5.1)

Why recall first: ROUGE was built for the DUC summarisation evaluations, where every summary is cut
to a fixed length, so precision is pinned by the length limit and the open question is how much of
the reference's content a system recovered. Today papers report the F-measure.

What this file reproduces, to 1e-9 on any text (tests/test_rouge.py checks it against the library):
- rouge-score 0.1.2: `RougeScorer(rouge_types, use_stemmer, split_summaries, tokenizer)` with
  `.score` / `.score_multi`, `Score`, `BootstrapAggregator`, its tokenizer (lower-case, anything
  outside [a-z0-9] becomes a space) and nltk 3.10's Porter stemmer, rewritten here by hand; its
  `Tokenizer` base class for custom tokenizers; its io module's `compute_scores_and_write_to_csv`
  and its command line (`python rouge.py --target_filepattern ... --prediction_filepattern ...
  --output_filename ...`), byte for byte the same CSV. rouge-score's own test files pass on this
  file through a module that only renames (tests/test_rouge.py runs them).
- ROUGE-1.5.5.pl, Lin's Perl toolkit, for rougeW, rougeS and rougeSU (which rouge-score lacks),
  quirks included; each quirk is named at the line that reproduces it.

Memory grows linearly with text length: rougeL keeps one row of the LCS table, rougeLsum the rows
of one reference sentence against a bounded group of predicted sentences (rouge-score keeps the
whole table, (|a|+1)(|b|+1) cells, beyond reach at 1e5 words). The exception is rougeLsum on one
huge sentence (a long text without line breaks): about 3 sqrt(n) rows of n bits (checkpoints).

Conventions: the target (reference) comes first, the prediction second, as in rouge-score. Texts are
plain str; "\n" separates sentences for rougeLsum and rougeW. Scores are fractions in [0, 1].

Left out: ROUGE-1.5.5's stopword removal, length cut-offs, its WordNet exception list and averaging
over references (we take the best reference, as rouge-score does); rouge-score's nltk punkt
sentence splitter, which needs downloaded data: a documented rule-based splitter stands in.
"""
import abc
import argparse
import array
import collections
import glob
import json
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class RougeConfig:
    """Settings of one evaluation run (the CLI's flags)."""
    rouge_types: tuple = DEFAULT_TYPES
    use_stemmer: bool = False
    split_summaries: bool = False
    unicode: bool = False            # opt-in Unicode-aware tokenizer (default: rouge-score's ASCII one)
    n_samples: int = 1000            # bootstrap resamples, ROUGE-1.5.5's and rouge-score's default
    confidence_interval: float = 0.95
    seed: int = 0

    @classmethod
    def tiny(cls, **overrides: object) -> "RougeConfig":
        """Fewer resamples for tests: same numbers for scores, coarser intervals."""
        return cls(**{"n_samples": 100, **overrides})


class Score(NamedTuple):
    """precision, recall and F-measure of one prediction against one target (as rouge-score's)."""
    precision: float
    recall: float
    fmeasure: float


class AggregateScore(NamedTuple):
    """low / mid / high of a bootstrap confidence interval, each a Score."""
    low: Score
    mid: Score
    high: Score


def fmeasure(precision: float, recall: float) -> float:
    """F1 = 2 P R / (P + R), 0 when both are 0 (rouge-score's formula; ROUGE-1.5.5 with alpha=0.5)."""
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


ZERO = Score(0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------------
# ROUGE-N: clipped n-gram overlap (Lin 2004, section 2)
# ---------------------------------------------------------------------------------------------------
def ngram_counts(tokens: list[str], n: int) -> collections.Counter:
    """Counter of the n-grams of a token list: tuples, or the tokens themselves for n = 1."""
    return collections.Counter(tokens if n == 1 else zip(*(tokens[i:] for i in range(n))))


def score_ngrams(target_counts: collections.Counter, prediction_counts: collections.Counter) -> Score:
    """ROUGE-N from two n-gram Counters.

    Clipping: a predicted n-gram matches at most as often as the reference has it, so "the the the"
    against "the cat" earns one hit, not three: hits = sum_g min(c_ref(g), c_pred(g)).
    """
    hits = 0
    for gram, count in target_counts.items():
        hits += min(count, prediction_counts.get(gram, 0))
    # max(., 1): an empty side gives 0 rather than 0/0, as in rouge-score
    precision = hits / max(sum(prediction_counts.values()), 1)
    recall = hits / max(sum(target_counts.values()), 1)
    return Score(precision, recall, fmeasure(precision, recall))


# ---------------------------------------------------------------------------------------------------
# ROUGE-L: longest common subsequence (Lin 2004, section 3)
# ---------------------------------------------------------------------------------------------------
# A common subsequence keeps order but not adjacency: "the cat sat on the mat" and "the cat was
# sitting on the mat" share "the cat on the mat" (5 words) although "sat" != "sitting".
# Textbook dynamic programming fills a (|a|+1) x (|b|+1) table:
#     L[i][j] = L[i-1][j-1] + 1                 if a[i-1] == b[j-1]
#             = max(L[i-1][j], L[i][j-1])       otherwise
# rouge-score does exactly that in Python, O(|a| |b|) steps, and spends most of its time there. It
# also keeps the whole table, (|a|+1)(|b|+1) cells: 1e10 for two 1e5-word texts, and still 1.2 GiB
# as the bit rows below. So rougeL keeps one row (it needs only the length) and rougeLsum keeps
# rows only for one reference sentence against a bounded group of predicted sentences: memory
# grows linearly with the text.

def lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    """The full LCS dynamic-programming table (for teaching, the demo and the tests)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table


def lcs_path(table: list[list[int]], a: list[str], b: list[str]) -> list[int]:
    """Positions in a of the LCS read out of a full table by rouge-score's walk (_backtrack_norec):
    from (|a|, |b|), diagonal on a match, else left when L[i][j-1] > L[i-1][j], else up."""
    i, j, path = len(a), len(b), []
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            path.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return path[::-1]


# The faster way (Allison & Dix 1986; Hyyro 2004, "bit-parallel LCS"): along a row i the values
# L[i][0..n] never drop and rise by 0 or 1, so a row is fully described by n bits. Keep
# V with bit j = 0 where the row steps up (L[i][j+1] = L[i][j] + 1) and 1 where it stays flat.
# Then one integer expression moves from row i-1 to row i for all columns at once:
#     U = V & M[a_i]           M[x]: bit j set where b[j] == x; U: matches on flat stretches
#     V' = (V + U) | (V - U)   the carry of + runs from the first match of a flat stretch up to
#                              the step that ends it: that match becomes a step, the old step
#                              (at a larger j) becomes flat, so the row now rises at the match;
#                              | (V - U) keeps the rest of the stretch flat
# and L[i][j] = j - popcount(V_i & (2^j - 1)). Python's integers are arbitrarily long, so a row
# of any length is O(1) interpreter steps: O(|a|) steps instead of O(|a| |b|).

def match_masks(b: list[str], offset: int = 0, masks: dict[str, int] | None = None) -> dict[str, int]:
    """M[x] = bitmask of the positions j with b[j] == x (bits shifted up by offset)."""
    masks = {} if masks is None else masks
    for j, token in enumerate(b, offset):
        masks[token] = masks.get(token, 0) | (1 << j)
    return masks


def lcs_rows(a: list[str], masks: "dict[str, int] | PositionMasks", full: int, v: int | None = None) -> list[int]:
    """The bit rows V_0 .. V_|a| of the LCS table of a against the positions set in full
    (V_0 = v, all flat by default)."""
    v = full if v is None else v
    rows = [v]
    for token in a:
        u = v & masks.get(token, 0)
        # V' = (V + U) | (V - U); U is a subset of V, so V - U never borrows
        v = ((v + u) | (v - u)) & full
        rows.append(v)
    return rows


# Memory. Every mask M[x] is as long as b, so |b| bits per distinct word: 1e6 words of text with
# 20,000 distinct words would need 2.5 GB of masks alone. lcs_length therefore cuts b into strips of
# STRIP_BITS columns and runs the recurrence one strip at a time, top to bottom; the only thing a
# strip passes to the next is the carry out of its top bit in each row i, the carry that V + U
# would have pushed across the border. Per row and strip, with c_i the carry in:
#     s = V + U + c_i,   c_{i+1 for the next strip} = s >> width,   V' = (s | (V - U)) & full
# (V - U never borrows, so only + crosses strips). Memory: |a| carry bytes + one strip's masks.
STRIP_BITS = 1 << 14


def lcs_length(a: list[str], b: list[str]) -> int:
    """|LCS(a, b)|, bit-parallel, keeping one row: O(|a| + |b|) memory (equal to
    lcs_table(a, b)[-1][-1], which would need (|a|+1)(|b|+1) cells)."""
    if not a or not b:
        return 0
    if len(b) <= STRIP_BITS:                    # one strip, no carries: the plain recurrence
        masks, full = match_masks(b), (1 << len(b)) - 1
        v = full
        for token in a:
            u = v & masks.get(token, 0)
            v = ((v + u) | (v - u)) & full      # V' = (V + U) | (V - U)
        return len(b) - v.bit_count()
    carries, length = bytes(len(a)), 0          # no carry enters the lowest strip
    for start in range(0, len(b), STRIP_BITS):
        strip = b[start: start + STRIP_BITS]
        width, masks = len(strip), None         # drop the last strip's masks before building these
        masks, full = match_masks(strip), (1 << width) - 1
        v, carries_out = full, bytearray(len(a))
        for i, token in enumerate(a):
            u = v & masks.get(token, 0)
            s = v + u + carries[i]              # V + U with the carry from the strip below
            carries_out[i] = s >> width
            v = (s | (v - u)) & full
        carries, length = carries_out, length + width - v.bit_count()   # L = sum of strip steps
    return length


# rougeLsum needs the rows themselves (the backtracking below reads them), |a| + 1 of them. When
# they would exceed ROW_BUDGET_BITS (a reference sentence of thousands of words against as many
# predicted words), keep only every k-th row, k ~ sqrt(|a|), and recompute a block of k rows
# from its checkpoint when the backtracking walk reaches it: about 3 sqrt(|a|) rows instead of
# |a| + 1 (the checkpoints, plus the two blocks the walk is in: it only moves up), for one
# more forward pass.
ROW_BUDGET_BITS = 1 << 28                       # 32 MiB of rows


class CheckpointedRows:
    """rows[i] = V_i of lcs_rows(a, masks, full), with O(sqrt(|a|)) rows in memory."""

    def __init__(self, a: list[str], masks: "dict[str, int] | PositionMasks", full: int, block: int | None = None):
        self.a, self.masks, self.full = a, masks, full
        self.block = block or max(1, int(len(a) ** 0.5) + 1)
        self.checkpoints, v = [full], full      # checkpoints[k] = V_{k * block}
        for i, token in enumerate(a, 1):
            u = v & masks.get(token, 0)
            v = ((v + u) | (v - u)) & full
            if i % self.block == 0:
                self.checkpoints.append(v)
        self.cache = {}

    def __getitem__(self, i: int) -> int:
        k, offset = divmod(i, self.block)
        if k not in self.cache:
            for old in [old for old in self.cache if old > k + 1]:
                del self.cache[old]             # the walk never goes back down
            start = k * self.block
            self.cache[k] = lcs_rows(self.a[start: start + self.block], self.masks, self.full,
                                     self.checkpoints[k])
        return self.cache[k][offset]


# A sentence longer than a strip (a text without line breaks, scored by rougeLsum) needs whole
# rows, since the walk reads prefixes of them, but not all its masks at once: PositionMasks keeps
# each word's positions (4 bytes each) and builds M[x] when a row asks for x, caching masks up to
# MASK_CACHE_BITS. Building one costs |b| / 8 bytes of work, less than the row update it serves.
MASK_CACHE_BITS = 1 << 29                       # 64 MiB


class PositionMasks:
    """M[x] of a long sequence b, built on demand from the positions of x: O(|b|) memory instead
    of |b| bits per distinct word. Reads like the dict of match_masks (get, [])."""

    def __init__(self, b: list[str]):
        self.positions = {}
        for j, token in enumerate(b):
            if token not in self.positions:
                self.positions[token] = array.array("I")
            self.positions[token].append(j)
        self.n_bytes = (len(b) + 7) // 8
        self.cache, self.cached_bits = {}, 0

    def get(self, token: str, default: int = 0) -> int:
        mask = self.cache.get(token)
        if mask is None:
            if token not in self.positions:
                return default
            bits = bytearray(self.n_bytes)
            for j in self.positions[token]:
                bits[j >> 3] |= 1 << (j & 7)
            mask = int.from_bytes(bits, "little")          # bit j of byte j // 8 = position j
            if self.cached_bits + 8 * self.n_bytes > MASK_CACHE_BITS:
                self.cache, self.cached_bits = {}, 0        # full: start over (frequent words return)
            self.cache[token] = mask
            self.cached_bits += 8 * self.n_bytes
        return mask

    def __getitem__(self, token: str) -> int:
        return self.get(token)


def masks_of(b: list[str]) -> dict[str, int] | PositionMasks:
    """match_masks(b) for a sequence up to a strip long, PositionMasks(b) beyond."""
    return match_masks(b) if len(b) <= STRIP_BITS else PositionMasks(b)


def bit_rows(a: list[str], masks: dict[str, int] | PositionMasks, full: int) -> list[int] | CheckpointedRows:
    """All rows when they fit ROW_BUDGET_BITS, otherwise CheckpointedRows (same values)."""
    if (len(a) + 1) * full.bit_length() > ROW_BUDGET_BITS:
        return CheckpointedRows(a, masks, full)
    return lcs_rows(a, masks, full)


def backtrack(a: list[str], b: list[str], rows: list[int] | CheckpointedRows, masks: dict[str, int] | PositionMasks,
              offset: int = 0) -> list[int]:
    """Positions in a of the LCS that rouge-score's _backtrack_norec reads out of the table.

    rouge-score walks back from (|a|, |b|): diagonal when a[i-1] == b[j-1]; else left when
    L[i][j-1] > L[i-1][j]; else up (ties go up). We walk the same path with L read from the bit
    rows of b (which sit at bit `offset` of rows and masks). Two shortcuts:
    - off the diagonal L[i][j] = max(up, left), so "left wins" is "up is smaller than L[i][j]":
      one popcount a step;
    - once the path turns left on row i it keeps going left (L[i-1][.] only shrinks leftwards)
      until b[j-1] == a[i-1], so jump straight to that column: the highest set bit of M[a[i-1]].
    """
    i, j = len(a), len(b)
    here = j - ((rows[i] >> offset) & ((1 << j) - 1)).bit_count()         # L[|a|][|b|]
    path = []
    while here:                                 # L = 0: no match is left above and to the left
        if a[i - 1] != b[j - 1]:
            if j - ((rows[i - 1] >> offset) & ((1 << j) - 1)).bit_count() == here:
                i -= 1                          # up: L[i-1][j] == L[i][j]
                continue
            # left, to the nearest column j with b[j-1] == a[i-1]
            j = ((masks[a[i - 1]] >> offset) & ((1 << (j - 1)) - 1)).bit_length()
        path.append(i - 1)                      # diagonal: a[i-1] == b[j-1] is on the LCS
        i, j, here = i - 1, j - 1, here - 1
    path.reverse()
    return path


def lcs_indices(a: list[str], b: list[str]) -> list[int]:
    """Positions in a of one LCS of a and b: the one rouge-score's lcs_ind picks.

    Which LCS is part of the metric: rougeLsum takes the union of these positions over sentences,
    and two equally long LCSs can cover different reference words.
    """
    if not a or not b:
        return []
    masks = masks_of(b)
    return backtrack(a, b, bit_rows(a, masks, (1 << len(b)) - 1), masks)


# The predicted sentences are laid side by side in one bit vector (below), so one pass over a
# reference sentence gives its rows against all of them. One vector for a whole long prediction
# would bring back the |b|-bit masks, so sentences are packed into groups of at most GROUP_BITS
# positions: rows and masks then cost O(|reference sentence| x GROUP_BITS) bits per group, and the
# groups' masks together grow linearly with the prediction. A single sentence longer than a group
# gets a group of its own, with PositionMasks beyond STRIP_BITS words.
GROUP_BITS = 1 << 11


def side_by_side(sentences: list[list[str]], group_bits: int | None = None
                 ) -> list[tuple[dict[str, int] | PositionMasks, list[tuple[int, list[str]]], int]]:
    """Lay sentences side by side in bit vectors of at most group_bits positions, each sentence
    followed by a guard bit that stays 0: a carry leaving one sentence stops at its guard and is
    masked away, exactly as "& full" drops it for a lone sentence. One bit-parallel pass per
    group then gives the LCS rows against all of its sentences.
    Returns a list of groups (masks, [(offset, sentence)], full)."""
    group_bits = GROUP_BITS if group_bits is None else group_bits
    groups, masks, spans, full, offset = [], {}, [], 0, 0
    for s in sentences:
        if not s:
            continue
        if spans and offset + len(s) > group_bits:
            groups.append((masks, spans, full))
            masks, spans, full, offset = {}, [], 0, 0
        if len(s) > STRIP_BITS:                 # a long sentence: alone, masks built on demand
            groups.append((PositionMasks(s), [(0, s)], (1 << len(s)) - 1))
            continue
        match_masks(s, offset, masks)
        spans.append((offset, s))
        full |= ((1 << len(s)) - 1) << offset
        offset += len(s) + 1
    if spans:
        groups.append((masks, spans, full))
    return groups


def union_lcs(a: list[str], layout: list[tuple[dict[str, int] | PositionMasks, list[tuple[int, list[str]]], int]]
              ) -> list[int]:
    """Sorted positions in a covered by its LCS with any of the sentences laid out by
    side_by_side (the union LCS of Lin 2004, section 3.2)."""
    union = set()
    if a:
        for masks, spans, full in layout:
            rows = bit_rows(a, masks, full)
            for offset, s in spans:
                union.update(backtrack(a, s, rows, masks, offset))
    return sorted(union)


def find_union(position_lists: list[list[int]]) -> list[int]:
    """Sorted union of lists of positions (rouge-score's _find_union)."""
    return sorted(set().union(*position_lists))


def union_lcs_words(a: list[str], sentences: list[list[str]]) -> list[str]:
    """The words of a on its union LCS with the sentences, in order (rouge-score's _union_lcs)."""
    return [a[i] for i in union_lcs(a, side_by_side(sentences))]


def score_lcs(target_tokens: list[str], prediction_tokens: list[str]) -> Score:
    """rougeL: one LCS over the whole texts, newlines ignored (section 3.1, sentence level)."""
    if not target_tokens or not prediction_tokens:
        return ZERO
    lcs = lcs_length(target_tokens, prediction_tokens)
    precision = lcs / len(prediction_tokens)
    recall = lcs / len(target_tokens)
    return Score(precision, recall, fmeasure(precision, recall))


class WordBudget:
    """ROUGE-1.5.5's clipping for summary-level scores: a word can be matched only as often as it
    occurs in the whole reference and in the whole prediction, whichever is fewer. Without it a
    predicted sentence could be credited once for every reference sentence it overlaps."""

    def __init__(self, target_sentences: list[list[str]], prediction_sentences: list[list[str]]):
        self.target_left = collections.Counter(t for s in target_sentences for t in s)
        self.prediction_left = collections.Counter(t for s in prediction_sentences for t in s)

    def take(self, token: str) -> bool:
        """Spend one occurrence of token on both sides if both have one left; say whether it did."""
        if self.target_left[token] > 0 and self.prediction_left[token] > 0:
            self.target_left[token] -= 1
            self.prediction_left[token] -= 1
            return True
        return False


def summary_level_lcs(target_sentences: list[list[str]], prediction_sentences: list[list[str]]) -> Score:
    """rougeLsum (section 3.2): for each reference sentence r_i, the union of its LCS positions with
    every predicted sentence; each covered word is a hit if WordBudget still allows it.

    rougeL vs rougeLsum, a classic source of wrong numbers: rougeL ignores sentence structure, while
    rougeLsum is the summary-level ROUGE-L of the Perl toolkit that summarisation papers cite. It
    splits on "\n" only, so summaries whose sentences are not on separate lines make rougeLsum
    silently equal rougeL. Put one sentence per line (or use split_summaries=True).
    """
    m, n = sum(map(len, target_sentences)), sum(map(len, prediction_sentences))
    if not m or not n:
        return ZERO
    budget = WordBudget(target_sentences, prediction_sentences)
    layout = side_by_side(prediction_sentences)
    hits = sum(budget.take(r[i]) for r in target_sentences for i in union_lcs(r, layout))
    precision, recall = hits / n, hits / m
    return Score(precision, recall, fmeasure(precision, recall))


# ---------------------------------------------------------------------------------------------------
# ROUGE-W: weighted LCS (Lin 2004, section 4), as ROUGE-1.5.5.pl computes it
# ---------------------------------------------------------------------------------------------------
# Plain LCS cannot tell "A B C D H I K" from "A H B K C I D" against "A B C D E F G": both share
# A B C D. WLCS rewards runs of consecutive matches with f(k) = k^w (w > 1, 1.2 by default):
#     k = run length ending at (i-1, j-1);  c[i][j] = c[i-1][j-1] + f(k+1) - f(k)  on a match
# so one run of 4 is worth f(4) = 5.28 (w = 1.2) and four runs of 1 are worth 4.

def wlcs_table(a: list[str], b: list[str], weight: float = 1.2) -> tuple[list[list[float]], list[list[str]]]:
    """WLCS dynamic programming (ROUGE-1.5.5's wlcs_inner): score table c and move table
    ('d' diagonal, 'u' up, 'l' left; ties between up and left go up)."""
    c = [[0.0] * (len(b) + 1) for _ in range(len(a) + 1)]
    run = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    move = [[""] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                k = run[i - 1][j - 1]
                # c[i][j] = c[i-1][j-1] + f(k+1) - f(k),  f(k) = k^w
                c[i][j] = c[i - 1][j - 1] + (k + 1) ** weight - k ** weight
                run[i][j], move[i][j] = k + 1, "d"
            elif c[i - 1][j] >= c[i][j - 1]:
                c[i][j], move[i][j] = c[i - 1][j], "u"
            else:
                c[i][j], move[i][j] = c[i][j - 1], "l"
    return c, move


def wlcs(a: list[str], b: list[str], weight: float = 1.2) -> float:
    """WLCS(a, b), the weighted score of Lin 2004 section 4 (e.g. 16 vs 4 for his example, w = 2)."""
    return wlcs_table(a, b, weight)[0][-1][-1] if a and b else 0.0


def wlcs_indices(a: list[str], b: list[str], weight: float = 1.2) -> list[int]:
    """Positions in a on the WLCS path (ROUGE-1.5.5's markLCS)."""
    _, move = wlcs_table(a, b, weight)
    i, j, path = len(a), len(b), []
    while i and j:
        step = move[i][j]
        if step == "d":
            path.append(i - 1)
        i, j = i - (step != "l"), j - (step != "u")
    return path[::-1]


def summary_level_wlcs(target_sentences: list[list[str]], prediction_sentences: list[list[str]],
                       weight: float = 1.2) -> Score:
    """rougeW as ROUGE-1.5.5 computes ROUGE-W-1.2 (its sub wlcs):
        hit = sum over runs of consecutive marked positions in each reference sentence of f(run)
        R = f^-1(hit / f(sum_i f(|r_i|))),   P = f^-1(hit / f(|prediction|)),   f^-1(x) = x^(1/w)
    The marks are the union of WLCS paths against every predicted sentence, clipped by WordBudget
    as in rougeLsum. Three quirks of the Perl code are kept, so the numbers match published ones:
    - the reference length is weighted twice, f(sum_i f(|r_i|)) (sub computeWLCSScore applies f to
      a base that sub wlcs already weighted), so even a prediction identical to a one-sentence
      reference of n words gets R = n^(1 - w) < 1 (0.68 for n = 7): ROUGE-W recall runs low;
    - runs are consecutive in the reference only: a prediction "A x B y C z D" that hits A B C D
      in a row of the reference counts as one run of 4, exactly like "A B C D";
    - a clipped word inside a run neither counts nor ends the run.
    """
    m, n = sum(map(len, target_sentences)), sum(map(len, prediction_sentences))
    if not m or not n:
        return ZERO
    budget = WordBudget(target_sentences, prediction_sentences)
    hit = 0.0
    for r in target_sentences:
        marked = [False] * len(r)
        for s in prediction_sentences:
            for i in wlcs_indices(r, s, weight):
                marked[i] = True
        run = 0
        for j, token in enumerate(r):
            if marked[j] and budget.take(token):
                run += 1
                if j + 1 == len(r) or not marked[j + 1]:       # the run ends here
                    hit += run ** weight
                    run = 0
    # R = f^-1(hit / f(sum_i f(|r_i|))), the Perl's double weighting, f^-1(x) = x^(1/w)
    base = sum(len(r) ** weight for r in target_sentences) ** weight
    recall = (hit / base) ** (1 / weight)
    precision = (hit / n ** weight) ** (1 / weight)
    return Score(precision, recall, fmeasure(precision, recall))


# ---------------------------------------------------------------------------------------------------
# ROUGE-S and ROUGE-SU: skip-bigrams (Lin 2004, section 5), as ROUGE-1.5.5.pl counts them
# ---------------------------------------------------------------------------------------------------
# A skip-bigram is any pair of words in sentence order, with any gap: "police killed the gunman"
# has C(4, 2) = 6 of them. ROUGE-S<d> only allows at most d words between the two (ROUGE-1.5.5's
# -2 d); ROUGE-SU adds unigrams, so a prediction with the right words in the wrong order still
# scores above 0.

def skip_bigram_counts(tokens: list[str], max_gap: int | None = None, unigrams: bool = False) -> collections.Counter:
    """Counter of skip-bigrams (pairs at most max_gap words apart; None = any gap), plus unigrams.

    ROUGE-1.5.5 (createSkipBigram) loops i over all words but the last, so with unigrams the LAST
    word is never counted as a unigram: "a b c" gives {a, b} + {ab, ac, bc}. Lin 2004 describes
    adding a begin-of-sentence marker instead, which would count all three; we keep the Perl count.
    """
    counts = collections.Counter()
    for i in range(len(tokens) - 1):
        if unigrams:
            counts[(tokens[i],)] += 1
        stop = len(tokens) if max_gap is None else min(len(tokens), i + max_gap + 2)
        for j in range(i + 1, stop):
            counts[(tokens[i], tokens[j])] += 1
    return counts


# ---------------------------------------------------------------------------------------------------
# Porter stemmer (Porter 1980) in nltk's NLTK_EXTENSIONS mode: rouge-score's use_stemmer=True
# ---------------------------------------------------------------------------------------------------
# Why stem: "jumps", "jumped" and "jumping" all become "jump", so a paraphrase that changes a
# word's ending still matches. ROUGE with and without stemming are different numbers (stemming
# usually adds a point or two): compare papers only when both say which one they used.
#
# Porter reads a word as consonants (c) and vowels (v). Collapsing runs gives [C](VC)^m[V]; m, the
# "measure", counts vowel-consonant transitions, and a rule like "(m>0) ATIONAL -> ATE" strips a
# suffix only if at least one VC is left in front of it. Five steps of such rules run in order.
# nltk's default mode adds an irregular-forms table and a few extra rules, marked "nltk:" below.

VOWELS = frozenset("aeiou")

# nltk: irregular forms, mapped straight to their stem before any rule runs.
IRREGULAR_FORMS = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}


def consonant_flags(word: str) -> list[bool]:
    """True where word[i] is a consonant: not a, e, i, o, u, and 'y' only first or after a vowel."""
    flags = []
    for i, ch in enumerate(word):
        if ch in VOWELS:
            flags.append(False)
        elif ch == "y":
            # 'y' is a vowel after a consonant ("happy") and a consonant otherwise ("yes", "toy")
            flags.append(i == 0 or not flags[i - 1])
        else:
            flags.append(True)
    return flags


def measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel -> consonant transitions ("trouble" 1, "oaten" 2)."""
    flags = consonant_flags(stem)
    return sum(1 for a, b in zip(flags, flags[1:]) if not a and b)


def contains_vowel(stem: str) -> bool:
    """Porter's condition *v*."""
    return not all(consonant_flags(stem))


def ends_double_consonant(word: str) -> bool:
    """Porter's condition *d: two equal consonants at the end ("hopp", "fall")."""
    return len(word) >= 2 and word[-1] == word[-2] and consonant_flags(word)[-1]


def ends_cvc(word: str) -> bool:
    """Porter's condition *o: ends consonant-vowel-consonant, the last not w, x or y ("hop").

    nltk: a two-letter word vowel-consonant counts too ("ow" of "owed"), without the w/x/y test.
    """
    flags = consonant_flags(word)
    if len(word) >= 3:
        return flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy"
    return len(word) == 2 and not flags[0] and flags[1]


def apply_rules(word: str, rules: list[tuple[str, str, Callable[[str], bool]]]) -> str:
    """The first rule whose suffix matches decides: if its condition holds the suffix is replaced,
    otherwise the word is returned unchanged; later rules are never tried (Porter 1980)."""
    for suffix, replacement, condition in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition(stem) else word
    return word


def m_gt0(stem: str) -> bool:
    return measure(stem) > 0


def m_gt1(stem: str) -> bool:
    return measure(stem) > 1


def always(stem: str) -> bool:
    return True


STEP1A = [("sses", "ss", always), ("ies", "i", always), ("ss", "ss", always), ("s", "", always)]
STEP2 = [
    ("ational", "ate", m_gt0), ("tional", "tion", m_gt0), ("enci", "ence", m_gt0),
    ("anci", "ance", m_gt0), ("izer", "ize", m_gt0), ("bli", "ble", m_gt0), ("alli", "al", m_gt0),
    ("entli", "ent", m_gt0), ("eli", "e", m_gt0), ("ousli", "ous", m_gt0), ("ization", "ize", m_gt0),
    ("ation", "ate", m_gt0), ("ator", "ate", m_gt0), ("alism", "al", m_gt0),
    ("iveness", "ive", m_gt0), ("fulness", "ful", m_gt0), ("ousness", "ous", m_gt0),
    ("aliti", "al", m_gt0), ("iviti", "ive", m_gt0), ("biliti", "ble", m_gt0),
    ("fulli", "ful", m_gt0),                                                     # nltk
    # nltk: the 'l' of "logi" stays with the stem for the test, so "geologi" -> "geolog"
    ("logi", "log", lambda stem: measure(stem + "l") > 0),
]
STEP3 = [("icate", "ic", m_gt0), ("ative", "", m_gt0), ("alize", "al", m_gt0),
         ("iciti", "ic", m_gt0), ("ical", "ic", m_gt0), ("ful", "", m_gt0), ("ness", "", m_gt0)]
STEP4 = ([(suffix, "", m_gt1) for suffix in
          ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")]
         + [("ion", "", lambda stem: measure(stem) > 1 and stem[-1] in "st")]   # (m>1 and (*S or *T))
         + [(suffix, "", m_gt1) for suffix in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")])


def step1a(word: str) -> str:
    """Plurals: caresses -> caress, ponies -> poni, cats -> cat."""
    if word.endswith("ies") and len(word) == 4:                 # nltk: "dies" -> "die"
        return word[:-1]
    return apply_rules(word, STEP1A)


def step1b(word: str) -> str:
    """-ed and -ing: agreed -> agree, plastered -> plaster, hopping -> hop, filing -> file."""
    if word.endswith("ied"):                                    # nltk: "died" -> "die", "spied" -> "spi"
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):                                    # (m>0) EED -> EE
        return word[:-1] if m_gt0(word[:-3]) else word
    for suffix in ("ed", "ing"):                                # (*v*) ED -> , (*v*) ING ->
        if word.endswith(suffix) and contains_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    if stem.endswith(("at", "bl", "iz")):                       # AT -> ATE, BL -> BLE, IZ -> IZE
        return stem + "e"
    if ends_double_consonant(stem):                             # hopp -> hop; fall, hiss, fizz stay
        return stem if stem[-1] in "lsz" else stem[:-1]
    if measure(stem) == 1 and ends_cvc(stem):                   # (m=1 and *o) -> E: fil -> file
        return stem + "e"
    return stem


def step1c(word: str) -> str:
    """Y -> I. nltk: only after a consonant that is not the first letter (happy -> happi, but "by")."""
    if word.endswith("y") and len(word) > 2 and consonant_flags(word)[-2]:
        return word[:-1] + "i"
    return word


def step2(word: str) -> str:
    """Double suffixes to single ones: relational -> relate, hopefulness -> hopeful."""
    # nltk: ALLI -> AL is tried first and, when it fires, step 2 runs again on the result
    if word.endswith("alli") and m_gt0(word[:-4]):
        return step2(word[:-2])
    return apply_rules(word, STEP2)


def step5a(word: str) -> str:
    """(m>1) E -> ;  (m=1 and not *o) E -> .  Both conditions are tried (not a first-match list)."""
    if word.endswith("e"):
        stem = word[:-1]
        m = measure(stem)
        if m > 1 or (m == 1 and not ends_cvc(stem)):
            return stem
    return word


def step5b(word: str) -> str:
    """(m>1 and *d and *L) -> single letter: controll -> control. nltk measures the word minus one l."""
    if word.endswith("ll") and m_gt1(word[:-1]):
        return word[:-1]
    return word


def porter_stem(word: str) -> str:
    """Stem one word exactly as nltk 3.10's PorterStemmer().stem(word) (checked on ~1M words)."""
    lower = word.lower()
    if lower in IRREGULAR_FORMS:
        return IRREGULAR_FORMS[lower]
    if len(word) <= 2:                                          # nltk: 1-2 letter words pass through
        return lower
    stem = step1c(step1b(step1a(lower)))
    stem = apply_rules(apply_rules(step2(stem), STEP3), STEP4)
    return step5b(step5a(stem))


class PorterStemmer:
    """nltk-compatible `.stem(word)`, memoised: a corpus repeats its words, Porter's rules are slow."""

    def __init__(self) -> None:
        self._cache = {}

    def stem(self, word: str) -> str:
        stem = self._cache.get(word)
        if stem is None:
            stem = self._cache[word] = porter_stem(word)
        return stem


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------
ASCII_WORD = re.compile(r"[a-z0-9]+")
# byte -> itself for [a-z0-9] and "\n" (kept so that lines survive), a space for every other byte
TO_SPACE = bytes(c if chr(c) in "abcdefghijklmnopqrstuvwxyz0123456789\n" else 32 for c in range(256))


def ascii_words(text: str) -> str:
    """text.lower() with every character outside [a-z0-9] and "\n" turned into a space.

    rouge-score does re.sub("[^a-z0-9]+", " ", text.lower()); the same in C and twice as fast: each
    non-ASCII character becomes "?" (one per code point), then every byte outside [a-z0-9] a space.
    Lower-casing first matters: the Kelvin sign K lower-cases to an ASCII "k".
    """
    return text.lower().encode("ascii", "replace").translate(TO_SPACE).decode("ascii")


def tokenize(text: str, stemmer: PorterStemmer | None = None) -> list[str]:
    """rouge-score's tokenizer: lower-case, every character outside [a-z0-9] becomes a space, split,
    then stem words longer than 3 characters. Non-ASCII letters vanish ("café" -> "caf")."""
    words = ascii_words(text).split()
    if stemmer is None:
        return words
    return [stemmer.stem(w) if len(w) > 3 else w for w in words]


class Tokenizer(abc.ABC):
    """Base class of tokenizers (rouge-score's tokenizers.Tokenizer): a custom tokenizer subclasses
    it and overrides tokenize(text) -> list of str. RougeScorer accepts any object with a
    tokenize method; subclassing states the contract and fails early if tokenize is missing."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError("Tokenizer must override tokenize() method")


class DefaultTokenizer(Tokenizer):
    """rouge-score's DefaultTokenizer, with one dict from word to token so a repeated word costs a
    single lookup. A Porter stem of a word of more than 3 letters is never empty, so rouge-score's
    final "drop empty tokens" filter never fires and is left out."""

    def __init__(self, use_stemmer: bool = False):
        self.use_stemmer = use_stemmer
        self._token_of = _StemTable() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        return self._tokens(ascii_words(text).split())

    def tokenize_lines(self, text: str) -> list[list[str]]:
        """The tokens of each non-empty line (rougeLsum's sentences), in one pass over the text."""
        return [self._tokens(line.split()) for line in ascii_words(text).split("\n") if line]

    def _tokens(self, words):
        if self._token_of is None:
            return words
        token_of = self._token_of
        return [token_of[w] for w in words]


class _StemTable(dict):
    """word -> token: the Porter stem for words of more than 3 characters, the word itself otherwise.
    Grows by one entry per distinct word (a few hundred thousand for a large corpus)."""

    def __missing__(self, word: str) -> str:
        token = self[word] = porter_stem(word) if len(word) > 3 else word
        return token


# Scripts written without spaces between words: one token per character (a crude but common
# choice for ROUGE on Chinese or Japanese; Thai, Lao, Khmer and Myanmar really need a segmenter).
NO_SPACE_SCRIPTS = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\U00020000-\U0002ffff]")


class UnicodeTokenizer(Tokenizer):
    """Opt-in tokenizer that keeps every script: NFKC-normalise, case-fold, keep runs of letters,
    marks and digits (Unicode categories L, M, N), one token per character in scripts without
    spaces. English ASCII words are Porter-stemmed as by the default tokenizer.

    rouge-score's tokenizer deletes everything outside [a-z0-9], so two German, Hindi or Chinese
    texts score 0 against each other; this one does not. It is not rouge-score's: report it as such.
    """

    def __init__(self, use_stemmer: bool = False):
        self.use_stemmer = use_stemmer
        self._stems = _StemTable() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).casefold()
        tokens, word = [], []
        for ch in text:
            if NO_SPACE_SCRIPTS.match(ch):
                tokens += ["".join(word), ch] if word else [ch]
                word = []
            elif unicodedata.category(ch)[0] in "LMN":
                word.append(ch)
            elif word:
                tokens.append("".join(word))
                word = []
        if word:
            tokens.append("".join(word))
        if self._stems is not None:
            tokens = [self._stems[t] if ASCII_WORD.fullmatch(t) else t for t in tokens]
        return tokens


# ---------------------------------------------------------------------------------------------------
# Sentence splitting, for rougeLsum and rougeW
# ---------------------------------------------------------------------------------------------------
# rouge-score splits on "\n", or with split_summaries=True calls nltk.sent_tokenize (punkt), whose
# English model is downloaded data we cannot install. split_sentences is a rule-based stand-in:
#   a sentence ends at '.', '!' or '?' (and any closing quotes or brackets) followed by whitespace,
#   except after a known abbreviation ("Dr.", "e.g."), a single-letter initial ("J. Smith"), or an
#   ellipsis ("...") followed by a lower-case word.
# It can differ from punkt where punkt learned something from its training corpus: abbreviations
# not in the list below ("approx.", "Calif."), collocations such as "Jan. 5", initials and ordinal
# numbers judged by the case of the next word, and an ellipsis followed by a capital.
# Newlines are ordinary whitespace here, as they are for punkt.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs cf e.g i.e et al fig figs eq eqs no nos vol pp ed eds "
    "u.s u.k inc ltd co corp dept gen gov sen rep rev jan feb mar apr jun jul aug sep sept oct nov dec".split())
SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u2019\u201d]*$")    # at the end of a whitespace-free word
OPENERS = "\"'([\u2018\u201c"


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with the rules above; returns stripped, non-empty sentences."""
    words = list(re.finditer(r"\S+", text))
    sentences, start = [], 0
    for word, following in zip(words, words[1:]):
        end = SENTENCE_END.search(word.group())
        if end is None:
            continue
        punct = end.group().rstrip(OPENERS + ")]\u2019\u201d")
        core = word.group()[: end.start()].lstrip(OPENERS).lower()
        if punct == "." and (core in ABBREVIATIONS or (len(core) == 1 and core.isalpha())):
            continue                                    # "Dr. Smith", "J. Smith": not an end
        if punct.startswith("..") and following.group().lstrip(OPENERS)[:1].islower():
            continue                                    # "and so... we left": one sentence
        sentences.append(text[start:word.end()].strip())
        start = word.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def get_sentences(text: str, split_summaries: bool = False) -> list[str]:
    """rouge-score's rougeLsum sentences: lines (split on "\n" only), or split_sentences; no empties."""
    sentences = split_sentences(text) if split_summaries else text.split("\n")
    return [s for s in sentences if s]


# ---------------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------------
TYPE_HELP = ("rouge1 .. rouge9, rougeL, rougeLsum, rougeW or rougeW-<weight> (e.g. rougeW-1.2), "
             "rougeS / rougeSU (any gap) or rougeS<d> / rougeSU<d> (at most d words apart, e.g. rougeSU4)")


class UnknownRougeType(ValueError):
    pass


def parse_rouge_type(name: str) -> tuple[str, int | float | tuple[int | None, bool] | None]:
    """Name -> (kind, parameter): ('n', 2), ('L', None), ('Lsum', None), ('W', 1.2), ('S', (4, True))."""
    if not isinstance(name, str):
        raise TypeError(f"a ROUGE type must be a str such as 'rouge1', got {type(name).__name__}")
    if name in ("rougeL", "rougeLsum"):
        return name[5:], None
    if (m := re.fullmatch(r"rouge(\d)", name)) and m.group(1) != "0":
        return "n", int(m.group(1))
    if m := re.fullmatch(r"rougeW(?:-(\d+(?:\.\d+)?))?", name):
        weight = float(m.group(1) or 1.2)
        if weight <= 1:
            raise UnknownRougeType(f"{name}: the ROUGE-W weight must be > 1, got {weight}")
        return "W", weight
    if m := re.fullmatch(r"rouge(SU|S)(\*|\d+)?", name):
        gap = None if m.group(2) in (None, "*") else int(m.group(2))
        return "S", (gap, m.group(1) == "SU")
    raise UnknownRougeType(f"unknown ROUGE type {name!r}; expected {TYPE_HELP}")


def _check_text(what, text):
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r:.60}")


class _Text(NamedTuple):
    tokens: list        # the whole text's tokens (rougeN, rougeL, rougeS)
    sentences: list     # one token list per sentence (rougeLsum, rougeW)


class RougeScorer:
    """Drop-in for rouge_score.rouge_scorer.RougeScorer.

        scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        scorer.score("The quick brown fox jumps", "The quick brown dog jumped")["rouge1"].fmeasure

    Unlike rouge-score, an unknown type fails here, when the scorer is built, not at the first score.
    """

    def __init__(self, rouge_types: list[str] | tuple[str, ...], use_stemmer: bool = False,
                 split_summaries: bool = False, tokenizer: Tokenizer | None = None):
        if isinstance(rouge_types, str):
            raise TypeError(f"rouge_types must be a list such as ['{rouge_types}'], got the str {rouge_types!r}")
        self.rouge_types = list(rouge_types)
        self._kinds = [(name, *parse_rouge_type(name)) for name in self.rouge_types]
        if tokenizer is not None and not callable(getattr(tokenizer, "tokenize", None)):
            raise TypeError(f"tokenizer must have a tokenize(text) method, got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer if tokenizer is not None else DefaultTokenizer(use_stemmer)
        self._split_summaries = split_summaries
        kinds = {kind for _, kind, _ in self._kinds}
        self._needs_sentences = bool(kinds & {"Lsum", "W"})
        self._needs_tokens = bool(kinds - {"Lsum", "W"})

    def _prepare(self, text):
        tokenize = self._tokenizer.tokenize
        if not self._needs_sentences:
            return _Text(tokenize(text), None)
        if isinstance(self._tokenizer, DefaultTokenizer) and not self._split_summaries:
            # "\n" separates words for the default tokenizer, so the text's tokens are its lines'
            # tokens joined: one pass gives both
            sentences = self._tokenizer.tokenize_lines(text)
            return _Text([t for s in sentences for t in s] if self._needs_tokens else None, sentences)
        sentences = [tokenize(s) for s in get_sentences(text, self._split_summaries)]
        return _Text(tokenize(text) if self._needs_tokens else None, sentences)

    def _score_prepared(self, target, prediction):
        result, ngrams = {}, {}
        for name, kind, param in self._kinds:
            if kind == "n":
                if param not in ngrams:
                    ngrams[param] = (ngram_counts(target.tokens, param),
                                     ngram_counts(prediction.tokens, param))
                result[name] = score_ngrams(*ngrams[param])
            elif kind == "L":
                result[name] = score_lcs(target.tokens, prediction.tokens)
            elif kind == "Lsum":
                result[name] = summary_level_lcs(target.sentences, prediction.sentences)
            elif kind == "W":
                result[name] = summary_level_wlcs(target.sentences, prediction.sentences, param)
            else:
                result[name] = score_ngrams(skip_bigram_counts(target.tokens, *param),
                                            skip_bigram_counts(prediction.tokens, *param))
        return result

    def score(self, target: str, prediction: str) -> dict[str, Score]:
        """{rouge_type: Score(precision, recall, fmeasure)} of one prediction against one target."""
        _check_text("target", target)
        _check_text("prediction", prediction)
        return self._score_prepared(self._prepare(target), self._prepare(prediction))

    def score_multi(self, targets: list[str], prediction: str) -> dict[str, Score]:
        """Score against each target and keep, per type, the target with the best F-measure (the
        first one on a tie, like numpy.argmax in rouge-score)."""
        if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
            raise TypeError(f"targets must be a list of str, got {type(targets).__name__}")
        targets = list(targets)
        if not targets:
            raise ValueError("targets is empty: score_multi needs at least one reference")
        for target in targets:
            _check_text("each target", target)
        _check_text("prediction", prediction)
        prediction = self._prepare(prediction)
        all_scores = [self._score_prepared(self._prepare(t), prediction) for t in targets]
        return {name: max((s[name] for s in all_scores), key=lambda score: score.fmeasure)
                for name in self.rouge_types}


# ---------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals (ROUGE-1.5.5 and rouge-score's BootstrapAggregator)
# ---------------------------------------------------------------------------------------------------
class BootstrapAggregator:
    """Confidence intervals of the corpus mean by bootstrap resampling (Efron 1979).

    Draw n_samples resamples of the examples with replacement, average each; the 2.5th and 97.5th
    percentiles of those means bound a 95% interval. "mid" is their 50th percentile, which is not
    exactly the plain mean (rouge-score's docstring says "mean"; its code takes the median).

    seed: an int gives the same intervals every run; they equal rouge-score's after
    numpy.random.seed(seed). None draws from numpy's global generator, as rouge-score does.
    """

    def __init__(self, confidence_interval: float = 0.95, n_samples: int = 1000, seed: int | None = 0):
        if not 0 <= confidence_interval <= 1:
            raise ValueError(f"confidence_interval must be in [0, 1], got {confidence_interval}")
        if n_samples <= 0:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        self._confidence_interval = confidence_interval
        self._n_samples = n_samples
        self._seed = seed
        self._scores = collections.defaultdict(list)

    def add_scores(self, scores: dict[str, Score]) -> None:
        """Add one example's {rouge_type: Score}."""
        for rouge_type, score in scores.items():
            self._scores[rouge_type].append(score)

    def aggregate(self) -> dict[str, AggregateScore]:
        """{rouge_type: AggregateScore(low, mid, high)}, each a Score."""
        rng = np.random if self._seed is None else np.random.RandomState(self._seed)
        result = {}
        for rouge_type, scores in self._scores.items():
            matrix = np.array(scores, dtype=np.float64)                     # (examples, 3)
            low, mid, high = self._bootstrap(matrix, rng)
            result[rouge_type] = AggregateScore(*(Score(*map(float, row)) for row in (low, mid, high)))
        return result

    def _bootstrap(self, matrix, rng):
        """(3, 3) array: rows low / mid / high, columns precision / recall / F."""
        n = matrix.shape[0]
        means = np.zeros((self._n_samples, matrix.shape[1]))
        for i in range(self._n_samples):
            # one resample: n indices drawn with replacement (the same draws as rouge-score's)
            means[i] = matrix[rng.choice(np.arange(n), size=n)].mean(axis=0)
        tail = (1 - self._confidence_interval) / 2
        return np.percentile(means, [100 * tail, 50, 100 * (1 - tail)], axis=0)


# ---------------------------------------------------------------------------------------------------
# Plumbing: files in and out (ours, and rouge-score's io with its CSV), the command line, the demo
# ---------------------------------------------------------------------------------------------------
def read_examples(path: str) -> list[str]:
    """One example per line; a literal backslash-n inside a line is a sentence break."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"{path} is a directory, not a file of examples") from None
    if lines and lines[-1] == "":
        lines.pop()                                    # the file's final newline ends the last line
    return [line.rstrip("\r").replace("\\n", "\n") for line in lines]


def read_corpus(reference_paths: list[str], prediction_path: str) -> tuple[list[list[str]], list[str]]:
    """(one list of texts per reference file, predictions); every file must have as many lines."""
    predictions = read_examples(prediction_path)
    if not predictions:
        raise ValueError(f"no examples: {prediction_path} is empty")
    references = []
    for path in reference_paths:
        references.append(read_examples(path))
        if len(references[-1]) != len(predictions):
            raise ValueError(f"line counts differ: {prediction_path} has {len(predictions)} lines "
                             f"but {path} has {len(references[-1])}; one example per line in each")
    return references, predictions


def evaluate(references: list[list[str]], predictions: list[str], config: RougeConfig
             ) -> tuple[list[dict[str, Score]], dict[str, AggregateScore]]:
    """Score each prediction against its references (best F of several), then bootstrap.
    references: one list of texts per reference file. Returns (per-example scores, intervals)."""
    tokenizer = UnicodeTokenizer(config.use_stemmer) if config.unicode else None
    scorer = RougeScorer(config.rouge_types, config.use_stemmer, config.split_summaries, tokenizer)
    aggregator = BootstrapAggregator(config.confidence_interval, config.n_samples, config.seed)
    per_example = []
    for i, prediction in enumerate(predictions):
        scores = scorer.score_multi([refs[i] for refs in references], prediction)
        aggregator.add_scores(scores)
        per_example.append(scores)
    return per_example, aggregator.aggregate()


def format_table(intervals: dict[str, AggregateScore], n_examples: int, confidence: float) -> str:
    """Markdown table: mid [low, high] in percent for P, R and F of each type."""
    pct = round(100 * confidence)
    lines = [f"ROUGE over {n_examples} examples, mid [{pct}% interval] in percent",
             "", "| type | precision | recall | F-measure |", "|---|---|---|---|"]
    for name, agg in intervals.items():
        cells = [f"{100 * agg.mid[k]:.2f} [{100 * agg.low[k]:.2f}, {100 * agg.high[k]:.2f}]"
                 for k in range(3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, config: RougeConfig, per_example: list[dict[str, Score]],
               intervals: dict[str, AggregateScore]) -> None:
    """Aggregates and per-example scores as JSON, written atomically (temp file, then rename)."""
    payload = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "n_examples": len(per_example),
        "aggregate": {name: {part: agg._asdict()[part]._asdict() for part in ("low", "mid", "high")}
                      for name, agg in intervals.items()},
        "per_example": [{name: s._asdict() for name, s in scores.items()} for scores in per_example],
    }
    atomic_write_text(path, json.dumps(payload, indent=1))


def atomic_write_text(path: str, text: str) -> None:
    """Write text to path through atomic_write (a unique temp file in the same folder, fsync, rename),
    so a crash never leaves a half-written file under the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# fsync_path and atomic_write are clip.py's canonical text, copied byte for byte (rouge.py stands
# alone; tests/test_plumbing.py fails if a copy drifts).

def fsync_path(path: str | Path) -> None:
    """Ask the OS to put a file, or a folder's list of names, on disk now. A rename survives a power cut
    only once its folder is synced; Windows cannot open a folder for this, and needs it less."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """write(tmp_path), fsync, then rename over `path`: a crash leaves the old file or the new, never half.
    The temporary name is unique (mkstemp) and removed if write fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# rouge-score's io module and command line (rouge_score/io.py, rouge_score/rouge.py), same names,
# arguments and CSV bytes: a file pattern each for targets and predictions, files paired in sorted
# order, records split by a delimiter ("\n": one example per line), and either the bootstrap
# low / mid / high of every type or one row of scores per example.
def glob_files(pattern: str, what: str) -> list[str]:
    """Sorted files matching a glob pattern; none is an error that names the pattern."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"no {what} files match {pattern!r}: expected at least one")
    return files


def read_records(path: str, delimiter: str = "\n") -> list[str]:
    """The records of a file split by delimiter. As in rouge-score, a final delimiter ends the last
    record; without one the last record still counts, with a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            records = f.read().split(delimiter)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"cannot read records from {path}: no such file") from None
    if records[-1]:
        logging.warning("%s: expected the delimiter %r at the end of the file", path, delimiter)
    else:
        records.pop()
    return records


def compute_scores_and_write_to_csv(target_filepattern: str, prediction_filepattern: str, output_filename: str,
                                    scorer: RougeScorer, aggregator: BootstrapAggregator | None,
                                    delimiter: str = "\n") -> dict[str, AggregateScore] | list[dict[str, Score]]:
    """rouge-score's io.compute_scores_and_write_to_csv: score every record of the target files
    against the same record of the prediction files, then write the aggregator's low / mid / high
    as CSV, or with aggregator=None one CSV row of P, R, F per example."""
    targets = glob_files(target_filepattern, "target")
    predictions = glob_files(prediction_filepattern, "prediction")
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} target files match {target_filepattern!r} but "
                         f"{len(predictions)} prediction files match {prediction_filepattern!r}; "
                         f"they are paired in sorted order, so the counts must be equal")
    scores = []
    for target_file, prediction_file in zip(targets, predictions):
        target_records = read_records(target_file, delimiter)
        prediction_records = read_records(prediction_file, delimiter)
        if len(target_records) != len(prediction_records):
            raise ValueError(f"record counts differ: {target_file} has {len(target_records)} but "
                             f"{prediction_file} has {len(prediction_records)} (delimiter {delimiter!r})")
        scores += [scorer.score(t, p) for t, p in zip(target_records, prediction_records)]
    if not scores:
        raise ValueError(f"no records in {', '.join(targets)}: nothing to score")
    if aggregator is None:
        atomic_write_text(output_filename, scores_csv(scores))
        return scores                           # rouge-score returns None; the scores are handy
    for score in scores:
        aggregator.add_scores(score)
    aggregates = aggregator.aggregate()
    atomic_write_text(output_filename, aggregates_csv(aggregates))
    return aggregates


def aggregates_csv(aggregates: dict[str, AggregateScore]) -> str:
    """rouge-score's aggregate CSV: "score_type,low,mid,high", then <type>-R, -P, -F rows."""
    lines = ["score_type,low,mid,high"]
    for name, agg in sorted(aggregates.items()):
        for letter, field in (("R", "recall"), ("P", "precision"), ("F", "fmeasure")):
            low, mid, high = (getattr(part, field) for part in agg)
            lines.append("%s-%s,%f,%f,%f" % (name, letter, low, mid, high))
    return "\n".join(lines) + "\n"


def scores_csv(scores: list[dict[str, Score]]) -> str:
    """rouge-score's per-example CSV: "id,<type>-P,<type>-R,<type>-F,..." and one row per example."""
    names = sorted(scores[0])
    lines = ["id" + "".join(",{t}-P,{t}-R,{t}-F".format(t=name) for name in names)]
    for i, score in enumerate(scores):
        lines.append("%d" % i + "".join(",%f,%f,%f" % tuple(score[name]) for name in names))
    return "\n".join(lines) + "\n"


def _fraction(hits, total):
    return f"{hits}/{total} = {hits / total:.4f}" if total else "0 (empty)"


def _explain_ngrams(ref, pred, n):
    ref_counts, pred_counts = ngram_counts(ref, n), ngram_counts(pred, n)
    print(f"\nROUGE-{n}: clipped {n}-gram matches, min(count in reference, count in prediction)")
    for gram, count in ref_counts.items():
        words = gram if n == 1 else " ".join(gram)
        print(f"  {words:<18} ref {count}  pred {pred_counts[gram]}  -> {min(count, pred_counts[gram])}")
    hits = sum(min(c, pred_counts[g]) for g, c in ref_counts.items())
    print(f"  R = hits / reference {n}-grams  = {_fraction(hits, sum(ref_counts.values()))}")
    print(f"  P = hits / prediction {n}-grams = {_fraction(hits, sum(pred_counts.values()))}")
    print(f"  F = {score_ngrams(ref_counts, pred_counts).fmeasure:.4f}")


def _explain_lcs(ref, pred):
    table = lcs_table(ref, pred)
    on_path = set(lcs_indices(ref, pred))
    print("\nROUGE-L: the LCS table, L[i][j] = LCS of the first i reference and first j prediction "
          "words\n  (a match adds 1 to the diagonal; otherwise take the larger of up and left)")
    width = max(map(len, ref + pred)) + 1
    print(" " * (width + 4) + "".join(f"{w:>{width}}" for w in pred))
    for i in range(len(ref) + 1):
        label = ref[i - 1] + ("*" if i - 1 in on_path else " ") if i else ""
        print(f"  {label:>{width + 1}} " + "".join(f"{v:>{width}}" for v in table[i][1:]))
    lcs = [ref[i] for i in sorted(on_path)]
    print(f"  LCS (* above) = {' '.join(lcs)!r}, length {len(lcs)}")
    score = score_lcs(ref, pred)
    print(f"  R = {_fraction(len(lcs), len(ref))}, P = {_fraction(len(lcs), len(pred))}, F = {score.fmeasure:.4f}")


def demo() -> None:
    """The worked example `python rouge.py` prints, step by step."""
    reference = "The cat sat on the mat."
    prediction = "The cat was sitting on the mat!"
    ref, pred = tokenize(reference), tokenize(prediction)
    print(f"reference  : {reference!r}\nprediction : {prediction!r}")
    print("\nTokens: lower-case, everything outside [a-z0-9] becomes a space")
    print(f"  ref  = {ref} ({len(ref)})\n  pred = {pred} ({len(pred)})")
    _explain_ngrams(ref, pred, 1)
    _explain_ngrams(ref, pred, 2)
    _explain_lcs(ref, pred)

    stemmer = PorterStemmer()
    print("\nStemming (Porter, words of more than 3 letters): ", end="")
    print(", ".join(f"{w} -> {stemmer.stem(w)}" for w in ("sitting", "jumped", "jumps", "relational")))
    print("  'sat' stays 'sat': Porter strips suffixes, it does not know irregular verbs")

    ref_text = "police killed the gunman\nthe gunman was armed"
    pred_text = "the gunman was killed\npolice shot the armed gunman"
    ref_s = [tokenize(s) for s in ref_text.split("\n")]
    pred_s = [tokenize(s) for s in pred_text.split("\n")]
    print(f"\nROUGE-Lsum: reference sentences {ref_s}\n            predicted sentences {pred_s}")
    for r in ref_s:
        parts = [[r[i] for i in lcs_indices(r, p)] for p in pred_s]
        union = sorted({i for p in pred_s for i in lcs_indices(r, p)})
        print(f"  {' '.join(r)!r}: LCS per predicted sentence {parts} -> union {[r[i] for i in union]}")
    lsum = summary_level_lcs(ref_s, pred_s)
    flat = score_lcs([t for s in ref_s for t in s], [t for s in pred_s for t in s])
    print(f"  rougeLsum F = {lsum.fmeasure:.4f}   vs rougeL (one sequence, newlines ignored) F = {flat.fmeasure:.4f}")

    x, y1, y2 = "a b c d e f g".split(), "a b c d h i k".split(), "a h b k c i d".split()
    print(f"\nROUGE-W (Lin 2004, section 4): X = {x}")
    print(f"  Y1 = {y1}: LCS {lcs_length(x, y1)}, WLCS with f(k)=k^2: {wlcs(x, y1, 2):.0f} (one run of 4)")
    print(f"  Y2 = {y2}: LCS {lcs_length(x, y2)}, WLCS with f(k)=k^2: {wlcs(x, y2, 2):.0f} (four runs of 1)")
    w = RougeScorer(["rougeW"])
    f1, f2 = (w.score(" ".join(x), " ".join(y))["rougeW"].fmeasure for y in (y1, y2))
    print(f"  rougeW (ROUGE-1.5.5's scoring, runs counted along the reference only): F(Y1) = {f1:.4f}, "
          f"F(Y2) = {f2:.4f}")

    s1, s2 = "police killed the gunman".split(), "the gunman police killed".split()
    c1, c2 = skip_bigram_counts(s1), skip_bigram_counts(s2)
    common = sorted(" ".join(g) for g in c1 if g in c2)
    print(f"\nROUGE-S (section 5): skip-bigrams of {' '.join(s1)!r}: {[' '.join(g) for g in c1]}")
    print(f"  shared with {' '.join(s2)!r}: {common} -> R = P = {_fraction(len(common), len(c1))}")
    su = RougeScorer(["rougeSU"]).score(" ".join(s1), " ".join(reversed(s1)))["rougeSU"]
    print(f"  reversed, no pair survives; rougeSU adds unigrams, all but each text's last word as in "
          f"ROUGE-1.5.5:\n  9 units each, 'killed' and 'the' shared: R = {su.recall:.4f} = 2/9")


def absl_bool(text: str) -> bool:
    """A value of an absl boolean flag, as in --use_stemmer=false."""
    value = text.lower()
    if value in ("true", "t", "1", "yes"):
        return True
    if value in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_switch(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, help: str,
               aliases: tuple[str, ...] = (), default: bool = False) -> None:
    """A switch spelled the absl way, so rouge-score's command lines run unchanged: --flag,
    --flag=true|false and --noflag (a store_true could not take rouge-score's --aggregate=false)."""
    name = flag.lstrip("-")
    parser.add_argument(flag, *aliases, dest=name, nargs="?", const=True, default=default,
                        type=absl_bool, metavar="true|false", help=help)
    parser.add_argument("--no" + name, dest=name, action="store_false", help=argparse.SUPPRESS)


FILE_PATTERN_FLAGS = ("target_filepattern", "prediction_filepattern", "output_filename")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rouge.py",
        description="ROUGE scores of predictions against references (rouge-score compatible). "
                    "Files come either as --references/--predictions (a table, optional JSON) or as "
                    "rouge-score's --target_filepattern/--prediction_filepattern/--output_filename "
                    "(its CSV). Without files: a worked example, step by step. --seed seeds the bootstrap; "
                    "--tiny is RougeConfig.tiny(), 100 resamples.",
        epilog="No --train, --resume, --out or --device: ROUGE trains nothing, runs in pure Python on the CPU, "
               "and writes only the files --json or --output_filename name.")
    parser.add_argument("--references", type=str, nargs="+", metavar="FILE",
                        help="reference file(s), one example per line; several files = several references "
                             "per example (best F counts); a literal \\n in a line is a sentence break")
    parser.add_argument("--predictions", type=str, metavar="FILE", help="predictions, one per line")
    parser.add_argument("--types", type=str, nargs="+", default=list(DEFAULT_TYPES), help=TYPE_HELP)
    add_switch(parser, "--use_stemmer", "Porter-stem words of more than 3 letters", aliases=("--stem",))
    add_switch(parser, "--split_summaries", "rougeLsum: split sentences with the rule-based splitter "
               "instead of on newlines", aliases=("--split-summaries",))
    parser.add_argument("--unicode", action="store_true",
                        help="Unicode-aware tokenizer (keeps non-ASCII words; not rouge-score's numbers)")
    parser.add_argument("--samples", type=int, default=RougeConfig.n_samples, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=RougeConfig.confidence_interval)
    # the shared flags, in clip.py's words (tests/test_plumbing.py checks every file's --help says the same)
    parser.add_argument("--seed", type=int, default=RougeConfig.seed, help="random seed (default 0)")
    parser.add_argument("--json", type=str, metavar="OUT", help="also write scores to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (seconds): tests and quick checks")
    rs = parser.add_argument_group("rouge-score's command line (python -m rouge_score.rouge)")
    rs.add_argument("--target_filepattern", type=str, help="glob of files of target records")
    rs.add_argument("--prediction_filepattern", type=str,
                    help="glob of files of prediction records, paired with the targets in sorted order")
    rs.add_argument("--output_filename", type=str, help="CSV to write")
    rs.add_argument("--delimiter", type=str, default="\n", help="record delimiter in the files")
    rs.add_argument("--rouge_types", type=str, default="rouge1,rouge2,rougeL",
                    help="comma-separated types (rouge-score's default: rouge1,rouge2,rougeL)")
    add_switch(rs, "--aggregate", "write bootstrap low/mid/high (default) rather than one row per "
               "example", default=True)
    return parser


def config_from_args(args: argparse.Namespace, rouge_types: list[str]) -> RougeConfig:
    make = RougeConfig.tiny if args.tiny else RougeConfig
    overrides = {} if args.tiny else {"n_samples": args.samples}
    return make(rouge_types=tuple(rouge_types), use_stemmer=args.use_stemmer, unicode=args.unicode,
                split_summaries=args.split_summaries, confidence_interval=args.confidence,
                seed=args.seed, **overrides)


def main_file_patterns(parser: argparse.ArgumentParser, args: argparse.Namespace
                       ) -> dict[str, AggregateScore] | list[dict[str, Score]]:
    """rouge-score's command line: score the files matching the patterns, write its CSV."""
    missing = [f"--{name}" for name in FILE_PATTERN_FLAGS if getattr(args, name) is None]
    if missing:
        parser.error("--target_filepattern, --prediction_filepattern and --output_filename go "
                     f"together; missing {', '.join(missing)}")
    if args.references is not None or args.predictions is not None:
        parser.error("give files either as --references/--predictions or as --target_filepattern/"
                     "--prediction_filepattern, not both")
    config = config_from_args(args, [t for t in args.rouge_types.split(",") if t])
    try:
        tokenizer = UnicodeTokenizer(config.use_stemmer) if config.unicode else None
        scorer = RougeScorer(config.rouge_types, config.use_stemmer, config.split_summaries, tokenizer)
        aggregator = (BootstrapAggregator(config.confidence_interval, config.n_samples, config.seed)
                      if args.aggregate else None)
        result = compute_scores_and_write_to_csv(args.target_filepattern, args.prediction_filepattern,
                                                 args.output_filename, scorer, aggregator, args.delimiter)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    if aggregator is not None:
        print(format_table(result, len(aggregator._scores[config.rouge_types[0]]),
                           config.confidence_interval) + "\n")
    print(f"wrote {args.output_filename}")
    return result


def main(argv: list[str] | None = None) -> dict[str, AggregateScore] | list[dict[str, Score]] | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(getattr(args, name) is not None for name in FILE_PATTERN_FLAGS):
        return main_file_patterns(parser, args)
    if args.references is None and args.predictions is None:
        demo()
        return None
    if args.references is None or args.predictions is None:
        parser.error("--references and --predictions go together")
    config = config_from_args(args, args.types)
    try:
        references, predictions = read_corpus(args.references, args.predictions)
        per_example, intervals = evaluate(references, predictions, config)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_table(intervals, len(predictions), config.confidence_interval))
    if args.json:
        write_json(args.json, config, per_example, intervals)
        print(f"\nwrote {args.json}")
    return intervals


if __name__ == "__main__":
    main()

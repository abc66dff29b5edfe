"""HotpotQA's official answer metrics (hotpot_evaluate_v1.py, Yang et al. 2018), unchanged in behaviour.

EM is the environment's reward; F1 is reported next to it. Both compare *normalised* answers: lower-cased,
punctuation removed, the articles a/an/the removed, whitespace collapsed.
"""
from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (in this order, as the official script)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> tuple[float, float, float]:
    """Token-level (f1, precision, recall). A yes/no/noanswer on either side must match exactly, else all 0."""
    pred, gold = normalize_answer(prediction), normalize_answer(ground_truth)
    if (pred in _SPECIAL or gold in _SPECIAL) and pred != gold:
        return 0.0, 0.0, 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0, 0.0, 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def em_f1(prediction: str, ground_truth: str) -> tuple[float, float]:
    """(EM as 0.0/1.0, F1) — what the environment puts in `info` on Finish."""
    return float(exact_match_score(prediction, ground_truth)), f1_score(prediction, ground_truth)[0]

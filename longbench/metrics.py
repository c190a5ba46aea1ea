"""The official LongBench metrics, each mapping (prediction, one reference) to a number in [0, 1].

They follow the reference ``metrics.py`` of THUDM/LongBench exactly, quirks included, because the
quirks move task scores by tenths of a point:

* ROUGE-L comes from the ``rouge`` package 1.0.1 (pltrdy) and any exception scores 0 -- including the
  ``RecursionError`` its recursive LCS reconstruction raises on long sentences (about 990 words for
  two identical texts). Where that cut-off falls depends on how deep the caller's stack already is, so
  :func:`rouge_detail` gives the package exactly the headroom it has under the official ``eval.py``
  (``<module> -> scorer -> rouge_score``), whatever the entry point (see :func:`official_headroom`).
* Chinese text is segmented with ``jieba`` 0.42.1 (``cut_all=False``).
* ``classification_score`` removes items from a list while iterating over it (skipping the next one).
* ``code_sim_score`` uses fuzzywuzzy 0.18.0's ``ratio`` with its pure-Python ``difflib`` matcher,
  re-implemented below so that an installed ``python-Levenshtein`` can never switch the backend.
"""

from __future__ import annotations

import difflib
import logging
import re
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import cache

CODE_SIM_BACKEND = "difflib (fuzzywuzzy 0.18.0 ratio semantics)"

_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ALL_PUNCTUATION = frozenset(string.punctuation + _ZH_PUNCTUATION)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, replace the articles a/an/the by a space, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, delete all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


def f1_tokens(prediction: list[str], reference: list[str]) -> float:
    """Multiset-overlap F1 between two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Token F1 after SQuAD-style normalisation (English QA tasks and TriviaQA)."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_cut(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Token F1 over jieba words, each normalised separately; empty words dropped (MultiFieldQA-zh)."""
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(ground_truth)) if t]
    return f1_tokens(pred, ref)


def stack_headroom() -> int:
    """How many more nested Python calls fit in the caller's frame before ``RecursionError``."""
    def dive(depth: int) -> int:
        try:
            return dive(depth + 1)
        except RecursionError:
            return depth

    return dive(0)


# The official scorer's call chain, run as a script: ``python eval.py`` calls ``scorer`` at module
# level, ``scorer`` calls the metric, the metric calls ``Rouge().get_scores``.
_OFFICIAL_CHAIN = """
import sys
sys.setrecursionlimit({limit})
{probe}
def rouge_score(prediction, ground_truth, **kwargs):
    print(stack_headroom())
    return 0.0
def scorer(dataset, predictions, answers, all_classes):
    for prediction, ground_truths in zip(predictions, answers):
        for ground_truth in ground_truths:
            max(0.0, rouge_score(prediction, ground_truth, all_classes=all_classes))
scorer("gov_report", ["a"], [["a"]], None)
"""


@cache
def official_headroom(limit: int) -> int:
    """The headroom ``Rouge().get_scores`` gets under the official ``eval.py`` with recursion limit
    ``limit``, measured once per process by running the official call chain in this interpreter."""
    import inspect

    probe = inspect.getsource(stack_headroom)
    script = _OFFICIAL_CHAIN.format(limit=limit, probe=probe)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cannot measure the official scorer's stack headroom: {done.stderr.strip()}")
    return int(done.stdout.strip())


def rouge_detail(prediction: str, ground_truth: str) -> tuple[float, str | None]:
    """ROUGE-L F of the ``rouge`` package and the failure kind: None, ``"recursion"`` or ``"error"``.
    The recursion limit is shifted for the call so that the package has the official headroom."""
    from rouge import Rouge

    rouge = Rouge()
    limit = sys.getrecursionlimit()
    here = stack_headroom()  # measured in this frame, like the probe in rouge_score of the official chain
    sys.setrecursionlimit(limit - here + official_headroom(limit))
    try:
        scores = rouge.get_scores([prediction], [ground_truth], avg=True)
    except RecursionError:
        return 0.0, "recursion"
    except Exception:  # noqa: BLE001 -- the official scorer catches everything (empty hypothesis too)
        return 0.0, "error"
    finally:
        sys.setrecursionlimit(limit)
    return scores["rouge-l"]["f"], None


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F, 0 on any exception (GovReport, QMSum, MultiNews, SAMSum)."""
    return rouge_detail(prediction, ground_truth)[0]


def zh_words(text: str) -> str:
    """jieba segmentation joined by single spaces, the input form of ``rouge_zh_score``."""
    return " ".join(_jieba_cut(text))


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F over jieba words (DuReader, VCSUM)."""
    return rouge_score(zh_words(prediction), zh_words(ground_truth))


def classification_score(prediction: str, ground_truth: str, *, all_classes: list[str], **_) -> float:
    """1/k when the reference is among the k class names found in the prediction (TREC, LSHT)."""
    matches = [name for name in all_classes if name in prediction]
    for name in matches:  # mutating while iterating skips the next item: the official behaviour
        if name in ground_truth and name != ground_truth:
            matches.remove(name)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _digit_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return float(sum(1 for n in numbers if n == target) / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of digit runs in the prediction equal to the reference paragraph id (PassageRetrieval-en)."""
    return _digit_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of digit runs equal to the reference ``段落N`` id (PassageRetrieval-zh)."""
    return _digit_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of digit runs in the prediction equal to the reference count (PassageCount)."""
    return _digit_share(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` 0.18.0 with the difflib matcher: 100 if equal, 0 if one side is empty,
    else ``round(100 * SequenceMatcher(None, a, b).ratio())``."""
    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def first_code_line(prediction: str) -> str:
    """The first line free of backticks, ``#`` and ``//`` after leading newlines ('' if none)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Edit similarity of the first code line with the reference line (LCC, RepoBench-P)."""
    return fuzz_ratio(first_code_line(prediction), ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}


def get_metric(name: str) -> Callable[..., float]:
    """The metric function called ``name``; ``ValueError`` listing the known metrics otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; accepted: {', '.join(METRICS)}") from None


def metric_with_failure(name: str, prediction: str, ground_truth: str,
                        all_classes: list[str] | None = None) -> tuple[float, str | None]:
    """Score one pair and say whether the official scorer silently failed on it (ROUGE exceptions)."""
    if name == "rouge_score":
        return rouge_detail(prediction, ground_truth)
    if name == "rouge_zh_score":
        return rouge_detail(zh_words(prediction), zh_words(ground_truth))
    return get_metric(name)(prediction, ground_truth, all_classes=all_classes), None

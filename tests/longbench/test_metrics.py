"""Every metric against the official scorer's expected outputs (metric_cases.json), plus own cases."""

from __future__ import annotations

import pytest

from kvpress.longbench import metrics
from kvpress.longbench.scoring import score_sample, score_task, score_task_e
from kvpress.longbench.tasks import resolve_config

TOL = 1e-9


def test_every_official_metric_case(metric_cases):
    failures = []
    for case in metric_cases["metric_cases"]:
        fn = metrics.get_metric(case["metric"])
        got = fn(case["prediction"], case["ground_truth"], all_classes=case.get("all_classes"))
        if abs(got - case["expected"]) > TOL:
            failures.append((case["id"], got, case["expected"]))
    assert not failures
    assert len(metric_cases["metric_cases"]) >= 41


def test_every_metric_is_covered_by_the_official_cases(metric_cases):
    assert {c["metric"] for c in metric_cases["metric_cases"]} >= set(metrics.METRICS) - {"retrieval_zh_score"} 


@pytest.mark.parametrize("case_id", ["first_line_triviaqa", "first_line_trec", "max_over_answers",
                                     "no_first_line_for_qa", "rounding"])
def test_official_scorer_cases(metric_cases, case_id):
    case = next(c for c in metric_cases["scorer_cases"] if c["id"] == case_id)
    task = resolve_config(case["task"]).task
    records = [{"pred": p, "answers": a, "all_classes": case["all_classes"]}
               for p, a in zip(case["predictions"], case["answers"])]
    assert score_task(task, records)[0] == case["expected_task_score"]


def test_official_e_bucket_edges(metric_cases):
    case = metric_cases["scorer_e_cases"][0]
    task = resolve_config(case["task"] + "_e").task
    records = [{"pred": p, "answers": a, "all_classes": None, "length": n}
               for p, a, n in zip(case["predictions"], case["answers"], case["lengths"])]
    assert score_task_e(task, records) == case["expected"]


def test_rouge_recursion_failure_is_zero_and_counted(metric_cases):
    case = next(c for c in metric_cases["metric_cases"] if c["id"] == "rouge_recursion_identical_1200")
    task = resolve_config("gov_report").task
    sample = score_sample(task, case["prediction"], [case["ground_truth"]])
    assert sample.score == 0.0 and sample.rouge_recursion


def test_empty_predictions_score_zero_everywhere():
    classes = ["City", "Country"]
    for name, fn in metrics.METRICS.items():
        reference = {"retrieval_score": "Paragraph 3", "retrieval_zh_score": "段落3",
                     "count_score": "3"}.get(name, "City")
        assert fn("", reference, all_classes=classes) == 0.0, name


def test_chinese_tokenisation_uses_jieba_words():
    # jieba splits 我们 / 在 / 北京 / 开会 ; the reference 北京 is one of four words
    assert metrics.qa_f1_zh_score("我们在北京开会", "北京") == pytest.approx(2 * 0.25 * 1 / 1.25)
    # full-width punctuation and spaces vanish, 《 is kept (absent from the reference set)
    assert metrics.normalize_zh_answer("《红楼梦》， 作者") == "《红楼梦作者"
    assert metrics.qa_f1_zh_score("北京。", "北京") == 1.0
    # rouge over jieba words: identical text with no period gives (almost) 1
    assert metrics.rouge_zh_score("会议讨论了预算", "会议讨论了预算") == pytest.approx(1.0, abs=1e-7)


def test_multi_line_code_predictions_take_the_first_clean_line():
    prediction = "\n\n```python\n# set up\n    total = sum(values)  \nreturn total\n```"
    assert metrics.first_code_line(prediction) == "    total = sum(values)  "
    assert metrics.code_sim_score(prediction, "    total = sum(values)  ") == 1.0
    assert metrics.code_sim_score("// a\n// b", "x") == 0.0


def test_fuzz_ratio_matches_fuzzywuzzy_difflib_backend():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    import difflib

    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("python-Levenshtein installed: fuzzywuzzy is not on the difflib backend")
    pairs = [("print(a, b)", "foo(bar, baz)"), ("", ""), ("", "x"), ("abc", "abc"), ("a" * 250, "a" * 240 + "b"),
             ("self.x = 1", "self.y = 2")]
    for a, b in pairs:
        assert metrics.fuzz_ratio(a, b) == fuzz.ratio(a, b)


def test_classification_with_several_candidate_classes():
    classes = ["Food", "Date", "City", "Country", "Other location", "Individual"]
    assert metrics.classification_score("City, Country or Date", "City", all_classes=classes) == pytest.approx(1 / 3)
    assert metrics.classification_score("Individual", "City", all_classes=classes) == 0.0
    # "location" alone is not a class; "Other location" found once
    assert metrics.classification_score("Other location", "Other location", all_classes=classes) == 1.0
    # list-mutation quirk: after removing "A" the scan skips "AB", which stays in the list
    assert metrics.classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC"]) == 0.5


def test_retrieval_zh_and_count_digit_runs():
    assert metrics.retrieval_zh_score("段落3", "段落3") == 1.0
    assert metrics.retrieval_zh_score("段落13", "段落3") == 0.0
    assert metrics.count_score("7 or 8", "7") == 0.5


def test_unknown_metric_names_the_accepted_ones():
    with pytest.raises(ValueError, match="qa_f1_score"):
        metrics.get_metric("bleu")


# Sample scores (passage_count: the share of digit runs equal to the reference "3") whose bucket score
# differs between round(100 * sum / len, 2) and the official round(100 * np.mean(x), 2).
E_PREDICTIONS = {0.0: "4", 1.0: "3", 0.5: "3 4", 0.25: "3 4 4 4", 0.75: "3 3 3 4", 1 / 3: "3 4 4",
                 2 / 3: "3 3 4", 0.4: "3 3 4 4 4", 0.6: "3 3 3 4 4", 0.8: "3 3 3 3 4"}
E_VALUES = [0.0, 0.75, 1.0, 1.0, 0.5, 0.8, 2 / 3, 0.0, 1 / 3, 0.4, 0.25, 0.75, 2 / 3, 0.75, 0.25, 1 / 3, 0.75,
            0.5, 0.4, 1.0, 0.25, 1.0, 0.4, 0.6]


def test_e_bucket_rounds_like_np_mean():
    import numpy as np

    official = float(round(100 * np.mean(E_VALUES), 2))
    assert official == 55.62 and round(100 * sum(E_VALUES) / len(E_VALUES), 2) == 55.63  # the case discriminates
    task = resolve_config("passage_count_e").task
    records = [{"pred": E_PREDICTIONS[v], "answers": ["3"], "all_classes": None, "length": 100} for v in E_VALUES]
    assert [score_sample(task, r["pred"], r["answers"]).score for r in records] == pytest.approx(E_VALUES)
    assert score_task_e(task, records)["0-4k"] == official


OFFICIAL_EVAL = """
import sys
from rouge import Rouge

def rouge_score(prediction, ground_truth, **kwargs):  # LongBench/metrics.py
    rouge = Rouge()
    try:
        scores = rouge.get_scores([prediction], [ground_truth], avg=True)
    except:
        return 0.0
    return scores["rouge-l"]["f"]

def scorer(dataset, predictions, answers, all_classes):  # LongBench/eval.py
    total_score = 0.
    for (prediction, ground_truths) in zip(predictions, answers):
        score = 0.
        for ground_truth in ground_truths:
            score = max(score, rouge_score(prediction, ground_truth, all_classes=all_classes))
        total_score += score
    return round(100 * total_score / len(predictions), 2)

lo, hi = int(sys.argv[1]), int(sys.argv[2])  # identical texts of lo words score 100, of hi words 0
assert scorer("gov_report", [" ".join(f"w{i}" for i in range(lo))], [[" ".join(f"w{i}" for i in range(lo))]], None) > 0
assert scorer("gov_report", [" ".join(f"w{i}" for i in range(hi))], [[" ".join(f"w{i}" for i in range(hi))]], None) == 0
while hi - lo > 1:
    mid = (lo + hi) // 2
    text = " ".join(f"w{i}" for i in range(mid))
    if scorer("gov_report", [text], [[text]], None) > 0:
        lo = mid
    else:
        hi = mid
print(lo)
"""


def _nested(depth: int, fn):
    return fn() if depth == 0 else _nested(depth - 1, fn)


def test_rouge_recursion_cut_off_is_the_official_one_at_any_stack_depth():
    """The longest pair of identical texts the official eval.py (run as a script) still scores, found by
    bisection, scores here too, and one word more fails, however deep the caller's stack is."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OFFICIAL_EVAL, "985", "996"], capture_output=True, text=True,
                          check=True)
    longest = int(done.stdout)
    task = resolve_config("gov_report").task
    for depth in (0, 150):
        for words, expected in ((longest, 1.0), (longest + 1, 0.0)):
            text = " ".join(f"w{i}" for i in range(words))
            sample = _nested(depth, lambda t=text: score_sample(task, t, [t]))
            assert sample.score == pytest.approx(expected, abs=1e-6), (depth, words)
            assert sample.rouge_recursion == (expected == 0.0)

"""Prompt construction (exact strings for all 21 v1 tasks), middle truncation and chat-template rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvpress.longbench import prompts
from kvpress.longbench.tasks import resolve_config, tasks

DATA = Path(__file__).parent / "data"

RECORD = {"context": "<CONTEXT>", "input": "<INPUT>", "answers": ["x"], "length": 1, "_id": "r"}

# The official templates filled with <CONTEXT> / <INPUT>, byte for byte.
EXPECTED = {
    'narrativeqa': 'You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: <CONTEXT>\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: <INPUT>\n\nAnswer:',
    'qasper': 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: <CONTEXT>\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: <INPUT>\n\nAnswer:',
    'multifieldqa_en': 'Read the following text and answer briefly.\n\n<CONTEXT>\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: <INPUT>\nAnswer:',
    'multifieldqa_zh': '阅读以下文字并用中文简短回答：\n\n<CONTEXT>\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：<INPUT>\n回答：',
    'hotpotqa': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n<CONTEXT>\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: <INPUT>\nAnswer:',
    '2wikimqa': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n<CONTEXT>\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: <INPUT>\nAnswer:',
    'musique': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n<CONTEXT>\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: <INPUT>\nAnswer:',
    'dureader': '请基于给定的文章回答下述问题。\n\n文章：<CONTEXT>\n\n请基于上述文章回答下面的问题。\n\n问题：<INPUT>\n回答：',
    'gov_report': 'You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n<CONTEXT>\n\nNow, write a one-page summary of the report.\n\nSummary:',
    'qmsum': 'You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n<CONTEXT>\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: <INPUT>\nAnswer:',
    'multi_news': 'You are given several news passages. Write a one-page summary of all news. \n\nNews:\n<CONTEXT>\n\nNow, write a one-page summary of all the news.\n\nSummary:',
    'vcsum': '下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n<CONTEXT>\n\n会议总结：',
    'trec': 'Please determine the type of the question below. Here are some examples of questions.\n\n<CONTEXT>\n<INPUT>',
    'triviaqa': 'Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n<CONTEXT>\n\n<INPUT>',
    'samsum': 'Summarize the dialogue into a few short sentences. The following are some examples.\n\n<CONTEXT>\n\n<INPUT>',
    'lsht': '请判断给定新闻的类别，下面是一些例子。\n\n<CONTEXT>\n<INPUT>',
    'passage_count': 'There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n<CONTEXT>\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ',
    'passage_retrieval_en': 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n<CONTEXT>\n\nThe following is an abstract.\n\n<INPUT>\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    'passage_retrieval_zh': '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n<CONTEXT>\n\n下面是一个摘要\n\n<INPUT>\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    'lcc': 'Please complete the code given below. \n<CONTEXT>Next line of code:\n',
    'repobench-p': 'Please complete the code given below. \n<CONTEXT><INPUT>Next line of code:\n',
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_v1_prompt_is_the_official_text(name):
    assert prompts.build_prompt(tasks()[name], RECORD) == EXPECTED[name]


def test_all_21_tasks_have_an_expected_prompt():
    assert set(EXPECTED) == set(tasks()) and len(tasks()) == 21


def test_spacing_quirks_of_the_official_templates():
    p = {name: prompts.build_prompt(t, RECORD) for name, t in tasks().items()}
    assert p["narrativeqa"].count("asconcisely") == 2
    assert "<CONTEXT>\n\n Answer the question based on the above article" in p["qasper"]
    assert "Write a one-page summary of all news. \n\nNews:" in p["multi_news"]
    assert p["passage_count"].endswith("The final answer is: ")
    assert p["passage_retrieval_en"].endswith("The answer is: ")
    assert p["lcc"] == "Please complete the code given below. \n<CONTEXT>Next line of code:\n"
    assert p["repobench-p"].endswith("<CONTEXT><INPUT>Next line of code:\n")
    assert p["trec"].endswith("<CONTEXT>\n<INPUT>") and p["lsht"].endswith("<CONTEXT>\n<INPUT>")
    assert p["triviaqa"].endswith("<CONTEXT>\n\n<INPUT>") and p["samsum"].endswith("<CONTEXT>\n\n<INPUT>")


def test_record_braces_are_not_parsed():
    record = dict(RECORD, context="def f(): return {'a': 1}", input="{input}")
    assert "return {'a': 1}" in prompts.build_prompt(tasks()["lcc"], record)
    assert prompts.build_prompt(tasks()["hotpotqa"], record).endswith("Question: {input}\nAnswer:")


def _synthetic_records():
    return [json.loads(line) for line in (DATA / "synthetic_sample.jsonl").read_text().splitlines() if line]


def test_worked_example_of_the_spec(tokenizer):
    """hotpotqa synthetic record: 160 tokens, truncated to 64, 94 with SmolLM2's chat template."""
    record = next(r for r in _synthetic_records() if r["dataset"] == "hotpotqa" and not r["_id"].startswith("synthetic-e"))
    prompt = prompts.build_prompt(tasks()["hotpotqa"], record)
    assert prompts.count_tokens(tokenizer, prompt) == 160
    encoded = prompts.encode(tokenizer, prompt, task=tasks()["hotpotqa"], max_length=64)
    assert encoded.raw_tokens == 160 and encoded.truncated and encoded.templated
    assert encoded.truncated_tokens == 64
    assert len(encoded.input_ids) == 94


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_middle_truncation_keeps_head_and_tail_for_every_task(tokenizer, name):
    task = tasks()[name]
    words = " ".join(f"w{i}" for i in range(300))
    record = dict(RECORD, context=words, input="question " + words[:200])
    prompt = prompts.build_prompt(task, record)
    ids = tokenizer(prompt).input_ids
    assert len(ids) > 100
    text, raw = prompts.truncate_middle(tokenizer, prompt, 100)
    assert raw == len(ids)
    head = tokenizer.decode(ids[:50], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-50:], skip_special_tokens=True)
    assert text == head + tail
    # a byte-level BPE slice may cut a multi-byte character: it decodes to U+FFFD (official behaviour)
    assert prompt.startswith(head.rstrip("\ufffd")) and prompt.endswith(tail.lstrip("\ufffd"))
    assert abs(prompts.count_tokens(tokenizer, text) - 100) <= 3
    # odd limits use int(max_length / 2) on each side
    assert prompts.truncate_middle(tokenizer, prompt, 101)[0] == text


def test_prompt_under_the_limit_is_unchanged(tokenizer):
    prompt = prompts.build_prompt(tasks()["trec"], RECORD)
    assert prompts.truncate_middle(tokenizer, prompt, 10_000) == (prompt, prompts.count_tokens(tokenizer, prompt))
    assert prompts.truncate_middle(tokenizer, prompt, None)[0] == prompt


@pytest.mark.parametrize("mode", prompts.CHAT_TEMPLATE_MODES)
def test_chat_template_routing(tokenizer, mode):
    for name, task in tasks().items():
        expected = {"none": False, "hf_all": True, "official": not task.skip_chat_template}[mode]
        assert prompts.use_chat_template(tokenizer, task, mode) is expected, name
    skip = {n for n, t in tasks().items() if t.skip_chat_template}
    assert skip == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert prompts.use_chat_template(tokenizer, None, "official")  # LongBench v2: always


def test_templated_prompt_is_one_user_turn(tokenizer):
    task = tasks()["hotpotqa"]
    prompt = prompts.build_prompt(task, RECORD)
    encoded = prompts.encode(tokenizer, prompt, task=task, max_length=None)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == expected
    raw = prompts.encode(tokenizer, prompt, task=tasks()["lcc"], max_length=None)
    assert not raw.templated and raw.input_ids == tokenizer(prompt).input_ids


class _BosTokenizer:
    """Stand-in tokenizer whose chat template writes the BOS string itself (Llama-3 style)."""

    chat_template = "{{ bos }}"
    bos_token = "<s>"

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        ids = [ord(c) for c in text]
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<s>[U]" + messages[0]["content"] + "[A]"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 1)


def test_no_second_bos_when_the_template_writes_it():
    tok = _BosTokenizer()
    encoded = prompts.encode(tok, "hi", task=tasks()["hotpotqa"], max_length=None)
    assert tok.calls[-1] is False
    assert encoded.input_ids[:3] == [ord("<"), ord("s"), ord(">")]


def test_v2_prompt_replaces_placeholders_in_order():
    record = {"context": "  doc $Q$  ", "question": " Why? ", "choice_A": "a", "choice_B": "b", "choice_C": "c",
              "choice_D": "d"}
    text = prompts.build_v2_prompt(record, "0shot")
    assert "<text>\ndoc Why?\n</text>" in text  # $Q$ inside the document is replaced too (official order)
    assert text.endswith('Format your response as follows: "The correct answer is (insert answer here)".')
    assert "(A) a\n(B) b\n(C) c\n(D) d" in text
    with pytest.raises(ValueError, match="0shot"):
        prompts.build_v2_prompt(record, "fewshot")


def test_unknown_chat_template_mode():
    with pytest.raises(ValueError, match="official"):
        prompts.use_chat_template(None, None, "always")


def test_e_config_uses_its_base_task():
    config = resolve_config("qasper_e")
    assert config.is_e and config.task.name == "qasper"
    with pytest.raises(ValueError, match="hotpotqa"):
        resolve_config("musique_e")  # musique has no LongBench-E config


V2_RECORD = {"context": " ".join(f"w{i}" for i in range(300)), "question": "Which one?", "choice_A": "a",
             "choice_B": "b", "choice_C": "c", "choice_D": "d"}


@pytest.mark.parametrize("max_length", [100, 101])
def test_v2_truncation_is_the_official_v2_rule(tokenizer, max_length):
    prompt = prompts.build_v2_prompt(V2_RECORD, "0shot")
    ids = tokenizer.encode(prompt)
    text, raw = prompts.truncate_middle_v2(tokenizer, prompt, max_length)
    # LongBench v2 pred.py: input_ids[:max_len//2] + input_ids[-max_len//2:], decoded once
    assert raw == len(ids) and text == tokenizer.decode(ids[:max_length // 2] + ids[-max_length // 2:],
                                                         skip_special_tokens=True)
    assert prompts.truncate_middle_v2(tokenizer, prompt, len(ids)) == (prompt, len(ids))
    if max_length % 2:  # v1's rule keeps int(max_length / 2) on each side: one token less
        assert prompts.truncate_middle(tokenizer, prompt, max_length)[0] != text


def test_v2_uses_its_own_limit_not_the_v1_one(tokenizer):
    prompt = prompts.build_v2_prompt(V2_RECORD, "0shot")
    v2 = prompts.encode(tokenizer, prompt, task=None, max_length=101)
    assert v2.truncated and tokenizer.decode(v2.input_ids).count("Which one?") == 1
    assert v2.truncated_tokens == prompts.count_tokens(tokenizer, prompts.truncate_middle_v2(tokenizer, prompt, 101)[0])


def test_the_question_follows_the_context_in_every_official_template():
    for name, task in tasks().items():
        assert prompts.context_tail(task, RECORD) is not None, name
        if "{input}" in task.prompt:
            assert "<INPUT>" in prompts.context_tail(task, RECORD), name
    assert prompts.v2_context_tail(V2_RECORD, "0shot").startswith("\n</text>\n\nWhat is the correct answer")
    assert prompts.v2_context_tail(V2_RECORD, "0shot_no_context") is None  # nothing to compress
    assert prompts.v2_context_tail(V2_RECORD, "0shot_cot_ans") is None  # the document is omitted there


def test_question_first_template_is_not_split():
    task = dataclasses.replace(tasks()["hotpotqa"], prompt="Question: {input}\n\n{context}\n\nAnswer:")
    assert prompts.context_tail(task, RECORD) is None


@pytest.mark.parametrize("name, max_length", [("hotpotqa", None), ("hotpotqa", 120), ("lcc", None),
                                              ("passage_retrieval_en", 150)])
def test_context_split_is_at_the_end_of_the_context(tokenizer, name, max_length):
    task = tasks()[name]
    record = dict(RECORD, context=" ".join(f"w{i}" for i in range(200)) + " LAST", input="Who wrote it?")
    prompt = prompts.build_prompt(task, record)
    tail = prompts.context_tail(task, record)
    plain = prompts.encode(tokenizer, prompt, task=task, max_length=max_length)
    split = prompts.encode(tokenizer, prompt, task=task, max_length=max_length, tail=tail)
    assert split.input_ids == plain.input_ids and plain.context_end is None  # same tokens, only a split point
    head = tokenizer.decode(split.input_ids[:split.context_end])
    rest = tokenizer.decode(split.input_ids[split.context_end:])
    assert head.endswith(" LAST") and rest.startswith(tail)
    assert "Who wrote it?" not in head


def test_no_split_when_truncation_cut_into_the_tail(tokenizer):
    task = tasks()["hotpotqa"]
    record = dict(RECORD, context=" ".join(f"w{i}" for i in range(200)), input=" ".join(f"q{i}" for i in range(80)))
    prompt = prompts.build_prompt(task, record)
    encoded = prompts.encode(tokenizer, prompt, task=task, max_length=60, tail=prompts.context_tail(task, record))
    assert encoded.truncated and encoded.context_end is None

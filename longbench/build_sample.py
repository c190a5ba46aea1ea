"""Build the bundled LongBench-format sample set from real text that ships with Python.

    python -m kvpress.longbench.build_sample            # rewrite longbench/data/*.jsonl
    python -m kvpress.longbench.build_sample --check    # exit 1 if the files differ from a rebuild

Four tasks, three samples each, prompts of about 1k tokens so a run on CPU takes a minute or two:

* ``lcc`` (code completion, ``code_sim_score``): the lines of a standard-library module preceding a
  chosen line of code; the reference is that line.
* ``passage_count`` (``count_score``): paragraphs of the Python language reference (``pydoc_data``),
  some repeated, shuffled; the reference is the number of distinct paragraphs.
* ``passage_retrieval_en`` (``retrieval_score``): numbered reference paragraphs; the "abstract" is the
  first sentence of one of them; the reference is ``Paragraph k``.
* ``multifieldqa_en`` (``qa_f1_score``): fact questions over the history section of Python's
  ``LICENSE.txt``; every reference is checked to occur in the document.

Everything is deterministic (fixed seeds, sorted inputs), so the same Python version rebuilds the
same files. The bundled files were built with Python ``BUILT_WITH``; other versions may differ in
the source text and therefore in the records.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

BUILT_WITH = "3.11.7"
SEED = 20240601
SAMPLES = 3
CODE_CHARS = 3600        # about 1k tokens of Python source before the line to complete
PARAGRAPHS = 12          # paragraph slots per passage_count / passage_retrieval context
LICENSE_CHARS = 4200

CODE_FILES = ("textwrap.py", "shlex.py", "calendar.py")
LICENSE_QUESTIONS = (  # (question, accepted answers) over the history section of LICENSE.txt
    ("In which country was Python created?", ["the Netherlands", "Netherlands"]),
    ("Which organization was formed in 2001 to own Python-related Intellectual Property?",
     ["Python Software Foundation", "PSF"]),
    ("In which town did Guido continue his work on Python in 1995?", ["Reston, Virginia", "Reston"]),
)


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_tag() -> str:
    return f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def word_length(*texts: str) -> int:
    """LongBench ``length`` for English and code: whitespace-split words of input, context, answers."""
    return sum(len(t.split()) for t in texts)


def record(task: str, index: int, context: str, input_: str, answers: list[str]) -> dict:
    """A record with exactly the keys of the official files."""
    return {"input": input_, "context": context, "answers": answers,
            "length": word_length(input_, context, *answers), "dataset": task, "language": "en",
            "all_classes": None, "_id": f"sample-{task}-{index:02d}"}


def statement_lines(source: str) -> set[int]:
    """1-based first lines of the statements of a module, docstrings excluded."""
    return {node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.stmt)
            and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))}


def is_code_line(line: str) -> bool:
    """A line worth completing: long enough, free of the metric's comment markers, ending a call or
    opening a block."""
    text = line.strip()
    return len(text) >= 16 and not any(m in line for m in ("#", "`", "//")) and text.endswith((")", ":"))


def code_samples(rng: random.Random) -> list[dict]:
    out = []
    for index, name in enumerate(CODE_FILES):
        source = (stdlib() / name).read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        starts = statement_lines(source)
        prefix_chars = [0]
        for line in lines:
            prefix_chars.append(prefix_chars[-1] + len(line))
        candidates = [i for i, line in enumerate(lines) if prefix_chars[i] >= CODE_CHARS and i + 1 in starts and is_code_line(line)]
        cut = rng.choice(candidates)
        start = cut
        while start > 0 and prefix_chars[cut] - prefix_chars[start - 1] <= CODE_CHARS:
            start -= 1
        context = "".join(lines[start:cut])
        out.append(record("lcc", index, context, "", [lines[cut].rstrip("\n")]))
    return out


def reference_paragraphs() -> list[str]:
    """Prose paragraphs (40-90 words, no code or headings) of the language reference in pydoc_data."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.split("\n")
            if any(line.startswith(" ") or set(line.strip()) <= set("*=-") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if 40 <= len(text.split()) <= 90 and text.endswith(".") and text not in found:
                found.append(text)
    return found


def numbered(paragraphs: list[str]) -> str:
    return "\n\n".join(f"Paragraph {i}: {p}" for i, p in enumerate(paragraphs, start=1))


def count_samples(rng: random.Random, pool: list[str]) -> list[dict]:
    out = []
    for index in range(SAMPLES):
        unique = rng.randint(6, 9)
        chosen = rng.sample(pool, unique)
        slots = chosen + [rng.choice(chosen) for _ in range(PARAGRAPHS - unique)]
        rng.shuffle(slots)
        out.append(record("passage_count", index, numbered(slots), "", [str(len(set(slots)))]))
    return out


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])\s+[A-Z\"]", text)
    return match.group(1) if match else text


def retrieval_samples(rng: random.Random, pool: list[str]) -> list[dict]:
    out = []
    for index in range(SAMPLES):
        chosen = rng.sample(pool, PARAGRAPHS)
        target = rng.randrange(PARAGRAPHS)
        out.append(record("passage_retrieval_en", index, numbered(chosen), first_sentence(chosen[target]),
                          [f"Paragraph {target + 1}"]))
    return out


def license_samples() -> list[dict]:
    text = (stdlib() / "LICENSE.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, LICENSE_CHARS)
    document = text[:cut].strip()
    out = []
    for index, (question, answers) in enumerate(LICENSE_QUESTIONS):
        missing = [a for a in answers if a not in document]
        if missing:
            raise RuntimeError(f"LICENSE.txt of {python_tag()} no longer contains {missing}; update the questions")
        out.append(record("multifieldqa_en", index, document, question, answers))
    return out


def build() -> dict[str, list[dict]]:
    """All sample records, by task."""
    rng = random.Random(SEED)
    pool = reference_paragraphs()
    return {
        "lcc": code_samples(rng),
        "passage_count": count_samples(rng, pool),
        "passage_retrieval_en": retrieval_samples(rng, pool),
        "multifieldqa_en": license_samples(),
    }


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    differ = []
    for task, records in build().items():
        path = out / f"{task}.jsonl"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != render(records):
                differ.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(render(records), encoding="utf-8")
            print(f"{path}: {len(records)} records")
    if differ:
        print("differs from a rebuild: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

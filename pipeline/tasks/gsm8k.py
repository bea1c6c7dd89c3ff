"""GSM8K grade-school maths: the hub (`openai/gsm8k`, main, test split), a local jsonl file, or
offline GSM-Symbolic problems generated from GSM8K templates by `reasoning-gym` (seeded)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config_tasks import STYLES, Gsm8kConfig
from pipeline.errors import UserError
from pipeline.sampling import seeded_sample
from pipeline.tasks.base import Task, TaskPrompts, disjoint
from pipeline.tasks.rows import Layout, read_rows
from pipeline.tasks.scoring import parse_number

# reasoning-gym appends this instruction to every question; our prompt states the format itself
_RG_SUFFIX = re.compile(r"\s*Give the result as your final answer\.?\s*(Do not include units\.?)?\s*$")


@dataclass(frozen=True)
class MathItem:
    id: str
    question: str
    answer: str  # the final number, digits only (e.g. "-3", "1250", "2.5")


def load_gsm8k(source: str, n: int, seed: int = 0, fields: dict | None = None) -> list[MathItem]:
    """`n` items: source "reasoning-gym" (offline), "hub" (openai/gsm8k test), or a local file
    (.jsonl, .json, .parquet, .csv) with `question` and `answer` fields (answer "... #### N" as in
    GSM8K, or just the number), or fields that `evaluate.gsm8k.fields` maps."""
    return gsm8k_source(source, n, seed, fields)[0]


def gsm8k_source(source: str, n: int, seed: int = 0, fields: dict | None = None
                 ) -> tuple[list[MathItem], dict[str, Any]]:
    if n < 1:
        raise UserError(f"n = {n} items: ask for at least 1")
    if source in ("reasoning-gym", "gsm_symbolic"):
        return reasoning_gym_items(n, seed), {"source": "reasoning-gym", "dataset": "gsm_symbolic"}
    if source == "hub":
        items, record = _hub_items(), {"source": "hub", "dataset": "openai/gsm8k", "split": "test"}
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"GSM8K source {source!r}: expected 'reasoning-gym', 'hub', or an existing file "
                            "(.jsonl, .json, .parquet or .csv)")
        items, rows = read_file(path, fields)
        record = {"source": str(path), **rows.record()}
    return seeded_sample(items, n, seed), record


def gold_number(answer: str) -> str:
    """The final number of a GSM8K answer field ('... #### 1,250' → '1250') or of a bare number."""
    text = str(answer)
    tail = text.rsplit("####", 1)[-1]
    value = parse_number(tail)
    if value is None:
        raise ValueError(f"answer {answer!r} ends in no number")
    return _fmt(value)


def _fmt(value) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return repr(float(value)) if len(str(float(value))) < 20 else str(value)


def _hub_items() -> list[MathItem]:
    try:
        from datasets import load_dataset

        rows = load_dataset("openai/gsm8k", "main", split="test")
    except Exception as e:  # connection, offline mode, missing cache
        raise UserError(f"GSM8K from the hub failed ({e.__class__.__name__}): use source 'reasoning-gym' (offline) "
                        "or a local .jsonl file") from None
    return [MathItem(f"gsm8k-test-{i}", r["question"], gold_number(r["answer"])) for i, r in enumerate(rows)]


LAYOUTS = (Layout("gsm8k", {"question": "question", "answer": "answer", "id": "id"}, frozenset({"id"})),)


def read_file(path: Path, fields: dict | None = None):
    """(items, pipeline.tasks.rows.Rows) of a local file of questions and numeric answers."""
    rows = read_rows(Path(path), "gsm8k", LAYOUTS, fields)
    items = []
    for where, row in rows.rows:
        try:
            items.append(MathItem(str(row.get("id", f"{Path(path).stem}-{len(items) + 1}")), str(row["question"]),
                                  gold_number(str(row["answer"]))))
        except ValueError:
            raise UserError(f"{where}: 'answer' {row['answer']!r} ends in no number ('... #### N' or N)") from None
    return items, rows


def read_jsonl(path: Path) -> list[MathItem]:
    return read_file(path)[0]


def reasoning_gym_items(n: int, seed: int = 0) -> list[MathItem]:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("GSM8K source 'reasoning-gym' needs the reasoning-gym package: pip install reasoning-gym") from None
    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [MathItem(f"gsm-symbolic-{seed}-{i}", _RG_SUFFIX.sub("", row["question"]).strip(), gold_number(row["answer"]))
            for i, row in enumerate(data)]


# --- as an evaluation task --------------------------------------------------------------------------

# "debate": the multiagent-debate prompts of Du et al. (2023), the NL baseline the paper compares with
# (first round, then "solutions from other agents"). "brief": ours, asks for short solutions so that a
# slow CPU can decode them within a small token budget.
DEBATE = ("Can you solve the following math problem? {question} Explain your reasoning. Your final answer "
          "should be a single numerical number, in the form \\boxed{{answer}}, at the end of your response.")
DEBATE_READ = ("These are the solutions to the problem from other agents:\n\nOne agent solution: {message}\n\n"
               "Using the solutions from other agents as additional information, can you provide your answer "
               "to the math problem? The original math problem is {question} Your final answer should be a "
               "single numerical number, in the form \\boxed{{answer}}, at the end of your response.")
BRIEF = ("Solve the math problem. Be brief: write only the calculations needed, one short line each, then "
         "give the final answer on the last line as 'Answer: <number>'.\n\nProblem: {question}")
BRIEF_READ = BRIEF + "\n\nAnother assistant's solution:\n{message}"


def gsm8k_prompts(items: Sequence[MathItem], style: str = "debate", source: dict[str, Any] | None = None
                  ) -> TaskPrompts:
    from pipeline.tasks.scoring import gsm8k_correct

    if style not in STYLES:
        raise UserError(f"GSM8K prompt style {style!r} is not one of {', '.join(STYLES)}")
    ask, read = (DEBATE, DEBATE_READ) if style == "debate" else (BRIEF, BRIEF_READ)

    def with_message(i, message):
        return read.format(question=items[i].question, message=message.strip())

    def score(i, text):
        return {"accuracy": gsm8k_correct(text, items[i].answer)}

    def shown(text):
        from pipeline.tasks.scoring import extract_number

        value = extract_number(text)
        return "" if value is None else _fmt(value)

    texts = [ask.format(question=it.question) for it in items]
    return TaskPrompts("gsm8k", [it.id for it in items], texts, list(texts), None, with_message, score, "accuracy",
                       ("accuracy",), "Solution:", (), [it.answer for it in items], source=dict(source or {}),
                       shown=shown)


def _build(cfg: Gsm8kConfig, n: int | None, exclude: frozenset[str]) -> TaskPrompts:
    ask = DEBATE if cfg.prompt == "debate" else BRIEF
    record: dict[str, Any] = {}

    def load(k):
        items, info = gsm8k_source(cfg.source, k, cfg.seed, cfg.fields)
        record.update(info)
        return items

    items = disjoint(load, n or cfg.n, exclude, lambda it: ask.format(question=it.question))
    return gsm8k_prompts(items, cfg.prompt, record)


TASK = Task("gsm8k", Gsm8kConfig, _build, "grade-school maths; both agents see the question")

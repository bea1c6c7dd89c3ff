"""SQuAD-format reading comprehension: the hub (`rajpurkar/squad`), a local file (a SQuAD v1.1 JSON
file, or rows in the hub's layout -- id, title, context, question, answers {text, answer_start} --
as .jsonl, .json, .parquet or .csv, or in a layout `evaluate.squad.fields` maps), or our own seeded
generator of fictional biographies and countries (offline, no package ships SQuAD).

The generator writes a paragraph of facts about an invented person or country (names built from
syllables, so no model can know them) and asks about one fact; the answer is a span of the
paragraph, with its character offset, exactly as in SQuAD. Same seed, same items, on every machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config_tasks import SquadConfig
from pipeline.errors import UserError
from pipeline.sampling import seeded_sample
from pipeline.tasks.base import Task, TaskPrompts, disjoint
from pipeline.tasks.rows import Layout, distinct_keys, read_rows, strings


@dataclass(frozen=True)
class QAItem:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]  # gold answer texts (spans of the context)
    answer_starts: tuple[int, ...]  # character offset of each answer in the context
    title: str = ""


def load_squad(source: str, n: int, seed: int = 0, fields: dict | None = None) -> list[QAItem]:
    """`n` items: source "generate" (offline), "hub" (rajpurkar/squad validation), or a local file.

    Hub and file items are a seeded sample of n questions (all of them when fewer)."""
    return squad_source(source, n, seed, fields)[0]


def squad_source(source: str, n: int, seed: int = 0, fields: dict | None = None
                 ) -> tuple[list[QAItem], dict[str, Any]]:
    """load_squad's items and what the run's record says about them."""
    if n < 1:
        raise UserError(f"n = {n} items: ask for at least 1")
    if source == "generate":
        return generate_items(n, seed), {"source": "generate", "passages": f"generated, seed {seed}"}
    if source == "hub":
        items, record = _hub_items(), {"source": "hub", "dataset": "rajpurkar/squad", "split": "validation"}
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"SQuAD source {source!r}: expected 'generate', 'hub', or an existing file "
                            "(SQuAD v1.1 .json, or .jsonl, .parquet, .csv rows)")
        items, record = read_squad(path, fields)
    return seeded_sample(items, n, seed), record


def _hub_items() -> list[QAItem]:
    from pipeline.tasks.scoring import answer_key

    try:
        from datasets import load_dataset

        rows = load_dataset("rajpurkar/squad", split="validation")
    except Exception as e:  # connection, offline mode, missing cache: many exception types
        raise UserError(f"SQuAD from the hub failed ({e.__class__.__name__}): use source 'generate' (offline) "
                        "or a local SQuAD v1.1 .json file") from None
    items = []
    for r in rows:  # an answer that normalizes to nothing would let an empty reply match: dropped
        kept = [(t, int(s)) for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]) if answer_key(t)]
        if kept:
            items.append(QAItem(str(r["id"]), r["context"], r["question"], tuple(t for t, _ in kept),
                                tuple(s for _, s in kept), r.get("title", "")))
    return items


# The hub's row layout (a SQuAD v1.1 file is read into it, pipeline/tasks/rows.py); `answers` may also
# be a string or a list of strings (offsets then found in the context).
LAYOUTS = (Layout("squad", {"context": "context", "question": "question", "answers": "answers", "id": "id",
                            "title": "title"}, frozenset({"id", "title"})),)


def read_squad(path: Path, fields: dict | None = None) -> tuple[list[QAItem], dict[str, Any]]:
    """Every answerable question of a local file, and the record of its layout."""
    rows = read_rows(path, "squad", LAYOUTS, fields)
    items, seen = [], set()
    for where, row in rows.rows:
        for key in ("context", "question"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string")
        answers = row["answers"]
        starts = None
        if isinstance(answers, dict):
            starts = answers.get("answer_start")
            answers = answers.get("text")
        texts = strings(where, "answers", answers)
        distinct_keys(where, "answer", list(dict.fromkeys(texts)))  # annotators repeat answers: kept once
        if not isinstance(starts, list) or len(starts) != len(texts):
            starts = [row["context"].find(t) for t in texts]
        item_id = str(row.get("id", f"{path.stem}-{len(items) + 1}"))
        if item_id in seen:
            raise UserError(f"{where}: id {item_id!r} appears twice: ids must be unique")
        seen.add(item_id)
        items.append(QAItem(item_id, row["context"], row["question"], tuple(texts), tuple(int(s) for s in starts),
                            str(row.get("title", ""))))
    return items, {"source": str(path), **rows.record()}


def read_squad_json(path: Path) -> list[QAItem]:
    """Every answerable question of a SQuAD v1.1 (or v2.0: impossible ones skipped) JSON file."""
    if Path(path).suffix != ".json":
        raise UserError(f"{path}: not a SQuAD v1.1 .json file")
    return read_squad(Path(path))[0]


def write_squad_json(items: list[QAItem], path: Path) -> Path:
    """Items as a SQuAD v1.1 JSON file (one article per title)."""
    articles: dict[str, list] = {}
    for it in items:
        articles.setdefault(it.title, []).append({"context": it.context, "qas": [{
            "id": it.id, "question": it.question,
            "answers": [{"text": a, "answer_start": s} for a, s in zip(it.answers, it.answer_starts)]}]})
    data = {"version": "1.1", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return Path(path)


# --- the offline generator ------------------------------------------------------------------------

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z",
           "th", "sh", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ae"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "x"]

FIELDS = ["botany", "astronomy", "chemistry", "geology", "linguistics", "medicine", "architecture",
          "mathematics", "philosophy", "economics", "music", "zoology", "history", "law"]
OCCUPATIONS = ["engineer", "pharmacist", "teacher", "cartographer", "journalist", "judge", "surgeon",
               "librarian", "architect", "diplomat", "watchmaker", "painter", "shipbuilder", "translator"]
WORKS = ["bridge", "observatory", "dictionary", "atlas", "symphony", "railway", "library", "canal", "museum",
         "treaty", "lighthouse", "cathedral"]
REGIONS = ["northern", "southern", "eastern", "western", "central"]
GEOGRAPHY = ["sea", "mountains", "plains", "islands", "lakes", "desert", "coast"]
EXPORTS = ["copper", "wool", "timber", "salt", "olive oil", "tin", "cotton", "silk", "coffee", "amber", "rice", "marble"]


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


class _Paragraph:
    """Builds a context sentence by sentence and remembers where each fact's answer text starts."""

    def __init__(self) -> None:
        self.text = ""
        self.facts: list[tuple[str, str, int]] = []  # (question, answer, start)

    def add(self, parts: list[str | tuple[str, str]]) -> None:
        """parts: plain strings, or (answer_text, question) pairs marking an askable span."""
        if self.text:
            self.text += " "
        for part in parts:
            if isinstance(part, tuple):
                answer, question = part
                self.facts.append((question, answer, len(self.text)))
                self.text += answer
            else:
                self.text += part


def _biography(rng: random.Random) -> tuple[str, _Paragraph]:
    first, last = _word(rng, rng.randint(1, 2)), _word(rng, rng.randint(2, 3))
    name = f"{first} {last}"
    she = rng.random() < 0.5
    he, his = ("She", "her") if she else ("He", "his")
    born = rng.randint(1720, 1900)
    married = born + rng.randint(19, 40)
    died = born + rng.randint(max(married - born + 5, 45), 95)
    town, uni, city, spouse_last = (_word(rng, 2), _word(rng, 2), _word(rng, 3), _word(rng, 2))
    spouse = f"{_word(rng, 2)} {spouse_last}"
    field_, job, work = rng.choice(FIELDS), rng.choice(OCCUPATIONS), rng.choice(WORKS)
    work_name = f"{_word(rng, 2)} {work}"
    p = _Paragraph()
    p.add([f"{name} was born in ", (str(born), f"In what year was {name} born?"), " in the town of ",
           (town, f"In which town was {name} born?"), "."])
    p.add([f"{he} studied ", (field_, f"What did {name} study?"), " at the ",
           (f"University of {uni}", f"At which university did {name} study?"), "."])
    p.add([f"After graduating, {he.lower()} worked as a ", (job, f"What did {name} work as?"), " in ",
           (city, f"In which city did {name} work?"), "."])
    p.add([f"{he} is best known for the ", (work_name, f"What is {name} best known for?"), "."])
    p.add([f"In {married}, {he.lower()} married ", (spouse, f"Whom did {name} marry?"), "."])
    p.add([f"{name} died in {died} at the age of ", (str(died - born), f"How old was {name} at death?"), "."])
    return name, p


def _country(rng: random.Random) -> tuple[str, _Paragraph]:
    country = _word(rng, rng.randint(2, 3))
    capital, mountain, currency = _word(rng, 2), _word(rng, 2), _word(rng, 1).lower()
    language = _word(rng, 2) + rng.choice(["ic", "ish", "ese", "an"])
    region = f"{rng.choice(REGIONS)} {_word(rng, 2)} {rng.choice(GEOGRAPHY)}"
    independence = rng.randint(1600, 1990)
    height, people = rng.randint(1200, 6800), rng.randint(2, 95) / 10 * rng.choice([1, 10])
    export = rng.choice(EXPORTS)
    p = _Paragraph()
    p.add([f"{country} is a small country in the ", (region, f"Where is {country}?"), "."])
    p.add(["Its capital is ", (capital, f"What is the capital of {country}?"), ", and its official language is ",
           (language, f"What is the official language of {country}?"), "."])
    p.add(["The currency of the country is the ", (currency, f"What is the currency of {country}?"), "."])
    p.add([f"{country} became independent in ", (str(independence), f"When did {country} become independent?"), "."])
    p.add(["Its highest peak is Mount ", (mountain, f"What is the highest peak of {country}?"), ", at ",
           (f"{height} metres", f"How high is the highest peak of {country}?"), "."])
    p.add(["About ", (f"{people:g} million", f"How many people live in {country}?"),
           " people live there, and its main export is ", (export, f"What is the main export of {country}?"), "."])
    return country, p


GENERATORS: dict[str, Callable[[random.Random], tuple[str, _Paragraph]]] = {
    "biography": _biography, "country": _country}


def generate_items(n: int, seed: int = 0, kinds: tuple[str, ...] = ("biography", "country")) -> list[QAItem]:
    """n SQuAD-format items, one question per paragraph, alternating between the kinds."""
    rng = random.Random(f"xmodel-squad-{seed}")
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        title, para = GENERATORS[kind](rng)
        question, answer, start = rng.choice(para.facts)
        assert para.text[start:start + len(answer)] == answer
        items.append(QAItem(f"gen-{seed}-{i}", para.text, question, (answer,), (start,), f"{kind}: {title}"))
    return items


# --- as an evaluation task --------------------------------------------------------------------------

SQUAD_ASK = "Answer the question with a short phrase. Reply with the answer only."
SQUAD_READ = ("Read the passage, then answer the question with a short phrase copied from the passage. "
              "Reply with the answer only.")


def _read(it: QAItem) -> str:
    return f"{SQUAD_READ}\n\nPassage: {it.context}\n\nQuestion: {it.question}"


def squad_prompts(items: Sequence[QAItem], setting: str = "private", source: dict[str, Any] | None = None
                  ) -> TaskPrompts:
    read = _read

    def ask(it):
        return f"{SQUAD_ASK}\n\nQuestion: {it.question}"

    def with_message(i, message):
        it = items[i]
        note = f"Another assistant, who read a passage about this, answered: {message.strip()}\n\n"
        return note + (read(it) if setting == "shared" else ask(it))

    def score(i, text):
        from pipeline.tasks.scoring import contains, squad_scores

        em, f1 = squad_scores(text, items[i].answers)
        return {"em": em, "f1": f1, "contains": contains(text, items[i].answers)}

    from pipeline.tasks.scoring import clean_prediction

    private = setting == "private"
    return TaskPrompts("squad", [it.id for it in items], [read(it) for it in items],
                       [ask(it) if private else read(it) for it in items],
                       [read(it) for it in items] if private else None, with_message, score, "em", ("em", "contains"),
                       "Answer:", ("\n",), [list(it.answers) for it in items], columns=("em", "f1", "contains"),
                       setting=setting, source=dict(source or {}), shown=clean_prediction,
                       carriers=[it.context for it in items])


def _build(cfg: SquadConfig, n: int | None, exclude: frozenset[str]) -> TaskPrompts:
    record: dict[str, Any] = {}

    def load(k):
        items, info = squad_source(cfg.source, k, cfg.seed, cfg.fields)
        record.update(info)
        return items

    # several questions may share a passage (SQuAD files: about five): items drawn apart from others
    # (training, the sweep) never share one with them
    items = disjoint(load, n or cfg.n, exclude, _read, lambda it: it.context)
    return squad_prompts(items, cfg.setting, record)


TASK = Task("squad", SquadConfig, _build, "SQuAD-format reading comprehension (private: only A reads the passage)")

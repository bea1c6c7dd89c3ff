"""Text corpora for extraction: the same texts, in the same order, go to both models."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import CorpusConfig
from pipeline.errors import UserError
from pipeline.sampling import seeded_sample  # noqa: F401  (re-exported: corpus sampling)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    index: list[int]  # row of each text in its source, stored as the store's text_index
    source: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i, t in zip(self.index, self.texts):
            h.update(f"{i}\t{t}\n".encode())
        return h.hexdigest()[:16]


def load_corpus(cfg: CorpusConfig) -> Corpus:
    """Candidate texts from the source, filtered by length, then a seeded sample of cfg.n of them."""
    if cfg.source == "pydoc":
        rows = pydoc_sentences()
    elif cfg.source == "c4":
        rows = _c4_rows(cfg)
    elif cfg.source.startswith("task:"):  # pipeline.task_corpus: one view per model role, read by extraction
        raise UserError(f"corpus.source = {cfg.source!r} is a task corpus, read per model role by `xmodel extract` "
                        "only: run this with the params that the task-corpus overlay was not applied to")
    else:
        rows = _file_rows(Path(cfg.source), cfg.text_field)
    candidates = [(i, t) for i, t in enumerate(rows) if cfg.min_chars <= len(t) <= cfg.max_chars]
    if not candidates:
        raise UserError(
            f"corpus {cfg.source!r} has no text of {cfg.min_chars}-{cfg.max_chars} characters "
            f"({len(rows)} rows read): give a non-empty corpus or widen corpus.min_chars/max_chars")
    candidates = seeded_sample(candidates, cfg.n, cfg.seed)
    return Corpus(texts=[t for _, t in candidates], index=[i for i, _ in candidates], source=cfg.source)


def pydoc_sentences() -> list[str]:
    """English prose sentences from CPython's bundled reference documentation (always installed)."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.splitlines()
            # Skip code samples, grammar rules and headings: prose paragraphs start unindented.
            if not lines or lines[0].startswith((" ", "\t")) or set(lines[-1].strip()) <= set("*=-"):
                continue
            prose = " ".join(line.strip() for line in lines)
            sentences.extend(s.strip() for s in _SENTENCE_END.split(prose) if s.strip())
    return sentences


def _file_rows(path: Path, field: str) -> list[str]:
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"corpus.source = {str(path)!r}: expected 'pydoc', 'c4', or a .txt/.jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read corpus {path}: {e.__class__.__name__}: {e}; give a readable UTF-8 file") from None
    if path.suffix == ".txt":
        return [line.strip() for line in lines if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            raise UserError(f"{path}:{n}: not a JSON object with a {field!r} field; fix the line or set corpus.text_field") from None
        if not isinstance(text, str):  # a number or a list would be stringified into a text nobody wrote
            kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(text), "null")
            raise UserError(f"{path}:{n}: field {field!r} is {kind} ({json.dumps(text)[:40]}), not a string; "
                            "fix the line or set corpus.text_field")
        rows.append(text.strip())
    return rows


def _c4_rows(cfg: CorpusConfig) -> list[str]:
    """C4 English, streamed: split documents into sentences until enough candidates are seen."""
    try:
        from datasets import load_dataset

        stream = load_dataset("allenai/c4", "en", split="train", streaming=True).shuffle(seed=cfg.seed, buffer_size=10_000)
        rows: list[str] = []
        for doc in stream:
            rows.extend(s.strip() for s in _SENTENCE_END.split(doc["text"].replace("\n", " ")))
            if len(rows) >= 20 * cfg.n:
                return rows
        return rows
    except Exception as e:  # the hub raises many types (connection, offline mode, auth)
        raise UserError(f"corpus 'c4' needs the dataset hub, which failed ({e.__class__.__name__}): use corpus.source = pydoc or a local .txt/.jsonl") from None

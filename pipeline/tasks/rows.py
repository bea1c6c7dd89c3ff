"""A task's items from a local file: the file's rows, the layout they follow, and the checks every
gold answer passes.

Files: `.jsonl` and `.json` (JSON lines, a list of objects, or one object holding them: SQuAD v1.1)
are read here, line by line, so that an error names `file:line` and a huge line is refused by its
size before it is parsed or tokenized; `.parquet` and `.csv` are read by `datasets.load_dataset`
(rows are named `file:row N`).

Layouts: each task names the fields it needs (`prompt_a`, `prompt_b`, `answer`, ... its *own*
names) and the layouts it knows, each a map from its names to a file's and the file fields it
knows and does not use (the KVComm games' `person`, `landmark`, `attitudes`). A file's layout is
recognised from its first row; `evaluate.<task>.fields` (own name -> file field, plus `ignore: [..]`)
is a layout of the user's own and replaces recognition. A field no layout knows is an error on the
row that has it (a typo like `answr` would otherwise drop what it holds), unless `ignore` lists it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pipeline.errors import UserError

MAX_ROW_BYTES = 1 << 20  # a row above 1 MiB is refused unread: no prompt of these tasks is near it,
#                          and a 128k-token context is about 0.5 MB of text
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
IGNORE = "ignore"  # the key of `evaluate.<task>.fields` listing file fields to drop


@dataclass(frozen=True)
class Layout:
    """How one kind of file names a task's fields."""

    name: str
    fields: Mapping[str, str]  # the task's own name -> the file's name
    optional: frozenset[str] = frozenset()  # own names a row may lack
    extra: tuple[str, ...] = ()  # file fields this layout knows and does not read

    def required(self) -> list[str]:
        return [f for own, f in self.fields.items() if own not in self.optional]

    def known(self) -> set[str]:
        return {*self.fields.values(), *self.extra}


@dataclass(frozen=True)
class Rows:
    """The rows of a file as the task's own fields, each with where it came from."""

    path: Path
    layout: str
    rows: list[tuple[str, dict[str, Any]]]  # (file:line, {own name: value})
    fields: dict[str, str] = field(default_factory=dict)  # the map that was used

    def record(self) -> dict[str, Any]:
        """What a run's record says about its items' file."""
        return {"file": str(self.path), "layout": self.layout, "fields": dict(self.fields), "rows": len(self.rows)}


def user_layout(task: str, fields: Mapping[str, Any], base: Layout) -> Layout:
    """The layout `evaluate.<task>.fields` describes: `base` (the task's own names) with the given
    own names mapped to file fields, and `ignore` added to the fields known and unused."""
    mapping, ignore = dict(base.fields), fields.get(IGNORE, [])
    if isinstance(ignore, str) or not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise UserError(f"evaluate.{task}.fields.{IGNORE} = {ignore!r}: give a list of field names")
    for own, theirs in fields.items():
        if own == IGNORE:
            continue
        if own not in base.fields:
            raise UserError(f"evaluate.{task}.fields: {own!r} is none of {task}'s fields "
                            f"({', '.join([*base.fields, IGNORE])})")
        if not isinstance(theirs, str) or not theirs:
            raise UserError(f"evaluate.{task}.fields.{own} = {theirs!r}: give the file's field name")
        mapping[own] = theirs
    return Layout("fields", mapping, base.optional, tuple(ignore))


def read_rows(path: Path, task: str, layouts: Sequence[Layout], fields: Mapping[str, Any] | None = None) -> Rows:
    """Every row of `path` in the task's own names, by the layout of `fields` or the first of
    `layouts` its first row matches (one clear line when none does)."""
    path = Path(path)
    raw = list(_raw_rows(path))
    if not raw:
        raise UserError(f"{path}: holds no item (no row, or no answerable question)")
    if fields:
        chosen = user_layout(task, fields, layouts[0])
        missing = [f for f in chosen.required() if f not in raw[0][1]]
        if missing:
            raise UserError(f"{raw[0][0]}: no field {', '.join(missing)} (evaluate.{task}.fields maps "
                            f"{task}'s fields to them); the row has {', '.join(raw[0][1]) or 'no field'}")
    else:
        chosen = recognise(raw[0], task, layouts)
    rows = [(where, _own(where, row, chosen, task)) for where, row in raw]
    return Rows(path, chosen.name, rows, dict(chosen.fields))


def recognise(first: tuple[str, dict[str, Any]], task: str, layouts: Sequence[Layout]) -> Layout:
    """The layout of a file's first row: the first whose required fields it has, preferring one that
    knows every field it has."""
    where, row = first
    have = set(row)
    fits = [lay for lay in layouts if set(lay.required()) <= have]
    for lay in fits:
        if have <= lay.known():
            return lay
    if fits:
        return fits[0]  # its unknown field is then named on the row (_own)
    wants = "; ".join(f"{lay.name} needs {', '.join(lay.required())} (missing "
                      f"{', '.join(f for f in lay.required() if f not in have)})" for lay in layouts)
    raise UserError(f"{where}: fields {', '.join(sorted(have)) or '(none)'} match no {task} layout: {wants}; "
                    f"or map them with evaluate.{task}.fields")


def _own(where: str, row: dict[str, Any], layout: Layout, task: str) -> dict[str, Any]:
    unknown = [k for k in row if k not in layout.known()]
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (layout {layout.name} reads "
                        f"{', '.join(layout.fields.values())}): fix its name, or add it to "
                        f"evaluate.{task}.fields.{IGNORE}")
    out = {}
    for own, theirs in layout.fields.items():
        if theirs in row and row[theirs] is not None:
            out[own] = row[theirs]
        elif own not in layout.optional:
            raise UserError(f"{where}: no field {theirs!r} (the {task} field {own}, layout {layout.name})")
    return out


# --- reading -------------------------------------------------------------------------------------

def _raw_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix == ".jsonl":
        yield from _json_lines(path)
    elif path.suffix == ".json":
        yield from _json_file(path)
    elif path.suffix in (".parquet", ".csv"):
        yield from _datasets_rows(path)
    else:
        raise UserError(f"{path}: a {path.suffix or 'suffix-less'} file; give one of {', '.join(SUFFIXES)}")


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None
    with handle:
        for n, line in enumerate(_lines(handle), 1):
            where = f"{path}:{n}"
            if len(line) > MAX_ROW_BYTES:
                raise UserError(f"{where}: a line over {MAX_ROW_BYTES:,} bytes, the most a row may hold (refused "
                                "unread): shorten it or drop it")
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))  # a BOM may open a file
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}): one JSON object per line") from None
            yield where, _object(where, row)


def _lines(handle) -> Iterator[bytes]:
    """Lines of a binary file, never holding more than MAX_ROW_BYTES + 1 of one in memory: an
    over-long line is returned cut (its length tells the caller to refuse it)."""
    while True:
        line = handle.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_ROW_BYTES and not line.endswith(b"\n"):
            yield line
            return
        yield line


def _json_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file, as datasets' json loader reads them
            yield from _json_lines(path)
            return
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):  # SQuAD v1.1 / v2.0
        yield from _squad_nested(path, data)
    elif isinstance(data, list):
        for n, row in enumerate(data, 1):
            where = f"{path}: row {n}"
            yield where, _sized(where, _object(where, row))
    else:
        yield f"{path}: row 1", _sized(f"{path}: row 1", _object(f"{path}: row 1", data))


def _squad_nested(path: Path, data: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Questions of a SQuAD v1.1 (v2.0: impossible ones skipped) file as flat rows of the layout
    of the hub's `rajpurkar/squad` (id, title, context, question, answers {text, answer_start})."""
    try:
        for a, article in enumerate(data["data"]):
            for p, para in enumerate(article["paragraphs"]):
                for q, qa in enumerate(para["qas"]):
                    if qa.get("is_impossible") or not qa["answers"]:
                        continue
                    where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                    yield where, _sized(where, {
                        "id": qa["id"], "title": article.get("title", ""), "context": para["context"],
                        "question": qa["question"],
                        "answers": {"text": [x["text"] for x in qa["answers"]],
                                    "answer_start": [x["answer_start"] for x in qa["answers"]]}})
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable SQuAD v1.1 JSON file ({e.__class__.__name__}: {e}); "
                        "expected {'data': [{'paragraphs': [{'context', 'qas': [...]}]}]}") from None


def _datasets_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import tempfile

    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix} files needs the datasets package: pip install datasets") from None
    try:
        path.stat()
        with tempfile.TemporaryDirectory() as cache:  # leave no cache behind in the user's HF folder
            datasets.disable_progress_bars()
            rows = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True).to_list()
    except Exception as e:  # pyarrow, pandas and OS errors: many types
        raise UserError(f"cannot read {path} as {path.suffix[1:]} ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        yield where, _sized(where, row)


def _object(where: str, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: a {type(row).__name__}, expected a JSON object of named fields")
    return row


def _sized(where: str, row: dict[str, Any]) -> dict[str, Any]:
    size = sum(len(v) for v in _strings(row))
    if size > MAX_ROW_BYTES:
        raise UserError(f"{where}: {size:,} characters of text, over the {MAX_ROW_BYTES:,} a row may hold: "
                        "shorten it or drop it")
    return row


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


# --- the checks every gold answer passes ---------------------------------------------------------

def strings(where: str, name: str, value: Any, allow_list: bool = True) -> list[str]:
    """A field holding a string (or a list of strings) as a list of non-empty strings."""
    values = [value] if isinstance(value, str) else value
    if (not isinstance(values, list) or not values or (not allow_list and len(values) != 1)
            or not all(isinstance(v, str) and v.strip() for v in values)):
        kind = "a non-empty string or a list of non-empty strings" if allow_list else "a non-empty string"
        raise UserError(f"{where}: '{name}' must be {kind}, not {value!r}")
    return values


def distinct_keys(where: str, name: str, values: Sequence[str]) -> None:
    """Refuse gold answers or options that say nothing once normalized ("The", "!!!": an empty
    reply would match them) or that two of them normalize to the same string."""
    from pipeline.tasks.scoring import answer_key

    seen: dict[str, str] = {}
    for v in values:
        key = answer_key(v)
        if not key:
            raise UserError(f"{where}: {name} {v!r} is empty once normalized (case, punctuation and the articles "
                            "a/an/the dropped), so an empty reply would match it: give a real answer")
        if key in seen:
            raise UserError(f"{where}: {name} {seen[key]!r} and {v!r} are the same once normalized: list each once")
        seen[key] = v

"""The files outside the repository that params name, by content.

A corpus `.txt`/`.jsonl`, a local model directory or `.gguf` file, and a task's local `source` file
(a SQuAD `.json`, a GSM8K or game `.jsonl`, ...) are chosen by params, so dvc.yaml cannot list them as
deps. The `inputs` stage (always run, cheap) writes one small JSON per consumer with their sha256;
the stages that read an input depend on its JSON, which changes only when the content does.

Names that are not local files (`pydoc`, `c4`, hub ids, catalog names, `generate`, ...) are recorded
as they are: params already pins them (a hub revision or catalog entry carries its own sha).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.errors import UserError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """sha256 of files keyed by (path, size, mtime, inode), so a multi-GB model directory is read
    once, not on every `dvc repro` (the same shortcut DVC's own state database takes)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs a re-hash

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key, stamp = str(file.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.entries.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        sha = sha256_file(file)
        self.entries[key] = [*stamp, sha]
        return sha

    def save(self) -> None:
        from pipeline.artifacts import write_json

        if self.path is not None:
            write_json(self.path, self.entries, sort_keys=True)


def describe(spec: str, hashes: HashCache) -> dict[str, Any]:
    """{"source": spec} plus {"sha256": ...} when spec is a local file, or {"files": {name: sha256}}
    for a local directory (its regular files, not recursing: a model directory is flat)."""
    out: dict[str, Any] = {"source": spec}
    path = Path(spec).expanduser() if spec.strip() else None  # Path("") would be the current directory
    if path is None or not path.exists():
        return out
    if path.is_file():
        out["sha256"] = hashes.sha256(path)
    elif path.is_dir():
        out["files"] = {f.name: hashes.sha256(f) for f in sorted(path.iterdir()) if f.is_file()}
    return out


def manifests(params: Any, hashes: HashCache) -> dict[str, dict[str, Any]]:
    """Name of each input manifest (its file is data/inputs/<name>.json) -> its content: `corpus`,
    `model-<role>` per model role, and `evaluate-<task>` per task of evaluate.tasks (its `source`)."""
    out = {"corpus": corpus_manifest(params, hashes)}
    for role, spec in sorted(params.models.items()):
        out[f"model-{role}"] = describe(spec, hashes)
    for task in params.evaluate.tasks:
        section = getattr(params.evaluate, task, None)
        source = getattr(section, "source", None)
        if source is not None and not isinstance(source, str):
            raise UserError(f"params: evaluate.{task}.source = {source!r} must be a string (a name or a path)")
        out[f"evaluate-{task}"] = describe(source, hashes) if source is not None else {}
    return out


def corpus_manifest(params: Any, hashes: HashCache) -> dict[str, Any]:
    """The corpus by content. A task corpus (`task:<name>`) is the task's items, which its section
    `evaluate.<name>` defines (its source file by content; its n and seed hold the evaluation items
    out), in `evaluate.chat`'s prompt format: params keys that params chooses, so dvc.yaml cannot
    declare them to extract, which depends on this manifest instead."""
    from dataclasses import asdict

    out = describe(params.corpus.source, hashes)
    name = params.corpus.task
    section = getattr(params.evaluate, name, None) if name else None
    if section is not None:  # an unknown task is refused by extract, with the names it knows
        out["evaluate"] = {"chat": params.evaluate.chat,
                           name: {**asdict(section), "source": describe(section.source, hashes)}}
    return out

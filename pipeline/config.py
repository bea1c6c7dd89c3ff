"""Typed configuration built from params.yaml.

Stages take these dataclasses, never raw dicts. Unknown keys and wrong types are refused with one
line naming the key, so a typo in params.yaml cannot silently fall back to a default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.config_evaluate import EvaluateConfig  # a leaf too: reading params imports no stage code
from pipeline.config_tasks import check_depths, check_range
from pipeline.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class CorpusConfig:
    # "pydoc" (CPython's reference prose, always offline), "c4" (hub, streamed), a .txt/.jsonl path, or
    # "task:<name>": a registered task's prompts, A's and B's (skyline) views of items disjoint from
    # evaluate.<name>'s (pipeline/task_corpus.py; n items drawn with seed, min/max_chars unused)
    source: str = "pydoc"
    n: int = 512
    seed: int = 0
    min_chars: int = 40
    max_chars: int = 300
    text_field: str = "text"  # the field read from .jsonl rows

    @property
    def task(self) -> str | None:
        """The task a `task:<name>` source names (pipeline/task_corpus.py), else None."""
        return self.source[len(TASK_CORPUS):] if self.source.startswith(TASK_CORPUS) else None


TASK_CORPUS = "task:"  # corpus.source prefix of a task corpus


@dataclass(frozen=True)
class ExtractConfig:
    # int = layer index (0 = embedding output, l = output of decoder block l);
    # float in [0, 1] = relative depth, rounded to the nearest index, so models of other depths pair up
    layers: list[int | float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.93])
    max_tokens: int = 48  # sequences are truncated to this many tokens (special tokens included)
    tokens_per_seq: int = 32  # per-token states kept for the first N tokens of each sequence; 0 = none
    unit_size: int = 256  # sequences per work unit; one unit = one shard of each sequence array
    batch_tokens: int = 4096  # padded tokens per forward batch (speed only, not part of the store identity)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (speed only)
    dtype: str = "auto"  # auto (CUDA bf16, MPS fp16, CPU fp32) | float32 | bfloat16 | float16
    store_dtype: str = "auto"  # auto (= compute dtype, lossless) | float32 | float16 | bfloat16


def _default_aligners() -> dict[str, dict[str, Any]]:
    # params.yaml's fit.aligners: all five fitted (one DVC stage each)
    trained = {"loss": "mse", "lr": 0.001, "batch_size": 32, "epochs": 100, "patience": 5}
    return {"procrustes": {}, "linear": {**trained, "weight_decay": 0.0}, "affine": {**trained, "weight_decay": 0.0},
            "lora": {"rank": 32, "base": "procrustes-affine", **trained}, "projection": {}}


@dataclass(frozen=True)
class FitConfig:
    # pooled | last | tokens; "last" is what AC sends and what the paper's W is trained on
    kind: str = "last"
    # (A layer, B layer): ints or relative depths, resolved against each store's model depth; the
    # pair must be among the stored layers. 0.93 is the paper's k = j = 26 of 28.
    layers: list[int | float] = field(default_factory=lambda: [0.93, 0.93])
    heldout_frac: float = 0.1  # in (0, 1): texts held out (hashed text_index) from every fit; all scores use them
    seed: int = 0  # the held-out split
    pairwise_rows: int = 4096  # held-out rows used by O(rows²) metrics (retrieval, InfoNCE, kNN, uniformity)
    temperature: float = 0.07  # in (0, 100]: of the InfoNCE score
    # torch threads while fitting; 0 = torch's default. Speed only. Mini-batch matmuls are small: on
    # a busy CPU extra OpenMP threads spin-wait (4× slower on 2 shared cores); GPUs ignore it.
    threads: int = 1
    # where trainable aligners train: auto (a GPU if there is one) | cpu | cuda[:N]. Speed only; under
    # torchrun they train on the CPU.
    device: str = "auto"
    # per-aligner hyper-parameters: name (or module:Class) -> fields of the aligner's Params dataclass
    aligners: dict[str, dict[str, Any]] = field(default_factory=lambda: _default_aligners())
    # per-layer maps of mapped KV (`xmodel kvmaps NAME`, one kvmaps@NAME stage each), fitted on the
    # per-token rows of every stored layer; none by default (A = B needs no map)
    layer_maps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GridConfig:
    kind: str = "last"  # pooled | last (sequence rows: one per text)
    knn_k: int = 10  # mutual k-NN neighbours


FUSE_VARIANTS = ("task", "prose")  # what the fuser trains on (pipeline/fuser.py)


@dataclass(frozen=True)
class FuseConfig:
    """The learned fuser (pipeline/fuser.py): one `fuse@<variant>` stage per entry of `variants`."""

    variants: list[str] = field(default_factory=list)  # task | prose; none in the default (A = B)
    task: str = "countries"  # the task variant's items (drawn apart from evaluate.<task>'s, train places)
    n_train: int = 192  # training items (task) or texts (prose)
    n_heldout: int = 32  # held out: early stopping and the reported loss
    seed: int = 1  # draws the items / texts (the evaluation's items are excluded whatever the seed)
    rank: int = 32  # of each layer's map A -> B (least-squares initialised, reduced-rank)
    ridge: float = 0.01  # of the least-squares initialisation, on standardized A states
    gate_init: float = 0.0  # initial gate logit of every layer: sigmoid(0) = 0.5 of the prefix's values
    answer_tokens: int = 16  # target tokens per item at most (teacher answer, or the text's second half)
    lr: float = 0.001
    epochs: int = 4
    patience: int = 1  # epochs without held-out improvement before stopping; 0 = run all epochs
    batch_size: int = 8
    device: str = "auto"  # auto (a GPU if there is one) | cpu | cuda[:N]
    dtype: str = "auto"  # the models' dtype: auto (CUDA bf16, CPU fp32) | float32 | bfloat16 | float16

    def __post_init__(self):
        for v in self.variants:
            if v not in FUSE_VARIANTS:
                raise UserError(f"params: fuse.variants: {v!r} is not one of {', '.join(FUSE_VARIANTS)}")
        for key in ("n_train", "n_heldout", "rank", "answer_tokens", "batch_size"):
            if isinstance(getattr(self, key), int) and getattr(self, key) < 1:
                raise UserError(f"params: fuse.{key} = {getattr(self, key)} must be at least 1")
        for key in ("epochs", "patience"):
            if isinstance(getattr(self, key), int) and getattr(self, key) < 0:
                raise UserError(f"params: fuse.{key} = {getattr(self, key)} must be 0 or more")
        for key in ("lr", "ridge"):
            value = getattr(self, key)
            if isinstance(value, (int, float)) and not (value > 0 and value < float("inf")):
                raise UserError(f"params: fuse.{key} = {value} must be a finite number > 0")
        if self.dtype not in DTYPES | {"auto"}:
            raise UserError(f"params: fuse.dtype = {self.dtype!r} is not one of {sorted(DTYPES | {'auto'})}")


@dataclass(frozen=True)
class PathsConfig:
    data: str = "data"  # stores in data/stores/<role>.zarr, model manifests in data/models/<role>.json
    cache: str = ""  # converted-model cache; "" = $XMODEL_CACHE or ~/.cache/xmodel

    # the data dir's layout has one owner, pipeline.artifacts.Layout; these are shorthands for it
    @property
    def layout(self):
        from pipeline.artifacts import Layout

        return Layout(Path(self.data))

    def store(self, role: str) -> Path:
        return self.layout.store(role)

    def aligner(self, name: str) -> Path:
        return self.layout.aligner(name)

    def metrics(self, name: str) -> Path:
        return self.layout.metrics(name)

    def manifest(self, role: str) -> Path:
        return self.layout.manifest(role)

    def cache_dir(self) -> Path:
        import os

        if self.cache:
            return Path(self.cache).expanduser()
        return Path(os.environ.get("XMODEL_CACHE", "~/.cache/xmodel")).expanduser()


@dataclass(frozen=True)
class Params:
    models: dict[str, str] = field(default_factory=lambda: {"a": "qwen2.5-coder-0.5b-instruct", "b": "qwen2.5-coder-0.5b-instruct"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def model_spec(self, role: str) -> str:
        if role not in self.models:
            raise UserError(f"unknown model role {role!r}: params.yaml 'models' defines {sorted(self.models)}")
        return self.models[role]

    def model_specs(self) -> tuple[str, str]:
        return self.model_spec("a"), self.model_spec("b")  # A's and B's, the pair evaluate and fuse load


def params_from_dict(raw: dict[str, Any]) -> Params:
    import dacite

    try:
        params = dacite.from_dict(Params, raw, config=dacite.Config(strict=True))
    except dacite.UnexpectedDataError as e:
        raise UserError(f"params: unknown key(s) {sorted(e.keys)}: remove them or fix the spelling") from None
    except dacite.WrongTypeError as e:
        raise UserError(f"params: {e.field_path} = {e.value!r} has the wrong type: expected {_type_name(e.field_type)}"
                        f"{yaml_number_hint(e.value)}") from None
    except dacite.DaciteError as e:
        raise UserError(f"params: {e}") from None
    check_scalars(params, Params, "")
    _validate(params)
    return params


def check_scalars(value: Any, hint: Any, key: str) -> None:
    """Two things a type check lets through, refused at any depth (dataclass fields, list items,
    mapping values): a boolean where the typed config does not ask for one (bool is a subclass of
    int, so dacite takes `corpus.n: true` for 1), and NaN or an infinity anywhere, fit.aligners'
    hyper-parameters included (YAML's .nan, .inf and 1e400 are floats)."""
    import math
    import typing
    from dataclasses import fields, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        for f in fields(value):
            check_scalars(getattr(value, f.name), hints.get(f.name, Any), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, bool):
        if hint is not Any and not _admits(hint, bool):
            raise UserError(f"params: {key} = {str(value).lower()} is a boolean: expected {_type_name(hint)}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"params: {key} = {value} is not a finite number: give a value in its range")
    elif isinstance(value, (list, tuple, dict)):
        member = next((a for a in _members(hint) if typing.get_origin(a) in (list, tuple, dict)), Any)
        item = (typing.get_args(member) or (Any,))[-1]
        for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
            check_scalars(v, item, f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]")


def _members(hint: Any) -> tuple:
    import types
    import typing

    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _admits(hint: Any, t: type) -> bool:
    return any(m is Any or m is t for m in _members(hint))


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None,
                overlays: Sequence[Path | str] = ()) -> Params:
    """The params of `path` (params.yaml; a missing file means all defaults, which are params.yaml's),
    with each overlay file merged over it in order (see merge_params), then the dotted overrides."""
    return params_from_dict(merged_params(path, overrides, overlays))


def merged_params(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None,
                  overlays: Sequence[Path | str] = ()) -> dict[str, Any]:
    """The raw mapping load_params validates: base file, overlays (each must exist), overrides."""
    path = Path(path)
    raw = read_params_file(path) if path.exists() else {}
    for overlay in overlays:
        overlay = Path(overlay)
        if not overlay.is_file():
            raise UserError(f"params file {str(overlay)!r} does not exist: check the path (profiles are "
                            f"profiles/<name>.yaml, e.g. --params profiles/tiny.yaml)")
        raw = merge_params(raw, read_params_file(overlay))
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                above = ".".join(parents[:i + 1])
                raise UserError(f"-S {key}={value!r}: {above} is {node!r}, not a section with keys: "
                                f"set {above} itself (-S {above}=VALUE) or check the key's spelling")
        node[leaf] = value
    return raw


def is_params_file(path: Path) -> bool:
    """Whether `path` is a file holding a YAML mapping of params sections only (what `xmodel
    profile --out` may replace: never a dvc.yaml or any other file)."""
    import yaml
    from dataclasses import fields

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and bool(raw) and set(raw) <= {f.name for f in fields(Params)}


def read_params_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def merge_params(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` deep-merged over `base` (neither is changed): mappings merge key by key, any other
    value (a list too) replaces the base's, and `null` removes the key, so its default applies (how a
    profile drops an entry of a mapping, e.g. `fit: {aligners: {lora: null}}`)."""
    out = dict(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_params(out[key], value)
        else:
            out[key] = value
    return out


def yaml_number_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML, DVC) reads 1e-4 as text, not a number: say so where a number was meant."""
    try:
        float(value)
    except (TypeError, ValueError):
        return ""
    return f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. 1.0e-4 or 2.0e+3)" if isinstance(value, str) else ""


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _validate(p: Params) -> None:
    e = p.extract
    positive = {"extract.max_tokens": e.max_tokens, "extract.unit_size": e.unit_size,
                "extract.batch_tokens": e.batch_tokens, "corpus.n": p.corpus.n}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"params: {key} = {value} must be at least 1")
    if e.tokens_per_seq < 0:
        raise UserError(f"params: extract.tokens_per_seq = {e.tokens_per_seq} must be 0 (none) or more")
    if not e.layers:
        raise UserError("params: extract.layers is empty: give layer indices (ints) or relative depths (floats in [0, 1])")
    check_depths("extract.layers", e.layers)
    f = p.fit
    if len(f.layers) != 2:
        raise UserError(f"params: fit.layers = {f.layers} must be a pair [A layer, B layer] (ints or relative depths)")
    check_depths("fit.layers", f.layers)
    check_range("fit.heldout_frac", f.heldout_frac, 0.0, 1.0, low_open=True, high_open=True)
    if f.threads < 0:
        raise UserError(f"params: fit.threads = {f.threads} must be 0 (torch's default) or more")
    for key, value in (("fit.pairwise_rows", f.pairwise_rows), ("grid.knn_k", p.grid.knn_k)):
        if value < 1:
            raise UserError(f"params: {key} = {value} must be at least 1")
    check_range("fit.temperature", f.temperature, 0.0, 100.0, low_open=True)
    for key, value in f.aligners.items():
        if not isinstance(value, dict):
            raise UserError(f"params: fit.aligners.{key} must be a mapping of hyper-parameters, got {value!r}")
    for key, value, allowed in (("extract.dtype", e.dtype, DTYPES | {"auto"}),
                                ("extract.store_dtype", e.store_dtype, DTYPES | {"auto"}),
                                ("fit.kind", f.kind, {"pooled", "last", "tokens"}),
                                ("grid.kind", p.grid.kind, {"pooled", "last"})):
        if value not in allowed:
            raise UserError(f"params: {key} = {value!r} is not one of {sorted(allowed)}")


DTYPES = {"float32", "bfloat16", "float16"}


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able value (dataclasses included)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

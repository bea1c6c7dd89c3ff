"""The two models under evaluation, their layers (k, j) and the fitted aligners between them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import UserError


@dataclass
class Pair:
    model_a: Any
    tok_a: Any
    model_b: Any
    tok_b: Any
    name_a: str = "A"
    name_b: str = "B"
    # what each model is by content (models.ResolvedModel.sha, as the stores record it as model_sha):
    # an aligner fitted on other models is refused even when the widths and depths agree
    sha_a: str | None = None
    sha_b: str | None = None

    @property
    def same_model(self) -> bool:
        """A and B are one model (one object, or the same weights by content): a run of one is a run of the other."""
        return self.model_a is self.model_b or (self.sha_a is not None and self.sha_a == self.sha_b)

    @property
    def width_a(self) -> int:
        from pipeline.architecture import architecture

        return architecture(self.model_a).width

    @property
    def width_b(self) -> int:
        from pipeline.architecture import architecture

        return architecture(self.model_b).width


def load_pair(specs: tuple[str, str], cache_dir: Path, device: str, dtype: str) -> Pair:
    """Models A and B by their specs (A's, B's), resolved through the converted-model cache
    `cache_dir` and loaded on `device` in `dtype`."""
    from pipeline.models import load_model, resolve_model

    models = []
    for spec in specs:
        resolved = resolve_model(spec, cache_dir)
        models.append((*load_model(resolved, device=device, dtype=dtype), spec, resolved.sha))
    (ma, ta, sa, ha), (mb, tb, sb, hb) = models
    return Pair(ma, ta, mb, tb, sa, sb, ha, hb)


def resolve_ks(pair: Pair, layer_a: int | float, layer_b: int | float) -> tuple[int, int]:
    from pipeline.architecture import architecture
    from pipeline.layers import resolve_layers

    return (resolve_layers([layer_a], architecture(pair.model_a).n_layers)[0],
            resolve_layers([layer_b], architecture(pair.model_b).n_layers)[0])


def load_aligners(names: Sequence[str], data_dir: Path, pair: Pair, k: int, j: int) -> dict[str, Any]:
    """Fitted aligners by name: each a directory with aligner.json, given as a path or as a name
    under <data_dir>/aligners/ (where `xmodel fit NAME` saves it). Each must have been fitted for
    these models: the model shas recorded in its meta (from the stores it was fitted on) must be the
    evaluated models' (when the pair knows them), its widths A's and B's, and its layers (keys
    layer_a/layer_b, or layers = {a, b}) k and j. A `module:Class` name may import its module
    (params named it); a kind that only aligner.json names is never imported.

    Each is read under the readers' side of the lock `xmodel fit` writes it under, after finishing
    a fit killed mid-commit, and carries `fingerprint` (artifacts.folder_hash of the bytes it was
    loaded from) and `directory`: what the evaluation record names it by (`fingerprints`)."""
    from pipeline.aligners.registry import load_aligner
    from pipeline.artifacts import Layout, aligner_lock, folder_hash, recover, shared

    out = {}
    folders = [Path(name).name for name in names]
    for name in names:
        path = Path(name).expanduser()
        key, trust = path.name, None
        if not (path / "aligner.json").is_file() and not _layer_maps(path) and not _fuser(path):
            # a name: where `xmodel fit NAME` (or kvmaps NAME) saved it
            path, trust = Layout(Path(data_dir)).aligner(name), name
        if _layer_maps(path) or _fuser(path):  # mapped KV's maps, a trained fuser: every layer, not (k, j)
            out[key] = _load_layer_maps(name, path, pair) if _layer_maps(path) else _load_fuser(path, pair)
            out[key].fingerprint, out[key].directory = folder_hash(path), _relative(path, Path(data_dir))
            continue
        with shared(aligner_lock(path), path):  # never a folder half replaced by a running fit
            recover(path)  # nor by a killed one: its commit is finished first
            aligner = load_aligner(path, trust=trust)
            aligner.fingerprint, aligner.directory = folder_hash(path), _relative(path, Path(data_dir))
        _check_models(name, path, aligner.meta or {}, pair)
        if (aligner.d_source, aligner.d_target) != (pair.width_a, pair.width_b):
            raise UserError(f"aligner {name} maps {aligner.d_source}→{aligner.d_target}, but the models are "
                            f"{pair.width_a}→{pair.width_b} wide: refit it on these models")
        meta = aligner.meta or {}
        layers = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
        la, lb = meta.get("layer_a", layers.get("a")), meta.get("layer_b", layers.get("b"))
        if (la is not None and int(la) != k) or (lb is not None and int(lb) != j):
            raise UserError(f"aligner {name} was fitted on layers ({la}, {lb}), but evaluation uses (k, j) = ({k}, {j}): "
                            "set evaluate.layer_a/layer_b to its layers or refit it")
        if trust is None and folders.count(key) > 1:  # one kind from two runs (data/in-task/aligners/lora and lora)
            key = f"{key}@{path.absolute().parents[1].name}"  # its data dir names it: lora@in-task
        if key in out:
            raise UserError(f"evaluate.aligners lists the aligner {key} twice: remove one")
        out[key] = aligner
    return out


def _relative(path: Path, data_dir: Path) -> Path:
    # relative to the data dir when inside it, so a record stays valid on a copy of data/
    try:
        return path.absolute().relative_to(data_dir.absolute())
    except ValueError:
        return path.absolute()


def fingerprints(aligners: dict[str, Any]) -> dict[str, dict[str, str]]:
    """What an evaluation record names each aligner it used by: its folder (relative to the data dir
    when inside it) and the hash of the weights and aligner.json it was loaded from (the report
    flags a record whose aligner has changed since)."""
    return {key: {"path": str(a.directory), "fingerprint": a.fingerprint}
            for key, a in aligners.items() if getattr(a, "fingerprint", None)}


def vector_aligners(aligners: dict[str, Any]) -> dict[str, Any]:
    """The one-vector aligners of evaluate.aligners (not the layer maps or fusers listed beside them)."""
    return {name: a for name, a in aligners.items() if hasattr(a, "transform")}


def _layer_maps(path: Path) -> bool:
    from pipeline.evaluation.mapped_kv import META

    return (path / META).is_file()


def _fuser(path: Path) -> bool:
    from pipeline.fuser import CONFIG

    return (path / CONFIG).is_file()


def _load_fuser(path: Path, pair: Pair) -> Any:
    from pipeline.fuser import load_fuser

    fuser = load_fuser(path)
    fuser.check(pair)
    fuser.net.to(next(pair.model_b.parameters()).device)  # its maps run where B does
    return fuser


def _load_layer_maps(name: str, path: Path, pair: Pair) -> Any:
    from pipeline.evaluation.mapped_kv import LayerMaps

    maps = LayerMaps.load(path)
    _check_models(name, path, maps.meta, pair)
    if (maps.meta.get("d_a"), maps.meta.get("d_b")) != (pair.width_a, pair.width_b):
        raise UserError(f"layer maps {name} map {maps.meta.get('d_a')}→{maps.meta.get('d_b')}, but the models are "
                        f"{pair.width_a}→{pair.width_b} wide: refit them on these models (`xmodel kvmaps`)")
    return maps.to(next(pair.model_b.parameters()).device)  # the maps run where B does


def _check_models(name: str, path: Path, meta: dict[str, Any], pair: Pair) -> None:
    """Refuse an aligner whose recorded models are not the pair's (by content sha)."""
    wanted = {"a": pair.sha_a, "b": pair.sha_b}
    if not any(wanted.values()):
        return  # a pair built by hand, without model identities: widths and layers are all there is
    recorded = meta.get("models") or {}
    for role, sha in wanted.items():
        theirs = (recorded.get(role) or {}).get("model_sha")
        if sha is None:
            continue
        if theirs is None:
            raise UserError(f"aligner {name} ({path}) does not record which models it was fitted on: "
                            f"refit it with `xmodel fit {Path(name).name} --force`")
        if theirs != sha:
            model = (recorded.get(role) or {}).get("model_id")
            raise UserError(f"aligner {name} was fitted on another model {role.upper()} ({model}, sha {str(theirs)[:12]}) "
                            f"than the one evaluated (sha {sha[:12]}): refit it on these models "
                            f"(`xmodel extract --model {role}`, then `xmodel fit {Path(name).name} --force`)")

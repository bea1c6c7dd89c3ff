"""The aligner interface: fit on row-aligned (source, target) activations, then map source → target.

Every aligner keeps its map as a torch module (`self.net`, float32) so one code path serves numpy
arrays (fit stage, metrics), dask arrays (lazily, block by block) and torch tensors on any device
(injection hooks). Saved as the folder `weights.safetensors` + `aligner.json`, built under a
temporary name and swapped in whole (`pipeline.artifacts`): an aligner folder is either the old one
or the new one, never half of each; one without aligner.json (a fit's checkpoint only) is refused
on load, as are damaged or non-finite weights.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.config import yaml_number_hint
from pipeline.errors import UserError
from pipeline.metrics import is_dask

WEIGHTS = "weights.safetensors"
CONFIG = "aligner.json"
FORMAT = 1

_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str}


def check_fields(params: Any) -> None:
    """Refuse a hyper-parameter of the wrong scalar type (call from __post_init__)."""
    for f in fields(params):
        want = _SCALARS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        value = getattr(params, f.name)
        bad_bool = isinstance(value, bool) and f.type in ("int", "float", int, float)
        if want is not None and (bad_bool or not isinstance(value, want)):
            raise UserError(f"{type(params).__name__}.{f.name} = {value!r}: expected {f.type}{yaml_number_hint(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # YAML's 1e400 is inf, and .nan is NaN
            raise UserError(f"{type(params).__name__}.{f.name} = {value!r}: expected a finite number")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class NoParams:
    pass


class Aligner:
    """Base class. Subclasses set `Params` (a frozen dataclass of hyper-parameters) and implement
    `build_net` (the module's structure, used by load) and `fit` (which sets d_source, d_target,
    net and fit_info)."""

    kind: ClassVar[str] = ""  # set by @register on the class itself; see kind_name()
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None, **overrides: Any):
        self.params = make_params(self.Params, params, overrides, self.kind_name())
        self.d_source: int | None = None
        self.d_target: int | None = None
        self.net: Any = None  # torch.nn.Module: (..., d_source) → (..., d_target)
        self.meta: dict[str, Any] = {}  # filled by the caller: layers, source store fingerprints
        self.fit_info: dict[str, Any] = {}  # what fitting measured; saved in aligner.json

    @classmethod
    def kind_name(cls) -> str:
        """The registered name, or `module:Class` for an unregistered class (so load can import it)."""
        return cls.__dict__.get("kind") or f"{cls.__module__}:{cls.__qualname__}"

    # -- to implement -------------------------------------------------------------------------
    def fit(self, source: Any, target: Any, **options: Any) -> Aligner:
        raise NotImplementedError

    def build_net(self, d_source: int, d_target: int) -> Any:
        raise NotImplementedError

    # -- mapping ------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.net is not None

    def transform(self, x: Any) -> Any:
        """Map rows (..., d_source) → (..., d_target). numpy in → float32 numpy out; torch in →
        torch out (same device and dtype, computed in float32); dask in → lazy dask out."""
        if not self.fitted:
            raise UserError(f"{self.kind_name()} aligner is not fitted: call fit() or load() first")
        if is_dask(x):
            if x.ndim != 2:
                raise UserError(f"dask input must be 2-D (rows, {self.d_source}), got {x.shape}")
            x = x.rechunk({1: -1})  # a block must hold whole rows
            return x.map_blocks(self._transform_numpy, dtype=np.float32, chunks=(x.chunks[0], (self.d_target,)))
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            return self._transform_torch(x)
        return self._transform_numpy(x)

    __call__ = transform

    def _transform_torch(self, x: Any) -> Any:
        import torch

        if x.shape[-1] != self.d_source:
            raise UserError(f"input width {x.shape[-1]} does not match the aligner's source width {self.d_source}")
        self.net.to(x.device)  # in place, and a no-op once the module is there
        with torch.no_grad():
            return self.net(x.to(torch.float32)).to(x.dtype)

    def _transform_numpy(self, x: Any) -> np.ndarray:
        import torch

        x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        return self._transform_torch(torch.from_numpy(x)).cpu().numpy()

    # -- weights ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"saved weights do not fit a {self.kind_name()} aligner "
                            f"{self.d_source}→{self.d_target}: {str(e).splitlines()[0]}") from None

    # -- persistence --------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        from pipeline import __version__

        return {"format": FORMAT, "kind": self.kind_name(), "d_source": self.d_source,
                "d_target": self.d_target, "params": asdict(self.params), "meta": self.meta,
                "fit": self.fit_info, "created_with": __version__}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the aligner as the folder `directory` (weights.safetensors + aligner.json), whole or
        not at all: it replaces an aligner folder (never anything else) only once complete. Under
        torch.distributed only rank 0 writes; every rank must call save (they meet at a barrier)."""
        from pipeline.artifacts import Outputs

        directory = Path(directory)
        from pipeline.distributed import group, is_main

        if is_main():
            with Outputs() as out:
                self.stage_save(out, directory)
        if group()[1] > 1:
            import torch.distributed as dist

            dist.barrier()
        return directory

    def stage_save(self, out: Any, directory: Path) -> None:
        """Add this aligner's folder to a stage's pending `artifacts.Outputs` (committed with the rest)."""
        from safetensors.torch import save

        if not self.fitted:
            raise UserError(f"nothing to save: the {self.kind_name()} aligner is not fitted")
        state = self.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:  # NaN weights map every row to NaN: never written, so nothing can load them
            raise UserError(f"the fitted {self.kind_name()} aligner has non-finite weights ({', '.join(bad)}); "
                            f"nothing was saved to {directory}: lower the learning rate, or check the stores "
                            "with `xmodel store verify`")
        weights = save(state)
        text = json.dumps(self.config(), indent=2, sort_keys=True, default=_json_default) + "\n"

        def build(tmp: Path) -> None:
            from pipeline.artifacts import raw_write

            raw_write(tmp / WEIGHTS, weights)
            raw_write(tmp / CONFIG, text)

        out.directory(directory, build, is_aligner_dir, "aligner directory")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Aligner:
        """Restore an aligner saved by `save`. Called on a subclass, the saved kind must match it;
        called on Aligner, the class is resolved from the saved kind: a registered name, a class
        whose module is already imported, or `trust` (a `module:Class` the caller was told to use,
        e.g. a name in params fit.aligners). aligner.json is user-editable: it never chooses which
        module gets imported."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = saved_config(directory)
        kind = cfg.get("kind", "?")
        if cls is Aligner:  # which class a saved kind is, is the registry's to say
            raise TypeError("Aligner.load needs the aligner's class: use pipeline.aligners.load_aligner(directory)")
        if kind != cls.kind_name():
            raise UserError(f"{directory} holds a {kind!r} aligner, not {cls.kind_name()!r}")
        try:
            obj = cls(params_from_dict(cls.Params, cfg["params"], kind))
            obj.d_source, obj.d_target = int(cfg["d_source"]), int(cfg["d_target"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{directory / CONFIG} is malformed ({type(e).__name__}: {e}): refit the aligner") from None
        obj.meta, obj.fit_info = cfg.get("meta", {}), cfg.get("fit", {})
        obj.net = obj.build_net(obj.d_source, obj.d_target)
        try:
            state = load_file(str(directory / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{directory / WEIGHTS} is damaged or missing ({e}): refit the aligner "
                            f"(`xmodel fit {directory.name} --force`)") from None
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise UserError(f"{directory / WEIGHTS} holds non-finite weights ({', '.join(bad)}): refit the aligner "
                            "with a lower learning rate")
        obj.load_state_dict(state)
        obj.net.eval()
        return obj

    def __repr__(self) -> str:
        dims = f"{self.d_source}→{self.d_target}" if self.fitted else "unfitted"
        return f"<{type(self).__name__} {self.kind_name()!r} {dims} {self.params}>"


# -- helpers shared by aligners and training ------------------------------------------------------


def make_params(params_cls: type, params: Any, overrides: dict[str, Any], kind: str) -> Any:
    if params is None:
        params = params_cls()
    elif not isinstance(params, params_cls):
        raise UserError(f"{kind}: params must be a {params_cls.__name__}, got {type(params).__name__}")
    if not overrides:
        return params
    valid = {f.name for f in fields(params_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise UserError(f"{kind}: unknown hyper-parameter(s) {unknown}: valid are {sorted(valid)}")
    return replace(params, **overrides)


def params_from_dict(params_cls: type, raw: dict[str, Any], kind: str) -> Any:
    return make_params(params_cls, None, dict(raw), kind)


_MASK64 = (1 << 64) - 1


def hashed_heldout(ids: np.ndarray, seed: int, frac: float) -> np.ndarray:
    """Whether each id is held out: splitmix64(id + seed·φ) < frac. A pure function of the id, so a
    split is the same whatever the row order, chunking or number of ranks."""
    z = np.asarray(ids).astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < frac


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over `path`: a kill leaves the old file or the new, never half
    (`pipeline.artifacts`, which also turns a full disk into one line)."""
    from pipeline.artifacts import write_file

    write_file(path, write)


def is_aligner_dir(path: Path) -> bool:
    """Whether `path` is a folder xmodel wrote as an aligner (or began to: a fit's checkpoint), so it
    may be replaced: only the files save and fit write, and an aligner.json of ours or a ckpt/."""
    names = {p.name for p in path.iterdir()}
    if not names <= {WEIGHTS, CONFIG, "ckpt"} | {n for n in names if n.endswith(".tmp")}:
        return False
    if not names or "ckpt" in names:
        return True
    try:
        return "format" in json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False


def saved_config(directory: Path) -> dict[str, Any]:
    """aligner.json of a finished aligner of this format (one line naming the fix otherwise)."""
    cfg = read_json(directory / CONFIG, f"{directory} holds no finished aligner (no {CONFIG}): fit one first")
    if cfg.get("format") != FORMAT:
        raise UserError(f"{directory / CONFIG}: format {cfg.get('format')!r} is not {FORMAT}: refit the aligner")
    return cfg


def read_json(path: Path, missing: str) -> dict[str, Any]:
    if not path.exists():
        raise UserError(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}): delete it and refit") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a JSON object: delete it and refit")
    return data


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)

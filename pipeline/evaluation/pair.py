"""The two models under evaluation, their layers (k, j) and the fitted aligners between them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvaluateConfig


@dataclass
class Pair:
    model_a: Any
    tok_a: Any
    model_b: Any
    tok_b: Any
    name_a: str = "A"
    name_b: str = "B"

    @property
    def width_a(self) -> int:
        return int(_text_config(self.model_a).hidden_size)

    @property
    def width_b(self) -> int:
        return int(_text_config(self.model_b).hidden_size)


def _text_config(model):
    return getattr(model.config, "text_config", None) or model.config


def load_pair(params: Any, cfg: EvaluateConfig) -> Pair:
    from pipeline.models import load_model, resolve_model

    models = {}
    for role in ("a", "b"):
        spec = params.model_spec(role)
        resolved = resolve_model(spec, params.paths.cache_dir())
        models[role] = (*load_model(resolved, device=cfg.device, dtype=cfg.dtype), spec)
    (ma, ta, sa), (mb, tb, sb) = models["a"], models["b"]
    return Pair(ma, ta, mb, tb, sa, sb)


def resolve_ks(pair: Pair, layer_a: int | float, layer_b: int | float) -> tuple[int, int]:
    from pipeline.layers import num_layers, resolve_layers

    return resolve_layers([layer_a], num_layers(pair.model_a))[0], resolve_layers([layer_b], num_layers(pair.model_b))[0]


def load_aligners(names: Sequence[str], data_dir: Path, pair: Pair, k: int, j: int) -> dict[str, Any]:
    """Fitted aligners by name: each a directory with aligner.json, given as a path or as a name
    under <data_dir>/aligners/ (`module:Class` names as `module.Class`, as the fit stage saves them).
    Widths must match A and B; layers recorded in the aligner's meta (keys layer_a/layer_b, or
    layers = {a, b}) must match k and j."""
    from pipeline.aligners import load_aligner

    out = {}
    for name in names:
        path = Path(name).expanduser()
        if not (path / "aligner.json").is_file():  # a name: where `xmodel fit NAME` saved it
            path = Path(data_dir) / "aligners" / name.replace(":", ".")
        aligner = load_aligner(path)
        if (aligner.d_source, aligner.d_target) != (pair.width_a, pair.width_b):
            raise UserError(f"aligner {name} maps {aligner.d_source}→{aligner.d_target}, but the models are "
                            f"{pair.width_a}→{pair.width_b} wide: refit it on these models")
        meta = aligner.meta or {}
        layers = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
        la, lb = meta.get("layer_a", layers.get("a")), meta.get("layer_b", layers.get("b"))
        if (la is not None and int(la) != k) or (lb is not None and int(lb) != j):
            raise UserError(f"aligner {name} was fitted on layers ({la}, {lb}), but evaluation uses (k, j) = ({k}, {j}): "
                            "set evaluate.layer_a/layer_b to its layers or refit it")
        out[Path(name).name] = aligner
    return out

"""Fitting an aligner from the two activation stores alone (no model is loaded), and scoring it.

The stores' rows are paired by text (`pipeline.pairing`), and a fixed share of the *texts* (hashed
text_index, `fit.seed`, `fit.heldout_frac`) is held out from every fit: every aligner and the layer
grid are scored on the same unseen texts. A trainable aligner splits the rows it is given once more
for its own early stopping (its `heldout_frac`), so it never sees the scoring texts.

An aligner directory records the inputs it was fitted on (`meta.inputs`: aligner, hyper-parameters,
activation kind, layers, widths, store fingerprints, split); a directory or checkpoint made from
other inputs is refused unless `force`, so nothing already written is replaced by accident.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.config import FitConfig
from pipeline.errors import UserError
from pipeline.pairing import Pairs, pair_rows

INPUTS = "inputs.json"  # in the checkpoint directory: what the checkpoint was made from


def read_stores(paths: tuple[Path, Path], held: ExitStack | None = None):
    """The stores at `paths`, each held with the readers' side of its lock until `held` closes (the
    fit and grid stages: no `xmodel extract --force` replaces a store under them)."""
    from pipeline.artifacts import shared, store_lock
    from store.reader import ActivationStore

    out = []
    for path in paths:
        if held is not None:
            held.enter_context(shared(store_lock(path), path))
        out.append(ActivationStore(path))
    return tuple(out)


def store_layer(store, spec: int | float) -> int:
    """A layer index (int) or relative depth (float) of the store's model, which must be stored."""
    from pipeline.layers import resolve_layers

    (layer,) = resolve_layers([spec], int(store.attrs.get("num_layers", max(store.layers))))
    if layer not in store.layers:
        what = f"relative depth {spec} is layer {layer} of {store.path}, which is" if isinstance(spec, float) \
            else f"layer {layer} of {store.path} is"
        raise UserError(f"{what} not stored (stored layers are {store.layers}): "
                        "choose a stored layer in fit.layers or add it to extract.layers")
    return layer


def split_pairs(a, b, kind: str, seed: int, heldout_frac: float) -> tuple[Pairs, Pairs]:
    """(training, held-out) paired rows; a text's rows are all on one side."""
    from pipeline.aligners.base import hashed_heldout

    pairs = pair_rows(a, b, kind)
    held = hashed_heldout(pairs.text, seed, heldout_frac)
    if held.all() or not held.any():
        raise UserError(f"{len(pairs)} paired rows leave no training or no held-out rows with fit.heldout_frac = "
                        f"{heldout_frac}: use more texts (corpus.n) or another fraction")
    return pairs.subset(~held), pairs.subset(held)


@dataclass(frozen=True)
class Paired:
    """Row-aligned train / held-out rows of one activation kind at one layer pair of two stores."""

    a: Any  # ActivationStore
    b: Any
    kind: str
    layer_a: int
    layer_b: int
    train: Pairs
    heldout: Pairs
    seed: int
    heldout_frac: float

    @classmethod
    def build(cls, a, b, kind: str, layer_a: int, layer_b: int, seed: int, heldout_frac: float) -> Paired:
        train, heldout = split_pairs(a, b, kind, seed, heldout_frac)
        return cls(a, b, kind, layer_a, layer_b, train, heldout, seed, heldout_frac)

    def arrays(self, pairs: Pairs) -> tuple[Any, Any]:
        """Lazy float32 (source, target) dask arrays of the given pairs, read shard by shard."""
        return (self.a.dask(self.kind, self.layer_a)[pairs.rows_a],
                self.b.dask(self.kind, self.layer_b)[pairs.rows_b])

    def inputs(self) -> dict[str, Any]:
        """What a fit on these rows depends on (the aligner's identity adds its kind and params)."""
        return {"activation_kind": self.kind, "layers": {"a": self.layer_a, "b": self.layer_b},
                "dims": {"a": self.a.width, "b": self.b.width},
                "stores": {"a": self.a.attrs.get("params_hash"), "b": self.b.attrs.get("params_hash")},
                "split": {"seed": self.seed, "heldout_frac": self.heldout_frac}}

    def describe(self) -> dict[str, Any]:
        return {"activation_kind": self.kind, "layer_a": self.layer_a, "layer_b": self.layer_b,
                "train_rows": len(self.train), "heldout_rows": len(self.heldout)}


def paired_for_fit(a, b, cfg: FitConfig) -> Paired:
    layer_a, layer_b = store_layer(a, cfg.layers[0]), store_layer(b, cfg.layers[1])
    return Paired.build(a, b, cfg.kind, layer_a, layer_b, cfg.seed, cfg.heldout_frac)


# ---------------------------------------------------------------------------------------------
# Scores


def heldout_metrics(aligner, source: Any, target: Any, pairwise_rows: int, temperature: float) -> dict[str, float]:
    """Scores of `aligner` mapping held-out source rows onto their target rows: MSE, R², CKA and
    alignment over all rows (streamed); retrieval, InfoNCE and uniformity (O(rows²)) over the first
    `pairwise_rows`."""
    from pipeline import metrics as M

    mapped = aligner.transform(source)
    out: dict[str, float] = {**M.regression_scores(mapped, target), "cka": M.cka(mapped, target),
                             "alignment": M.alignment(mapped, target)}
    m = min(int(target.shape[0]), pairwise_rows)
    pm, pt = np.asarray(mapped[:m]), np.asarray(target[:m])
    out.update({f"retrieval_{k}": v for k, v in M.retrieval_topk(pm, pt).items()})
    out.update(infonce=M.infonce(pm, pt, temperature), uniformity=M.uniformity(pm),
               uniformity_target=M.uniformity(pt), pairwise_rows=m)
    out["nonfinite_rows"] = M.nonfinite_rows(mapped)  # > 0: the scores above are failures (see metrics)
    return out


# ---------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class FitResult:
    directory: Path
    aligner: Any
    metrics: dict[str, Any]  # empty on ranks other than 0


def make_aligner(name: str, cfg: FitConfig):
    """The aligner class for `name`, built with its hyper-parameters from fit.aligners.<name>."""
    from pipeline.aligners.registry import get_aligner

    cls = get_aligner(name)
    try:
        return cls(**cfg.aligners.get(name, {}))
    except (UserError, TypeError) as e:  # TypeError: a custom aligner whose constructor is not the base one
        raise UserError(f"params fit.aligners.{name}: {e}") from None


def check_aligners(cfg: FitConfig) -> None:
    """Every fit.aligners entry names an aligner and gives it valid hyper-parameters (one line for the
    first that does not). `xmodel profile` and the `inputs` stage, the first of every `dvc repro`,
    check this, so a typo is not found by its fit stage after the models ran."""
    for name in cfg.aligners:
        make_aligner(name, cfg)


def identity(aligner, paired: Paired) -> dict[str, Any]:
    return {"aligner": aligner.kind_name(), "params": asdict(aligner.params), **paired.inputs()}


def fit_from_stores(name: str, cfg: FitConfig, stores: tuple[Path, Path], paths: Any, force: bool = False,
                    log: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Fit aligner `name` (hyper-parameters cfg.aligners[name]) on the configured rows of the stores
    `stores` (A's, B's) and score it on the held-out texts; `paths` (a pipeline.artifacts.Layout) places
    the aligner folder and its record (details/ and metrics/fit-<name>.json), which appear together
    (rank 0), or, if anything fails (too few rows, a diverged training, a full disk), neither changes.
    Under torchrun the trainable aligners train with DDP; the checkpoint of an interrupted run
    (<dir>/ckpt) is resumed. One process at a time fits a given aligner directory, and no store is
    replaced under a fit.

    Four steps: everything is checked before anything is claimed, then claim (lock and refuse or
    clear a folder of other inputs), train, score, save."""
    import torch

    from pipeline.distributed import close_dist, init_dist, pick_device

    if cfg.pairwise_rows < 2:  # retrieval of one row against itself is a sure hit: not a score
        raise UserError(f"fit.pairwise_rows = {cfg.pairwise_rows}: the pairwise scores need at least 2 rows")
    aligner = make_aligner(name, cfg)
    held = ExitStack()  # the locks: readers' side of both stores, the writer's of the aligner directory
    dist, threads = None, torch.get_num_threads()
    try:
        a, b = read_stores(stores, held)
        paired = paired_for_fit(a, b, cfg)
        if len(paired.heldout) < 2:
            raise UserError(f"{len(paired.heldout)} held-out row(s) cannot score an aligner (at least 2 are needed): "
                            "use more texts (corpus.n) or a larger fit.heldout_frac")
        directory = paths.aligner(name)
        inputs = identity(aligner, paired)
        torch.set_num_threads(cfg.threads or threads)
        dist = init_dist("cpu")  # aligners train on the CPU copies the store readers give
        # resolved before anything is claimed: a bad fit.device leaves the aligner directory untouched.
        # DDP ranks average gradients over gloo on the CPU; one process may train on a GPU
        device = pick_device(cfg.device) if dist.world == 1 else torch.device("cpu")
        held.enter_context(claim(directory, inputs, force, dist))
        aligner.meta = {**paired.describe(), "inputs": inputs, "models": provenance(a, b),
                        "store_paths": {"a": str(a.path), "b": str(b.path)}}
        seconds = train(aligner, paired, directory, log, device, dist)
        report = on_main(dist, lambda: save(aligner, directory, paths, name, score(aligner, paired, cfg, seconds, device)),
                         f"rank 0 could not save {directory}: see its error")
        return FitResult(directory, aligner, report or {})
    finally:
        held.close()
        if dist is not None:
            close_dist(dist)
        torch.set_num_threads(threads)


def on_main(dist, step: Callable[[], Any], elsewhere: str) -> Any:
    """`step()` on rank 0; every rank raises if it raised a UserError there (none waits at a barrier
    forever). Its result on rank 0, None on the others."""
    from pipeline.distributed import is_main

    result, failure = None, None
    if is_main():
        try:
            result = step()
        except UserError as e:
            failure = e
    if not dist.all_ok(failure is None):
        raise failure or UserError(elsewhere)
    return result


@contextmanager
def claim(directory: Path, inputs: dict[str, Any], force: bool, dist) -> Iterator[None]:
    """Hold the aligner directory (rank 0 takes its lock) after refusing, or with `force` clearing, one
    fitted on other inputs."""
    from pipeline.artifacts import aligner_lock, exclusive

    with ExitStack() as held:
        def take() -> None:
            held.enter_context(exclusive(aligner_lock(directory), directory))
            _claim(directory, inputs, force)

        on_main(dist, take, f"rank 0 refused {directory}: see its error")
        yield


def train(aligner, paired: Paired, directory: Path, log, device, dist) -> float:
    """Fit `aligner` on the training rows (resuming <directory>/ckpt); the seconds it took. A training
    that diverged leaves the folder as it was before (its checkpoint would only diverge again)."""
    from pipeline.aligners.training import Diverged
    from pipeline.distributed import is_main

    source, target = paired.arrays(paired.train)
    options = _fit_options(aligner, directory / "ckpt", log, device)
    if dist.world > 1 and "block_rows" in inspect.signature(aligner.fit).parameters:
        # DDP deals row blocks to ranks: cut the rows into enough blocks for every rank
        rows = max(1, len(paired.train) // (4 * dist.world))
        source, target = source.rechunk({0: rows}), target.rechunk({0: rows})
        options["block_rows"] = rows
    t0 = time.perf_counter()
    try:
        aligner.fit(source, target, **options)
    except Diverged:
        if is_main():
            shutil.rmtree(directory / "ckpt", ignore_errors=True)
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    return time.perf_counter() - t0


def score(aligner, paired: Paired, cfg: FitConfig, seconds: float, device) -> dict[str, Any]:
    """The fit's record: what it was fitted on and its held-out scores (scored before anything is
    written: a fit that cannot be scored leaves no aligner)."""
    scores = heldout_metrics(aligner, *paired.arrays(paired.heldout), cfg.pairwise_rows, cfg.temperature)
    report = {"aligner": aligner.kind_name(), **paired.describe(), "d_source": aligner.d_source,
              "d_target": aligner.d_target, "fit_seconds": round(seconds, 3), "fit_device": str(device), **scores}
    for key in ("epochs_run", "best_epoch", "stopped_early"):
        if key in aligner.fit_info:
            report[key] = aligner.fit_info[key]
    return report


def save(aligner, directory: Path, paths: Any, name: str, report: dict[str, Any]) -> dict[str, Any]:
    """The aligner folder and its record, together. The folder replaces the old one (and with it the
    checkpoint, which only serves an interrupted run: one kept would let a rerun after a code change
    skip training)."""
    from pipeline import headlines
    from pipeline.artifacts import Outputs, write_record

    with Outputs() as out:
        aligner.stage_save(out, directory)
        write_record(paths, f"fit-{name}", report, headlines.fit)  # details/ and metrics/fit-<name>.json
    return report


def provenance(a, b) -> dict[str, Any]:
    """The models the stores were extracted from, as evaluate checks them against the models it loads."""
    keys = ("model_id", "revision", "model_sha", "tokenizer_hash")
    return {role: {k: s.identity.get(k) for k in keys} for role, s in (("a", a), ("b", b))}


def _fit_options(aligner, ckpt: Path, log, device) -> dict[str, Any]:
    """Checkpointing and progress for the aligners whose fit takes them (custom ones may not)."""
    from pipeline.distributed import is_main

    accepted = inspect.signature(aligner.fit).parameters
    options: dict[str, Any] = {}
    if "checkpoint_dir" in accepted:
        options["checkpoint_dir"] = ckpt
        if is_main():
            from pipeline.artifacts import write_json

            write_json(ckpt / INPUTS, _json(aligner.meta["inputs"]), sort_keys=True)
    if "log" in accepted and log is not None:
        options["log"] = log
    if "device" in accepted and device.type != "cpu":
        options["device"] = device
    return options


def _claim(directory: Path, inputs: dict[str, Any], force: bool) -> None:
    """Refuse (or with force, clear) an aligner directory or checkpoint made from other inputs; a
    folder that is not an aligner xmodel wrote is refused even with force."""
    from pipeline.aligners.base import is_aligner_dir
    from pipeline.artifacts import check_ours, recover

    check_ours(directory, is_aligner_dir, "aligner directory")
    recover(directory)  # an earlier save killed between its two renames
    ckpt = directory / "ckpt"
    theirs = _saved_inputs(directory)
    if theirs is not None and _json(theirs) != _json(inputs):
        if not force:
            raise UserError(f"{directory} holds an aligner fitted on other inputs ({_diff(theirs, inputs)}): "
                            "rerun with --force to replace it")
        shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt.exists():
        path = ckpt / INPUTS
        ckpt_inputs = json.loads(path.read_text()) if path.exists() else None
        if ckpt_inputs is not None and ckpt_inputs != _json(inputs) and not force:
            raise UserError(f"{ckpt} holds a checkpoint of other inputs ({_diff(ckpt_inputs, inputs)}): "
                            "rerun with --force to discard it")
        if ckpt_inputs != _json(inputs):  # foreign, or from a run killed before it wrote anything
            shutil.rmtree(ckpt)


def _saved_inputs(directory: Path) -> dict[str, Any] | None:
    path = directory / "aligner.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("meta", {}).get("inputs", {})
    except json.JSONDecodeError:
        return {}  # damaged: counts as other inputs


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _diff(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    theirs, ours = _flat(_json(theirs)), _flat(_json(ours))
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in keys[:3])
    return shown + (f", and {len(keys) - 3} more" if len(keys) > 3 else "")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

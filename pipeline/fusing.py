"""Stage `fuse@<variant>`: train the learned fuser (pipeline/fuser.py) with B frozen in the loop.

Loads A and B (fuse.device, fuse.dtype), builds the variant's examples, initialises the fuser by least
squares (or resumes its checkpoint), trains it with Adam on B's next-token loss, early-stopped on the
held-out items, and writes data/fusers/<variant>/ (weights.safetensors + fuser.json) and its record,
data/details/ and data/metrics/fuse-<variant>.json, together (pipeline.artifacts.Outputs).

A folder or checkpoint made from other inputs (config, models, examples: one fingerprint) is refused
unless `force`. The checkpoint (<dir>/ckpt) is written after every epoch and resumed by a rerun; a
non-finite loss stops the run with one line and leaves the folder as it was before.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import FUSE_VARIANTS, CorpusConfig, FuseConfig
from pipeline.errors import UserError

INIT = "init.json"  # in the checkpoint folder: the least-squares fit's facts and the reference losses


@dataclass(frozen=True)
class FuseResult:
    directory: Path
    fuser: Any
    report: dict[str, Any]


def examples_fingerprint(examples) -> str:
    blob = json.dumps([[e.a_ids, e.b_prompt, e.target] for e in examples]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fuse(variant: str, cfg: FuseConfig, specs: tuple[str, str], cache_dir: Path, evaluate: Any, corpus: CorpusConfig,
         paths: Any, force: bool = False, log: Callable[[str], None] | None = None) -> FuseResult:
    """Train fuser `variant` (cfg: the fuse section) between models `specs` (A's, B's, resolved through
    the converted-model cache `cache_dir`) on the items of `evaluate` (an EvaluateConfig: its
    <cfg.task> section, in its chat format) or on the prose of `corpus`; `paths` (a
    pipeline.artifacts.Layout) places the fuser folder, its lock and its record."""
    import numpy as np
    import torch

    from pipeline import headlines
    from pipeline.aligners.training import Checkpoint, Diverged, TrainState
    from pipeline.architecture import architecture
    from pipeline.artifacts import Outputs, exclusive, write_record
    from pipeline.config import fingerprint
    from pipeline.evaluation.kv import cache_shape, check_attention
    from pipeline.evaluation.pair import load_pair
    from pipeline.faults import fault_point
    from pipeline.fuser import Fuser, batch_loss, layer_sources, mean_loss, prose_examples, task_examples

    log = log or (lambda line: None)
    if variant not in FUSE_VARIANTS:
        raise UserError(f"fuse variant {variant!r} is not one of {', '.join(FUSE_VARIANTS)}")
    directory = paths.fuser(variant)
    pair = load_pair(specs, cache_dir, cfg.device, cfg.dtype)
    for model in (pair.model_a, pair.model_b):
        model.requires_grad_(False)
        model.eval()
    check_attention(pair.model_b)
    cache_shape(pair.model_b, "B")  # B must be a model whose KV prefix kv_generate can place
    t0 = time.perf_counter()
    if variant == "task":
        examples = task_examples(cfg, evaluate, pair.model_b, pair.tok_a, pair.tok_b, log)
    else:
        examples = prose_examples(cfg, corpus, pair.tok_a, pair.tok_b)
    examples = [e for e in examples if e.target]  # an empty teacher answer trains nothing
    train, held = examples[:-cfg.n_heldout], examples[-cfg.n_heldout:]
    if len(train) < 1:
        raise UserError(f"fuse: no training item has a non-empty target (of {cfg.n_train + cfg.n_heldout}): "
                        "check the task's decoding (max_new_tokens) or ask for more items")
    la, lb = architecture(pair.model_a).n_layers, architecture(pair.model_b).n_layers
    inputs = {"variant": variant, "config": {k: v for k, v in asdict(cfg).items() if k != "variants"},
              "models": {"a": {"spec": pair.name_a, "sha": pair.sha_a}, "b": {"spec": pair.name_b, "sha": pair.sha_b}},
              "examples": examples_fingerprint(examples), "task": cfg.task if variant == "task" else None}
    fp = fingerprint(inputs)
    meta = {"variant": variant, "fingerprint": fp, "inputs": inputs, "config": asdict(cfg),
            "sources": layer_sources(la, lb), "d_a": pair.width_a, "d_b": pair.width_b, "layers_a": la,
            "layers_b": lb, "models": inputs["models"]}
    ckpt_dir = directory / "ckpt"
    with exclusive(paths.lock(f"fusers/{variant}"), directory):
        _claim(directory, fp, force)
        ckpt = Checkpoint(ckpt_dir, fp)
        try:
            net, init = _start(ckpt, pair, train, held, cfg, meta, log)
            fuser = Fuser(net, meta)
            trainable = [net[k] for k in ("u", "v", "c", "gate")]
            opt = torch.optim.Adam(trainable, lr=cfg.lr)
            if ckpt.exists():
                st, best = ckpt.load(net, opt)
            else:  # the least-squares start is epoch 0: training must beat it to be kept
                st = TrainState(initial_heldout_loss=init["heldout_loss_init"], best_loss=init["heldout_loss_init"])
                best = {k: v.detach().clone() for k, v in net.items()}
            resumed = st.epoch
            bs = cfg.batch_size
            while st.epoch < cfg.epochs and not st.stopped_early:
                order = np.random.default_rng([cfg.seed, st.epoch]).permutation(len(train))
                total, tokens = 0.0, 0
                for s in range(0, len(order), bs):
                    loss, n = batch_loss(fuser, pair.model_a, pair.tok_a, pair.model_b, pair.tok_b,
                                         [train[i] for i in order[s:s + bs]])
                    if not math.isfinite(float(loss.detach())):
                        raise Diverged(f"fuse: the training loss became {float(loss.detach())} in epoch {st.epoch + 1} (step "
                                       f"{st.step + 1}) with fuse.lr = {cfg.lr:g}: lower fuse.lr; nothing was saved")
                    opt.zero_grad(set_to_none=True)
                    (loss / n).backward()
                    opt.step()
                    st.step += 1
                    total, tokens = total + float(loss.detach()), tokens + n
                    fault_point("steps")
                heldout = mean_loss(fuser, pair.model_a, pair.tok_a, pair.model_b, pair.tok_b, held, bs)
                if not (math.isfinite(heldout) and all(bool(p.isfinite().all()) for p in trainable)):
                    raise Diverged(f"fuse: the held-out loss became {heldout} after epoch {st.epoch + 1} with "
                                   f"fuse.lr = {cfg.lr:g}: lower fuse.lr; nothing was saved")
                st.epoch += 1
                st.history.append({"epoch": st.epoch, "step": st.step, "train_loss": total / max(1, tokens),
                                   "heldout_loss": heldout})
                if heldout < st.best_loss:
                    st.best_loss, st.best_epoch, st.bad_epochs = heldout, st.epoch, 0
                    best = {k: v.detach().clone() for k, v in net.items()}
                else:
                    st.bad_epochs += 1
                    st.stopped_early = cfg.patience > 0 and st.bad_epochs >= cfg.patience
                log(f"epoch {st.epoch}: train loss {total / max(1, tokens):.4g}, held-out loss {heldout:.4g}")
                ckpt.save(net, best, opt, st)
        except Diverged:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # it would only diverge again
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
            raise
        net.load_state_dict(best)
        net.requires_grad_(False)
        report = {"variant": variant, "task": inputs["task"], "models": inputs["models"],
                  "teacher": "B's greedy answer on the skyline prompt" if variant == "task" else "the text's second half",
                  "n_train": len(train), "n_heldout": len(held),
                  "heldout_loss": st.best_loss,
                  "heldout_loss_init": init["heldout_loss_init"], "heldout_loss_b_alone": init["heldout_loss_b_alone"],
                  "epochs_run": st.epoch, "best_epoch": st.best_epoch, "stopped_early": st.stopped_early,
                  "resumed_from_epoch": resumed, "history": st.history, "gates": fuser.gates,
                  "init": {k: v for k, v in init.items() if not k.startswith("heldout")},
                  "device": str(next(pair.model_b.parameters()).device), "seconds": time.perf_counter() - t0}
        meta["fit"] = {k: report[k] for k in ("heldout_loss", "heldout_loss_init", "heldout_loss_b_alone",
                                              "epochs_run", "best_epoch")}
        # the folder replaces the checkpoint with it: one kept would let a rerun after a code change skip training
        with Outputs() as out:
            fuser.stage_save(out, directory)
            write_record(paths, f"fuse-{variant}", report, headlines.fuse)
    return FuseResult(directory, fuser, report)


def _start(ckpt, pair, train, held, cfg, meta, log):
    """(the fuser's tensors, init facts): from the checkpoint, or by least squares (then the
    held-out losses of the initial fuser and of B alone, kept beside the checkpoint)."""
    from pipeline.aligners.base import read_json
    from pipeline.artifacts import write_json
    from pipeline.fuser import Fuser, build_net, init_fuser, mean_loss

    if ckpt.exists():
        log(f"resuming {ckpt.dir}")
        init = read_json(ckpt.dir / INIT, f"{ckpt.dir} lacks {INIT}: delete {ckpt.dir} and rerun")
        return build_net(len(meta["sources"]), meta["d_a"], meta["d_b"], cfg.rank), init
    t0 = time.perf_counter()
    net, init = init_fuser(pair.model_a, pair.tok_a, pair.model_b, pair.tok_b, [e.a_text for e in train], cfg.rank,
                           cfg.ridge, cfg.gate_init, cfg.batch_size)
    init["seconds"] = time.perf_counter() - t0
    models = (pair.model_a, pair.tok_a, pair.model_b, pair.tok_b)
    init["heldout_loss_init"] = mean_loss(Fuser(net, meta), *models, held, cfg.batch_size)
    init["heldout_loss_b_alone"] = mean_loss(None, *models, held, cfg.batch_size)
    log(f"least-squares init on {init['init_tokens']} paired tokens ({init['seconds']:.1f}s): held-out loss "
        f"{init['heldout_loss_init']:.4g} (B alone {init['heldout_loss_b_alone']:.4g})")
    write_json(ckpt.dir / INIT, init)
    return net, init


def _claim(directory: Path, fp: str, force: bool) -> None:
    """Refuse (or with force, clear) a fuser folder or checkpoint made from other inputs; a folder
    that is not a fuser xmodel wrote is refused even with force."""
    from pipeline.artifacts import check_ours, recover
    from pipeline.fuser import CONFIG, is_fuser_dir

    check_ours(directory, is_fuser_dir, "fuser directory")
    recover(directory)
    ckpt = directory / "ckpt"
    for path in (directory / CONFIG, ckpt / "state.json"):
        try:
            theirs = json.loads(path.read_text()).get("fingerprint") if path.exists() else fp
        except (json.JSONDecodeError, UnicodeDecodeError):
            theirs = None  # damaged: counts as other inputs
        if theirs != fp:
            if not force:
                raise UserError(f"{path} was made from other inputs (fuse config, models or items): "
                                "rerun with --force to replace it")
            shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt.exists() and not (ckpt / "state.json").exists():  # killed before its first epoch ended
        shutil.rmtree(ckpt)

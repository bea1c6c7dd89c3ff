"""Aligners: Procrustes recovers planted maps; trainable aligners learn; save/load, registry, resume."""

import os
import socket

import dask.array as da
import numpy as np
import pytest
import torch

import pipeline.aligners.registry as registry
from pipeline import metrics as M
from pipeline.aligners.registry import Aligner, get_aligner, load_aligner, register
from pipeline.aligners.adapters import LoRA, Linear
from pipeline.aligners.procrustes import Procrustes, ProcrustesAffine
from pipeline.aligners.projection import LearnedProjection
from pipeline.aligners.training import RowSplit, heldout_mask
from pipeline.errors import UserError


def rng(seed=0):
    return np.random.default_rng(seed)


def source(n, d, seed=0, offset=1.5):
    r = rng(seed)
    return r.normal(size=(n, d)) * r.uniform(0.5, 2.0, size=d) + offset


def orthogonal(d, seed):
    """A random d×d orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed)."""
    q, r = np.linalg.qr(rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def weight(a):
    return a.net.weight.detach().numpy().astype(np.float64)


def planted(n, seed, d_a=16, d_b=24, noise=0.5):
    """y = x Mᵀ + noise with one fixed M (seed 99); `seed` draws the rows."""
    m = rng(99).normal(size=(d_b, d_a)) / np.sqrt(d_a)
    x = rng(seed).normal(size=(n, d_a))
    y = x @ m.T + noise * rng(seed + 1).normal(size=(n, d_b))
    return x.astype(np.float32), y.astype(np.float32)


@pytest.fixture(autouse=True)
def one_thread():
    """The matrices here are tiny: with two OpenMP threads per op, a busy 2-core machine makes
    torch spin-wait and run ~20× slower, so each test runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- Procrustes -----------------------------------------------------------------------------------


def test_procrustes_recovers_planted_rotation_and_agrees_with_scipy():
    x = source(400, 12, seed=1)
    q = orthogonal(12, seed=2)
    fitted = Procrustes().fit(x, x @ q.T)
    assert np.allclose(weight(fitted), q, atol=1e-5)
    # with noise there is no exact answer: compare with scipy (x R ≈ y, so W = Rᵀ)
    y = x @ q.T + 0.3 * rng(3).normal(size=x.shape)
    from scipy.linalg import orthogonal_procrustes

    r, _ = orthogonal_procrustes(x, y)
    assert np.allclose(weight(Procrustes().fit(x, y)), r.T, atol=1e-5)


@pytest.mark.parametrize("d_a,d_b", [(12, 12), (12, 20)])
def test_procrustes_affine_recovers_planted_scaled_affine_map(d_a, d_b):
    x = source(400, d_a, seed=4, offset=3.0)
    q = orthogonal(d_b, seed=5)[:, :d_a]  # orthonormal columns when d_b > d_a
    bias = 10 * rng(6).normal(size=d_b)
    fitted = ProcrustesAffine().fit(x, 2.5 * x @ q.T + bias)
    assert fitted.fit_info["scale"] == pytest.approx(2.5, rel=1e-6)
    assert np.allclose(weight(fitted), 2.5 * q, atol=1e-5)
    assert np.allclose(fitted.net.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    assert fitted.fit_info["train_r2"] == pytest.approx(1.0, abs=1e-9)


def test_procrustes_recovers_planted_semi_orthogonal_embedding():
    x = source(300, 10, seed=7)
    q = orthogonal(18, seed=8)[:, :10]  # 18×10, orthonormal columns
    fitted = Procrustes().fit(x, x @ q.T)
    assert weight(fitted).shape == (18, 10)
    assert np.allclose(weight(fitted), q, atol=1e-5)


def test_narrowing_procrustes_needs_refinement_for_least_squares():
    # d_B < d_A: the SVD solution maximizes correlation but is not the least-squares projection
    x = source(2000, 12, seed=9, offset=0.0)
    q = orthogonal(12, seed=10)[:7]  # 7×12, orthonormal rows
    y = x @ q.T
    svd_only = Procrustes().fit(x, y)
    refined = Procrustes(refine_iters=3000, refine_tol=1e-13).fit(x, y)
    assert not np.allclose(weight(svd_only), q, atol=1e-3)
    assert np.allclose(weight(refined), q, atol=1e-5)
    assert refined.fit_info["train_r2"] > svd_only.fit_info["train_r2"]
    assert np.allclose(weight(refined) @ weight(refined).T, np.eye(7), atol=1e-6)


@pytest.mark.parametrize("cls", [Procrustes, ProcrustesAffine])
def test_chunked_dask_fit_equals_in_memory_fit(cls):
    x = source(1000, 9, seed=11, offset=50.0).astype(np.float32)
    y = (x @ rng(12).normal(size=(9, 14)) + rng(13).normal(size=(1000, 14))).astype(np.float32)
    whole = cls().fit(x, y)
    chunked = cls().fit(da.from_array(x, chunks=(64, 9)), da.from_array(y, chunks=(64, 14)))
    assert np.allclose(weight(chunked), weight(whole), atol=1e-6)
    if cls.affine:
        assert np.allclose(chunked.net.bias.numpy(), whole.net.bias.numpy(), atol=1e-5)


# -- trainable aligners ---------------------------------------------------------------------------


def test_infonce_training_raises_heldout_retrieval():
    x, y = planted(2000, seed=20)
    x_test, y_test = planted(500, seed=30)
    hp = dict(loss="infonce", temperature=0.1, batch_size=128, lr=1e-2, patience=0)
    untrained = Linear(epochs=0, **hp).fit(x, y)
    trained = Linear(epochs=8, **hp).fit(x, y)

    def top1(a):
        return M.retrieval_topk(a.transform(x_test), y_test, ks=(1,))["top1"]

    assert top1(trained) > top1(untrained) + 0.3
    assert trained.fit_info["heldout"]["retrieval_top1"] > untrained.fit_info["heldout"]["retrieval_top1"] + 0.3


def test_learned_projection_lowers_heldout_mse():
    x, y = planted(1500, seed=40)
    x_test, y_test = planted(500, seed=50)
    untrained = LearnedProjection(epochs=0).fit(x, y)
    trained = LearnedProjection(epochs=4).fit(x, y)
    assert trained.params.batch_size == 32 and trained.params.lr == 1e-3  # the paper's recipe
    assert M.mse(trained.transform(x_test), y_test) < 0.6 * M.mse(untrained.transform(x_test), y_test)


@pytest.mark.parametrize("kind,extra", [("linear", {}), ("affine", {}), ("lora", {"rank": 4}),
                                        ("lora", {"rank": 4, "loss": "infonce"})])
def test_trainable_aligners_lower_their_heldout_loss(kind, extra):
    x, y = planted(1500, seed=60)
    y = y + 3.0  # an offset only a bias (or the affine base) can absorb
    a = get_aligner(kind)(epochs=3, batch_size=64, lr=1e-2, **extra).fit(x, y)
    info = a.fit_info
    assert len(info["history"]) == 3
    assert info["heldout"]["loss"] < info["initial_heldout_loss"]


def test_affine_bias_starts_at_the_training_means():
    """A large offset is fitted from the first step (a zero bias would crawl towards it at Adam's lr)."""
    x, y = planted(1500, seed=61)
    y = y + 50.0
    affine = get_aligner("affine")(epochs=1, batch_size=64, lr=1e-3).fit(x, y)
    linear = get_aligner("linear")(epochs=1, batch_size=64, lr=1e-3).fit(x, y)
    assert affine.fit_info["initial_heldout_loss"] < 0.05 * linear.fit_info["initial_heldout_loss"]
    assert affine.fit_info["heldout"]["loss"] < 0.05 * linear.fit_info["heldout"]["loss"]


def test_lora_starts_at_procrustes_affine_of_training_rows():
    x, y = planted(800, seed=70)
    lora = LoRA(epochs=0, heldout_frac=0.25, seed=5).fit(x, y)
    train = ~heldout_mask(0, len(x), seed=5, frac=0.25)
    base = ProcrustesAffine().fit(x[train], y[train])
    assert np.allclose(lora.transform(x), base.transform(x), atol=1e-5)
    identity = LoRA(epochs=0, base="identity").fit(x, y)
    assert np.allclose(identity.transform(x), np.concatenate([np.zeros((800, 8)), x], 1), atol=1e-6)


# -- data split and batches -----------------------------------------------------------------------


def test_split_is_fixed_by_seed_and_each_epoch_takes_every_training_row_once():
    ids = np.arange(1000, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    a = RowSplit(ids, ids, seed=3, heldout_frac=0.2, shuffle_buffer=100, block_rows=64)
    b = RowSplit(da.from_array(ids, chunks=(37, 2)), ids, seed=3, heldout_frac=0.2, shuffle_buffer=250)
    assert np.array_equal(a.heldout, b.heldout)  # independent of chunking and buffering
    assert 0.15 < a.heldout.mean() < 0.25
    assert not np.array_equal(a.heldout, RowSplit(ids, ids, seed=4, heldout_frac=0.2).heldout)

    def epoch(split, e, **kw):
        return np.concatenate([x[:, 0].numpy() for x, _ in split.train_batches(e, 32, **kw)]).astype(int)

    train_ids = np.flatnonzero(~a.heldout)
    first = epoch(a, 0)
    assert np.array_equal(np.sort(first), train_ids)
    assert np.array_equal(first, epoch(a, 0))  # deterministic
    assert not np.array_equal(first, epoch(a, 1))  # reshuffled per epoch
    assert not np.array_equal(first, np.sort(first))
    assert np.array_equal(epoch(a, 0, skip=5), first[5 * 32:])  # resuming skips exactly
    ranks = [epoch(a, 0, rank=r, world=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert np.array_equal(np.sort(np.concatenate(ranks)), train_ids)
    held = np.concatenate([x[:, 0].numpy() for x, _ in a.heldout_batches(32)]).astype(int)
    assert np.array_equal(held, np.flatnonzero(a.heldout))



def test_rows_held_on_the_device_give_the_same_batches_and_fit(monkeypatch):
    """The GPU path (every training row copied once, batches gathered there) takes the same rows in
    the same order as the streamed path; checked here with the CPU standing in for the device."""
    x, y = planted(700, seed=60)
    x, y = da.from_array(x, chunks=(90, 16)), da.from_array(y, chunks=(90, 24))
    streamed = RowSplit(x, y, seed=2, heldout_frac=0.2, shuffle_buffer=200)
    resident = RowSplit(x, y, seed=2, heldout_frac=0.2, shuffle_buffer=200)
    resident.to_device(torch.device("cpu"))
    for epoch, skip in ((0, 0), (1, 3)):
        a = list(streamed.train_batches(epoch, 32, skip=skip))
        b = list(resident.train_batches(epoch, 32, skip=skip))
        assert len(a) == len(b) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    a, b = list(streamed.heldout_batches(50)), list(resident.heldout_batches(50))
    assert len(a) == len(b) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    # a whole fit through the resident path equals the streamed fit
    full = Linear(**RESUME_HP).fit(x, y)
    monkeypatch.setattr(RowSplit, "fits_on", lambda self, device, budget=0.5: True)
    on_device = Linear(**RESUME_HP).fit(x, y)
    assert torch.equal(on_device.net.weight, full.net.weight)
    assert on_device.fit_info["history"] == full.fit_info["history"]

# -- kill and resume ------------------------------------------------------------------------------


# min_delta is large so that the run stops early and ends on weights older than its last epoch
RESUME_HP = dict(loss="infonce", epochs=6, batch_size=64, shuffle_buffer=300, lr=1e-2, patience=2, min_delta=0.3)


def test_resumed_training_equals_uninterrupted(tmp_path):
    x, y = planted(1400, seed=80)
    x, y = da.from_array(x, chunks=(100, 16)), da.from_array(y, chunks=(100, 24))
    full = Linear(**RESUME_HP).fit(x, y)
    ckpt = tmp_path / "ckpt"
    first = Linear(**RESUME_HP).fit(x, y, checkpoint_dir=ckpt, checkpoint_every=5, stop_after_steps=30)
    assert first.fit_info == {"interrupted": True, "step": 30, "epoch": 1}  # killed mid-epoch 2
    second = Linear(**RESUME_HP).fit(x, y, checkpoint_dir=ckpt, stop_after_steps=51)
    assert second.fit_info["interrupted"]
    resumed = Linear(**RESUME_HP).fit(x, y, checkpoint_dir=ckpt)
    assert torch.equal(resumed.net.weight, full.net.weight)
    assert resumed.fit_info["resumed_from_step"] == 51 and full.fit_info["resumed_from_step"] == 0
    same = lambda info: {k: v for k, v in info.items() if k != "resumed_from_step"}  # noqa: E731
    assert same(resumed.fit_info) == same(full.fit_info)
    assert full.fit_info["stopped_early"] and full.fit_info["best_epoch"] < full.fit_info["epochs_run"]
    assert full.fit_info["best_epoch"] * 20 < 51 < full.fit_info["steps"]  # interrupted after the best epoch


def test_checkpoint_of_another_run_is_refused(tmp_path):
    x, y = planted(300, seed=90)
    Linear(epochs=2).fit(x, y, checkpoint_dir=tmp_path, stop_after_steps=1)
    with pytest.raises(UserError, match="another run"):
        Linear(epochs=2, lr=0.5).fit(x, y, checkpoint_dir=tmp_path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share two cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = planted(1000, seed=100)
        a = Linear(epochs=2, batch_size=64, lr=1e-2, shuffle_buffer=200).fit(x, y, block_rows=50)
        np.save(out / f"w{rank}.npy", weight(a))
        a.save(out / "aligner")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_stay_in_lockstep_and_rank0_saves(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), tmp_path), nprocs=2)
    w0, w1 = np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w1.npy")
    assert np.array_equal(w0, w1)  # averaged gradients keep the replicas identical
    assert np.array_equal(weight(load_aligner(tmp_path / "aligner")), w0)
    single = Linear(epochs=2, batch_size=64, lr=1e-2, shuffle_buffer=200).fit(*planted(1000, seed=100), block_rows=50)
    assert not np.array_equal(weight(single), w0)  # the two ranks did split the data


# -- save / load ----------------------------------------------------------------------------------


ALL = [("procrustes", {}), ("procrustes-affine", {}), ("linear", {"epochs": 1}), ("affine", {"epochs": 1}),
       ("lora", {"epochs": 1, "rank": 3}), ("projection", {"epochs": 1})]


@pytest.mark.parametrize("kind,hp", ALL)
def test_save_load_round_trip(tmp_path, kind, hp):
    x, y = planted(400, seed=110)
    a = get_aligner(kind)(**hp).fit(x, y)
    a.meta = {"layers": [3, 5], "source_store": "abc123"}
    a.save(tmp_path)
    b = load_aligner(tmp_path)
    assert type(b) is type(a) and b.params == a.params and b.meta == a.meta
    assert np.array_equal(b.transform(x), a.transform(x))
    assert type(a).load(tmp_path).d_target == 24
    # torch in → torch out, same dtype; dask in → lazy dask out
    t = torch.from_numpy(x[:5]).to(torch.bfloat16)
    out = b.transform(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == (5, 24)
    assert np.allclose(out.float().numpy(), b.transform(t.float().numpy()), rtol=2e-2, atol=2e-2)
    lazy = b.transform(da.from_array(x, chunks=(64, 16)))
    assert isinstance(lazy, da.Array) and np.array_equal(lazy.compute(), a.transform(x))


def test_load_refuses_wrong_kind_and_unfinished_directories(tmp_path):
    x, y = planted(100, seed=120)
    Procrustes().fit(x, y).save(tmp_path / "p")
    with pytest.raises(UserError, match="not 'linear'"):
        Linear.load(tmp_path / "p")
    with pytest.raises(UserError, match="no finished aligner"):
        load_aligner(tmp_path / "missing")
    with pytest.raises(UserError, match="not fitted"):
        Procrustes().transform(x)
    with pytest.raises(UserError, match="unknown hyper-parameter"):
        Linear(learning_rate=1.0)
    with pytest.raises(UserError, match="rank"):
        LoRA(rank=0)
    with pytest.raises(UserError, match="expected int"):
        Linear(epochs="3")


# -- registry -------------------------------------------------------------------------------------


class MeanAligner(Aligner):
    """Maps everything to the target mean: a minimal custom aligner, left unregistered."""

    def build_net(self, d_source, d_target):
        net = torch.nn.Linear(d_source, d_target)
        torch.nn.init.zeros_(net.weight)
        return net

    def fit(self, source, target):
        self.d_source, self.d_target = source.shape[1], target.shape[1]
        self.net = self.build_net(self.d_source, self.d_target)
        with torch.no_grad():
            self.net.bias.copy_(torch.from_numpy(np.asarray(target, np.float32).mean(0)))
        return self


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_registered_custom_class_and_import_path_resolve(tmp_path, clean_registry):
    @register("test-mean")
    class Registered(MeanAligner):
        pass

    assert get_aligner("test-mean") is Registered and Registered.kind_name() == "test-mean"
    path = f"{__name__}:MeanAligner"
    assert get_aligner(path) is MeanAligner and MeanAligner.kind_name() == path
    assert get_aligner("procrustes") is Procrustes
    # an unregistered class saves its import path as kind, so load finds it again
    x, y = planted(50, seed=130)
    MeanAligner().fit(x, y).save(tmp_path)
    assert np.allclose(load_aligner(tmp_path).transform(x[:3]), y.mean(0), atol=1e-6)


def test_registry_refusals(clean_registry):
    with pytest.raises(UserError, match="procrustes-affine"):  # lists the registered names
        get_aligner("procrustez")
    with pytest.raises(UserError, match="cannot import"):
        get_aligner("no_such_module_xyz:Thing")
    with pytest.raises(UserError, match="not an Aligner"):
        get_aligner("pipeline.metrics:cka")
    with pytest.raises(ValueError, match="already registered"):
        register("procrustes")(MeanAligner)


# -- damaged, foreign or NaN aligners are refused with one line (issue 12) -------------------------


def test_damaged_weights_are_one_line_naming_the_file(tmp_path):
    x, y = planted(100, seed=140)
    Procrustes().fit(x, y).save(tmp_path / "p")
    weights = tmp_path / "p" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk or a copy cut short
    with pytest.raises(UserError, match="weights.safetensors is damaged or missing .*: refit the aligner") as e:
        load_aligner(tmp_path / "p")
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    x, y = planted(100, seed=150)
    a = Procrustes().fit(x, y)
    a.save(tmp_path / "p")
    good = (tmp_path / "p" / "weights.safetensors").read_bytes()
    with torch.no_grad():
        a.net.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite weights .*nothing was saved"):
        a.save(tmp_path / "p")
    assert (tmp_path / "p" / "weights.safetensors").read_bytes() == good  # the old one is kept
    from safetensors.torch import save_file

    save_file(a.state_dict(), str(tmp_path / "p" / "weights.safetensors"))  # NaN written by other means
    with pytest.raises(UserError, match="holds non-finite weights"):
        load_aligner(tmp_path / "p")


def test_aligner_json_never_decides_what_is_imported(tmp_path, monkeypatch):
    """A user-editable kind naming a module nobody imported is refused without importing it."""
    import json
    import sys

    module = tmp_path / "mods" / "xmodel_planted_mod.py"
    module.parent.mkdir()
    marker = tmp_path / "imported"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(module.parent))
    x, y = planted(100, seed=160)
    Procrustes().fit(x, y).save(tmp_path / "p")
    config = tmp_path / "p" / "aligner.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "kind": "xmodel_planted_mod:Thing"}))
    with pytest.raises(UserError, match="neither a registered aligner nor a class already imported"):
        load_aligner(tmp_path / "p")
    assert not marker.exists() and "xmodel_planted_mod" not in sys.modules
    # named by the caller (params fit.aligners, the command line): then it may be imported
    with pytest.raises(UserError, match="has no 'Thing'"):
        load_aligner(tmp_path / "p", trust="xmodel_planted_mod:Thing")
    assert marker.exists()
    sys.modules.pop("xmodel_planted_mod", None)


def test_evaluate_refuses_an_aligner_fitted_on_other_models(tmp_path):
    from pipeline.evaluation.pair import Pair, load_aligners

    def model(width):  # a real model of that width (the pair reads widths through pipeline/architecture.py)
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "llama", hidden_size=width, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32))

    x, y = planted(100, seed=170)
    a = Procrustes().fit(x, y)  # 16 → 24
    a.meta = {"layer_a": 2, "layer_b": 3, "models": {"a": {"model_id": "org/a", "model_sha": "a" * 40},
                                                     "b": {"model_id": "org/b", "model_sha": "b" * 40}}}
    a.save(tmp_path / "aligners" / "procrustes")
    same = Pair(model(16), None, model(24), None, "a", "b", "a" * 40, "b" * 40)
    assert set(load_aligners(["procrustes"], tmp_path, same, 2, 3)) == {"procrustes"}
    # a fine-tune of B: same width and depth, other weights
    other = Pair(model(16), None, model(24), None, "a", "b-ft", "a" * 40, "c" * 40)
    with pytest.raises(UserError, match="fitted on another model B .*refit it on these models"):
        load_aligners(["procrustes"], tmp_path, other, 2, 3)
    a.meta = {"layer_a": 2, "layer_b": 3}  # saved by hand, without provenance
    a.save(tmp_path / "aligners" / "procrustes")
    with pytest.raises(UserError, match="does not record which models"):
        load_aligners(["procrustes"], tmp_path, same, 2, 3)

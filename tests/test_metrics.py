"""Metrics: streaming results equal brute-force formulas; CKA has its invariances."""

import dask.array as da
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import ortho_group

from pipeline import metrics as M
from pipeline.errors import UserError


def rng(seed=0):
    return np.random.default_rng(seed)


def related(n, p=9, q=6, seed=0, offset=3.0):
    """x with a mean offset, y partly a linear function of x."""
    r = rng(seed)
    x = r.normal(size=(n, p)) * r.uniform(0.5, 3, size=p) + offset
    y = x @ r.normal(size=(p, q)) + 2 * r.normal(size=(n, q)) - offset
    return x, y


@pytest.fixture
def small_tiles(monkeypatch):
    """Pairwise metrics walk 7×7 tiles and stream 5-row blocks, so the tiling logic runs."""
    monkeypatch.setattr(M, "PAIR_BLOCK", 7)
    monkeypatch.setattr(M, "BLOCK_ELEMENTS", 5 * 15)


# -- CKA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p,q", [(40, 9, 6), (25, 40, 30), (200, 12, 3)])
@pytest.mark.parametrize("debiased", [True, False])
def test_streaming_cka_equals_gram_formula(n, p, q, debiased):
    x, y = related(n, p, q, seed=n)
    want = M.cka_gram(x, y, debiased=debiased)
    for got in (M.cka(x, y, debiased=debiased),
                M.cka(x, y, debiased=debiased, block_rows=3),
                M.cka(da.from_array(x, chunks=(7, p)), da.from_array(y, chunks=(11, q)), debiased=debiased)):
        assert got == pytest.approx(want, rel=1e-6)


def test_debiased_and_biased_cka_differ():
    # guards the test above: if the debiasing terms were dropped, both would match the same value
    x, y = related(30, 20, 20, seed=1)
    assert abs(M.cka(x, y, debiased=True) - M.cka(x, y, debiased=False)) > 1e-3


def test_streaming_cka_of_float16_dask_equals_gram_of_same_values():
    x, y = related(64, 10, 7, seed=3)
    x16, y16 = x.astype(np.float16), y.astype(np.float16)
    got = M.cka(da.from_array(x16, chunks=(16, 10)), da.from_array(y16, chunks=(16, 7)))
    assert got == pytest.approx(M.cka_gram(x16.astype(np.float64), y16.astype(np.float64)), rel=1e-6)


def test_cka_invariances():
    x, y = related(300, 10, 8, seed=4)
    base = M.cka(x, y)
    q = ortho_group.rvs(8, random_state=5)
    assert M.cka(x, y @ q) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert M.cka(x * 7.5, y * 0.01) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    assert M.cka(y, x) == pytest.approx(base, rel=1e-12)  # symmetric
    assert M.cka(x, x) == pytest.approx(1.0, rel=1e-9)
    # a non-orthogonal map changes it, so the invariance checks above can fail
    assert abs(M.cka(x, y * np.arange(1, 9)) - base) > 1e-3


def test_cka_survives_huge_offsets():
    # LLM residual streams have huge means; the shifted accumulation must not cancel them away
    x, y = related(500, 8, 5, seed=6, offset=0.0)
    assert M.cka(x + 1e6, y - 3e5, block_rows=64) == pytest.approx(M.cka(x, y), rel=1e-9)


def test_cka_near_zero_for_independent_features():
    r = rng(7)
    x, y = r.normal(size=(200, 100)), r.normal(size=(200, 100))
    assert abs(M.cka(x, y, debiased=True)) < 0.03
    assert M.cka(x, y, debiased=False) > 0.3  # the biased estimator is far from 0 here


def test_cka_needs_four_rows():
    with pytest.raises(UserError):
        M.cka(np.ones((3, 2)), np.ones((3, 2)))


# -- streaming plumbing ---------------------------------------------------------------------------


def test_row_blocks_follow_dask_chunks_and_refuse_misaligned_rows():
    x = da.zeros((100, 4), chunks=(30, 4))
    blocks = M.RowBlocks(x, np.zeros((100, 3)), block_rows=50)
    assert blocks.bounds == [(0, 60), (60, 100)]  # never cuts a 30-row chunk
    assert sum(b[0].shape[0] for b in M.iter_row_blocks(x, block_rows=50)) == 100
    with pytest.raises(UserError, match="row-aligned"):
        M.RowBlocks(np.zeros((10, 2)), np.zeros((11, 2)))


def test_regression_scores_match_numpy():
    x, y = related(90, 6, 6, seed=8)
    pred = y + rng(9).normal(size=y.shape)
    want_mse = np.mean((pred - y) ** 2)
    want_r2 = 1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean(0)) ** 2)
    got = M.regression_scores(da.from_array(pred, chunks=(13, 6)), da.from_array(y, chunks=(20, 6)))
    assert got["mse"] == pytest.approx(want_mse, rel=1e-12)
    assert got["r2"] == pytest.approx(want_r2, rel=1e-12)
    assert M.r2(y, y) == 1.0 and M.mse(y, y) == 0.0


# -- pairwise metrics against brute force ---------------------------------------------------------


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_retrieval_topk_matches_brute_force(small_tiles):
    r = rng(10)
    keys = r.normal(size=(40, 5))
    queries = keys + 0.8 * r.normal(size=keys.shape)
    sim = unit(queries) @ unit(keys).T
    rank = (sim > np.diag(sim)[:, None]).sum(1)
    got = M.retrieval_topk(queries, keys, ks=(1, 5))
    assert got == {"top1": np.mean(rank < 1), "top5": np.mean(rank < 5)}
    assert 0 < got["top1"] < 1
    assert M.retrieval_topk(keys, keys)["top1"] == 1.0


def test_retrieval_does_not_reward_ties_or_a_collapsed_mapping():
    keys = rng(11).normal(size=(20, 4))
    # a constant mapping finds only the one key nearest to its constant: chance level
    assert M.retrieval_topk(np.ones((20, 4)), keys, ks=(1,))["top1"] == 1 / 20
    # identical keys tie with every query's own key; ties count against the query
    assert M.retrieval_topk(np.ones((20, 4)), np.ones((20, 4)), ks=(1, 5))["top5"] == 0.0


def test_mutual_knn_matches_brute_force(small_tiles):
    r = rng(12)
    x = r.normal(size=(30, 6))
    y = np.concatenate([x[:, :3], r.normal(size=(30, 5))], 1)  # shares part of x's geometry

    def knn(a, k):
        s = unit(a) @ unit(a).T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    k = 4
    nx, ny = knn(x, k), knn(y, k)
    want = np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, ny)])
    got = M.mutual_knn(x, y, k=k)
    assert got == pytest.approx(want)
    assert 0 < got < 1
    assert M.mutual_knn(x, x * 3, k=k) == 1.0
    with pytest.raises(UserError):
        M.mutual_knn(x, y, k=30)


def test_infonce_matches_brute_force(small_tiles):
    r = rng(13)
    k = r.normal(size=(25, 6))
    q = k + r.normal(size=k.shape)
    logits = unit(q) @ unit(k).T / 0.1
    forward = np.mean(logsumexp(logits, axis=1) - np.diag(logits))
    backward = np.mean(logsumexp(logits, axis=0) - np.diag(logits))
    assert M.infonce(q, k, temperature=0.1) == pytest.approx(forward, rel=1e-12)
    assert M.infonce(q, k, temperature=0.1, symmetric=True) == pytest.approx((forward + backward) / 2, rel=1e-12)


def test_alignment_and_uniformity_match_definitions(small_tiles):
    r = rng(14)
    x, y = r.normal(size=(23, 5)), r.normal(size=(23, 5))
    u, v = unit(x), unit(y)
    assert M.alignment(x, y) == pytest.approx(np.mean(np.sum((u - v) ** 2, 1)), rel=1e-12)
    d2 = np.sum((u[:, None] - u[None]) ** 2, -1)
    off = ~np.eye(23, dtype=bool)
    assert M.uniformity(x) == pytest.approx(np.log(np.mean(np.exp(-2 * d2[off]))), rel=1e-10)
    assert M.alignment(x, x * 2) == pytest.approx(0.0, abs=1e-12)


def test_pairwise_metrics_refuse_arrays_over_the_memory_bound():
    with pytest.raises(UserError, match="subset"):
        M.retrieval_topk(np.ones((100, 10)), np.ones((100, 10)), max_bytes=1000)


# -- non-finite rows are failures, never good scores (issue 12) -----------------------------------


def test_non_finite_rows_are_retrieval_misses(small_tiles):
    keys = rng(20).normal(size=(20, 4))
    # an all-NaN mapping used to "beat" no key and rank every query first: top-1 = 1.0
    assert M.retrieval_topk(np.full((20, 4), np.nan), keys) == {"top1": 0.0, "top5": 0.0}
    queries = keys.copy()
    queries[[3, 7]] = np.nan
    queries[11, 0] = np.inf
    assert M.retrieval_topk(queries, keys, ks=(1,))["top1"] == pytest.approx(17 / 20)  # the other 17 find theirs
    broken_keys = keys.copy()
    broken_keys[5] = np.nan  # a key that is not finite: its query misses, the others still find theirs
    assert M.retrieval_topk(keys, broken_keys, ks=(1,))["top1"] == pytest.approx(19 / 20)
    assert M.nonfinite_rows(queries) == 3 and M.nonfinite_rows(da.from_array(queries, chunks=(6, 4))) == 3


def test_non_finite_rows_share_no_neighbours_and_other_scores_are_nan(small_tiles):
    x = rng(21).normal(size=(30, 6))
    y = x.copy()
    y[:10] = np.nan
    assert M.mutual_knn(x, x, k=4) == 1.0
    # the 10 NaN rows have no neighbours (0 shared) and are nobody's: the 20 others keep theirs
    # among themselves only where x's neighbours avoided the NaN rows, never more than 20/30 in all
    got = M.mutual_knn(x, y, k=4)
    assert np.isfinite(got) and got <= 20 / 30
    assert (M.knn_indices(y, 4)[:10] == -1).all() and (M.knn_indices(y, 4)[10:] >= 10).all()
    for value in (M.cka(x, y), M.mse(y, x), M.alignment(y, x), M.infonce(y, x), M.uniformity(y)):
        assert np.isnan(value)

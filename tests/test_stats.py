"""Intervals and paired tests against scipy and known values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.stats import bootstrap_mean, mcnemar_exact, paired_bootstrap, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 100), (50, 100), (64, 100), (100, 100), (3, 7), (1, 1)])
def test_wilson_matches_scipy(k, n):
    lo, hi = wilson_interval(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_wilson_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 100)[1] == pytest.approx(0.0370, abs=1e-4)  # not the Wald 0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


@pytest.mark.parametrize("b,c", [(10, 2), (3, 3), (0, 6), (25, 40), (1, 0)])
def test_mcnemar_exact_matches_a_binomial_test_on_discordant_pairs(b, c):
    x = [1] * b + [0] * c + [1] * 7 + [0] * 5  # b: only x right, c: only y right, then 12 concordant
    y = [0] * b + [1] * c + [1] * 7 + [0] * 5
    got = mcnemar_exact(x, y)
    assert (got.only_x, got.only_y) == (b, c)
    assert got.p_value == pytest.approx(binomtest(b, b + c, 0.5).pvalue, abs=1e-12)


def test_mcnemar_known_value_and_ties():
    x, y = [1] * 10 + [0] * 2, [0] * 10 + [1] * 2
    assert mcnemar_exact(x, y).p_value == pytest.approx(0.03857, abs=1e-5)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.random(200)
    same = paired_bootstrap(y, y, n_boot=2000)
    assert same.diff == 0 and same.p_value == 1.0 and same.lo == same.hi == 0
    shifted = paired_bootstrap(y + 0.1 + rng.normal(0, 0.05, 200), y, n_boot=2000)
    assert shifted.lo > 0.08 and shifted.hi < 0.12 and shifted.p_value <= 1e-3
    noise = paired_bootstrap(y + rng.normal(0, 0.3, 200), y, n_boot=2000, seed=1)
    assert noise.lo < 0 < noise.hi and noise.p_value > 0.05
    assert paired_bootstrap(y, y[::-1], n_boot=500, seed=4) == paired_bootstrap(y, y[::-1], n_boot=500, seed=4)
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1])


def test_bootstrap_mean_interval():
    assert bootstrap_mean([0.5] * 10, n_boot=100) == (0.5, 0.5)
    x = np.random.default_rng(1).normal(3, 1, 400)
    lo, hi = bootstrap_mean(x, n_boot=4000)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.03) and hi == pytest.approx(x.mean() + 1.96 * se, abs=0.03)

"""Gen PPL at matched entropy: interpolation, range and the difference's standard error against hand computations."""

import math
import random

import pytest

from did_cli.ablation.entropy_matched import (
    BEATS,
    WITHIN,
    WORSE,
    FrontierPoint,
    Matched,
    PerSample,
    draft_frontier,
    match_entropy,
    t_quantile,
    verdict,
)


def _point(label, entropy, ppl, samples=None):
    return FrontierPoint(label, entropy, ppl, samples)


def test_frontier_keeps_only_drafts_nothing_beats_sorted_by_entropy():
    points = [
        _point("p1.0", 4.2, 80.0),
        _point("p0.8", 3.8, 30.0),
        _point("t0.9-p1.0", 4.0, 60.0),  # beaten by p0.9: higher entropy, lower gen PPL
        _point("p0.9", 4.05, 50.0),
        _point("broken", math.nan, 10.0),
    ]
    assert [p.label for p in draft_frontier(points)] == ["p0.8", "p0.9", "p1.0"]


def test_matched_gen_ppl_is_the_straight_line_in_log_gen_ppl_between_the_two_neighbours():
    frontier = draft_frontier([_point("a", 3.8, 30.0), _point("b", 4.0, 50.0), _point("c", 4.2, 80.0)])
    matched = match_entropy(_point("v", 3.85, 33.0), frontier)
    assert matched.status == "matched" and (matched.lower, matched.upper) == ("a", "b")
    assert matched.weight == pytest.approx(0.25)
    assert matched.frontier_gen_ppl == pytest.approx(30**0.75 * 50**0.25)  # 34.08: a quarter of the way, in log
    assert matched.difference == pytest.approx(33.0 - 30**0.75 * 50**0.25)
    upper = match_entropy(_point("v", 4.1, 70.0), frontier)
    assert (upper.lower, upper.upper, upper.frontier_gen_ppl) == ("b", "c", pytest.approx(math.sqrt(50 * 80)))
    at_end = match_entropy(_point("v", 4.2, 70.0), frontier)
    assert at_end.frontier_gen_ppl == pytest.approx(80.0) and at_end.difference == pytest.approx(-10.0)


def test_a_variant_outside_the_frontier_range_is_reported_as_such_never_extrapolated():
    frontier = draft_frontier([_point("a", 3.8, 30.0), _point("b", 4.0, 50.0)])
    below = match_entropy(_point("v", 3.7, 10.0), frontier)
    above = match_entropy(_point("v", 4.01, 10.0), frontier)
    assert below.status == "below" and above.status == "above"
    assert below.frontier_gen_ppl is None and below.difference is None and below.range == (3.8, 4.0)
    assert verdict(below) is None and verdict(above) is None
    assert match_entropy(_point("v", 3.9, 10.0), []).status == "none"


def _samples(ids, rng, ppl_mean, entropy_mean, shared=None):
    ppl, entropy = [], []
    for k in range(len(ids)):
        common = shared[k] if shared else 0.0  # a draft and its refinement share a sample's difficulty
        ppl.append(ppl_mean + 8 * common + rng.gauss(0, 5))
        entropy.append(entropy_mean + 0.05 * common + rng.gauss(0, 0.04))
    return PerSample(tuple(ids), tuple(ppl), tuple(entropy))


def _means(s: PerSample):
    return sum(s.ppl) / len(s.ppl), sum(s.entropy) / len(s.entropy)


def _difference(x):
    """d as a function of the six means (R, e_R, A, e_A, B, e_B), written from its definition."""
    r, er, a, ea, b, eb = x
    w = (er - ea) / (eb - ea)
    return r - a ** (1 - w) * b**w


def _gradient(x, h=1e-6):
    grad = []
    for k in range(len(x)):
        up, down = list(x), list(x)
        up[k] += h
        down[k] -= h
        grad.append((_difference(up) - _difference(down)) / (2 * h))
    return grad


def _covariance(rows):
    """Sample covariance matrix (n − 1) of a list of equal-length vectors."""
    n, k = len(rows), len(rows[0])
    mean = [sum(r[j] for r in rows) / n for j in range(k)]
    return [[sum((r[i] - mean[i]) * (r[j] - mean[j]) for r in rows) / (n - 1) for j in range(k)] for i in range(k)]


def _quadratic(g, cov):
    return sum(g[i] * cov[i][j] * g[j] for i in range(len(g)) for j in range(len(g)))


def _three_files(paired):
    rng = random.Random(7)
    n = 12
    shared = [rng.gauss(0, 1) for _ in range(n)]
    ids = list(range(n))
    other = [f"x{k}" for k in range(n + 3)] if not paired else ids
    refined = _samples(ids, rng, 36.0, 3.9, shared)
    low = _samples(ids, rng, 30.0, 3.8, shared)
    high = _samples(other if not paired else ids, rng, 50.0, 4.0, None if not paired else shared)
    points = [_point(name, *reversed(_means(s)), s) for name, s in (("v", refined), ("a", low), ("b", high))]
    return points, (refined, low, high)


def test_standard_error_of_paired_samples_equals_the_delta_method_by_hand():
    (variant, a, b), files = _three_files(paired=True)
    matched = match_entropy(variant, draft_frontier([a, b]))
    x = [variant.gen_ppl, variant.entropy, a.gen_ppl, a.entropy, b.gen_ppl, b.entropy]
    assert matched.difference == pytest.approx(_difference(x))
    # One 6-vector per sample (paired by id), its covariance, the numerical gradient: Var = g' Σ g / n.
    rows = [[f.ppl[k] if j == 0 else f.entropy[k] for f in files for j in (0, 1)] for k in range(12)]
    expected = math.sqrt(_quadratic(_gradient(x), _covariance(rows)) / 12)
    assert matched.sem == pytest.approx(expected, rel=1e-5)


def test_standard_error_of_independent_files_sums_each_files_delta_variance():
    (variant, a, b), files = _three_files(paired=False)
    matched = match_entropy(variant, draft_frontier([a, b]))
    x = [variant.gen_ppl, variant.entropy, a.gen_ppl, a.entropy, b.gen_ppl, b.entropy]
    g = _gradient(x)
    variance = 0.0
    for k, f in enumerate(files):
        rows = [[p, e] for p, e in zip(f.ppl, f.entropy, strict=True)]
        variance += _quadratic(g[2 * k : 2 * k + 2], _covariance(rows)) / len(rows)
    assert matched.sem == pytest.approx(math.sqrt(variance), rel=1e-5)


def test_with_constant_entropies_the_error_is_that_of_the_paired_differences():
    r, a, b = [30.0, 41.0, 35.0, 38.0], [33.0, 40.0, 36.0, 45.0], [52.0, 61.0, 50.0, 57.0]
    ids = (0, 1, 2, 3)
    variant = _point("v", 3.9, sum(r) / 4, PerSample(ids, tuple(r), (3.9,) * 4))
    low = _point("a", 3.8, sum(a) / 4, PerSample(ids, tuple(a), (3.8,) * 4))
    high = _point("b", 4.0, sum(b) / 4, PerSample(ids, tuple(b), (4.0,) * 4))
    matched = match_entropy(variant, [low, high])
    mean_a, mean_b = sum(a) / 4, sum(b) / 4
    geometric = math.sqrt(mean_a * mean_b)  # halfway in entropy: the geometric mean of the neighbours
    assert matched.difference == pytest.approx(sum(r) / 4 - geometric)
    # d(sqrt(A B))/dA = B / (2 sqrt(A B)): each sample's linearised difference, then its standard error.
    linear = [
        ri - 0.5 * geometric / mean_a * ai - 0.5 * geometric / mean_b * bi for ri, ai, bi in zip(r, a, b, strict=True)
    ]
    mean = sum(linear) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in linear) / 3)
    assert matched.sem == pytest.approx(sd / 2)


def test_no_standard_error_without_per_sample_values():
    matched = match_entropy(_point("v", 3.9, 30.0), [_point("a", 3.8, 30.0), _point("b", 4.0, 50.0)])
    assert matched.difference == pytest.approx(30.0 - math.sqrt(30 * 50)) and matched.sem is None
    assert verdict(matched) == WITHIN


@pytest.mark.parametrize(
    ("difference", "sem", "n", "expected"),
    [
        (-5.0, 2.0, 64, BEATS),  # 2.5 standard errors, t(63) = 2.0
        (-3.0, 2.0, 64, WITHIN),
        (4.5, 2.0, 64, WORSE),
        (-5.0, 2.0, 4, WITHIN),  # the same 2.5 standard errors from 4 samples: t(3) = 3.18
        (-7.0, 2.0, 4, BEATS),
        (-100.0, 2.0, 1, WITHIN),  # one sample has no spread to read
    ],
)
def test_verdict_needs_the_students_t_bound_for_its_sample_count(difference, sem, n, expected):
    assert verdict(Matched("matched", 40.0, difference, sem, num_samples=n)) == expected


def _t_cdf(x, df, steps=20000):
    """Student's t CDF at x > 0 by the trapezoid rule on its density (an independent check of the table)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    h = x / steps
    density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((k * h) ** 2 / df)) for k in range(steps + 1)]
    return 0.5 + h * (sum(density) - 0.5 * (density[0] + density[-1]))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30, 120])
def test_t_quantiles_are_the_two_sided_95_percent_points(df):
    assert _t_cdf(t_quantile(df), df) == pytest.approx(0.975, abs=2e-4)


def test_between_table_entries_the_wider_bound_is_used():
    assert t_quantile(11) == t_quantile(10) > t_quantile(12)
    assert t_quantile(10_000) == t_quantile(120)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_exactly_at_an_interior_frontier_point_the_wider_segment_error_is_used():
    (variant, a, b), _ = _three_files(paired=True)
    low = _point("low", a.entropy - 0.1, a.gen_ppl * 0.7, a.samples)
    at_a = FrontierPoint("v", a.entropy, variant.gen_ppl, variant.samples)
    frontier = draft_frontier([low, a, b])
    matched = match_entropy(at_a, frontier)
    assert matched.weight == 0.0 and matched.frontier_gen_ppl == pytest.approx(a.gen_ppl)
    above = match_entropy(at_a, [a, b]).sem
    below = match_entropy(at_a, [low, a]).sem
    assert matched.sem == pytest.approx(max(above, below)) and above != pytest.approx(below)

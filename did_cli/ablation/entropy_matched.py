"""Gen PPL at matched entropy: is a refinement better than the draft, or only less diverse?

Generative perplexity falls when sampling is sharper (lower temperature, smaller nucleus) because the text gets more
repetitive, and refinement lowers entropy too. So a refined variant is compared not with the one draft it refined
but with the **draft frontier**: the gen PPL that drafting alone reaches at the variant's entropy, by sharper or
flatter sampling (research notes §1.5: generative perplexity is read together with entropy, as in BD3-LM and ReMDM).

* The frontier is built from draft points (each a draft setting with its gen PPL and mean entropy): the points no
  other draft beats on both (higher-or-equal entropy and lower-or-equal gen PPL), joined by straight lines in
  (entropy, log gen PPL). Choosing the best drafts on noisy data favours the frontier, so a variant that beats it has
  beaten the strongest reading of the baseline.
* A variant's **matched gen PPL** is the frontier interpolated at the variant's mean entropy, linearly in log gen PPL
  (geometrically between the two neighbours). Along a nucleus sweep gen PPL grows about exponentially with entropy
  (the tiny models' drafts double from top-p 0.9 to 1.0 over 0.1 nats), so a straight line in gen PPL itself would
  run above the curve between points and flatter every variant. A variant outside the frontier's entropy range has
  no matched value (no extrapolation: the frontier's shape beyond its points is unknown).
* The **difference** is the variant's gen PPL minus the matched one; negative means better than drafting alone at
  the same diversity. Its standard error comes from the per-sample values by the delta method, counting the noise
  in the two frontier points' gen PPL *and* in all three mean entropies (which set the interpolation weight). When
  the three files hold the same sample ids (a sweep's variants and draft settings share seeds and ids) the samples are
  paired, so the correlation between a draft and its refinement is used, not ignored; otherwise the files are taken
  as independent. The standard error treats the choice of frontier points as fixed.

Pure functions on floats: no files, no models.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BEATS",
    "FrontierPoint",
    "Matched",
    "PerSample",
    "WORSE",
    "WITHIN",
    "draft_frontier",
    "match_entropy",
    "t_quantile",
    "verdict",
]

# Verdicts: the difference is beyond the two-sided 95 % bound either way, or within it.
BEATS, WORSE, WITHIN = "beats", "worse", "within noise"
# Two-sided 95 % quantiles of Student's t by degrees of freedom (standard table values). Few samples give a standard
# error that is itself noisy: with 2 samples the bound is 12.7 standard errors, not 2. Seven constants do not warrant
# scipy as a dependency; between table entries the smaller df (the larger quantile) is used, so the bound errs wide.
_T975 = ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (7, 2.365), (8, 2.306))
_T975 += ((9, 2.262), (10, 2.228), (12, 2.179), (15, 2.131), (20, 2.086), (25, 2.060), (30, 2.042), (40, 2.021))
_T975 += ((60, 2.000), (120, 1.980))


@dataclass(frozen=True)
class PerSample:
    """One file's per-sample values, aligned: sample ids, perplexities (NaN when unscored) and entropies (nats)."""

    ids: tuple[Any, ...]
    ppl: tuple[float, ...]
    entropy: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.ppl) == len(self.entropy):
            raise ValueError("ids, ppl and entropy must have one value per sample")


@dataclass(frozen=True)
class FrontierPoint:
    """A scored file seen as a point of gen PPL against entropy.

    Attributes:
        label: what made it (a variant id such as `draft-p0.8`).
        entropy: mean per-sample unigram entropy, nats.
        gen_ppl: mean per-sample perplexity.
        samples: the per-sample values behind both means, when known (needed for a standard error).
    """

    label: str
    entropy: float
    gen_ppl: float
    samples: PerSample | None = None


@dataclass(frozen=True)
class Matched:
    """A variant against the draft frontier at its entropy.

    Attributes:
        status: `matched`, `below` or `above` (the variant's entropy is outside the frontier's range), or `none`
            (fewer than one usable frontier point).
        frontier_gen_ppl: the frontier interpolated (in log gen PPL) at the variant's entropy (None unless matched).
        difference: variant gen PPL − frontier gen PPL (None unless matched); negative is better.
        sem: standard error of `difference` (None without per-sample values in all files involved).
        lower, upper: labels of the frontier points interpolated between (equal at an exact point).
        weight: share of `upper` in the interpolation, in [0, 1]: frontier = lower^(1 − weight) · upper^weight.
        range: the frontier's (lowest, highest) entropy, for saying how far out an unmatched variant is.
        num_samples: samples behind `sem` (paired samples, or the smallest file when unpaired).
    """

    status: str
    frontier_gen_ppl: float | None = None
    difference: float | None = None
    sem: float | None = None
    lower: str | None = None
    upper: str | None = None
    weight: float | None = None
    range: tuple[float, float] | None = None
    num_samples: int | None = None

    @property
    def bound(self) -> float | None:
        """Half-width of the two-sided 95 % interval of `difference`: Student's t at n − 1 df times `sem`."""
        if self.sem is None or not math.isfinite(self.sem) or not self.num_samples or self.num_samples < 2:
            return None
        return t_quantile(self.num_samples - 1) * self.sem


def t_quantile(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom (table value at or below `df`)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return next(q for d, q in reversed(_T975) if d <= df)


def draft_frontier(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The draft points no other draft beats, ascending in entropy (and so in gen PPL).

    A point is beaten by one with entropy >= and gen PPL <=, one of them strictly. Points with a non-finite gen PPL
    or entropy are left out.
    """
    usable = [p for p in points if math.isfinite(p.entropy) and math.isfinite(p.gen_ppl)]

    def beaten(p: FrontierPoint) -> bool:
        return any(
            q.entropy >= p.entropy and q.gen_ppl <= p.gen_ppl and (q.entropy, q.gen_ppl) != (p.entropy, p.gen_ppl)
            for q in usable
        )

    kept = {(p.entropy, p.gen_ppl): p for p in usable if not beaten(p)}  # one of exact duplicates
    return sorted(kept.values(), key=lambda p: p.entropy)


def match_entropy(variant: FrontierPoint, frontier: Sequence[FrontierPoint]) -> Matched:
    """The variant's gen PPL against the frontier interpolated at its entropy, with the difference's standard error.

    Args:
        variant: the refined file's point (its `samples` give the standard error).
        frontier: from `draft_frontier`: ascending entropy, increasing gen PPL.

    Returns:
        A Matched; `below`/`above` when the variant's entropy lies outside the frontier's range.
    """
    if not frontier or not (math.isfinite(variant.entropy) and math.isfinite(variant.gen_ppl)):
        return Matched("none")
    span = (frontier[0].entropy, frontier[-1].entropy)
    if variant.entropy < span[0]:
        return Matched("below", range=span)
    if variant.entropy > span[1]:
        return Matched("above", range=span)
    if len(frontier) == 1:
        a = b = frontier[0]
        weight = 0.0
    else:
        # The segment whose left end is the last point at or below the variant's entropy (the last segment at the top).
        i = max(j for j in range(len(frontier) - 1) if frontier[j].entropy <= variant.entropy)
        a, b = frontier[i], frontier[i + 1]
        weight = (variant.entropy - a.entropy) / (b.entropy - a.entropy)
    matched_ppl = math.exp((1.0 - weight) * math.log(a.gen_ppl) + weight * math.log(b.gen_ppl))
    difference = variant.gen_ppl - matched_ppl
    sem, n = _difference_sem(variant, a, b, weight)
    i = frontier.index(a)
    if weight == 0.0 and i > 0 and sem is not None:
        # Exactly at an interior frontier point the slope jumps: take the wider of the two segments' errors.
        other, other_n = _difference_sem(variant, frontier[i - 1], a, 1.0)
        if other is not None and other > sem:
            sem, n = other, other_n
    return Matched(
        "matched",
        frontier_gen_ppl=matched_ppl,
        difference=difference,
        sem=sem,
        lower=a.label,
        upper=b.label,
        weight=weight,
        range=span,
        num_samples=n,
    )


def verdict(matched: Matched) -> str | None:
    """`beats` or `worse` when the difference is outside its two-sided 95 % interval, else `within noise`.

    The interval is Student's t at n − 1 degrees of freedom times the standard error; None when not matched.
    Without a standard error only the sign can be read, and that is not a verdict: `within noise` is returned.
    """
    if matched.status != "matched" or matched.difference is None:
        return None
    bound = matched.bound
    if bound is None:
        return WITHIN
    if matched.difference < -bound:
        return BEATS
    if matched.difference > bound:
        return WORSE
    return WITHIN


def _difference_sem(
    variant: FrontierPoint, a: FrontierPoint, b: FrontierPoint, weight: float
) -> tuple[float | None, int | None]:
    """Delta-method standard error of d = R − M, M = A^(1 − w) B^w, w = (e_R − e_A) / (e_B − e_A).

    R, A, B are the mean perplexities of the variant and the two frontier points, e_* their mean entropies. The
    gradient of d in those six means is (1, −(1 − w) M / A, −w M / B) for the perplexities and (−s, s (1 − w), s w)
    for the entropies, s = M (ln B − ln A) / (e_B − e_A) being the frontier's slope at the variant; at a single point
    (A = B) only the perplexities count. Each sample contributes the gradient-weighted deviation of its values from
    its file's means; the standard error is the sample standard deviation of those contributions over √n, summed
    over files when they are independent. Returns (standard error, samples behind it); (None, None) without
    per-sample values.
    """
    files = [variant.samples, a.samples] if a is b else [variant.samples, a.samples, b.samples]
    if any(f is None for f in files):
        return None, None
    if a is b:
        ppl_weights, entropy_weights = [1.0, -1.0], [0.0, 0.0]
    else:
        matched = math.exp((1.0 - weight) * math.log(a.gen_ppl) + weight * math.log(b.gen_ppl))
        slope = matched * (math.log(b.gen_ppl) - math.log(a.gen_ppl)) / (b.entropy - a.entropy)
        ppl_weights = [1.0, -(1.0 - weight) * matched / a.gen_ppl, -weight * matched / b.gen_ppl]
        entropy_weights = [-slope, slope * (1.0 - weight), slope * weight]
    id_sets = [set(f.ids) for f in files]  # type: ignore[union-attr]
    paired = all(len(ids) == len(f.ids) for ids, f in zip(id_sets, files, strict=True)) and all(  # type: ignore[union-attr]
        ids == id_sets[0] for ids in id_sets
    )
    if paired:
        return _paired_sem(files, ppl_weights, entropy_weights)  # type: ignore[arg-type]
    variance, counts = 0.0, []
    for f, wp, we in zip(files, ppl_weights, entropy_weights, strict=True):
        contributions = _contributions(f.ppl, f.entropy, wp, we)  # type: ignore[union-attr]
        if len(contributions) < 2:
            return None, None
        variance += statistics.variance(contributions) / len(contributions)
        counts.append(len(contributions))
    return math.sqrt(variance), min(counts)


def _paired_sem(
    files: list[PerSample], ppl_weights: list[float], entropy_weights: list[float]
) -> tuple[float | None, int | None]:
    """Samples matched by id across files; only ids with a finite perplexity in every file take part."""
    by_id = [dict(zip(f.ids, zip(f.ppl, f.entropy, strict=True), strict=True)) for f in files]
    ids = [i for i in files[0].ids if all(math.isfinite(values[i][0]) for values in by_id)]
    if len(ids) < 2:
        return None, None
    total = [0.0] * len(ids)
    for values, wp, we in zip(by_id, ppl_weights, entropy_weights, strict=True):
        ppl = [values[i][0] for i in ids]
        entropy = [values[i][1] for i in ids]
        total = [t + c for t, c in zip(total, _contributions(ppl, entropy, wp, we), strict=True)]
    return statistics.stdev(total) / math.sqrt(len(ids)), len(ids)


def _contributions(ppl: Sequence[float], entropy: Sequence[float], wp: float, we: float) -> list[float]:
    """Wp (ppl_i − mean ppl) + we (entropy_i − mean entropy) over the samples with a finite perplexity."""
    kept = [(p, e) for p, e in zip(ppl, entropy, strict=True) if math.isfinite(p)]
    if not kept:
        return []
    mean_p = math.fsum(p for p, _ in kept) / len(kept)
    mean_e = math.fsum(e for _, e in kept) / len(kept)
    return [wp * (p - mean_p) + we * (e - mean_e) for p, e in kept]

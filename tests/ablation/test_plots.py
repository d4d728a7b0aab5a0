"""The sweep's pictures as a reader sees them: error bars, and labels by their points that overlap nothing."""

import math

import pytest

from did_cli.ablation import plots

matplotlib = pytest.importorskip("matplotlib")

N = 16
# A real did-tiny sweep (16 samples, L = 64, top-p 0.7-1.0, γ 0.25 and 0.5): variant, strategy, γ, B2, top-p,
# frontier draft, NFEs, gen PPL, its standard error, entropy, the entropy's standard error. Five refined variants lie
# within 0.04 nats and 10 gen PPL of each other, the crowd where labels used to overlap.
SWEEP = [
    ("draft", None, None, None, 0.9, False, 63.0, 74.80, 9.81, 3.640, 0.046),
    ("draft-p0.7", None, None, None, 0.7, True, 63.0, 31.63, 2.76, 3.480, 0.033),
    ("draft-p0.8", None, None, None, 0.8, True, 63.0, 45.57, 3.98, 3.565, 0.039),
    ("draft-p1", None, None, None, 1.0, True, 63.0, 152.75, 17.83, 3.782, 0.037),
    ("snapshot-g0.5-b64", "snapshot", 0.5, 64, 0.9, False, 95.0, 49.18, 5.78, 3.548, 0.053),
    ("posthoc-g0.5-b64", "posthoc", 0.5, 64, 0.9, False, 96.0, 45.00, 4.10, 3.557, 0.042),
    ("random-g0.5-b64", "random", 0.5, 64, 0.9, False, 95.0, 79.40, 8.65, 3.670, 0.043),
    ("snapshot-g0.25-b64", "snapshot", 0.25, 64, 0.9, False, 79.0, 55.29, 7.01, 3.563, 0.054),
    ("snapshot-g0.5-b16", "snapshot", 0.5, 16, 0.9, False, 95.0, 47.64, 3.96, 3.532, 0.053),
]


def _spread(mean: float, sem: float) -> list[float]:
    """N values with this mean and standard error of the mean."""
    step = sem * math.sqrt(N) * math.sqrt((N - 1) / N)
    return [mean + (step if i % 2 else -step) for i in range(N)]


def _rows(with_errors: bool = True) -> list[dict]:
    rows = []
    for variant, remask, gamma, size, top_p, frontier, nfes, ppl, sem, entropy, entropy_sem in SWEEP:
        row = {"model": "did-tiny", "variant": variant, "remask": remask, "gamma": gamma, "refine_block_size": size,
               "top_p": top_p, "temperature": 1.0, "draft_frontier": frontier, "length": 64, "nfes": nfes,
               "gen_ppl": ppl, "entropy": entropy, "judge": {"name": "did-tiny-judge"}}  # fmt: skip
        if with_errors:
            row["gen_ppl_sem"] = sem
            entropies = _spread(entropy, entropy_sem)
            row["per_sample"] = {"id": list(range(N)), "ppl": _spread(ppl, sem), "entropy": entropies}
        rows.append(row)
    return rows


def _bars(axes):
    from matplotlib.container import ErrorbarContainer

    return [c for c in axes.containers if isinstance(c, ErrorbarContainer)]


def _extents(container, axis):
    """(low, high) of each bar of one direction: y (vertical bars) or x (horizontal bars)."""
    lines = container.lines[2]
    index = {"y": 1, "x": 0}[axis]
    for collection in lines:
        spans = [tuple(sorted(p[index] for p in segment)) for segment in collection.get_segments()]
        if all(len({p[1 - index] for p in segment}) == 1 for segment in collection.get_segments()):
            return spans
    return []


def _flat(pairs):
    return [value for pair in pairs for value in pair]


def _legend_texts(figure):
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_standard_errors_come_from_the_row_and_its_per_sample_entropies():
    row = _rows()[4]
    assert plots.gen_ppl_sem(row) == 5.78
    assert plots.entropy_sem(row) == pytest.approx(0.053)
    assert plots.entropy_sem({"per_sample": {"entropy": [3.0]}}) is None and plots.gen_ppl_sem({}) is None


def test_gamma_curve_draws_each_gen_ppl_with_its_standard_error_and_a_band_for_the_draft():
    figure = plots.gamma_figure(plots.figure_classes(), _rows(), None)
    axes = figure.axes[0]
    bars = [span for container in _bars(axes) for span in _extents(container, "y")]
    expected = [(ppl - sem, ppl + sem) for _, remask, _, size, *_, ppl, sem, _, _ in SWEEP if remask and size == 64]
    assert _flat(sorted(bars)) == pytest.approx(_flat(sorted(expected)))
    (band,) = axes.patches  # the draft's line runs through its ± 1 standard error
    low, high = band.get_window_extent().transformed(axes.transData.inverted()).intervaly
    assert (low, high) == pytest.approx((74.80 - 9.81, 74.80 + 9.81))
    assert {"± 1 standard error over samples", "draft ± 1 standard error"} <= set(_legend_texts(figure))


def test_pareto_points_carry_their_standard_errors():
    figure = plots.pareto_figure(plots.figure_classes(), _rows())
    bars = [span for container in _bars(figure.axes[0]) for span in _extents(container, "y")]
    assert len(bars) == len(SWEEP)  # every draft and variant, frontier drafts included
    assert "± 1 standard error over samples" in _legend_texts(figure)


def test_entropy_plot_draws_both_standard_errors():
    figure = plots.entropy_figure(plots.figure_classes(), _rows())
    containers = _bars(figure.axes[0])
    assert containers and all(c.has_xerr and c.has_yerr for c in containers)
    horizontal = sorted(span for c in containers for span in _extents(c, "x"))
    expected = sorted((e - s, e + s) for *_, e, s in SWEEP)
    assert _flat(horizontal) == pytest.approx(_flat(expected), abs=1e-6)
    assert "± 1 standard error over samples" in _legend_texts(figure)


def test_entropy_plot_labels_every_point_by_it_and_no_label_overlaps_another_or_a_marker():
    figure = plots.entropy_figure(plots.figure_classes(), _rows())
    axes = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    from matplotlib.text import Text

    texts = {text.get_text(): text for text in axes.texts}
    variants = [variant for variant, remask, *_ in SWEEP if remask]
    assert set(texts) == {*variants, "top-p 0.7", "top-p 0.8", "top-p 0.9", "top-p 1"}  # frontier points say top-p
    inside = axes.get_window_extent(renderer)
    boxes = {name: Text.get_window_extent(text, renderer) for name, text in texts.items()}
    for name, box in boxes.items():
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, name
    names = list(boxes)
    assert not any(boxes[a].overlaps(boxes[b]) for i, a in enumerate(names) for b in names[i + 1 :])
    markers = [
        point
        for collection in axes.collections
        if isinstance(collection, matplotlib.collections.PathCollection)
        for point in collection.get_offset_transform().transform(collection.get_offsets())
    ]
    for name, text in texts.items():
        box, point = boxes[name], axes.transData.transform(text.xy)
        assert not any(box.x0 < x < box.x1 and box.y0 < y < box.y1 for x, y in markers), name
        # By its point: a few points away, or joined to it by a leader line.
        near = math.dist(point, (min(max(point[0], box.x0), box.x1), min(max(point[1], box.y0), box.y1)))
        assert near <= renderer.points_to_pixels(8) or text.arrow_patch is not None, name


def test_draft_labels_name_the_temperature_when_the_drafts_vary_it():
    rows = _rows()
    rows[1]["top_p"], rows[1]["temperature"] = 0.9, 0.8
    figure = plots.entropy_figure(plots.figure_classes(), rows)
    names = {text.get_text() for text in figure.axes[0].texts}
    assert {"top-p 0.9, T 0.8", "top-p 0.9, T 1"} <= names


def test_rows_without_standard_errors_are_drawn_without_bars():
    classes = plots.figure_classes()
    rows = _rows(with_errors=False)
    for figure in (plots.gamma_figure(classes, rows, None), plots.pareto_figure(classes, rows)):
        assert not _bars(figure.axes[0]) and not figure.axes[0].patches
        assert "± 1 standard error over samples" not in _legend_texts(figure)

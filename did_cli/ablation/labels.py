"""Point labels for the sweep's plots: by their points, inside the axes, clear of other labels and of markers.

Each label is tried first right next to its point (right, left, above, below, then the diagonals), where it is read
as that point's only if it is nearer to it than to any other marker. Where the points crowd (a sweep's refined
variants often lie within one standard error of each other), it goes further out, joined to its point by a thin
leader line. A place is taken only when the text's box stays inside the axes and overlaps no label placed before and
no marker, and a leader line passes through no other label or marker. Among those, a place that crosses no line or
error bar wins (nearby before further out), then one that crosses only its own point's error bars, then the one
crossing fewest. A point with no place at all is left unlabelled (the report's tables list every variant). Boxes are
measured in display coordinates once the figure's layout is settled, so `place_labels` runs after everything else is
drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PointLabel", "place_labels"]

# Right next to the point: (x, y) steps in the order tried, at these distances (points) from the point to the text.
_NEAR_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))
_NEAR_DISTANCES = (4.0, 7.0)
# Further out, with a leader line: sixteen directions at these distances (points).
_FAR_DIRECTIONS = tuple((math.cos(k * math.pi / 8), math.sin(k * math.pi / 8)) for k in range(16))
_FAR_DISTANCES = (18.0, 28.0, 40.0, 55.0)
# Lines, error bars and leader lines are checked in pieces about this long (pixels).
_PIECE = 6.0


@dataclass(frozen=True)
class PointLabel:
    """A label for the point (x, y) in data coordinates; `color` is the text's (and its leader line's)."""

    text: str
    x: float
    y: float
    color: str = "#000000"


@dataclass(frozen=True)
class _Place:
    offset: tuple[float, float]  # points from the point to the text's anchor
    leader: bool


def place_labels(figure: Any, axes: Any, labels: Sequence[PointLabel], fontsize: float = 7) -> list[Any]:
    """Annotate `axes` with each label at the best free place (module docstring); returns the Text artists placed.

    A text shared by several labels (a variant on several models' fronts) is placed once, at its first point.
    """
    from matplotlib.text import Text

    renderer = figure.canvas.get_renderer()
    figure.draw_without_rendering()  # settle the layout, so the boxes measured below are final
    scene = _Scene(axes.get_window_extent(renderer), list(_markers(axes, renderer)), list(_stroke_boxes(axes)))
    places = [_Place((dx * d, dy * d), False) for d in _NEAR_DISTANCES for dx, dy in _NEAR_DIRECTIONS]
    places += [_Place((dx * d, dy * d), True) for d in _FAR_DISTANCES for dx, dy in _FAR_DIRECTIONS]
    texts = []
    for label in _first_of_each_text(labels):
        point = axes.transData.transform((label.x, label.y))
        best: tuple[tuple[Any, ...], Any, Any] | None = None
        for rank, place in enumerate(places):
            text = _annotate(axes, label, place, fontsize)
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the text's own box (an Annotation's adds its leader line)
            crossed = scene.crossings(box, point, place.leader)
            # Preferred: crossing nothing, then crossing only the point's own error bars, then near before far.
            key = (crossed[0] > 0, crossed[1] > 0, place.leader, *crossed, rank) if crossed is not None else None
            if key is None or (best is not None and key >= best[0]):
                text.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (key, text, box)
            if crossed == (0, 0) and not place.leader:
                break  # the nearest clear place: nothing later can be better
        if best is not None:
            scene.labels.append(best[2])
            texts.append(best[1])
    return texts


class _Scene:
    """Where labels may go: inside the axes, clear of placed labels and markers; lines and error bars are counted."""

    def __init__(self, inside: Any, markers: list[tuple[Any, Any]], strokes: list[Any]) -> None:
        self.inside, self.markers, self.strokes = inside, markers, strokes
        self.labels: list[Any] = []

    def crossings(self, box: Any, point: Any, leader: bool) -> tuple[int, int] | None:
        """Pieces of other lines and bars, and of the point's own error bars, that the label crosses (None: no go)."""
        inside = self.inside
        if not (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1):
            return None
        if any(box.overlaps(other) for other in self.labels) or any(box.overlaps(m) for _, m in self.markers):
            return None
        near = _distance(box, point)
        others = [(centre, marker) for centre, marker in self.markers if math.dist(centre, point) > 1.0]
        crossed = [stroke for stroke in self.strokes if box.overlaps(stroke)]
        own = sum(_on_own_bars(stroke, point) for stroke in crossed)
        if not leader:
            # Read as its point's label only when no other marker is as near to it.
            if any(_distance(box, centre) <= near + 2.0 for centre, _ in others):
                return None
            return len(crossed) - own, own
        segment = list(_pieces([tuple(point), _nearest(box, point)]))[1:]  # the first piece is the point's
        blocked = [*self.labels, *(marker for _, marker in others)]
        if any(piece.overlaps(other) for piece in segment for other in blocked):
            return None
        strokes = [stroke for stroke in self.strokes if not _on_own_bars(stroke, point)]
        return len(crossed) - own + sum(any(piece.overlaps(s) for s in strokes) for piece in segment), own


def _on_own_bars(piece: Any, point: Any) -> bool:
    """Whether a stroke piece lies on the error bars (or their caps) through `point`."""
    across = piece.x1 - piece.x0 <= 4.0 and piece.x0 <= point[0] <= piece.x1
    along = piece.y1 - piece.y0 <= 4.0 and piece.y0 <= point[1] <= piece.y1
    return across or along


def _annotate(axes: Any, label: PointLabel, place: _Place, fontsize: float) -> Any:
    dx, dy = place.offset
    return axes.annotate(
        label.text,
        (label.x, label.y),
        xytext=place.offset,
        textcoords="offset points",
        fontsize=fontsize,
        color=label.color,
        ha="left" if dx > 0.3 * abs(dy) else "right" if dx < -0.3 * abs(dy) else "center",
        va="bottom" if dy > 0.3 * abs(dx) else "top" if dy < -0.3 * abs(dx) else "center",
        arrowprops=dict(arrowstyle="-", color=label.color, lw=0.5, alpha=0.7, shrinkA=1, shrinkB=2)
        if place.leader
        else None,
    )


def _distance(box: Any, point: Any) -> float:
    return math.dist(_nearest(box, point), point)


def _nearest(box: Any, point: Any) -> tuple[float, float]:
    """The point of `box` nearest to `point`."""
    return min(max(point[0], box.x0), box.x1), min(max(point[1], box.y0), box.y1)


def _first_of_each_text(labels: Sequence[PointLabel]) -> list[PointLabel]:
    first: dict[str, PointLabel] = {}
    for label in labels:
        first.setdefault(label.text, label)
    return list(first.values())


def _markers(axes: Any, renderer: Any) -> Iterator[tuple[Any, Any]]:
    """(centre, box) in display coordinates of every scatter marker on `axes` (a square as wide as the marker)."""
    from matplotlib.collections import PathCollection
    from matplotlib.transforms import Bbox

    for collection in axes.collections:
        if not isinstance(collection, PathCollection):
            continue
        points = collection.get_offset_transform().transform(collection.get_offsets())
        sizes = collection.get_sizes()  # marker areas in points²
        for i, (x, y) in enumerate(points):
            area = sizes[i % len(sizes)] if len(sizes) else 36.0
            radius = renderer.points_to_pixels(math.sqrt(area) / 2)
            yield (x, y), Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def _stroke_boxes(axes: Any) -> Iterator[Any]:
    """Small display boxes along every line and error bar on `axes` (what a label had better not cross)."""
    from matplotlib.collections import LineCollection

    for line in axes.lines:
        points = line.get_transform().transform(line.get_xydata())
        if line.get_linestyle() in ("None", "", " "):  # markers only (an error bar's caps): each point on its own
            for point in points:
                yield from _pieces([point])
        else:
            yield from _pieces(points)
    for collection in axes.collections:
        if isinstance(collection, LineCollection):
            transform = collection.get_transform()
            for segment in collection.get_segments():
                yield from _pieces(transform.transform(segment))


def _pieces(points: Any) -> Iterator[Any]:
    """Boxes of about `_PIECE` pixels covering a polyline given in display coordinates (a small box for a point)."""
    from matplotlib.transforms import Bbox

    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if len(finite) == 1:
        x, y = finite[0]
        yield Bbox.from_extents(x - 2, y - 2, x + 2, y + 2)
    for (x0, y0), (x1, y1) in zip(finite, finite[1:], strict=False):
        steps = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / _PIECE))
        for k in range(steps):
            a, b = k / steps, (k + 1) / steps
            xs, ys = (x0 + a * (x1 - x0), x0 + b * (x1 - x0)), (y0 + a * (y1 - y0), y0 + b * (y1 - y0))
            yield Bbox.from_extents(min(xs) - 1, min(ys) - 1, max(xs) + 1, max(ys) + 1)

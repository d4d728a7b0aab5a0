"""MAUVE of generated texts against reference texts, with features from the judge LM (optional `mauve-text` extra).

MAUVE (Pillutla et al., NeurIPS 2021; used by ReMDM for masked-diffusion samples) compares the distribution of
generated texts P with that of reference texts Q: both are embedded by an LM, the embeddings are quantised
together (PCA to 90% of the variance, then k-means into `num_buckets` clusters), and MAUVE is the area under the
divergence curve of the two cluster histograms (1: indistinguishable; lower: further apart). The quantisation
and the curve come from the `mauve-text` package (`mauve.compute_mauve` given `p_features` / `q_features`).

Features (facts from `mauve-text` 0.4's `featurize_tokens_from_model`, our own code): the final-layer hidden state
at each text's last token, from right-padded batches with an attention mask. Two choices differ from its default
(gpt2-large features of the bare text, cut to 1024 tokens): the LM is *our judge* (`did_cli.evaluation.judge.Judge`,
gpt2-large as published or did-tiny-judge, so nothing more is downloaded), and each text is tokenised the way the
judge scores it for gen PPL: BOS first, then the text's ids, cut to `max_tokens` (BOS included).

Layout: `judge_features` (texts → features) and `mauve_score` (texts → `MauveResult`) take plain texts and a
loaded Judge and know nothing of files; `mauve_available` says whether the extra is installed, and `mauve_score`
raises `MauveUnavailable` (one line for a "note:") when it is not. `few_texts_note` is the one warning that MAUVE
from few texts is coarse, printed by `did eval-ppl --reference` and `did sweep --reference` alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import torch

from did_cli.errors import DidError, UsageError
from did_cli.evaluation.judge import Judge

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MauveReport",
    "MauveResult",
    "MauveSettings",
    "MauveUnavailable",
    "judge_features",
    "default_buckets",
    "few_texts_note",
    "mauve_available",
    "mauve_unavailable",
    "mauve_score",
    "mauve_scorer",
]

# mauve-text's `max_text_length`: texts are cut to 1024 tokens by default.
DEFAULT_MAX_TOKENS = 1024
INSTALL_HINT = "pip install 'did[mauve]'"


class MauveUnavailable(DidError):
    """The optional `mauve-text` package cannot be imported; MAUVE is skipped, everything else goes on."""

    exit_code = 2


@dataclass(frozen=True)
class MauveSettings:
    """How MAUVE is computed; the defaults are mauve-text 0.4's.

    Attributes:
        max_tokens: cut each text's judge ids (BOS included) to this many; also capped at the judge's positions.
        batch_size: texts per judge forward pass. Changes speed and memory, not the features (beyond float noise).
        num_buckets: k-means clusters; None is mauve-text's "auto": max(2, round(min(n_p, n_q) / 10)).
        seed: seeds PCA and k-means, so one input gives one score.
        scaling_factor: the constant c in exp(-c · KL) of the divergence curve (mauve-text's 5).
        kmeans_explained_var: share of the variance PCA keeps before clustering.
        kmeans_num_redo: k-means restarts (the best objective is kept).
        kmeans_max_iter: k-means iterations per restart.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    batch_size: int = 8
    num_buckets: int | None = None
    seed: int = 25
    scaling_factor: float = 5.0
    kmeans_explained_var: float = 0.9
    kmeans_num_redo: int = 5
    kmeans_max_iter: int = 500

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise UsageError(f"MAUVE needs max_tokens of at least 2 (BOS and one text token), got {self.max_tokens}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_buckets is not None and self.num_buckets < 2:
            raise UsageError(f"MAUVE needs at least 2 buckets, got {self.num_buckets}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise UsageError(f"the MAUVE scaling factor must be a finite number > 0, got {self.scaling_factor}")
        if not 0 < self.kmeans_explained_var < 1:
            raise UsageError(f"kmeans_explained_var must lie in (0, 1), got {self.kmeans_explained_var}")
        if self.kmeans_num_redo < 1 or self.kmeans_max_iter < 1:
            raise UsageError("kmeans_num_redo and kmeans_max_iter must be at least 1")


@dataclass(frozen=True)
class MauveResult:
    """MAUVE of one set of generated texts (P) against the reference texts (Q), with what it was computed from.

    Attributes:
        mauve: area under the divergence curve, in (0, 1]; 1 when the two cluster histograms are equal.
        frontier_integral: mauve-text's frontier integral, in [0, 1]; 0 when the histograms are equal.
        num_p: generated texts.
        num_q: reference texts.
        num_buckets: k-means clusters used.
        seed: the seed of PCA and k-means.
        scaling_factor: the constant c of the divergence curve.
        max_tokens: the cut applied to every text's judge ids (BOS included).
    """

    mauve: float
    frontier_integral: float
    num_p: int
    num_q: int
    num_buckets: int
    seed: int
    scaling_factor: float
    max_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def mauve_available() -> bool:
    """True when `mauve-text` (with its faiss and scikit-learn) imports."""
    return mauve_unavailable() is None


def mauve_unavailable() -> str | None:
    """Why MAUVE cannot be computed here (`MAUVE skipped: ...`, one line for a note), or None when it can."""
    try:
        _import_mauve()
    except MauveUnavailable as exc:
        return f"MAUVE skipped: {exc}"
    return None


def _import_mauve() -> ModuleType:
    try:
        import mauve
    except ImportError as exc:
        if exc.name == "mauve":
            raise MauveUnavailable(f"mauve-text is not installed ({INSTALL_HINT})") from None
        raise MauveUnavailable(f"mauve-text does not import ({exc}; {INSTALL_HINT})") from None
    return mauve


def _feature_ids(judge: Judge, text: str, max_tokens: int) -> list[int]:
    """BOS + the text's judge ids, cut to `max_tokens`: the ids `evaluation` scores for a text without a prompt."""
    ids = judge.encode(text)
    if ids[:1] == [judge.bos_id]:
        ids = ids[1:]  # text decoded the upstream way already starts with <|endoftext|>
    return [judge.bos_id, *ids][:max_tokens]


def judge_features(texts: Sequence[str], judge: Judge, *, max_tokens: int, batch_size: int) -> torch.Tensor:
    """The judge's final-layer hidden state at the last token of each text, the features MAUVE quantises.

    Texts are batched longest first and right-padded with an attention mask; a causal LM's state at a real
    position never sees the padding after it, so the batch size changes the features by float noise at most.

    Args:
        texts: n texts (an empty text is BOS alone).
        judge: a loaded Judge; its model must return `hidden_states` (any transformers causal LM does).
        max_tokens: cut each text's ids (BOS included) to this many; also capped at the judge's positions.
        batch_size: texts per forward pass.

    Returns:
        float32 [n, hidden] on the CPU, row i for texts[i].
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    limit = min(max_tokens, judge.max_positions) if judge.max_positions else max_tokens
    sequences = [_feature_ids(judge, text, limit) for text in texts]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    device = next(judge.model.parameters()).device
    hidden = judge.model.config.hidden_size
    features = torch.zeros((len(sequences), hidden), dtype=torch.float32)  # n, hidden
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(sequences[rows[0]])  # longest first
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # B, T; pad id 0 is masked out
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(rows):
                input_ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i])
                attention_mask[row, : len(sequences[i])] = 1
            output = judge.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_hidden_states=True,
                use_cache=False,
            )
            last_layer = output.hidden_states[-1]  # B, T, hidden (after the final layer norm)
            for row, i in enumerate(rows):
                features[i] = last_layer[row, len(sequences[i]) - 1].float().cpu()
    return features


def mauve_score(
    samples: Sequence[str], references: Sequence[str], judge: Judge, settings: MauveSettings | None = None
) -> MauveResult:
    """MAUVE of generated texts against reference texts, both embedded by the judge (deterministic: fixed seed).

    Args:
        samples: the generated texts (P), e.g. the `text` of each sample record.
        references: the reference texts (Q), e.g. human text of the same domain.
        judge: a loaded Judge (`did_cli.evaluation.judge.load_judge`).
        settings: cut, batch size, buckets, seed and scaling factor.

    Raises:
        MauveUnavailable: `mauve-text` cannot be imported (checked before any feature is computed).
        UsageError: fewer than 2 generated or reference texts, or more buckets than texts.
    """
    settings = settings or MauveSettings()
    mauve = _import_mauve()
    _check_counts(len(samples), len(references), settings)  # before any feature is computed
    limit = _cut(settings.max_tokens, judge)
    p = judge_features(samples, judge, max_tokens=limit, batch_size=settings.batch_size)
    q = judge_features(references, judge, max_tokens=limit, batch_size=settings.batch_size)
    return _mauve_from_features(mauve, p, q, settings, limit)


def mauve_scorer(
    references: Sequence[str], judge: Judge, settings: MauveSettings | None = None
) -> Callable[[Sequence[str]], MauveResult]:
    """A function giving the MAUVE of generated texts against `references`, featurised once, on its first call.

    For callers that score many sets against one reference one at a time (`did sweep`, variant by variant).

    Raises:
        MauveUnavailable: `mauve-text` cannot be imported (raised here, before anything is computed).
        UsageError: fewer than 2 reference texts (here), or fewer than 2 generated texts (when called).
    """
    settings = settings or MauveSettings()
    mauve = _import_mauve()
    _check_counts(2, len(references), settings)
    limit = _cut(settings.max_tokens, judge)
    features: list[torch.Tensor] = []

    def score(samples: Sequence[str]) -> MauveResult:
        _check_counts(len(samples), len(references), settings)
        if not features:
            features.append(judge_features(references, judge, max_tokens=limit, batch_size=settings.batch_size))
        p = judge_features(samples, judge, max_tokens=limit, batch_size=settings.batch_size)
        return _mauve_from_features(mauve, p, features[0], settings, limit)

    return score


def _cut(max_tokens: int, judge: Judge) -> int:
    return min(max_tokens, judge.max_positions) if judge.max_positions else max_tokens


def default_buckets(num_p: int, num_q: int) -> int:
    """mauve-text's "auto" number of k-means buckets for n_p generated and n_q reference texts."""
    return max(2, round(min(num_p, num_q) / 10))


# Below this many texts on a side, mauve-text's "auto" rule gives k-means at most 2 buckets: MAUVE is coarse.
FEW_TEXTS = 25


def few_texts_note(num_p: int, num_q: int) -> str | None:
    """The one-line note that MAUVE from `num_p` samples per file against `num_q` reference texts is coarse.

    None from FEW_TEXTS texts on each side. `num_p` is the smallest file's count when several files are compared.
    """
    if min(num_p, num_q) >= FEW_TEXTS:
        return None
    subject = f"MAUVE from {num_p} samples per file" if num_p < FEW_TEXTS else f"MAUVE against {num_q} reference texts"
    return (
        f"{subject} is coarse (k-means on so few texts has {default_buckets(num_p, num_q)} buckets; mauve-text's "
        "authors use thousands)"
    )


def _check_counts(num_p: int, num_q: int, settings: MauveSettings) -> int:
    """The number of buckets for n_p and n_q texts (mauve-text's "auto" rule when unset); refuses too few texts."""
    for count, what in ((num_p, "generated"), (num_q, "reference")):
        if count < 2:
            raise UsageError(f"MAUVE needs at least 2 {what} texts, got {count}")
    buckets = settings.num_buckets or default_buckets(num_p, num_q)
    if buckets > num_p + num_q:
        raise UsageError(f"MAUVE with {buckets} buckets needs at least as many texts, got {num_p} + {num_q}")
    return buckets


def _mauve_from_features(
    mauve: ModuleType, p: torch.Tensor, q: torch.Tensor, settings: MauveSettings, max_tokens: int
) -> MauveResult:
    """MAUVE from features p [n_p, hidden] and q [n_q, hidden] through `mauve.compute_mauve`."""
    buckets = _check_counts(len(p), len(q), settings)
    with _quiet_native_stderr():
        out = mauve.compute_mauve(
            p_features=p.double().numpy(),
            q_features=q.double().numpy(),
            num_buckets=buckets,
            kmeans_explained_var=settings.kmeans_explained_var,
            kmeans_num_redo=settings.kmeans_num_redo,
            kmeans_max_iter=settings.kmeans_max_iter,
            mauve_scaling_factor=settings.scaling_factor,
            seed=settings.seed,
        )
    return MauveResult(
        mauve=float(out.mauve),
        frontier_integral=float(out.frontier_integral),
        num_p=len(p),
        num_q=len(q),
        num_buckets=int(out.num_buckets),
        seed=settings.seed,
        scaling_factor=settings.scaling_factor,
        max_tokens=max_tokens,
    )


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence C-level writes to stderr (file descriptor 2) for the duration.

    faiss's k-means prints "WARNING clustering N points to K centroids: please provide at least 39·K training
    points" from C++ whenever there are fewer than 39 points per bucket, which mauve-text's own "auto" rule (10 per
    bucket) always gives; the advice does not apply to MAUVE and would break the one-line stderr of the CLI.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class MauveReport:
    """MAUVE of several inputs against one reference, or why it was skipped.

    Attributes:
        reference: the reference's name (its path as given).
        results: per input name, its `MauveResult`; empty when skipped.
        skipped: one line saying why MAUVE was not computed (None when it was).
    """

    reference: str
    results: dict[str, MauveResult]
    skipped: str | None = None

    def value(self, source: str) -> float | None:
        """The MAUVE of one input, None when skipped."""
        result = self.results.get(source)
        return result.mauve if result is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the reference, the skip reason (null when computed) and every input's full result."""
        results = {source: result.to_dict() for source, result in self.results.items()}
        return {"reference": self.reference, "skipped": self.skipped, "results": results}

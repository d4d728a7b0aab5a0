"""`did eval-nll`: the model's own likelihood bound (test perplexity) per block size, in-domain and zero-shot.

For each block size B the result is the block-diffusion NELBO in nats per token,

    NELBO = sum over rows of E_t[ sum over masked positions of w(t) * -log p_theta(x_0 | x_t, earlier clean blocks) ]
            / sum over rows of (scored tokens),

computed with the training objective (`training.objective.nelbo_terms`) and reported with exp(NELBO), an upper bound
on the perplexity. It is an upper bound on the NLL for B > 1 and the exact NLL at B = 1 (see below).

Upstream's `ppl_eval` (BD3-LM `diffusion.py`, mode=ppl_eval) reports `val/nll` = the token-weighted mean of the
same terms over the validation rows and `val/ppl` = its exp, with t ~ U[1e-3, 1] (unclipped), position 0 kept clean
and not counted (L - 1 tokens per wrapped row), one noise draw per row, and at B = 1 the exact NLL (t = 1, every
position masked). Ours is the same quantity with the same conventions; the one difference is how noise is laid out:

* upstream stratifies t over batch x blocks in a fixed order (block j of row i always gets the same stratum), so
  its number depends on the batch size and on the number of GPUs; here t is stratified over the noise draws x
  blocks of each row, with the strata assigned to blocks in a random order, drawn from (seed, row, B) alone. Each
  block's t is then exactly uniform, the estimate is unbiased, and it does not depend on batch size, process count
  or which models are compared (they see the same noise). Both estimate the same expectation; their difference is
  noise, which the standard error measures. `noise_layout="batch"` gives upstream's layout instead (consecutive
  groups of `batch_size` rows noised together by the same function training validation uses), for a number that
  moves with the batch size exactly as upstream's does.
* The standard error is over sequences (a ratio estimator: it reduces to std / sqrt(n) when every row has the same
  number of tokens); more noise draws per row (`noise_draws`) shrink the noise part of it.
* Rows come from `eval_rows` (training's wrapping, upstream's zero-shot rows, or one per document).

Multi-process (accelerate): rows are dealt round-robin to processes and the per-row results gathered; since the
noise depends only on (seed, row, B), the numbers equal a single process's.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from did_cli.errors import UsageError
from did_cli.evaluation.nll_rows import EvalRows, load_rows, read_documents
from did_cli.evaluation.settings import NllData, NllSettings
from did_cli.model import BD3LM
from did_cli.noise import DEFAULT_EPS_MAX, DEFAULT_EPS_MIN, Clip, ClipSpec, clip_for, is_unweighted, mask_tokens
from did_cli.processes import ONE_PROCESS, Processes
from did_cli.provenance import model_info, tokenizer_info, versions
from did_cli.settings import check_block_size
from did_cli.training.objective import nelbo_terms, noise_batch

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class RowResult:
    """One row at one block size: the NELBO sum (mean over noise draws) and the tokens it covers."""

    row: int
    nll: float
    tokens: int

    @property
    def nelbo(self) -> float:
        """Nats per token for this row."""
        return self.nll / self.tokens


@dataclass
class BlockResult:
    """One model at one block size."""

    model: str
    block_size: int
    rows: list[RowResult]
    seconds: float
    exact: bool
    clip: Clip

    @property
    def tokens(self) -> int:
        """Scored tokens over all rows."""
        return sum(r.tokens for r in self.rows)

    @property
    def nelbo(self) -> float:
        """Token-weighted NELBO (nats per token), upstream's aggregate."""
        return sum(r.nll for r in self.rows) / self.tokens

    @property
    def stderr(self) -> float:
        """Standard error of `nelbo` over sequences (ratio estimator; NaN with one row)."""
        n = len(self.rows)
        if n < 2:
            return float("nan")
        ratio = self.nelbo
        squares = sum((r.nll - ratio * r.tokens) ** 2 for r in self.rows)
        return math.sqrt(squares / (n * (n - 1))) / (self.tokens / n)

    def summary(self) -> dict[str, Any]:
        """The aggregate numbers (what `--json` lists per model and block size)."""
        return {
            "model": self.model,
            "block_size": self.block_size,
            "nelbo": self.nelbo,
            "ppl_bound": math.exp(self.nelbo),
            "stderr": _json_number(self.stderr),
            "nelbo_row_mean": sum(r.nelbo for r in self.rows) / len(self.rows),
            "sequences": len(self.rows),
            "tokens": self.tokens,
            "seconds": self.seconds,
            "exact_nll": self.exact,
            "clip": list(self.clip),
        }


@dataclass
class NllResult:
    """Everything `did eval-nll` reports."""

    results: list[BlockResult]
    data: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, Any]
    versions: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line each, for the user (a block size clamped to L)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` body."""
        return {
            "results": [r.summary() for r in self.results],
            "data": self.data,
            "settings": self.settings,
            "models": self.models,
            "versions": self.versions,
        }


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _interval(clip: ClipSpec | None, block_size: int, length: int) -> Clip:
    return (DEFAULT_EPS_MIN, DEFAULT_EPS_MAX) if clip is None else clip_for(clip, block_size, length)


def row_generator(seed: int, row: int, block_size: int) -> torch.Generator:
    """The noise source of one row at one block size (independent of the model, batch and process)."""
    digest = hashlib.sha256(f"did-nll:{seed}:{row}:{block_size}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def row_noise(
    clean: torch.Tensor, block_size: int, draws: int, interval: Clip, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and t for `draws` noisings of one row: t stratified over draws x blocks, strata shuffled over blocks.

    Args:
        clean: [L] int64 one row.
        block_size: B (divides L).
        draws: K.
        interval: (eps_min, eps_max) for t.
        mask_id: the [MASK] id.
        generator: the row's noise source.

    Returns:
        x_t [K, L] int64 (position 0 clean) and t [K, L] float32.
    """
    length = clean.shape[0]
    num_blocks = length // block_size
    cells = draws * num_blocks
    strata = torch.randperm(cells, generator=generator).float()
    uniform = (strata + torch.rand(cells, generator=generator)) / cells
    eps_min, eps_max = interval
    t = (uniform * (eps_max - eps_min) + eps_min).view(draws, num_blocks)
    rows = clean.unsqueeze(0).expand(draws, length)
    return mask_tokens(
        rows, t, block_size, mask_id, generator, resample=True, eps_min=eps_min, eps_max=eps_max, keep_first=True
    )


def _batch_noise(
    rows: EvalRows,
    index: int,
    block_size: int,
    interval: Clip,
    mask_id: int,
    settings: NllSettings,
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `index`'s x_t [L] and t [L] under the `batch` layout: its group's noise, drawn as training validates.

    `groups` caches each group's noise, since a process may score only some rows of a group.
    """
    group, position = divmod(index, settings.batch_size)
    if group not in groups:
        first = group * settings.batch_size
        clean = rows.tokens[first : first + settings.batch_size]
        generator = row_generator(settings.seed, group, block_size)
        groups.clear()
        groups[group] = noise_batch(clean, block_size, mask_id, generator, interval, resample=True)
    noisy, t = groups[group]
    return noisy[position], t[position]


@torch.no_grad()
def score_rows(
    model: BD3LM,
    rows: EvalRows,
    indices: Sequence[int],
    block_size: int,
    settings: NllSettings,
    on_progress: ProgressFn | None = None,
) -> list[RowResult]:
    """The NELBO sum of each row in `indices` at one block size (B at least L: one global block).

    Returns:
        One RowResult per index, in the order given.
    """
    length = rows.tokens.shape[1]
    block = min(block_size, length)
    exact = block == 1 and settings.exact_block_1
    interval = _interval(settings.clip, block, length)
    draws = 1 if exact else settings.noise_draws
    weighted = not is_unweighted(interval[0])
    per_call = max(1, settings.batch_size // draws)
    results: list[RowResult] = []
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for first in range(0, len(indices), per_call):
        chunk = list(indices[first : first + per_call])
        clean = rows.tokens[chunk].repeat_interleave(draws, dim=0)
        scored = rows.scored[chunk].repeat_interleave(draws, dim=0)
        if exact:
            noisy = torch.where(scored, torch.full_like(clean, model.mask_id), clean)
            noisy[:, 0] = clean[:, 0]
            t = torch.ones(clean.shape)
        elif settings.noise_layout == "batch":
            noised = [_batch_noise(rows, i, block, interval, model.mask_id, settings, groups) for i in chunk]
            noisy = torch.stack([n for n, _ in noised])
            t = torch.stack([t for _, t in noised])
        else:
            noised = [
                row_noise(rows.tokens[i], block, draws, interval, model.mask_id, row_generator(settings.seed, i, block))
                for i in chunk
            ]
            noisy = torch.cat([n for n, _ in noised])
            t = torch.cat([t for _, t in noised])
        device = model.device
        terms = nelbo_terms(
            model,
            clean.to(device),
            noisy.to(device),
            t.to(device),
            block,
            weighted=weighted,
            scored=scored.to(device),
        )
        sums = terms.double().sum(-1).view(len(chunk), draws).mean(-1).cpu()
        for position, index in enumerate(chunk):
            results.append(RowResult(index, float(sums[position]), int(rows.scored[index].sum())))
        if on_progress is not None:
            on_progress(first + len(chunk), len(indices))
    return results


def merge_shards(parts: Iterable[Iterable[RowResult]], count: int) -> list[RowResult]:
    """Row results gathered from every process, in row order.

    Raises:
        RuntimeError: a row is missing or repeated (the shards did not cover the rows exactly once).
    """
    merged = sorted((r for part in parts for r in part), key=lambda r: r.row)
    if [r.row for r in merged] != list(range(count)):
        raise RuntimeError(f"gathered {len(merged)} row results for {count} rows")
    return merged


ModelLike = str | BD3LM


def eval_nll(
    models: Sequence[ModelLike],
    data: NllData,
    settings: NllSettings | None = None,
    *,
    tokenizer: str | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    on_progress: Callable[[str, int, int, int], None] | None = None,
    processes: Processes = ONE_PROCESS,
) -> NllResult:
    """NELBO per token and its perplexity bound per model and block size (what `did eval-nll` runs).

    The data is read before any model loads, so a bad source fails fast; models sharing a tokenizer and length are
    scored on identical rows with identical noise.

    Args:
        models: names (embedded, folder or Hub id) or loaded models.
        data: the source, its rows and how many.
        settings: block sizes, noise draws, batch size, seed, clip.
        tokenizer: tokenizer override for models loaded here (default: each checkpoint's).
        revision: Hub revision for models loaded here.
        device: where models loaded here run.
        dtype: weights dtype for models loaded here.
        on_progress: called with (model name, block size, rows done, rows total).
        processes: the processes sharing the rows (each scores every world-th row; all return the whole result).

    Raises:
        UsageError: no model, a bad source choice, a block size that does not divide L, L above a model's length.
        DataError: missing, unreadable or empty data.
    """
    from did_cli.checkpoints import load_model, load_tokenizer

    settings = settings or NllSettings()
    if not models:
        raise UsageError("give at least one --model")
    documents, source = read_documents(
        data.data,
        data.preset,
        config=data.config,
        split=data.split,
        text_field=data.text_field,
        txt_documents=data.txt_documents,
    )
    layout = data.layout or ("bos-eos" if data.preset is not None else "wrap")
    loaded = []
    for model in models:
        if isinstance(model, str):
            name, model = model, load_model(model, device=device, dtype=dtype, revision=revision)
            loaded.append((name, model, load_tokenizer(model, tokenizer)))
        else:
            loaded.append((model_info(model)["name"], model, load_tokenizer(model, tokenizer)))

    def rows_for(model: BD3LM, tok: Any) -> EvalRows:
        return load_rows(
            documents, tok, model, source=source, seq_len=data.seq_len, layout=layout, num_samples=data.num_samples
        )

    return score_models(loaded, rows_for, settings, on_progress=on_progress, processes=processes)


def score_models(
    models: Sequence[tuple[str, BD3LM, Any]],
    rows_for: Callable[[BD3LM, Any], EvalRows],
    settings: NllSettings,
    *,
    on_progress: Callable[[str, int, int, int], None] | None = None,
    processes: Processes = ONE_PROCESS,
) -> NllResult:
    """NELBO per model and block size on rows built per model (`eval_nll` after loading).

    Args:
        models: (name, model, tokenizer) triples, scored in order.
        rows_for: builds the rows for a model and its tokenizer (rows are rebuilt only when the tokenizer or length
            changes, so models sharing a tokenizer are scored on identical rows).
        settings: block sizes, noise draws, batch size, seed, clip.
        on_progress: called with (model name, block size, rows done, rows total).
        processes: the processes sharing the rows: each scores every world-th row, so long documents spread evenly.

    Raises:
        UsageError: a block size that does not divide the sequence length.
    """
    device = processes.device
    results: list[BlockResult] = []
    data: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    cache: dict[tuple[Any, ...], EvalRows] = {}
    notes: list[str] = []
    for name, model, tokenizer in models:
        if device is not None:
            model = model.to(device)
        key = (tokenizer_info(tokenizer)["name"], len(tokenizer), model.config.model_length, model.mask_id)
        if key not in cache:
            cache[key] = rows_for(model, tokenizer)
        rows = cache[key]
        length = rows.tokens.shape[1]
        data[name] = rows.info
        infos[name] = {**model_info(model), "tokenizer": tokenizer_info(tokenizer)}
        sizes: list[int] = []
        for size in settings.block_sizes:
            check_block_size(size, length)
            note = f"block size {size} is longer than the rows ({length} tokens): one global block, B = {length}"
            if size > length and note not in notes:
                notes.append(note)
            if min(size, length) not in sizes:
                sizes.append(min(size, length))
        mine = [row for row in range(rows.tokens.shape[0]) if processes.owns(row)]
        for block in sizes:
            started = time.perf_counter()
            progress = functools.partial(on_progress, name, block) if on_progress else None
            scored = score_rows(model, rows, mine, block, settings, progress)
            merged = merge_shards(processes.gather(scored), rows.tokens.shape[0])
            exact = block == 1 and settings.exact_block_1
            # Exact NLL is t = 1 everywhere, which upstream writes as the interval (1, 1).
            clip = (1.0, 1.0) if exact else _interval(settings.clip, block, length)
            results.append(BlockResult(name, block, merged, time.perf_counter() - started, exact, clip))
    run_settings = {
        **asdict(settings),
        "clip": None if settings.clip is None else str(settings.clip),
        "processes": processes.world,
    }
    return NllResult(results, data, run_settings, infos, versions(), notes)

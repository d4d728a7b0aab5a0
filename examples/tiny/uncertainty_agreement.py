"""Which uncertainty picks the tokens a global pass would change? A per-token diagnostic for docs/ablations.md.

For each model: draft N samples (top-p 0.9, the sweep's seed), score every generated token by each remask strategy
(`did_cli.sampling.remask`), and take each strategy's bottom-gamma set S. The edit set E is what one global pass of
the same model would change: the positions whose argmax (under one bidirectional block over the finished draft)
differs from the committed token. Per sample, recall |S ∩ E| / |E| says how much of what the model would revise a
measure points at, precision |S ∩ E| / |S| how much of what it points at the model would revise; `random` is the
baseline (its expected recall is gamma). Means ± one standard error over samples go to a Markdown table and a plot.

    python examples/tiny/uncertainty_agreement.py --model mix=runs/tiny-mix/final --model nomix=runs/tiny-nomix/final \
        --num-samples 64 --gamma 0.1,0.25,0.5 --out runs/agreement
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

import did_cli as did
from did_cli.sampling.edit import edit
from did_cli.sampling.primitives import draw_uniforms
from did_cli.sampling.remask import STRATEGIES, RemaskInputs, select_lowest
from did_cli.settings import EditSettings


def _sets(model, records, gamma_values, passes, seed):
    """Per strategy and gamma, per sample: (recall, precision) of its bottom-gamma set against the edit set."""
    device = model.device
    tokens = torch.tensor([r.tokens for r in records], device=device)
    confidence = torch.tensor([r.confidence for r in records], device=device)
    entropy = torch.tensor([r.entropy for r in records], device=device)
    margin = torch.tensor([r.margin for r in records], device=device)
    ids, prompt_lengths = [r.id for r in records], [r.prompt_len for r in records]
    length = tokens.shape[1]
    eligible = torch.arange(length, device=device)[None, :] >= torch.tensor(prompt_lengths, device=device)[:, None]
    changed = edit(model, tokens, confidence, prompt_lengths, ids, 1, EditSettings(threshold=0.0), seed).edited
    uniforms = draw_uniforms(seed, ids, 1, length, 3)[..., 2].to(device)
    inputs = RemaskInputs(
        tokens, confidence, entropy, margin, uniforms, model, length, ids, 1, seed, passes, 0.5, eligible
    )
    out = {}
    for name, score in STRATEGIES.items():
        scores = score(inputs)
        for gamma in gamma_values:
            chosen = select_lowest(scores, eligible, gamma)
            both = (chosen & changed).sum(dim=1).double()
            recall = [float(b / e) for b, e in zip(both, changed.sum(dim=1), strict=True) if e > 0]
            precision = [float(b / c) for b, c in zip(both, chosen.sum(dim=1), strict=True) if c > 0]
            out[(name, gamma)] = (recall, precision)
    return out, float(changed.sum(dim=1).double().mean() / eligible.sum(dim=1).double().mean())


def _mean_se(values):
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def _plot(results, gammas, path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    models = list(results)
    names = list(STRATEGIES)
    figure = Figure(figsize=(4 + 3.5 * len(gammas), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(gammas), sharey=True, squeeze=False)[0]
    width = 0.8 / len(models)
    for axes, gamma in zip(panels, gammas, strict=True):
        for k, model in enumerate(models):
            stats = [_mean_se(results[model]["sets"][(name, gamma)][0]) for name in names]
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(names))]
            bars = axes.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=model)
            # The ceiling: a bottom-γ set holds γ n tokens, so it can hold at most γ / (edit share) of the edit set.
            ceiling = min(1.0, gamma / results[model]["edit_share"])
            axes.axhline(ceiling, color=bars.patches[0].get_facecolor(), linewidth=1, linestyle=":")
        axes.axhline(gamma, color="#555555", linewidth=1, linestyle="--")  # random's expected recall
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        axes.set_title(f"γ = {gamma:g}", fontsize="medium")
    panels[0].set_ylabel("recall of the edit set (± s.e.; dashed: random, dotted: ceiling)")
    figure.suptitle("Share of the tokens a global pass would change that each measure's bottom-γ set holds")
    figure.legend(*panels[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(models))
    figure.savefig(path, dpi=150)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="label=path (repeat)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--gamma", default="0.1,0.25,0.5")
    parser.add_argument("--passes", type=int, default=8, help="M of mc-dropout, mc-variance and noise-ensemble")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/agreement"))
    args = parser.parse_args()
    gammas = [float(g) for g in args.gamma.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in args.model:
        label, _, path = spec.partition("=")
        model = did.load_model(path or label)
        tokenizer = did.load_tokenizer(model)
        settings = did.DraftSettings(length=model.config.model_length)
        drafts = list(
            did.draft(
                model, tokenizer, settings, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size
            )
        )
        sets, edit_share = _sets(model, drafts, gammas, args.passes, args.seed)
        results[label] = {"sets": sets, "edit_share": edit_share}
    lines = ["| model | measure | " + " | ".join(f"γ = {g:g} recall | precision" for g in gammas) + " |"]
    lines.append("|" + "---|" * (2 + 2 * len(gammas)))
    rows = []
    for label, result in results.items():
        for name in STRATEGIES:
            cells = []
            for gamma in gammas:
                recall, precision = result["sets"][(name, gamma)]
                (r, rs), (p, ps) = _mean_se(recall), _mean_se(precision)
                cells += [f"{r:.3f} ± {rs:.3f}", f"{p:.3f} ± {ps:.3f}"]
                rows.append({"model": label, "measure": name, "gamma": gamma, "recall": r, "recall_se": rs,
                             "precision": p, "precision_se": ps, "samples": len(recall)})  # fmt: skip
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
        lines.append(
            f"| {label} | (edit set: {result['edit_share']:.1%} of generated tokens) |" + " |" * 2 * len(gammas)
        )
    table = "\n".join(lines) + "\n"
    (args.out / "agreement.md").write_text(table, encoding="utf-8")
    (args.out / "agreement.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    plotted = _plot(results, gammas, args.out / "agreement.png")
    print(table + (f"plot: {args.out / 'agreement.png'}" if plotted else "no plot (matplotlib not installed)"))


if __name__ == "__main__":
    main()

"""Draft against refine wall-clock per sample, for exact and cheaper refinements (issue 18's frontier).

Drafts `--num-samples` samples once (KV cache, B1 = `--block-size`), then refines the same drafts (γ, B2 = L) with
each variant: exact first-hitting (the default), one-token-per-call confidence order, confidence thresholds
(`--thresholds`), reused kept keys/values (`--refine-caches`), first-hitting with K tokens per call
(`--tokens-per-call`) and their combinations. Prints seconds per sample for
the draft and each refinement, the ratio, NFEs and full-sequence calls per sample, and tokens committed per call.
On a CPU the ratio uses the process's CPU time (one thread: what the wall-clock would be on an idle core), because
wall-clock on a shared machine mostly measures the other jobs; both are printed. Quality needs a judge:
`did sweep --confidence-threshold ... --refine-cache ...` (docs/ablations.md).

With `--per-call` it only times single calls at the shape (a cached draft call, a full refine call, and a refine
call of the remasked positions only against reused keys/values), which is how the 110M shape at L = 1024 is
estimated on a CPU within minutes.

    python -m benchmarks.frontier --model did-tiny --length 128 --num-samples 4 --batch-size 1
    python -m benchmarks.frontier --shape small --length 1024 --per-call
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks._common import build_model, device_name, print_table
from benchmarks._common import timed as _wall_timed
from did_cli.checkpoints import bos_token_id, load_tokenizer
from did_cli.model import BD3LM
from did_cli.sampling.draft import draft
from did_cli.sampling.refine import refine
from did_cli.sampling.reuse import KeptKVReuse
from did_cli.settings import DraftSettings, RefineSettings, UnmaskingSettings


def timed(device: torch.device, fn: Any) -> tuple[Any, float, float]:
    """fn's result, its wall-clock seconds and this process's CPU seconds (all threads)."""
    start = time.process_time()
    result, wall = _wall_timed(device, fn)
    return result, wall, time.process_time() - start


COLUMNS = [
    ("variant", "variant"),
    ("nfes", "NFEs / sample"),
    ("full_calls", "full-sequence calls / sample"),
    ("tokens_per_call", "tokens / call"),
    ("seconds", "wall s / sample"),
    ("cpu_seconds", "CPU s / sample"),
    ("vs_draft", "÷ draft (CPU s)"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "small"], help="random-weight model shape")
    parser.add_argument("--model", default=None, help="a checkpoint instead of a random shape (e.g. did-tiny)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--thresholds", default="0.9,0.7,0.5")
    parser.add_argument("--refine-caches", default="4,16")
    parser.add_argument("--tokens-per-call", default="", help="first-hitting K values for refinement, e.g. 2,4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--per-call", action="store_true", help="time single calls only (see the docstring)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a markdown table")
    return parser.parse_args()


def variants(args: argparse.Namespace) -> list[tuple[str, RefineSettings]]:
    """(name, settings) of every refinement, the exact one first."""
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    caches = [int(r) for r in args.refine_caches.split(",") if r.strip()]
    out = [
        ("exact (first-hitting)", RefineSettings(gamma=args.gamma)),
        ("confidence order, 1 / call", RefineSettings(gamma=args.gamma, unmasking=UnmaskingSettings("confidence"))),
    ]
    out += [(f"refine cache R={r}", RefineSettings(gamma=args.gamma, refine_cache=r)) for r in caches]
    for k in (int(k) for k in args.tokens_per_call.split(",") if k.strip()):
        unmasking = UnmaskingSettings(tokens_per_call=k)
        out.append((f"first-hitting K={k}", RefineSettings(gamma=args.gamma, unmasking=unmasking)))
        out += [
            (f"first-hitting K={k}, R={r}", RefineSettings(gamma=args.gamma, unmasking=unmasking, refine_cache=r))
            for r in caches
        ]
    for t in thresholds:
        unmasking = UnmaskingSettings("confidence", confidence_threshold=t)
        out.append((f"threshold {t:g}", RefineSettings(gamma=args.gamma, unmasking=unmasking)))
        out += [
            (f"threshold {t:g}, R={r}", RefineSettings(gamma=args.gamma, unmasking=unmasking, refine_cache=r))
            for r in caches
        ]
    return out


def frontier(model: BD3LM, args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = DraftSettings(length=args.length, block_size=args.block_size)
    bos = [[bos_token_id(load_tokenizer(model)) if args.model else 0]]  # a trained model's real BOS
    batches = [
        list(range(first, min(first + args.batch_size, args.num_samples)))
        for first in range(0, args.num_samples, args.batch_size)
    ]
    draft(model, bos * len(batches[0]), batches[0], settings, seed=1)  # warm-up
    drafts, seconds, cpu, nfes = [], 0.0, 0.0, 0
    for ids in batches:
        result, elapsed, used = timed(model.device, lambda ids=ids: draft(model, bos * len(ids), ids, settings, seed=0))
        drafts.append((ids, result))
        seconds, cpu = seconds + elapsed, cpu + used
        nfes += sum(result.nfes)
    n = args.num_samples
    clock = "cpu_seconds" if model.device.type == "cpu" else "seconds"
    rows = [{"variant": "draft (KV cache)", "nfes": nfes / n, "seconds": seconds / n, "cpu_seconds": cpu / n}]
    for name, refine_settings in variants(args):
        seconds, cpu, nfes, full, tokens = 0.0, 0.0, 0, 0, 0
        for ids, drafted in drafts:

            def run(ids=ids, drafted=drafted, refine_settings=refine_settings):
                tokens, confidence, prompts = drafted.tokens, drafted.confidence, drafted.prompt_lengths
                return refine(model, tokens, confidence, prompts, ids, 1, refine_settings, seed=0)

            out, elapsed, used = timed(model.device, run)
            seconds, cpu = seconds + elapsed, cpu + used
            nfes += sum(out.nfes)
            full += out.full_calls * len(ids)  # a batched call serves every row
            tokens += int(out.remasked.sum())
        rows.append(
            {
                "variant": name,
                "nfes": nfes / args.num_samples,
                "full_calls": full / args.num_samples,
                "tokens_per_call": tokens / max(nfes, 1),
                "seconds": seconds / n,
                "cpu_seconds": cpu / n,
            }
        )
    for row in rows:
        row["vs_draft"] = row[clock] / rows[0][clock]
    return rows


def per_call(model: BD3LM, args: argparse.Namespace, repeats: int = 3) -> list[dict[str, Any]]:
    """Median time of a cached draft call, a full refine call and a reused-keys/values refine call."""
    length, device = args.length, model.device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.mask_id, (args.batch_size, length), generator=generator).to(device)
    remasked = torch.rand(args.batch_size, length, generator=generator) < args.gamma
    remasked[:, 0] = False
    tokens = torch.where(remasked.to(device), model.mask_id, tokens)
    select = remasked.long().argmax(dim=1, keepdim=True).to(device)  # one committed position per call
    cache = model.new_cache(args.batch_size, length)
    half = length // 2
    model.extend_cache(tokens[:, :half], cache, args.block_size)
    block = tokens[:, half : half + args.block_size]
    reuse = KeptKVReuse(model, remasked, refresh_every=10**9)
    calls = {
        "draft call (KV cache, half full)": lambda: model(block, args.block_size, cache=cache, select=select * 0),
        "refine call, exact (all L positions)": lambda: model(tokens, length, select=select),
        f"refine call, reused kept K/V (γL = {int(remasked[0].sum())} positions)": lambda: reuse(tokens, select),
    }
    rows = []
    with torch.inference_mode():
        reuse(tokens, select)  # the refresh that fills the kept keys/values
        for name, call in calls.items():
            call()  # warm-up
            times = [timed(device, call)[1:] for _ in range(repeats)]
            rows.append(
                {
                    "variant": name,
                    "seconds": statistics.median(t[0] for t in times),
                    "cpu_seconds": statistics.median(t[1] for t in times),
                }
            )
    clock = "cpu_seconds" if device.type == "cpu" else "seconds"
    for row in rows:
        row["vs_draft"] = row[clock] / rows[0][clock]
    return rows


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = build_model(args.shape, args.model, args.length, args.device, args.dtype)
    params = sum(p.numel() for p in model.parameters())
    header = (
        f"device: {device_name(model.device)} | dtype: {args.dtype} | model: {args.model or args.shape} "
        f"({params / 1e6:.1f}M params) | L={args.length} B1={args.block_size} γ={args.gamma} | "
        f"batch {args.batch_size} | torch {torch.__version__} | threads {torch.get_num_threads()}"
    )
    with torch.inference_mode():
        rows = per_call(model, args) if args.per_call else frontier(model, args)
    if not args.json:
        print(header + "\n")
    print_table(rows, COLUMNS, args.json)


if __name__ == "__main__":
    main()

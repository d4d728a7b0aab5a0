"""Sampling throughput of DiD: stage 1 (cached draft), stage 2 (global refine), and the uncached draft baseline.

For each batch size it drafts `--num-samples` samples with the KV cache, then refines them (gamma 0.5, B2 = L),
and reports generated tokens/s (prompt excluded; for refinement the re-generated tokens), NFEs per sample, model
calls, wall-clock per sample, time per model call, peak memory and achieved FLOP/s (with MFU on GPUs in bf16).
The naive baseline is drafting without the cache (the whole prefix recomputed at every call) at batch 1; with
`--baseline-calls N` it is estimated from N timed calls spread over the sequence instead of run in full (the
cost of an uncached call depends only on the prefix length), which keeps the 110M shape on a CPU to minutes.

    python benchmarks/sampling.py --shape tiny --length 256 --batch-sizes 1,8
    python benchmarks/sampling.py --shape small --length 1024 --batch-sizes 1 --num-samples 1 --baseline-calls 32
    python benchmarks/sampling.py --shape small --length 1024 --device cuda --dtype bfloat16 --batch-sizes 1,16,64
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks._common import (
    FlopCounter,
    PeakMemory,
    add_speed_args,
    build_model,
    count_flops,
    device_name,
    peak_tflops,
    print_table,
    speed_label,
    timed,
)
from did_cli.execution import optimize
from did_cli.model import BD3LM
from did_cli.sampling.draft import draft
from did_cli.sampling.refine import refine
from did_cli.settings import DraftSettings, RefineSettings, UnmaskingSettings

COLUMNS = [
    ("stage", "stage"),
    ("batch", "batch"),
    ("samples", "samples"),
    ("generated_tokens", "gen. tokens"),
    ("tokens_per_s", "tokens/s"),
    ("nfes_per_sample", "NFEs/sample"),
    ("model_calls", "model calls"),
    ("seconds_per_sample", "s/sample"),
    ("ms_per_call", "ms/call"),
    ("peak_mib", "peak MiB"),
    ("tflops", "TFLOP/s"),
    ("mfu", "MFU"),
    ("refine_vs_full_forward", "refine cost per remasked token / full forward"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "small"], help="random-weight model shape")
    parser.add_argument("--model", default=None, help="a checkpoint instead of a random shape")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--num-samples", type=int, default=None, help="per batch size (default: the batch size)")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--tokens-per-call", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--baseline-calls", type=int, default=0, help="estimate the uncached baseline from N calls")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a markdown table")
    add_speed_args(parser)
    return parser.parse_args()


def _row(
    stage: str,
    batch: int,
    samples: int,
    tokens: int,
    nfes: float,
    calls: int,
    seconds: float,
    flops: float,
    peak: float,
    peak_tf: float | None,
) -> dict[str, Any]:
    tflops = flops / seconds / 1e12
    return {
        "stage": stage,
        "batch": batch,
        "samples": samples,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "nfes_per_sample": nfes,
        "model_calls": calls,
        "seconds_per_sample": seconds / samples,
        "ms_per_call": 1e3 * seconds / max(calls, 1),
        "peak_mib": peak,
        "tflops": tflops,
        "mfu": f"{100 * tflops / peak_tf:.1f}%" if peak_tf else None,
        "seconds": seconds,
    }


def run_batch_size(
    model: BD3LM, args: argparse.Namespace, batch: int, memory: PeakMemory, peak_tf: float | None
) -> list[dict[str, Any]]:
    samples = args.num_samples or batch
    unmasking = UnmaskingSettings(tokens_per_call=args.tokens_per_call)
    settings = DraftSettings(length=args.length, block_size=args.block_size, unmasking=unmasking)
    bos = [[0]]
    rows = []
    for _ in range(args.warmup):
        draft(model, bos * batch, list(range(batch)), settings, seed=0)
    counter, seconds, nfes, calls, tokens = FlopCounter(), 0.0, 0, 0, 0
    results = []
    memory.reset()
    with count_flops(model, counter):
        for first in range(0, samples, batch):
            ids = list(range(first, min(first + batch, samples)))
            result, elapsed = timed(model.device, lambda ids=ids: draft(model, bos * len(ids), ids, settings, seed=0))
            seconds += elapsed
            nfes += sum(result.nfes)
            calls += result.model_calls
            tokens += len(ids) * (args.length - 1)
            results.append((ids, result))
    rows.append(
        _row(
            "draft (KV cache)",
            batch,
            samples,
            tokens,
            nfes / samples,
            calls,
            seconds,
            counter.flops,
            memory.read_mib(),
            peak_tf,
        )
    )
    if args.no_refine:
        return rows
    refine_settings = RefineSettings(gamma=args.gamma, unmasking=unmasking)
    counter, seconds, nfes, calls, tokens = FlopCounter(), 0.0, 0, 0, 0
    memory.reset()
    with count_flops(model, counter):
        for ids, drafted in results:
            out, elapsed = timed(
                model.device,
                lambda ids=ids, drafted=drafted: refine(
                    model, drafted.tokens, drafted.confidence, drafted.prompt_lengths, ids, 1, refine_settings, seed=0
                ),
            )
            seconds += elapsed
            nfes += sum(out.nfes)
            calls += out.model_calls
            tokens += int(out.remasked.sum())
    row = _row(
        f"refine (gamma {args.gamma}, B2=L)",
        batch,
        samples,
        tokens,
        nfes / samples,
        calls,
        seconds,
        counter.flops,
        memory.read_mib(),
        peak_tf,
    )
    # The target "refinement costs at most one full forward pass per remasked token": time a full forward pass
    # (every position's logits) over one drafted batch and compare it with the refine time per remasked token.
    ids, drafted = results[0]
    with torch.inference_mode():
        model(drafted.tokens)  # warm-up at this shape
        _, full = timed(model.device, lambda: model(drafted.tokens))
    remasked_per_sample = tokens / samples
    per_token = seconds / len(results) / max(remasked_per_sample, 1)
    row["refine_vs_full_forward"] = per_token / full
    rows.append(row)
    return rows


def baseline(model: BD3LM, args: argparse.Namespace, memory: PeakMemory, peak_tf: float | None) -> dict[str, Any]:
    """Uncached drafting at batch 1: exact, or estimated from `--baseline-calls` timed calls."""
    unmasking = UnmaskingSettings(tokens_per_call=args.tokens_per_call)
    settings = DraftSettings(length=args.length, block_size=args.block_size, kv_cache=False, unmasking=unmasking)
    counter = FlopCounter()
    memory.reset()
    if not args.baseline_calls:
        with count_flops(model, counter):
            result, seconds = timed(model.device, lambda: draft(model, [[0]], [0], settings, seed=0))
        return _row(
            "draft, no cache (baseline)",
            1,
            1,
            args.length - 1,
            result.nfes[0],
            result.model_calls,
            seconds,
            counter.flops,
            memory.read_mib(),
            peak_tf,
        )
    # Every uncached call runs the whole prefix up to the end of the current block; time a spread of such calls.
    ends = [min(((pos // args.block_size) + 1) * args.block_size, args.length) for pos in range(1, args.length)]
    picks = sorted(
        {ends[round(i * (len(ends) - 1) / max(args.baseline_calls - 1, 1))] for i in range(args.baseline_calls)}
    )
    per_call: dict[int, float] = {}
    with torch.inference_mode(), count_flops(model, counter):
        for end in picks:
            tokens = torch.randint(0, model.mask_id, (1, end), device=model.device)
            select = torch.zeros(1, end, dtype=torch.bool, device=model.device)
            select[0, -1] = True
            model(tokens, args.block_size, select=select)  # warm-up at this shape
            _, per_call[end] = timed(
                model.device, lambda tokens=tokens, select=select: model(tokens, args.block_size, select=select)
            )
    keys = sorted(per_call)

    def interpolate(end: int) -> float:
        if end <= keys[0]:
            return per_call[keys[0]]
        for low, high in zip(keys, keys[1:], strict=False):
            if low <= end <= high:
                return per_call[low] + (per_call[high] - per_call[low]) * (end - low) / max(high - low, 1)
        return per_call[keys[-1]]

    seconds = sum(interpolate(end) for end in ends)
    flops_per_call = counter.flops / (2 * len(picks))
    row = _row(
        f"draft, no cache (baseline, est. from {len(picks)} calls)",
        1,
        1,
        args.length - 1,
        len(ends),
        len(ends),
        seconds,
        flops_per_call * len(ends),
        memory.read_mib(),
        peak_tf,
    )
    return row


def main() -> None:
    args = parse_args()
    model = build_model(args.shape, args.model, args.length, args.device, args.dtype)
    optimize(model, attn_backend=args.attn_backend, compile=args.compile, cuda_graphs=args.cuda_graphs)
    device = model.device
    memory = PeakMemory(device)
    peak_tf = peak_tflops(device, args.dtype)
    params = sum(p.numel() for p in model.parameters())
    header = (
        f"device: {device_name(device)} | dtype: {args.dtype} | model: {args.model or args.shape} "
        f"({params / 1e6:.1f}M params) | L={args.length} B1={args.block_size} | {speed_label(args)} | "
        f"torch {torch.__version__}"
    )
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rows.extend(run_batch_size(model, args, batch, memory, peak_tf))
    if not args.no_baseline:
        rows.append(baseline(model, args, memory, peak_tf))
        cached = next((r for r in rows if r["stage"].startswith("draft (KV") and r["batch"] == 1), None)
        if cached is None:
            header += " | include batch size 1 for the cached-vs-uncached ratio (the baseline runs at batch 1)"
        else:
            speedup = rows[-1]["seconds"] / (cached["seconds"] / cached["samples"])
            header += f" | cached draft vs uncached baseline at batch 1: {speedup:.1f}x"
    if not args.json:
        print(header + "\n")
    print_table(rows, COLUMNS, args.json)


if __name__ == "__main__":
    main()

"""One decoding call, eager vs compiled vs CUDA-graph replayed: ms/call, tokens/s, peak memory, FLOP/s (MFU on GPU).

For a block size B < L the call is what drafting repeats: B new tokens against a KV cache holding half the sequence,
logits for one position per sample (first-hitting commits one token per sample per call). For B >= L it is one call
of a global block (refinement with B2 = L): all L tokens, no cache, logits for one position per sample; CUDA graphs
apply to cached calls only, so that row has no graphed variant. The first call of each variant (where compilation or
graph capture happens) is reported separately from the steady state.

    python -m benchmarks.decoding --shape tiny --length 128 --block-sizes 4,128 --batch-sizes 1,16
    python -m benchmarks.decoding --shape small --length 1024 --block-sizes 4,16,1024 --batch-sizes 1,16,64 \\
        --device cuda --dtype bfloat16 --modes eager,compiled,graphs,compiled+graphs
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks._common import PeakMemory, build_model, device_name, peak_tflops, print_table, sync, timed
from did_cli.execution import optimize
from did_cli.model import BD3LM

COLUMNS = [
    ("block_size", "block size"),
    ("batch", "batch"),
    ("mode", "mode"),
    ("first_call_s", "first call s"),
    ("ms_per_call", "ms/call"),
    ("committed_per_s", "committed tokens/s"),
    ("processed_per_s", "processed tokens/s"),
    ("peak_mib", "peak MiB"),
    ("tflops", "TFLOP/s"),
    ("mfu", "MFU"),
]
MODES = {"eager": (False, False), "compiled": (True, False), "graphs": (False, True), "compiled+graphs": (True, True)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--block-sizes", default="4,128")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--modes", default="eager,compiled", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per row")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flex"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def call_flops(model: BD3LM, batch: int, new: int, keys: int) -> float:
    """Model FLOPs of one call: the blocks for `new` tokens against `keys` keys, and one row of logits per sample."""
    c = model.config
    linear = 2 * batch * new * c.n_blocks * (4 + 2 * c.mlp_ratio) * c.hidden_dim**2
    attention = 4 * batch * new * keys * c.hidden_dim * c.n_blocks
    return linear + attention + 2 * batch * c.hidden_dim * c.vocab_size


@torch.inference_mode()
def measure(model: BD3LM, args: argparse.Namespace, block_size: int, batch: int, mode: str) -> dict[str, Any]:
    compile, graphs = MODES[mode]
    optimize(model, attn_backend=args.attn_backend, compile=compile, cuda_graphs=graphs)
    device, length = model.device, args.length
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.mask_id, (batch, length), generator=generator).to(device)
    select = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if block_size < length:
        prefix = (length // 2) // block_size * block_size
        cache = model.new_cache(batch, length)
        model.extend_cache(tokens[:, :prefix], cache, block_size)
        new, keys = block_size, prefix + block_size
        window = tokens[:, prefix : prefix + block_size]

        def call() -> torch.Tensor:
            return model(window, block_size, cache=cache, select=select)
    else:
        new = keys = length

        def call() -> torch.Tensor:
            return model(tokens, None, select=select)

    _, first = timed(device, call)
    for _ in range(2):
        call()
    memory = PeakMemory(device)
    memory.reset()
    sync(device)
    tic = time.perf_counter()
    for _ in range(args.iters):
        call()
    sync(device)
    seconds = (time.perf_counter() - tic) / args.iters
    peak_tf = peak_tflops(device, args.dtype)
    tflops = call_flops(model, batch, new, keys) / seconds / 1e12
    return {
        "block_size": block_size,
        "batch": batch,
        "mode": mode,
        "first_call_s": first,
        "ms_per_call": 1e3 * seconds,
        "committed_per_s": batch / seconds,
        "processed_per_s": batch * new / seconds,
        "peak_mib": memory.read_mib(),
        "tflops": tflops,
        "mfu": f"{100 * tflops / peak_tf:.1f}%" if peak_tf else None,
    }


def main() -> None:
    args = parse_args()
    model = build_model(args.shape, args.model, args.length, args.device, args.dtype)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {', '.join(MODES)}")
    if model.device.type != "cuda":
        modes = [m for m in modes if "graphs" not in m]  # CUDA graphs need a CUDA device
    rows = []
    for block_size in (int(b) for b in args.block_sizes.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for mode in modes:
                if "graphs" in mode and block_size >= args.length:
                    continue  # cache-free calls are not graph-captured
                rows.append(measure(model, args, block_size, batch, mode))
                torch._dynamo.reset()  # each row compiles its own shapes; keep the recompile budget per row
    params = sum(p.numel() for p in model.parameters())
    if not args.json:
        print(
            f"device: {device_name(model.device)} | dtype: {args.dtype} | attention: {args.attn_backend} | model: "
            f"{args.model or args.shape} ({params / 1e6:.1f}M params) | L={args.length} | torch {torch.__version__}\n"
        )
    print_table(rows, COLUMNS, args.json)


if __name__ == "__main__":
    main()

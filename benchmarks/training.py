"""Training throughput of the mix-scale objective: tokens/s, peak memory and FLOP utilisation per block size.

Each block size in `--mix` is timed separately on random tokens with the real objective (x_t ⊕ x_0 in one pass for
small blocks, the x_t half alone for one global block), AdamW and gradient clipping, under bf16 autocast on CUDA.
Tokens/s counts the L tokens of each row (the x_0 half is conditioning, not extra data). Model FLOPs are 3x the
forward FLOPs (forward + backward), counted from the shapes the forward pass actually runs.

    python benchmarks/training.py --shape tiny --length 128 --mix 4,128 --batch-size 16
    python benchmarks/training.py --shape small --length 1024 --mix 4,1024 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Any

import torch

from benchmarks._common import (
    FlopCounter,
    PeakMemory,
    build_model,
    count_flops,
    device_name,
    peak_tflops,
    print_table,
    sync,
)
from did_cli.execution import optimize
from did_cli.noise import mask_tokens, sample_t
from did_cli.training.objective import nelbo_sum

COLUMNS = [
    ("block_size", "block size"),
    ("batch", "batch"),
    ("length", "L"),
    ("tokens_per_s", "tokens/s"),
    ("ms_per_step", "ms/step"),
    ("peak_mib", "peak MiB"),
    ("tflops", "model TFLOP/s"),
    ("mfu", "MFU"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mix", default="4,128", help="block sizes to time, comma-separated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flex"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model = build_model(args.shape, args.model, args.length, args.device, "float32").train()
    optimize(
        model,
        attn_backend=args.attn_backend,
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    device = model.device
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    memory = PeakMemory(device)
    peak_tf = peak_tflops(device, "bfloat16" if bf16 else "float32")
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for block_size in (min(int(b), args.length) for b in args.mix.split(",")):
        clean = torch.randint(0, model.mask_id, (args.batch_size, args.length), generator=generator)
        t = sample_t(args.batch_size, args.length // block_size, generator)
        noisy, t_token = mask_tokens(clean, t, block_size, model.mask_id, generator)
        clean, noisy, t_token = clean.to(device), noisy.to(device), t_token.to(device)

        def step(clean: torch.Tensor, noisy: torch.Tensor, t_token: torch.Tensor, block_size: int) -> None:
            with autocast:
                loss = nelbo_sum(model, clean, noisy, t_token, block_size) / clean.numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step(clean, noisy, t_token, block_size)
        counter = FlopCounter()
        with count_flops(model, counter), torch.no_grad(), autocast:
            nelbo_sum(model, clean, noisy, t_token, block_size)  # one counted forward pass
        memory.reset()
        sync(device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            step(clean, noisy, t_token, block_size)
        sync(device)
        seconds = (time.perf_counter() - tic) / args.steps
        tflops = 3 * counter.flops / seconds / 1e12
        rows.append(
            {
                "block_size": block_size,
                "batch": args.batch_size,
                "length": args.length,
                "tokens_per_s": args.batch_size * args.length / seconds,
                "ms_per_step": 1e3 * seconds,
                "peak_mib": memory.read_mib(),
                "tflops": tflops,
                "mfu": f"{100 * tflops / peak_tf:.1f}%" if peak_tf else None,
            }
        )
    params = sum(p.numel() for p in model.parameters())
    if not args.json:
        print(
            f"device: {device_name(device)} | {'bf16 autocast' if bf16 else 'fp32'} | model: "
            f"{args.model or args.shape} ({params / 1e6:.1f}M params) | attention: {args.attn_backend}"
            f"{' | compiled' if args.compile else ''}"
            f"{' | gradient checkpointing' if args.gradient_checkpointing else ''} | torch {torch.__version__}\n"
        )
    print_table(rows, COLUMNS, args.json)


if __name__ == "__main__":
    main()

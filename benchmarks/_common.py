"""Shared benchmark plumbing: model shapes, FLOP counting, peak memory, device names, table printing.

FLOPs are counted analytically from the shapes each model call actually sees (2 FLOPs per multiply-add): the
linear layers for every new token, attention scores and values against every key the token attends to (dense,
as SDPA computes it with a mask), and the vocabulary projection only for rows that get logits.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from did_cli.checkpoints import load_model, pick_device
from did_cli.config import ModelConfig
from did_cli.execution import StaticKVCache
from did_cli.model import BD3LM

# Dense bf16 tensor-core peaks (no sparsity) for MFU; CPU rows report achieved FLOP/s without MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """The execution flags every benchmark accepts (the CLI's --attn-backend, --compile, --cuda-graphs)."""
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flex"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay cached decoding calls from CUDA graphs")


def speed_label(args: argparse.Namespace) -> str:
    """How the model executes, for table headers."""
    modes = [name for name, on in (("compiled", args.compile), ("CUDA graphs", args.cuda_graphs)) if on]
    return f"attention: {args.attn_backend} | {' + '.join(modes) or 'eager'}"


def build_model(shape: str | None, model: str | None, length: int, device: str, dtype: str) -> BD3LM:
    """A random-weight model of a named shape (tiny, small = the 110M BD3-LM) or a loaded checkpoint."""
    if model is not None:
        return load_model(model, device=device, dtype=dtype)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(shape or "tiny", vocab_size=50258, model_length=length, dropout=0.0)
    net = BD3LM(config)
    with torch.no_grad():  # adaLN-zero init would make every block the identity; give the gates real values
        for param in net.parameters():
            if param.ndim > 1:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    net.source = None
    target = pick_device(device)
    return net.to(device=target, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32).eval()


@dataclass
class FlopCounter:
    """Accumulates the FLOPs of every call a model makes while `count_flops` is active."""

    flops: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)


@contextmanager
def count_flops(model: BD3LM, counter: FlopCounter) -> Iterator[FlopCounter]:
    """Wrap the model's block runner and output layer on this instance to add each call's FLOPs."""
    config = model.config
    d, layers, vocab, mlp = config.hidden_dim, config.n_blocks, config.vocab_size, config.mlp_ratio
    run_blocks, logits, hidden_states = model._run_blocks, model.logits, model.hidden_states

    def add_blocks(tokens: torch.Tensor, cache: Any) -> None:
        batch, n = tokens.shape
        keys = (cache.length if cache is not None else 0) + n
        linear = 2 * batch * n * layers * (4 * d * d + 2 * mlp * d * d)
        attention = 2 * 2 * batch * n * keys * d * layers
        counter.flops += linear + attention

    def counted_run_blocks(tokens: torch.Tensor, positions: torch.Tensor, mask: Any, cache: Any) -> Any:
        add_blocks(tokens, cache)
        return run_blocks(tokens, positions, mask, cache)

    def counted_hidden_states(input_ids: torch.Tensor, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
        if isinstance(cache, StaticKVCache):  # compiled or graph-replayed: `_run_blocks` is not called
            add_blocks(input_ids, cache)  # model FLOPs: the useful keys, not the masked rest of the buffer
        return hidden_states(input_ids, *args, cache=cache, **kwargs)

    def counted_logits(hidden: torch.Tensor, cond: torch.Tensor, select: Any = None) -> Any:
        if select is None:
            rows = hidden.shape[0] * hidden.shape[1]
        else:  # a bool mask selects its True entries; int64 positions [B, k] select B * k rows
            rows = int(select.sum()) if select.dtype == torch.bool else select.numel()
        counter.flops += 2 * rows * d * vocab
        return logits(hidden, cond, select)

    model._run_blocks, model.logits, model.hidden_states = counted_run_blocks, counted_logits, counted_hidden_states
    try:
        yield counter
    finally:
        del model._run_blocks, model.logits, model.hidden_states


class PeakMemory:
    """Peak memory of a stage: max allocated on CUDA, peak RSS (VmHWM, reset per stage) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                pass

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn's result and its wall-clock seconds, with the device drained before and after (CUDA runs asynchronously)."""
    sync(device)
    tic = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - tic


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], as_json: bool) -> None:
    """A markdown table on stdout (or the rows as JSON lines with --json)."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print("| " + " | ".join(title for _, title in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if isinstance(value, float):
                cells.append(f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}")
            else:
                cells.append("" if value is None else str(value))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()

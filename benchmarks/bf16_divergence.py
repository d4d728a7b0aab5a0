"""How far bf16 decoding moves the denoiser's distributions from fp32: mean KL per token on real drafts.

Drafts are drawn in fp32 (first-hitting, B = 4, top-p 0.9). Each draft is then replayed block by block through the
KV cache, as sampling runs it: the block is shown with a random number of its positions still masked (what a
first-hitting call sees part-way through a block), its logits are read at the masked positions, then the clean block
is committed. Three numerics see exactly the same inputs:

* fp32: the reference;
* did bf16: `--dtype bfloat16`, bf16 weights and residual stream, LayerNorm and rotary in fp32, a bf16 cache of
  post-rotary keys, attention in bf16;
* upstream-style: BD3-LM's published CUDA sampler, emulated on fp32 weights: q/k/v rounded to bf16 before the
  rotary embedding (its bf16 cache holds pre-rotary projections, the current block included), rotary computed in
  bf16, attention in fp32 on the rounded values;
* did --kv-cache-dtype bfloat16: the same scheme as implemented (fp32 weights, a bf16 cache).

Reported per numerics: KL(fp32 || variant) per masked token in nats (mean, 99th percentile, max; [MASK] excluded,
softmax in fp64), and how often the most likely token differs.

    python benchmarks/bf16_divergence.py                      # did-tiny on the CPU, 16 drafts of 128 tokens
    python benchmarks/bf16_divergence.py --device cuda --num-samples 64
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

import did_cli.model as model_module
from benchmarks._common import device_name, print_table
from did_cli.checkpoints import bos_token_id, load_model, load_tokenizer
from did_cli.model import BD3LM
from did_cli.sampling.draft import draft
from did_cli.settings import DraftSettings


def _block_logits(model: BD3LM, tokens: torch.Tensor, masked: torch.Tensor, block_size: int) -> torch.Tensor:
    """Logits [N, V] (fp64) at every masked position, each block seen through the cache after the clean prefix."""
    batch, length = tokens.shape
    noisy = torch.where(masked, model.mask_id, tokens)
    cache = model.new_cache(batch, length)
    out = []
    with torch.inference_mode():
        for start in range(0, length, block_size):
            end = start + block_size
            logits = model(noisy[:, start:end], block_size, cache=cache)  # B, b, V
            out.append(logits[masked[:, start:end]].double())
            model.extend_cache(tokens[:, start:end], cache, block_size)
    return torch.cat(out)


@contextlib.contextmanager
def _upstream_numerics(model: BD3LM) -> Iterator[None]:
    """Round q/k/v to bf16 before rotary and rotate in bf16, leaving everything else in fp32."""
    rotate = model_module._rotate

    def rotate_bf16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x16, half = x.bfloat16(), x.shape[-1] // 2
        rotated = torch.cat((-x16[..., half:], x16[..., :half]), dim=-1)
        return (x16 * cos.bfloat16() + rotated * sin.bfloat16()).to(x.dtype)

    hooks = [
        block.attn_qkv.register_forward_hook(lambda _m, _i, out: out.bfloat16().to(out.dtype))
        for block in model.backbone.blocks
    ]
    model_module._rotate = rotate_bf16
    try:
        yield
    finally:
        model_module._rotate = rotate
        for hook in hooks:
            hook.remove()


def _kl(reference: torch.Tensor, other: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row KL(p_ref || p_other) in nats and whether the top-1 token differs; [MASK] removed from both."""
    keep = torch.ones(reference.shape[-1], dtype=torch.bool)
    keep[mask_id] = False
    log_p, log_q = reference[:, keep].log_softmax(-1), other[:, keep].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl, log_p.argmax(-1) != log_q.argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="did-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    fp32 = load_model(args.model, device=args.device, dtype="float32")
    bf16 = load_model(args.model, device=args.device, dtype="bfloat16")
    bf16_cache = load_model(args.model, device=args.device, dtype="float32", kv_cache_dtype="bfloat16")
    length = fp32.config.model_length
    ids = list(range(args.num_samples))
    bos = bos_token_id(load_tokenizer(fp32, None))
    drafts = draft(fp32, [[bos]] * len(ids), ids, DraftSettings(length, args.block_size), args.seed)
    tokens = drafts.tokens
    # Per block, a uniformly random number of still-masked positions (1..B), at random places; BOS stays clean.
    generator = torch.Generator().manual_seed(args.seed)
    keys = torch.rand(tokens.shape, generator=generator)
    counts = torch.randint(1, args.block_size + 1, (len(ids), length // args.block_size), generator=generator)
    ranks = keys.view(len(ids), -1, args.block_size).argsort(-1).argsort(-1)
    masked = (ranks < counts[..., None]).view_as(tokens).to(tokens.device)
    masked[:, 0] = False

    reference = _block_logits(fp32, tokens, masked, args.block_size).cpu()
    with _upstream_numerics(fp32):
        upstream = _block_logits(fp32, tokens, masked, args.block_size).cpu()
    variants = {
        "did --dtype bfloat16": _block_logits(bf16, tokens, masked, args.block_size).cpu(),
        "upstream-style (emulated)": upstream,
        "did --kv-cache-dtype bfloat16": _block_logits(bf16_cache, tokens, masked, args.block_size).cpu(),
    }
    rows = []
    for name, logits in variants.items():
        kl, flipped = _kl(reference, logits, fp32.mask_id)
        rows.append(
            {
                "numerics": name,
                "tokens": kl.numel(),
                "mean KL": f"{kl.mean():.2e}",
                "p99 KL": f"{kl.quantile(0.99):.2e}",
                "max KL": f"{kl.max():.2e}",
                "top-1 differs": f"{flipped.double().mean():.2%}",
            }
        )
    print(f"{args.model} on {device_name(fp32.device)}: {args.num_samples} drafts of {length}, B = {args.block_size}")
    print_table(rows, [(key, key) for key in rows[0]], as_json=False)
    gap = (variants["did --kv-cache-dtype bfloat16"] - upstream).abs().max()
    print(f"--kv-cache-dtype bfloat16 vs the emulation: max |logit difference| {gap:.2e}")


if __name__ == "__main__":
    main()

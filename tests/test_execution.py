"""Execution choices that must not change results: flex attention, the static-shape cache, torch.compile,
gradient checkpointing. The oracles are the eager SDPA model and BD3-LM's reference implementation."""

import pytest
import torch
from torch._dynamo.utils import counters

from did_cli.errors import UsageError
from did_cli.execution import StaticDecoder, optimize, static_mask
from did_cli.sampling.draft import draft
from did_cli.sampling.refine import refine
from did_cli.settings import DraftSettings, RefineSettings
from did_cli.training.objective import nelbo_sum
from tests.bd3lm_reference import naive_block_causal, reference_sample_mode, reference_train_mode
from tests.conftest import make_tiny_model

ATOL = 1e-5
BOS = 67


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 68, (3, 32), generator=generator)
    noisy = torch.where(torch.rand(3, 32, generator=generator) < 0.5, torch.full_like(clean, 68), clean)
    t = torch.rand(3, 32, generator=generator) * 0.9 + 0.1
    return clean, noisy, t


def _gradients(model: torch.nn.Module, block_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    clean, noisy, t = _batch()
    torch.manual_seed(seed)  # dropout
    model.zero_grad(set_to_none=True)
    (nelbo_sum(model, clean, noisy, t, block_size) / clean.numel()).backward()  # a training step's mean loss
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block_size", [1, 4, 8, 16, 32])
def test_flex_training_form_matches_reference_implementation(block_size):
    model = optimize(make_tiny_model(dropout=0.0), attn_backend="flex")
    clean, noisy, _ = _batch()
    with torch.no_grad():
        ours = model.forward_train(noisy, clean, block_size)
    expected = reference_train_mode(model.state_dict(), 4, noisy, clean, block_size)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("block_size", [4, 8])
def test_flex_training_gradients_equal_sdpa(block_size):
    sdpa = optimize(make_tiny_model(dropout=0.0).train(), attn_backend="sdpa")
    flex = optimize(make_tiny_model(dropout=0.0).train(), attn_backend="flex")
    want, got = _gradients(sdpa, block_size), _gradients(flex, block_size)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=ATOL, msg=name)


@pytest.mark.parametrize("block_size", [2, 4, 32])
def test_flex_block_causal_logits_match_reference(block_size):
    model = optimize(make_tiny_model(), attn_backend="flex")
    _, noisy, _ = _batch(seed=2)
    with torch.no_grad():
        ours = model(noisy, block_size=block_size)
    expected = reference_sample_mode(model.state_dict(), 4, noisy, block_size)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=ATOL)


def test_flex_uncached_draft_equals_sdpa_draft():
    settings = DraftSettings(length=32, kv_cache=False)
    want = draft(make_tiny_model(), [[BOS]] * 2, [0, 1], settings, seed=5)
    got = draft(optimize(make_tiny_model(), attn_backend="flex"), [[BOS]] * 2, [0, 1], settings, seed=5)
    assert torch.equal(got.tokens, want.tokens)


def test_static_mask_is_block_causal_over_the_filled_prefix():
    positions = torch.arange(8, 16)
    expected = torch.zeros(8, 32, dtype=torch.bool)
    expected[:, :16] = naive_block_causal(16, 4)[8:]
    assert torch.equal(static_mask(positions, 32, 4), expected)


def test_static_cache_logits_equal_growing_cache():
    model = make_tiny_model()
    tokens = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(4))
    plain = model.new_cache(2, 32)
    model.decoder = StaticDecoder(model)
    static = model.new_cache(2, 32)
    with torch.no_grad():
        for cache in (plain, static):
            model.extend_cache(tokens[:, :8], cache, 4)
        for start in range(8, 32, 4):  # every call: the previous block rides along and is committed
            window = tokens[:, start - 4 : start + 4]
            want = model(window, 4, cache=plain, commit=4) if start > 8 else model(window[:, 4:], 4, cache=plain)
            got = model(window, 4, cache=static, commit=4) if start > 8 else model(window[:, 4:], 4, cache=static)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert static.length == plain.length == 28


def test_static_cache_draft_equals_plain_draft_token_for_token():
    prompts = [[BOS, 3, 4, 5, 6, 7], [BOS]]
    want = draft(make_tiny_model(), prompts, [0, 1], DraftSettings(length=32, block_size=2), seed=3)
    model = make_tiny_model()
    model.decoder = StaticDecoder(model)
    got = draft(model, prompts, [0, 1], DraftSettings(length=32, block_size=2), seed=3)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.confidence, want.confidence, atol=ATOL, rtol=ATOL)


def test_static_cache_made_by_a_sampler_serves_later_calls_outside_inference_mode():
    model = make_tiny_model()
    model.decoder = StaticDecoder(model)
    drafted = draft(model, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)  # runs in inference mode
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model.extend_cache(drafted.tokens[:, :8], cache, 4)
        got = model(drafted.tokens[:, 8:12], 4, cache=cache)
        want = model(drafted.tokens[:, :12], 4)[:, 8:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_compiled_sampling_equals_eager_without_recompiling_per_call():
    # aot_eager: dynamo's graphs and guards (what recompiles) without inductor's code generation, which takes about
    # half a minute per graph on a small CPU; the inductor case is the slow test below.
    eager = make_tiny_model()
    want = draft(eager, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)
    model = optimize(make_tiny_model(), compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    got = draft(model, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(got.tokens, want.tokens)
    assert graphs == 2  # one per call shape: a block alone, and a block with the finished one riding along
    again = draft(model, [[BOS]] * 2, [4, 5], DraftSettings(length=32), seed=9)
    assert counters["stats"]["unique_graphs"] == graphs and again.model_calls == 31 * 1
    assert torch.equal(again.tokens, draft(eager, [[BOS]] * 2, [4, 5], DraftSettings(length=32), seed=9).tokens)
    args = (again.confidence, again.prompt_lengths, [4, 5], 1, RefineSettings(gamma=0.5), 9)  # global block, no cache
    assert torch.equal(refine(model, again.tokens, *args).tokens, refine(eager, again.tokens, *args).tokens)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the cache-free blocks: one graph for the L-token call


@pytest.mark.slow
def test_inductor_compiled_draft_and_refine_equal_eager():
    eager = make_tiny_model()
    model = optimize(make_tiny_model(), compile=True)
    want = draft(eager, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)
    got = draft(model, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)
    assert torch.equal(got.tokens, want.tokens)
    args = (got.confidence, got.prompt_lengths, [0, 1], 1, RefineSettings(gamma=0.5), 3)
    assert torch.equal(refine(model, got.tokens, *args).tokens, refine(eager, got.tokens, *args).tokens)


def test_compiled_training_step_gradients_equal_eager():
    eager = make_tiny_model(dropout=0.0).train()
    compiled = optimize(make_tiny_model(dropout=0.0).train(), compile=True, compile_backend="aot_eager")
    want, got = _gradients(eager, 4), _gradients(compiled, 4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=ATOL, msg=name)


def test_gradient_checkpointing_gradients_equal_with_dropout():
    plain = make_tiny_model(dropout=0.3).train()
    checkpointed = optimize(make_tiny_model(dropout=0.3).train(), gradient_checkpointing=True)
    for block_size in (4, 32):
        want, got = _gradients(plain, block_size, seed=7), _gradients(checkpointed, block_size, seed=7)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=ATOL, msg=name)


def test_gradient_checkpointing_recomputes_blocks_in_backward():
    model = optimize(make_tiny_model(dropout=0.0).train(), gradient_checkpointing=True)
    calls = []
    block = model.backbone.blocks[0]
    forward = block.forward
    block.forward = lambda *args: calls.append(1) or forward(*args)
    _gradients(model, 4)
    assert len(calls) == 2  # the forward pass and its recomputation during backward


def test_cuda_graphs_refused_on_cpu():
    with pytest.raises(UsageError, match="--cuda-graphs needs a CUDA device"):
        optimize(make_tiny_model(), cuda_graphs=True)


def test_cache_free_calls_of_many_lengths_compile_twice_and_never_fall_back_to_eager(caplog):
    """`--no-kv-cache` drafting and variable-length refinement call the blocks at many lengths. With static graphs
    only, dynamo stopped compiling after 8 lengths and warned on stderr; now the second length compiles a graph with
    a symbolic length that serves every later one."""
    eager = make_tiny_model()
    model = optimize(make_tiny_model(), compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level("WARNING", logger="torch._dynamo"), torch.inference_mode():
        for lengths in (range(4, 32, 2), range(5, 32, 2)):  # 14 lengths, then 14 more
            for length in lengths:
                tokens = torch.randint(0, 68, (2, length), generator=torch.Generator().manual_seed(length))
                got, want = model(tokens, block_size=4), eager(tokens, block_size=4)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            if lengths.start == 4:
                first = counters["stats"]["unique_graphs"]
    # A few graphs (no mask for a single block, a static first length, one symbolic length), never one per length.
    assert first <= 4 and counters["stats"]["unique_graphs"] == first
    assert not [r for r in caplog.records if "recompil" in r.getMessage()]
    settings = DraftSettings(length=32, kv_cache=False)  # 8 blocks: the prefix grows through 8 lengths
    want = draft(eager, [[BOS]] * 2, [0, 1], settings, seed=3)
    assert torch.equal(draft(model, [[BOS]] * 2, [0, 1], settings, seed=3).tokens, want.tokens)
    # A few variants beside the symbolic-length graph (no mask for the first block, a contiguous full-length
    # batch), whatever the number of lengths; a second draft compiles nothing more.
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 6
    draft(model, [[BOS]] * 2, [2, 3], settings, seed=4)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not [r for r in caplog.records if "recompil" in r.getMessage()]

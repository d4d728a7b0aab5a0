"""CUDA checks (marked `gpu`, skipped without a GPU): the sampler's exactness properties and bf16 on the device."""

import pytest
import torch

from did_cli.sampling.draft import draft
from did_cli.sampling.refine import refine
from did_cli.settings import DraftSettings, RefineSettings
from did_cli.training.objective import nelbo_sum
from tests.conftest import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BOS = 67


@pytest.fixture
def cuda_model():
    return make_tiny_model(dropout=0.0).cuda()


def test_cuda_logits_match_cpu(cuda_model):
    cpu_model = make_tiny_model(dropout=0.0)
    tokens = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            cuda_model(tokens.cuda(), block_size=4).cpu(), cpu_model(tokens, block_size=4), atol=1e-4, rtol=1e-4
        )


def test_cuda_cached_draft_equals_uncached(cuda_model):
    cached = draft(cuda_model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=3)
    uncached = draft(cuda_model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32, kv_cache=False), seed=3)
    assert torch.equal(cached.tokens, uncached.tokens)


def test_cuda_batch_invariance(cuda_model):
    together = draft(cuda_model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=3)
    for i in range(4):
        alone = draft(cuda_model, [[BOS]], [i], DraftSettings(length=32), seed=3)
        assert torch.equal(alone.tokens[0], together.tokens[i])


def test_cuda_refine_changes_only_remasked(cuda_model):
    drafted = draft(cuda_model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=3)
    out = refine(
        cuda_model,
        drafted.tokens,
        drafted.confidence,
        drafted.prompt_lengths,
        [0, 1, 2, 3],
        1,
        RefineSettings(gamma=0.5),
        seed=3,
    )
    assert torch.equal(out.tokens[~out.remasked], drafted.tokens[~out.remasked])


def test_bf16_drafting_on_cuda(cuda_model):
    model = cuda_model.to(torch.bfloat16)
    out = draft(model, [[BOS]] * 8, list(range(8)), DraftSettings(length=32), seed=1)
    assert not (out.tokens == model.mask_id).any()
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
    assert out.confidence.dtype == torch.float32


def test_bf16_autocast_training_step(cuda_model):
    model = cuda_model.train()
    clean = torch.randint(0, 68, (4, 32), device="cuda")
    noisy = torch.where(torch.rand(4, 32, device="cuda") < 0.5, torch.full_like(clean, model.mask_id), clean)
    t = torch.full((4, 32), 0.5, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nelbo_sum(model, clean, noisy, t, 4) / clean.numel()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# Execution paths that exist for the GPU: flex kernels, compiled and graph-replayed decoding.
def test_cuda_graph_draft_equals_eager_token_for_token(cuda_model):
    from did_cli.execution import optimize

    eager = draft(cuda_model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=3)
    graphed_model = optimize(make_tiny_model(dropout=0.0).cuda(), cuda_graphs=True)
    for _ in range(2):  # the second run replays the graphs captured by the first
        graphed = draft(graphed_model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=3)
        assert torch.equal(graphed.tokens, eager.tokens)
        torch.testing.assert_close(graphed.confidence, eager.confidence, atol=1e-5, rtol=1e-5)
    assert len(graphed_model.decoder._graphs) == 2  # one graph per call shape (block alone, block + finished one)


def test_compiled_and_graphed_draft_equals_eager(cuda_model):
    from did_cli.execution import optimize

    eager = draft(cuda_model, [[BOS, 5, 6]] * 2, [0, 1], DraftSettings(length=32, block_size=2), seed=4)
    fast = optimize(make_tiny_model(dropout=0.0).cuda(), compile=True, cuda_graphs=True)
    got = draft(fast, [[BOS, 5, 6]] * 2, [0, 1], DraftSettings(length=32, block_size=2), seed=4)
    assert torch.equal(got.tokens, eager.tokens)


def test_compiled_flex_training_gradients_equal_sdpa_on_cuda():
    from did_cli.execution import optimize

    clean = torch.randint(0, 68, (4, 32), generator=torch.Generator().manual_seed(0)).cuda()
    noisy = torch.where(torch.rand(4, 32, device="cuda") < 0.5, torch.full_like(clean, 68), clean)
    t = torch.full((4, 32), 0.5, device="cuda")
    grads = {}
    for backend in ("sdpa", "flex"):
        # Two heads of width 16: the fused flex kernels need a head width of at least 16.
        model = optimize(make_tiny_model(dropout=0.0, n_heads=2).cuda().train(), attn_backend=backend)
        (nelbo_sum(model, clean, noisy, t, 4) / clean.numel()).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, want in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex"][name], want, atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_cache_drafting_on_cuda_with_graphs():
    from did_cli.execution import optimize

    model = optimize(make_tiny_model(dropout=0.0).cuda(), cuda_graphs=True)
    model.kv_cache_dtype = torch.bfloat16
    out = draft(model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=3)
    assert not (out.tokens == model.mask_id).any()
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
    assert {cache.keys.dtype for cache in model.decoder._caches.values()} == {torch.bfloat16}

import random

import pytest
import torch
import torch.nn.functional as F

from did_cli.errors import UsageError
from did_cli.evaluation.nll import (
    BlockResult,
    NllSettings,
    RowResult,
    merge_shards,
    row_generator,
    row_noise,
    score_rows,
)
from did_cli.evaluation.nll_rows import build_rows, load_rows
from did_cli.training.objective import validation_nelbo
from tests.conftest import CHARS, make_tiny_model

L = 32


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(dropout=0.0)


@pytest.fixture(scope="module")
def documents():
    rng = random.Random(0)
    return ["".join(rng.choice(CHARS[:40]) for _ in range(rng.randint(5, 40))) for _ in range(40)]


@pytest.fixture(scope="module")
def rows(model, documents, char_tokenizer):
    return load_rows(documents, char_tokenizer, model, source={"test": True}, seq_len=L, num_samples=6)


def _log_probs(logits, mask_id):
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return F.log_softmax(logits.double(), dim=-1)


def _direct_row(model, clean, block_size, draws, seed, row):
    """Loop over draws and blocks: block b is denoised from x_t of block b after the clean blocks before it."""
    if block_size == 1:
        total = 0.0
        for i in range(1, L):
            context = torch.cat([clean[:i], torch.tensor([model.mask_id])])[None]
            logp = _log_probs(model(context, block_size=1)[0, -1], model.mask_id)
            total -= float(logp[clean[i]])
        return total
    noisy, t = row_noise(clean, block_size, draws, (1e-3, 1.0), model.mask_id, row_generator(seed, row, block_size))
    total = 0.0
    for draw in range(draws):
        assert noisy[draw, 0] == clean[0]
        for start in range(0, L, block_size):
            block = slice(start, start + block_size)
            assert torch.unique(t[draw, block]).numel() == 1 and 1e-3 <= float(t[draw, start]) <= 1.0
            context = torch.cat([clean[:start], noisy[draw, block]])[None]
            logp = _log_probs(model(context, block_size=block_size)[0, start:], model.mask_id)
            for offset in range(block_size):
                position = start + offset
                if noisy[draw, position] == model.mask_id:
                    total -= float(logp[offset, clean[position]]) / float(t[draw, position])
    return total / draws


@pytest.mark.parametrize("block_size", [1, 4, L])
def test_nelbo_equals_a_direct_computation(model, rows, block_size):
    settings = NllSettings(block_sizes=(block_size,), noise_draws=3, batch_size=5, seed=7)
    with torch.no_grad():
        ours = score_rows(model, rows, range(len(rows.tokens)), block_size, settings)
        direct = [_direct_row(model, rows.tokens[i], block_size, 3, 7, i) for i in range(len(rows.tokens))]
    assert [r.tokens for r in ours] == [L - 1] * len(direct)  # position 0 is never scored
    torch.testing.assert_close(torch.tensor([r.nll for r in ours]), torch.tensor(direct), rtol=1e-5, atol=1e-4)
    result = BlockResult("m", block_size, ours, 0.0, block_size == 1, (1e-3, 1.0))
    assert result.nelbo == pytest.approx(sum(direct) / (len(direct) * (L - 1)), rel=1e-5)


def test_global_block_equals_the_mdlm_bound(model, rows):
    """B = L: one t per row, x_t seen bidirectionally with no clean context: MDLM's NELBO."""
    settings = NllSettings(noise_draws=2, seed=3)
    with torch.no_grad():
        ours = score_rows(model, rows, range(len(rows.tokens)), 1024, settings)
        for index, result in enumerate(ours):
            clean = rows.tokens[index]
            noisy, t = row_noise(clean, L, 2, (1e-3, 1.0), model.mask_id, row_generator(3, index, L))
            logp = _log_probs(model(noisy, block_size=None), model.mask_id)
            target = logp.gather(-1, clean.expand(2, L)[..., None]).squeeze(-1)
            masked = noisy == model.mask_id
            assert (t == t[:, :1]).all()
            expected = float((-target / t)[masked].sum()) / 2
            assert result.nll == pytest.approx(expected, rel=1e-5)


def test_same_seed_same_number_other_seed_other_number(model, rows):
    def run(seed):
        return score_rows(model, rows, range(len(rows.tokens)), 4, NllSettings(seed=seed))

    first, again, other = run(0), run(0), run(1)
    assert [r.nll for r in first] == [r.nll for r in again]
    assert [r.nll for r in first] != [r.nll for r in other]


def test_batch_size_does_not_change_the_number(model, rows):
    def run(batch_size):
        settings = NllSettings(noise_draws=3, batch_size=batch_size)
        return torch.tensor([r.nll for r in score_rows(model, rows, range(len(rows.tokens)), 8, settings)])

    torch.testing.assert_close(run(1), run(17), rtol=1e-6, atol=1e-5)


def test_more_noise_draws_reduce_the_standard_error(model, documents, char_tokenizer):
    many = load_rows(documents * 4, char_tokenizer, model, source={}, seq_len=L, num_samples=24)

    def stderr(draws):
        settings = NllSettings(noise_draws=draws, batch_size=64)
        scored = score_rows(model, many, range(24), 4, settings)
        return BlockResult("m", 4, scored, 0.0, False, (1e-3, 1.0)).stderr

    assert stderr(16) < 0.7 * stderr(1)


def test_shards_cover_every_row_once_and_merge_to_the_single_process_result(model, rows):
    count = len(rows.tokens)
    parts = [list(range(rank, count, 4)) for rank in range(4)]
    assert sorted(i for part in parts for i in part) == list(range(count))
    settings = NllSettings(noise_draws=2)
    whole = score_rows(model, rows, range(count), 4, settings)
    merged = merge_shards([score_rows(model, rows, part, 4, settings) for part in reversed(parts)], count)
    assert [(r.row, r.tokens) for r in merged] == [(r.row, r.tokens) for r in whole]
    torch.testing.assert_close(torch.tensor([r.nll for r in merged]), torch.tensor([r.nll for r in whole]))
    with pytest.raises(RuntimeError):
        merge_shards([whole[:2]], count)


def test_standard_error_is_the_ratio_estimator():
    rows = [RowResult(0, 10.0, 5), RowResult(1, 30.0, 10), RowResult(2, 8.0, 5)]
    result = BlockResult("m", 4, rows, 0.0, False, (1e-3, 1.0))
    ratio = 48.0 / 20.0
    residuals = [10 - ratio * 5, 30 - ratio * 10, 8 - ratio * 5]
    expected = (sum(r * r for r in residuals) / (3 * 2)) ** 0.5 / (20 / 3)
    assert result.nelbo == pytest.approx(2.4) and result.stderr == pytest.approx(expected)


def test_row_layouts(char_tokenizer):
    eos = char_tokenizer.eos_token_id
    docs = ["abcdef", "ghij", "klmnopqrstuv"]
    ids = [char_tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]

    tokens, scored, read = build_rows(docs, char_tokenizer, 8, "wrap", 68)
    stream = [t for doc in ids for t in (*doc, eos)]
    assert tokens.tolist() == [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)] and read == 3
    assert not scored[:, 0].any() and scored[:, 1:].all()

    tokens, scored, _ = build_rows(docs, char_tokenizer, 8, "bos-eos", 68)
    joined = [t for doc in ids for t in doc]
    assert tokens.tolist() == [[eos, *joined[i : i + 6], eos] for i in range(0, len(joined) - 5, 6)]

    tokens, scored, _ = build_rows(docs, char_tokenizer, 8, "document", 68, limit=2)
    assert tokens.tolist() == [[eos, *ids[0], eos], [eos, *ids[1], eos, 68, 68]]
    assert scored.tolist() == [[False] + [True] * 7, [False] + [True] * 5 + [False] * 2]


def test_python_api_takes_names_or_loaded_models(tmp_path, tiny_checkpoint, documents):
    import did_cli as did

    path = tmp_path / "docs.txt"
    path.write_text("\n".join(documents) + "\n")
    loaded = did.load_model(str(tiny_checkpoint), device="cpu")
    data = did.NllData(data=str(path), num_samples=4)
    result = did.eval_nll([str(tiny_checkpoint), loaded], data, did.NllSettings(block_sizes=(4, 64)))
    by_name = [(r.block_size, r.nelbo) for r in result.results[:2]]
    by_object = [(r.block_size, r.nelbo) for r in result.results[2:]]
    assert by_name == by_object and [b for b, _ in by_name] == [4, 32]
    assert result.to_dict()["results"][0]["sequences"] == 4


def test_batch_noise_layout_is_training_validation_and_moves_with_the_batch_size(model, rows):
    count = len(rows.tokens)  # 6 rows: one group of 6, or groups of 4 and 2
    whole = score_rows(model, rows, range(count), 4, NllSettings(noise_layout="batch", batch_size=count, seed=2))
    expected = validation_nelbo(model, rows.tokens, 4, row_generator(2, 0, 4))
    nelbo = BlockResult("m", 4, whole, 0.0, False, (1e-3, 1.0)).nelbo
    assert nelbo == pytest.approx(expected, rel=1e-5)
    split = score_rows(model, rows, range(count), 4, NllSettings(noise_layout="batch", batch_size=4, seed=2))
    assert [r.nll for r in split] != [r.nll for r in whole]
    sharded = merge_shards(
        [
            score_rows(
                model, rows, list(range(k, count, 2)), 4, NllSettings(noise_layout="batch", batch_size=4, seed=2)
            )
            for k in range(2)
        ],
        count,
    )
    torch.testing.assert_close(torch.tensor([r.nll for r in sharded]), torch.tensor([r.nll for r in split]))
    with pytest.raises(UsageError, match="draws once per row"):
        NllSettings(noise_layout="batch", noise_draws=2)

"""Checkpoint folders that are malformed or differ from did's own: var_min, bad config.json, non-finite weights."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from did_cli.checkpoints import load_model, save_model
from did_cli.errors import InputError, ModelLoadError
from tests.bd3lm_reference import reference_sample_mode
from tests.conftest import make_tiny_model
from tests.test_checkpoints import HUB_CONFIG, _upstream_state, _write_bd3lm_folder

EPS_KEYS = ("sampling_eps_min", "sampling_eps_max")


def _without_eps(state):
    return {k: v for k, v in state.items() if k not in EPS_KEYS}


def test_var_min_false_checkpoint_without_eps_buffers_loads_and_matches_reference(tmp_path):
    state = _without_eps(_upstream_state(seed=4))
    folder = _write_bd3lm_folder(tmp_path / "nv", state, HUB_CONFIG | {"var_min": False})
    model = load_model(str(folder), device="cpu")
    tokens = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(1))
    tokens[:, 16:] = 68
    with torch.no_grad():
        ours = model(tokens, block_size=4)
    torch.testing.assert_close(ours, reference_sample_mode(state, 4, tokens, 4), atol=1e-5, rtol=1e-5)
    # The metadata the weights lack comes from the config (not uninitialised memory).
    assert (float(model.sampling_eps_min), float(model.sampling_eps_max)) == pytest.approx((0.001, 0.999))
    assert not set(EPS_KEYS) & set(model.state_dict())


def test_var_min_true_checkpoint_without_eps_buffers_is_refused(tmp_path):
    folder = _write_bd3lm_folder(tmp_path / "v", _without_eps(_upstream_state()), HUB_CONFIG)
    with pytest.raises(ModelLoadError, match="lacks weight sampling_eps_m"):
        load_model(str(folder))


def test_var_min_false_checkpoint_with_eps_buffers_still_loads(tmp_path):
    folder = _write_bd3lm_folder(tmp_path / "nv", _upstream_state(), HUB_CONFIG | {"var_min": False})
    assert load_model(str(folder)).config.var_min is False


def test_var_min_false_model_saves_without_eps_buffers_and_round_trips(tmp_path):
    model = make_tiny_model(var_min=False)
    folder = save_model(model, tmp_path / "ckpt")
    assert not set(EPS_KEYS) & set(load_file(str(folder / "model.safetensors")))
    assert json.loads((folder / "config.json").read_text())["var_min"] is False
    again = load_model(str(folder))
    assert again.config == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key


def test_var_min_true_model_saves_its_eps_buffers(tmp_path):
    folder = save_model(make_tiny_model(), tmp_path / "ckpt")
    assert set(EPS_KEYS) <= set(load_file(str(folder / "model.safetensors")))
    assert json.loads((folder / "config.json").read_text())["var_min"] is True


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "JSON object"),
        ('"bd3lm"', "JSON object"),
        (json.dumps(HUB_CONFIG | {"hidden_dim": "abc"}), "hidden_dim must be a positive integer"),
        (json.dumps(HUB_CONFIG | {"n_heads": -4}), "n_heads must be a positive integer"),
        (json.dumps(HUB_CONFIG | {"vocab_size": -69}), "vocab_size must be a positive integer"),
        (json.dumps(HUB_CONFIG | {"vocab_size": 69.5}), "vocab_size must be a positive integer"),
        (json.dumps(HUB_CONFIG | {"n_blocks": True}), "n_blocks must be a positive integer"),
        (json.dumps(HUB_CONFIG | {"mask_id": "68"}), "mask_id must be an integer"),
        (json.dumps(HUB_CONFIG | {"mask_id": -1}), "outside the vocabulary"),
        (json.dumps(HUB_CONFIG | {"dropout": 1.5}), "dropout must be in"),
        (json.dumps(HUB_CONFIG | {"var_min": "no"}), "var_min must be true or false"),
        (json.dumps(HUB_CONFIG | {"tokenizer": ["gpt2"]}), "tokenizer must be"),
        (json.dumps(HUB_CONFIG | {"sampling_eps_min": 0.9, "sampling_eps_max": 0.1}), "sampling_eps_min"),
        (json.dumps(HUB_CONFIG | {"hidden_dim": 30}), "not a multiple of n_heads"),
        (json.dumps(HUB_CONFIG).replace('"dropout": 0.1', '"dropout": NaN'), "NaN is not valid JSON"),
        (json.dumps({k: v for k, v in HUB_CONFIG.items() if k != "vocab_size"}), "no vocab_size"),
    ],
)
def test_malformed_config_is_a_one_line_input_error_naming_the_file(tmp_path, text, message):
    folder = _write_bd3lm_folder(tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(InputError, match=message) as info:
        load_model(str(folder))
    assert "\n" not in str(info.value) and str(folder / "config.json") in str(info.value)


def test_config_ints_for_float_fields_are_accepted(tmp_path):
    folder = _write_bd3lm_folder(tmp_path / "m", config=HUB_CONFIG | {"sampling_eps_max": 1, "dropout": 0})
    config = load_model(str(folder)).config
    assert config.sampling_eps_max == 1.0 and isinstance(config.sampling_eps_max, float)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, bad):
    state = _upstream_state()
    state["backbone.blocks.1.attn_qkv.weight"][3, 5] = bad
    folder = _write_bd3lm_folder(tmp_path / "n", state)
    with pytest.raises(ModelLoadError, match=r"backbone\.blocks\.1\.attn_qkv\.weight holds NaN or infinite") as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)


def test_cli_reports_a_malformed_config_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from did_cli.cli import app

    folder = _write_bd3lm_folder(tmp_path / "m")
    (folder / "config.json").write_text("[]")
    result = CliRunner().invoke(app, ["draft", "-m", str(folder), "-n", "1", "--length", "8"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "JSON object" in lines[0]


def test_a_model_saved_with_nan_weights_is_refused_when_loaded(tmp_path):
    model = make_tiny_model()
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[0] = math.nan
    folder = save_model(model, tmp_path / "nan")
    with pytest.raises(ModelLoadError, match="output_layer.linear.bias"):
        load_model(str(folder))


def test_config_that_disagrees_with_the_weights_fails_before_allocating_the_model(tmp_path, monkeypatch):
    from did_cli.model import BD3LM

    folder = _write_bd3lm_folder(tmp_path / "big", config=HUB_CONFIG | {"hidden_dim": 100_000, "n_heads": 4})
    monkeypatch.setattr(BD3LM, "to_empty", lambda *a, **k: pytest.fail("allocated the configured model"))
    with pytest.raises(ModelLoadError, match=r"weight backbone\.\S+ has shape .*, the config implies"):
        load_model(str(folder))

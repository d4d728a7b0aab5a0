import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from did_cli.checkpoints import load_model, load_tokenizer, save_model
from did_cli.errors import InputError, ModelLoadError
from tests.bd3lm_reference import reference_sample_mode
from tests.conftest import TINY, make_tiny_model, randomize

# The fields of kuleshov-group/bd3lm-owt-block_size4's config.json, with tiny dimensions.
HUB_CONFIG = {
    "_name_or_path": "kuleshov-group/bd3lm-owt-block_size4",
    "architectures": ["BD3LM"],
    "attn_backend": "sdpa",
    "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
    "block_size": 4,
    "cond_dim": 16,
    "cross_attn": True,
    "dropout": 0.1,
    "hidden_dim": 32,
    "model_length": 32,
    "model_type": "bd3lm",
    "n_blocks": 2,
    "n_heads": 4,
    "return_dict": False,
    "sampling_eps_max": 0.999,
    "sampling_eps_min": 0.001,
    "time_conditioning": False,
    "torch_dtype": "float32",
    "transformers_version": "4.49.0",
    "var_min": True,
    "vocab_size": 69,
}


def _upstream_state(seed=3):
    """Random weights under BD3-LM's exact key names, built without did's model class."""
    d, c, v, blocks = 32, 16, 69, 2
    shapes = {
        "sampling_eps_min": (),
        "sampling_eps_max": (),
        "backbone.vocab_embed.embedding": (v, d),
        "backbone.sigma_map.mlp.0.weight": (c, 256),
        "backbone.sigma_map.mlp.0.bias": (c,),
        "backbone.sigma_map.mlp.2.weight": (c, c),
        "backbone.sigma_map.mlp.2.bias": (c,),
        "backbone.rotary_emb.inv_freq": (4,),
        "backbone.output_layer.norm_final.weight": (d,),
        "backbone.output_layer.linear.weight": (v, d),
        "backbone.output_layer.linear.bias": (v,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * d, c),
        "backbone.output_layer.adaLN_modulation.bias": (2 * d,),
    }
    for i in range(blocks):
        p = f"backbone.blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,),
            p + "attn_qkv.weight": (3 * d, d),
            p + "attn_out.weight": (d, d),
            p + "norm2.weight": (d,),
            p + "mlp.0.weight": (4 * d, d),
            p + "mlp.0.bias": (4 * d,),
            p + "mlp.2.weight": (d, 4 * d),
            p + "mlp.2.bias": (d,),
            p + "adaLN_modulation.weight": (6 * d, c),
            p + "adaLN_modulation.bias": (6 * d,),
        }
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    state["backbone.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    state["sampling_eps_min"] = torch.tensor(0.001)
    state["sampling_eps_max"] = torch.tensor(0.999)
    return state


def _write_bd3lm_folder(folder, state=None, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or HUB_CONFIG))
    save_file(state if state is not None else _upstream_state(), str(folder / "model.safetensors"))
    return folder


def test_bd3lm_checkpoint_reproduces_reference_logits(tmp_path):
    state = _upstream_state()
    folder = _write_bd3lm_folder(tmp_path / "bd3lm", state)
    model = load_model(str(folder), device="cpu")
    tokens = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(0))
    tokens[:, 20:] = 68
    with torch.no_grad():
        ours = model(tokens, block_size=4)
    torch.testing.assert_close(ours, reference_sample_mode(state, 4, tokens, 4), atol=1e-5, rtol=1e-5)
    assert model.config.block_size == 4 and model.mask_id == 68
    assert len(model.source.sha256) == 64


def test_missing_weight_is_an_error_naming_it(tmp_path):
    state = _upstream_state()
    del state["backbone.blocks.1.mlp.0.bias"]
    folder = _write_bd3lm_folder(tmp_path / "m", state)
    with pytest.raises(ModelLoadError, match=r"lacks weight backbone\.blocks\.1\.mlp\.0\.bias"):
        load_model(str(folder))


def test_unexpected_weight_is_an_error_naming_it(tmp_path):
    state = _upstream_state() | {"backbone.extra.weight": torch.zeros(2)}
    folder = _write_bd3lm_folder(tmp_path / "m", state)
    with pytest.raises(ModelLoadError, match=r"unexpected weight backbone\.extra\.weight"):
        load_model(str(folder))


def test_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    folder = _write_bd3lm_folder(tmp_path / "m", config=HUB_CONFIG | {"hidden_dim": 64, "n_heads": 4})
    with pytest.raises(ModelLoadError, match=r"weight backbone\.\S+ has shape"):
        load_model(str(folder))


def test_missing_config_and_bad_json_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_model(str(bad))


def test_autoregressive_or_time_conditioned_configs_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="time_conditioning"):
        load_model(str(_write_bd3lm_folder(tmp_path / "t", config=HUB_CONFIG | {"time_conditioning": True})))
    with pytest.raises(ModelLoadError, match="causal"):
        load_model(str(_write_bd3lm_folder(tmp_path / "c", config=HUB_CONFIG | {"causal": True})))


def test_missing_folder_and_offline_hub_id_are_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        load_model("kuleshov-group/bd3lm-owt-block_size4")
    assert "\n" not in str(info.value)


def test_save_and_load_round_trip_is_bit_exact(tmp_path, char_tokenizer):
    model = make_tiny_model(seed=5)
    folder = save_model(model, tmp_path / "ckpt", char_tokenizer)
    again = load_model(str(folder), device="cpu")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    assert again.config == model.config
    assert len(load_tokenizer(again)) == len(char_tokenizer)
    saved = load_file(str(folder / "model.safetensors"))
    assert "backbone.blocks.0.attn_qkv.weight" in saved and "sampling_eps_min" in saved


def test_saved_config_keeps_bd3lm_fields(tmp_path):
    folder = save_model(make_tiny_model(), tmp_path / "ckpt")
    body = json.loads((folder / "config.json").read_text())
    assert body["model_type"] == "bd3lm"
    assert {k: body[k] for k in ("hidden_dim", "n_blocks", "n_heads", "cond_dim", "vocab_size")} == {
        k: TINY[k] for k in ("hidden_dim", "n_blocks", "n_heads", "cond_dim", "vocab_size")
    }


def test_tokenizer_that_reaches_the_mask_id_is_refused(tmp_path, char_tokenizer):
    model = randomize(make_tiny_model(vocab_size=60))
    folder = save_model(model, tmp_path / "small_vocab", char_tokenizer)
    with pytest.raises(ModelLoadError, match="tokens but the model's vocabulary"):
        load_tokenizer(load_model(str(folder)))


def test_bfloat16_loading(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_bf16_saving_keeps_buffers_exact_and_rotary_uses_fp32(tmp_path, char_tokenizer):
    model = make_tiny_model()
    folder = save_model(model, tmp_path / "b", char_tokenizer, dtype=torch.bfloat16)
    saved = load_file(str(folder / "model.safetensors"))
    assert saved["backbone.blocks.0.attn_qkv.weight"].dtype == torch.bfloat16
    assert saved["backbone.rotary_emb.inv_freq"].dtype == torch.float32
    cos, _ = model.to(torch.bfloat16).backbone.rotary_emb(torch.arange(1000))
    exact = torch.cos(torch.outer(torch.arange(1000).float(), 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))))
    torch.testing.assert_close(cos[:, :4], exact, atol=1e-5, rtol=0)


def test_tokenizer_of_a_checkpoint_folder_without_tokenizer_files_comes_from_its_config(tmp_path, char_tokenizer):
    folder = _write_bd3lm_folder(tmp_path / "bare", config=HUB_CONFIG | {"tokenizer": "tok"})
    char_tokenizer.save_pretrained(str(folder / "tok"))
    assert len(load_tokenizer(str(folder))) == 68


# --- config.json for transformers: auto_map to BD3-LM's modeling code ------------------------------------------------


def _bd3lm_shapes(body):
    """The state-dict shapes BD3-LM's modeling_bd3lm.BD3LM builds from a config.json (its MLP ratio is always 4)."""
    d, c, v = body["hidden_dim"], body["cond_dim"], body["vocab_size"]
    shapes = {
        "backbone.vocab_embed.embedding": (v, d),
        "backbone.sigma_map.mlp.0.weight": (c, 256),
        "backbone.sigma_map.mlp.0.bias": (c,),
        "backbone.sigma_map.mlp.2.weight": (c, c),
        "backbone.sigma_map.mlp.2.bias": (c,),
        "backbone.rotary_emb.inv_freq": (d // body["n_heads"] // 2,),
        "backbone.output_layer.norm_final.weight": (d,),
        "backbone.output_layer.linear.weight": (v, d),
        "backbone.output_layer.linear.bias": (v,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * d, c),
        "backbone.output_layer.adaLN_modulation.bias": (2 * d,),
    }
    if body["var_min"]:
        shapes |= {"sampling_eps_min": (), "sampling_eps_max": ()}
    for i in range(body["n_blocks"]):
        p = f"backbone.blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,),
            p + "attn_qkv.weight": (3 * d, d),
            p + "attn_out.weight": (d, d),
            p + "norm2.weight": (d,),
            p + "mlp.0.weight": (4 * d, d),
            p + "mlp.0.bias": (4 * d,),
            p + "mlp.2.weight": (d, 4 * d),
            p + "mlp.2.bias": (d,),
            p + "adaLN_modulation.weight": (6 * d, c),
            p + "adaLN_modulation.bias": (6 * d,),
        }
    return shapes


def _readme_auto_map():
    """The auto_map and code revision README's "Share a fine-tune" section documents."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Share a fine-tune") :]
    section = section[: section.index("\n## ")]
    documented = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    revision = re.search(r'code_revision="([^"]+)"', section).group(1)
    return documented["auto_map"], revision


def test_saved_config_reads_back_with_identical_logits_and_names_the_documented_bd3lm_code(tmp_path, char_tokenizer):
    from did_cli.config import AUTO_MAP, BD3LM_CODE_REVISION, BD3LM_CONFIG_FIELDS

    model = make_tiny_model(seed=2, dropout=0.0)
    folder = save_model(model, tmp_path / "ckpt", char_tokenizer)
    again = load_model(str(folder), device="cpu")  # did's loader runs no remote code (the test is offline)
    tokens = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(tokens, block_size=4), again(tokens, block_size=4))
    body = json.loads((folder / "config.json").read_text())
    assert body["auto_map"] == AUTO_MAP
    assert _readme_auto_map() == (body["auto_map"], BD3LM_CODE_REVISION)
    assert set(BD3LM_CONFIG_FIELDS) <= set(body)  # BD3LMConfig's defaults (cond_dim 129, flex) are never used
    assert body["attn_backend"] == "sdpa" and body["mask_index"] == body["mask_id"] == 68
    assert "did_transformers_note" not in body


@pytest.mark.parametrize(
    "overrides",
    [{}, {"var_min": False}, {"block_size": 8}, {"model_length": 64, "block_size": 16}, {"n_heads": 2, "cond_dim": 8}],
)
def test_saved_weights_are_the_model_bd3lm_code_builds_from_config_json(tmp_path, overrides):
    model = make_tiny_model(seed=4, dropout=0.0, **overrides)
    folder = save_model(model, tmp_path / "ckpt")
    body = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == _bd3lm_shapes(body)
    # BD3-LM's sample-mode forward at config.json's block size, computed from config.json's fields alone.
    tokens = torch.randint(0, 68, (2, body["model_length"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(str(folder))(tokens, block_size=body["block_size"])
    expected = reference_sample_mode(state, body["n_heads"], tokens, body["block_size"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_transformers_resolves_the_auto_map_to_bd3lm_code_at_code_revision(tmp_path, monkeypatch):
    """At the boundary: transformers' own resolution of the references, with the Hub download replaced."""
    import transformers
    from transformers import AutoConfig, PretrainedConfig, dynamic_module_utils

    from did_cli.config import BD3LM_CODE_REPOSITORY

    class FakeBD3LMConfig(PretrainedConfig):
        model_type = "bd3lm"

    fetched = []

    def fetch(repo_id, module_file, **kwargs):
        fetched.append((repo_id, module_file, kwargs.get("revision")))
        return module_file

    monkeypatch.setattr(dynamic_module_utils, "get_cached_module_file", fetch)
    monkeypatch.setattr(dynamic_module_utils, "get_class_in_module", lambda name, *a, **k: FakeBD3LMConfig)
    folder = save_model(make_tiny_model(), tmp_path / "ckpt")
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert fetched == [(BD3LM_CODE_REPOSITORY, "configuration_bd3lm.py", None)]  # None: transformers' main
    assert (config.hidden_dim, config.n_blocks, config.block_size, config.attn_backend) == (32, 2, 4, "sdpa")
    AutoConfig.from_pretrained(str(folder), trust_remote_code=True, code_revision="0123abc")
    assert fetched[-1] == (BD3LM_CODE_REPOSITORY, "configuration_bd3lm.py", "0123abc")
    model_reference = json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForMaskedLM"]
    transformers.dynamic_module_utils.get_class_from_dynamic_module(model_reference, str(folder), code_revision="c1")
    assert fetched[-1] == (BD3LM_CODE_REPOSITORY, "modeling_bd3lm.py", "c1")


def test_a_did_only_option_is_saved_with_a_note_and_a_warning_instead_of_an_auto_map(tmp_path):
    model = make_tiny_model(mlp_ratio=2)
    with pytest.warns(UserWarning, match="mlp_ratio 2"):
        folder = save_model(model, tmp_path / "ckpt")
    body = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in body and "mlp_ratio 2" in body["did_transformers_note"]
    assert "library_name: did" in (folder / "README.md").read_text()
    assert load_model(str(folder)).config.mlp_ratio == 2  # did loads it all the same
    # A BD3-LM Hub config's own auto_map (files beside it) is replaced when did saves the model it describes.
    again = save_model(load_model(str(_write_bd3lm_folder(tmp_path / "hub"))), tmp_path / "resaved")
    assert json.loads((again / "config.json").read_text())["auto_map"]["AutoConfig"].startswith("kuleshov-group/")

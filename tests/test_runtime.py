"""Runtime behaviour that users of Hugging Face checkpoints rely on: configs, loading, saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from specformer.runtime import CheckpointError, ConfigError
from specformer.runtime.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from specformer.runtime.files import atomic_write_with

TINY = {
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_model(**overrides: object) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**(TINY | overrides))).eval()


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ---- config ---------------------------------------------------------------------------------------
def test_config_round_trips_unknown_keys(tmp_path: Path) -> None:
    config = LlamaConfig(**TINY, some_future_key={"a": 1}, architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    again = LlamaConfig.from_pretrained(tmp_path)
    assert again.some_future_key == {"a": 1}
    assert again == config
    assert json.loads((tmp_path / "config.json").read_text())["some_future_key"] == {"a": 1}


def test_config_reads_the_transformers_4_rope_form() -> None:
    config = LlamaConfig.from_dict(
        {
            "model_type": "llama",
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "torch_dtype": "bfloat16",
        }
    )
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.dtype == "bfloat16"
    written = config.to_dict()
    assert "rope_theta" not in written and "rope_scaling" not in written and "torch_dtype" not in written
    assert written["rope_parameters"]["factor"] == 8.0


def test_config_rejects_wrong_types_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`hidden_size` is '32'.*expected int"):
        LlamaConfig(hidden_size="32")
    with pytest.raises(ConfigError, match="rope_type"):
        LlamaConfig(rope_parameters={"rope_type": "spiral", "rope_theta": 1.0})
    with pytest.raises(ConfigError, match="needs `factor`"):
        LlamaConfig(rope_parameters={"rope_type": "linear"})


def test_config_json_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 32,}')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON at line 1"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="model_type `bert`"):
        LlamaConfig.from_pretrained(tmp_path)


def test_derived_defaults_follow_their_fields() -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=8)
    assert config.head_dim == 8 and config.num_key_value_heads == 8
    assert LlamaConfig(head_dim=4).head_dim == 4


# ---- loading and saving ---------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file()
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_sharded_save_and_load(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / WEIGHTS_NAME).exists()
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_tied_weights_are_shared_and_saved_once(tmp_path: Path) -> None:
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - safe_open is not a mapping
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_dtype_selection(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    assert LlamaForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    assert LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert LlamaForCausalLM.from_pretrained(tmp_path, dtype="float16").dtype == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
        LlamaForCausalLM.from_pretrained(tmp_path, dtype="float12")


def test_backbone_and_head_checkpoints_load_into_each_other(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "head")
    backbone = LlamaModel.from_pretrained(tmp_path / "head")  # the head's lm_head is dropped
    torch.testing.assert_close(backbone.norm.weight, model.model.norm.weight)
    model.model.save_pretrained(tmp_path / "backbone")
    # as transformers does: the backbone loads, the head the checkpoint never had starts fresh, with a word
    with pytest.warns(
        UserWarning, match=r"saved as LlamaModel.*\['lm_head\.weight'\] are freshly initialised"
    ):
        head = LlamaForCausalLM.from_pretrained(tmp_path / "backbone")
    torch.testing.assert_close(head.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not head.lm_head.weight.is_meta and torch.isfinite(head.lm_head.weight).all()
    (tmp_path / "head" / "model.safetensors").unlink()  # a causal LM checkpoint missing its own head:
    model.model.save_pretrained(tmp_path / "weights-only")
    (tmp_path / "weights-only" / "model.safetensors").rename(tmp_path / "head" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: lm_head\.weight"):  # still an error
        LlamaForCausalLM.from_pretrained(tmp_path / "head")


def test_mismatched_checkpoint_reports_every_problem(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / WEIGHTS_NAME)
    state["model.extra.weight"] = torch.zeros(1)
    state["model.norm.weight"] = torch.zeros(7)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError) as info:
        LlamaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected keys: model.extra.weight" in message
    assert "model.norm.weight: checkpoint (7,), model (32,)" in message


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"good")

    def crash(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, crash)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_meta_loading_never_initialises_real_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_model().save_pretrained(tmp_path)
    touched: list[torch.device] = []
    for name in ("normal_", "kaiming_uniform_", "uniform_", "zeros_", "ones_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor: torch.Tensor, *args: object, _original=original, **kwargs: object) -> torch.Tensor:
            touched.append(tensor.device)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    LlamaForCausalLM.from_pretrained(tmp_path)
    assert touched and all(device.type == "meta" for device in touched)


def test_unknown_attention_backend_is_named() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="`flash_attention_9` is not available; choose one of"):
        model.set_attention("flash_attention_9")


def test_attention_mask_shape_is_checked() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\); expected \(batch, 6\)"):
        model(torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_rope_parameters_per_layer_kind() -> None:
    """Nested rope parameters (Gemma 3's full/sliding tables): each kind standardised, missing kinds from
    the spec's defaults, flat legacy keys read as the first kind's, unknown kinds refused."""
    from specformer.runtime.config import ConfigError, standardize_rope

    kinds = {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    given = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    out = standardize_rope(given, {}, theta=None, max_position_embeddings=64, kinds=kinds)
    assert out["full_attention"]["factor"] == 8.0 and out["sliding_attention"]["rope_theta"] == 1e4
    legacy = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    out = standardize_rope(None, legacy, theta=None, max_position_embeddings=64, kinds=kinds)
    assert out["full_attention"]["rope_theta"] == 5e5 and out["full_attention"]["factor"] == 2.0
    assert not legacy  # consumed, so they are not written back to config.json
    legacy = {"rope_theta": 5e5, "rope_local_base_freq": 2e3}  # Gemma 3 as 4.x wrote it
    older = {"sliding_attention": {"rope_local_base_freq": "rope_theta"}}
    out = standardize_rope(
        None, legacy, theta=None, max_position_embeddings=64, kinds=kinds, legacy_keys=older
    )
    assert (out["full_attention"]["rope_theta"], out["sliding_attention"]["rope_theta"]) == (5e5, 2e3)
    assert not legacy
    with pytest.raises(ConfigError, match="this model's are"):
        standardize_rope({"chunked_attention": {}}, {}, theta=None, max_position_embeddings=64, kinds=kinds)

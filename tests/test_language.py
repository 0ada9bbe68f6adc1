"""Language features end to end: a spec is generated, imported and run, with no change to codegen/runtime."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from specformer.codegen import render_model
from specformer.dsl import SpecError, SpecSet
from specformer.runtime import ConfigError

SPECS = Path(__file__).resolve().parents[1] / "specs"


def build(text: str, name: str, tmp_path: Path) -> ModuleType:
    """Generate `name` from `text` (which may extend the installed specs) and import the package."""
    specs = SpecSet()
    for path in sorted(SPECS.glob("*.sf")):
        specs.add_file(path, f"specs/{path.name}")
    specs.add_text(text, f"{name}.sf")
    files = render_model(specs.resolved(name))
    for rel, source in files.items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(next(iter(files)).split("/")[0])
    finally:
        sys.path.remove(str(tmp_path))


PARALLEL = """
# A GPT-J/NeoX-style parallel residual: attention and MLP read the same input.
model Parallel extends Llama {
  model_type = "parallel"
  DecoderLayer.forward(x) {
    return x + self_attn(input_layernorm(x)) + mlp(post_attention_layernorm(x))
  }
}
"""


def test_parallel_residual_is_a_dataflow_change(tmp_path: Path) -> None:
    package = build(PARALLEL, "Parallel", tmp_path)
    config = package.ParallelConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    model = package.ParallelModel(config).eval()
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        out = model(ids).last_hidden_state
        # the same computation written by hand from the model's own parts
        x = model.embed_tokens(ids)
        rope = model.rotary_emb(torch.arange(5)[None])
        from specformer.runtime import AttentionMask

        mask = AttentionMask(None, 5)
        for layer in model.layers:
            attn = layer.self_attn(layer.input_layernorm(x), rope, mask, None)
            x = x + attn + layer.mlp(layer.post_attention_layernorm(x))
        torch.testing.assert_close(out, model.norm(x))


ENCODER = """
model Encoder {
  model_type = "tiny_encoder"
  config {
    vocab: int = 30
    dim: int = 16
    n_heads: int = 2
    max_position_embeddings: int = 32
    activation: enum(gelu, relu) = gelu
    layer_norm_eps: float = 1e-12
    pad_token_id: int? = none
    alias hidden_size -> dim
    alias num_attention_heads -> n_heads
  }
  block Layer {
    q = Linear(dim, dim)
    k = Linear(dim, dim)
    v = Linear(dim, dim)
    out = Linear(dim, dim)
    ln = LayerNorm(dim, eps = layer_norm_eps)
    forward(x) {
      y = attend(split_heads(q(x), dim // n_heads), split_heads(k(x), dim // n_heads), split_heads(v(x), dim // n_heads))
      return ln(x + out(merge_heads(y)))
    }
  }
  backbone Model as encoder {
    embeddings = Embedding(vocab, dim)
    positions = Embedding(max_position_embeddings, dim)
    layers = repeat(2, Layer)
    forward(input_ids, position_ids) {
      x = embeddings(input_ids) + positions(position_ids)
      x = layers(x)
      return x
    }
  }
  head ForSequenceClassification: sequence_classification {
    classifier = Linear(dim, num_labels)
    forward(h) { return classifier(first_token(h)) }
  }
}
"""


def test_post_norm_encoder_with_aliases_enums_and_padding(tmp_path: Path) -> None:
    package = build(ENCODER, "Encoder", tmp_path)
    config = package.EncoderConfig(hidden_size=24, num_attention_heads=4, num_labels=3)
    assert (config.dim, config.n_heads, config.hidden_size) == (24, 4, 24)
    assert "hidden_size" not in config.to_dict() and config.to_dict()["dim"] == 24
    with pytest.raises(ConfigError, match="`activation` is 'swish'"):
        package.EncoderConfig(activation="swish")
    model = package.EncoderForSequenceClassification(config).eval()
    ids = torch.randint(0, 30, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :5]).logits
        loss = model(ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=0)  # padding is invisible
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_enum_default_outside_its_choices() -> None:
    specs = SpecSet()
    specs.add_text(ENCODER.replace("enum(gelu, relu) = gelu", "enum(gelu, relu) = swish"), "e.sf")
    with pytest.raises(SpecError, match="`swish` is not a known enum"):
        specs.resolved("Encoder")


def test_alias_to_unknown_field() -> None:
    specs = SpecSet()
    specs.add_text(ENCODER.replace("alias hidden_size -> dim", "alias hidden_size -> dims"), "e.sf")
    with pytest.raises(
        SpecError, match="alias `hidden_size` points to unknown field `dims`; did you mean `dim`"
    ):
        specs.resolved("Encoder")


def _llama_with(line: str) -> SpecSet:
    specs = SpecSet()
    for path in sorted(SPECS.glob("*.sf")):
        specs.add_file(path, f"specs/{path.name}")
    text = (SPECS / "llama.sf").read_text().replace("model Llama {", "model Split {", 1)
    text = text.replace("parallel gate_proj, up_proj: colwise", line, 1).replace('"llama"', '"split"', 1)
    specs.add_text(text, "split.sf")
    return specs


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "parallel gate_proj, up_proj: columnwise",
            "unknown parallel style `columnwise`; did you mean `colwise`",
        ),
        (
            "parallel gate_proj, upp_proj: colwise",
            "`upp_proj`, which is not a submodule of `MLP`; did you mean `up_proj`",
        ),
        ("parallel gate_proj, down_proj: colwise", "`down_proj` is given two parallel styles"),
    ],
)
def test_parallel_lines_are_checked(line: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _llama_with(line).resolved("Split")


def test_parallel_only_splits_linear_layers() -> None:
    text = """
model Odd {
  model_type = "odd"
  config { hidden_size: int = 8  vocab_size: int = 10 }
  block Layer {
    norm = RMSNorm(hidden_size)
    parallel norm: colwise
    forward(x) { return norm(x) }
  }
  backbone Model as model {
    embed = Embedding(vocab_size, hidden_size)
    layer = Layer
    forward(input_ids) { return layer(embed(input_ids)) }
  }
}
"""
    specs = SpecSet()
    specs.add_text(text, "odd.sf")
    with pytest.raises(
        SpecError, match=r"`parallel \.\.\.: colwise` splits Linear submodules; `norm` is a RMSNorm"
    ):
        specs.resolved("Odd")


# ---- finer deltas -----------------------------------------------------------------------------------
def _resolved(text: str, name: str) -> object:
    specs = SpecSet()
    for path in sorted(SPECS.glob("*.sf")):
        specs.add_file(path, f"specs/{path.name}")
    specs.add_text(text, f"{name}.sf")
    return specs.resolved(name)


def _kwargs(sub: object) -> dict[str, object]:
    return {k: getattr(v, "value", getattr(v, "id", None)) for k, v in sub.kwargs}


def test_argument_overrides_set_one_argument_of_each_matching_submodule() -> None:
    model = _resolved(
        """
model Biased extends Llama {
  Attention.[qk]_proj.bias = true
  MLP.*_proj.bias = true
  DecoderLayer.*_layernorm.eps = 1e-5
}
""",
        "Biased",
    )
    attention, mlp, layer = (model.block(n) for n in ("Attention", "MLP", "DecoderLayer"))
    assert [_kwargs(attention.submodule(n))["bias"] for n in ("q_proj", "k_proj", "v_proj")] == [
        True,
        True,
        "attention_bias",
    ]
    assert all(_kwargs(s)["bias"] is True for s in mlp.submodules)
    assert [
        _kwargs(layer.submodule(n)).get("eps") for n in ("input_layernorm", "post_attention_layernorm")
    ] == [
        1e-5,
        1e-5,
    ]
    assert model.model_type == "biased"  # its own name, not Llama's model_type


def test_argument_override_of_a_forward_call_and_an_embedding_scale(tmp_path: Path) -> None:
    package = build(
        """
model Bidi extends Llama {
  Attention.attend.causal = false
  Model.embed_tokens.scale = hidden_size ** 0.5
}
""",
        "Bidi",
        tmp_path,
    )
    config = package.BidiConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2
    )
    model = package.BidiModel(config).eval()
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        full = model(ids).last_hidden_state
        first = model(ids[:, :3]).last_hidden_state
        assert not torch.allclose(full[:, :3], first, atol=1e-5)  # later tokens are seen: not causal
        assert torch.equal(model.embed_tokens(ids), model.embed_tokens.weight[ids] * 4.0)


def test_head_placement_and_let_fields() -> None:
    model = _resolved(
        """
model Moved extends Llama {
  config {
    let head_dim, mlp_bias
  }
  head ForQuestionAnswering as model
}
""",
        "Moved",
    )
    assert next(h for h in model.heads if h.name == "ForQuestionAnswering").attr == "model"
    computed = {f.name for f in model.config.fields if f.computed}
    assert {"head_dim", "mlp_bias"} <= computed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Attention.x_proj.bias = true", "has no submodule matching `x_proj`"),
        ("Attention.q_proj.bais = true", "`Linear` has no parameter `bais`; did you mean `bias`?"),
        ("Attention.attend.casual = true", "`attend` has no parameter `casual`; did you mean `causal`?"),
        ("Model.layers.count = 2", "`layers` is a repeat of `DecoderLayer` and takes no arguments"),
        ("head ForNothing as model", "has no block `ForNothing`"),
        (
            "config {\n    let hidden_sise\n  }",
            "`Llama` has no field `hidden_sise`; did you mean `hidden_size`?",
        ),
        ("config {\n    let pad_token_id, vocab_size\n  }", None),
    ],
)
def test_delta_errors_name_the_line(line: str, message: str | None) -> None:
    text = f"model Bad extends Llama {{\n  {line}\n}}\n"
    if message is None:
        _resolved(text, "Bad")
        return
    with pytest.raises(SpecError) as err:
        _resolved(text, "Bad")
    assert message in str(err.value) and "Bad.sf:" in str(err.value)


def _llama_gguf(rows: str, arch: str = "llama") -> SpecSet:
    specs = SpecSet()
    text = (SPECS / "llama.sf").read_text().replace("model Llama {", "model Stored {", 1)
    start = text.index('  gguf "llama" {')
    end = text.index("  }\n", start) + 4
    text = text[:start] + f'  gguf "{arch}" {{\n    {rows}\n  }}\n' + text[end:]
    specs.add_text(text.replace('model_type = "llama"', 'model_type = "stored"'), "stored.sf")
    return specs


@pytest.mark.parametrize(
    ("rows", "arch", "message"),
    [
        ("Attention.q_proj: rows(-1, 2) -> (0, 1)", "Llama 3", "is not a llama.cpp architecture name"),
        (
            "Atention.q_proj: rows(-1, 2) -> (1, 0)",
            "llama",
            "unknown block `Atention`; did you mean `Attention`",
        ),
        ("Attention.qproj: rows(-1, 2) -> (1, 0)", "llama", "`Attention` has no submodule `qproj`"),
        ("DecoderLayer.input_layernorm: rows(-1, 2) -> (1, 0)", "llama", "rows of a Linear"),
        ("Attention.q_proj: rows(-1, head_dim) -> (0, 0)", "llama", r"must name each of the 2 axes"),
        ("Attention.q_proj: rows(-1, head_dims) -> (1, 0)", "llama", "unknown field `head_dims`"),
        ("Attention.q_proj: rows(-1, 2) -> (1, 0.5)", "llama", "`0.5` is not an axis"),
        ("Attention.q_proj, Attention.q_proj: rows(-1, 2) -> (1, 0)", "llama", "two gguf row orders"),
    ],
)
def test_gguf_layouts_are_checked(rows: str, arch: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _llama_gguf(rows, arch).resolved("Stored")


def test_gguf_layout_is_not_inherited() -> None:
    specs = SpecSet()
    for path in sorted(SPECS.glob("*.sf")):
        specs.add_file(path, f"specs/{path.name}")
    assert specs.resolved("Llama").gguf.architecture == "llama"
    assert specs.resolved("Mistral").gguf is None  # llama.cpp stores Mistral as `llama`: Llama reads it
    assert [r.targets for r in specs.resolved("Llama").gguf.rows] == [
        (("Attention", "q_proj"), ("Attention", "k_proj"))
    ]

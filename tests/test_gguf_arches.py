"""GGUF files of each supported architecture and storage type load as transformers loads them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import transformers
from gguf_files import bpe_tokenizer, k_quant_blocks, write_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from specformer.runtime import CheckpointError
from specformer.runtime.auto import load_causal_lm
from specformer.runtime.gguf import read_gguf

CONFIG = {
    "vocab_size": 0,  # the tokenizer's
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}
# llama.cpp writes Mistral checkpoints with the `llama` architecture (same layout, no window metadata).
CASES = [
    ("llama", "F32"),
    ("llama", "F16"),
    ("llama", "BF16"),
    ("llama", "Q8_0"),
    ("llama", "Q4_0"),
    ("llama", "Q4_1"),
    ("qwen2", "Q8_0"),
    ("qwen2", "F16"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(300)


def random_gguf(arch: str, qtype: str, tokenizer, folder: Path) -> Path:
    """A random small `arch` model from transformers, written as a GGUF file of weight type `qtype`."""
    config = CONFIG | {"vocab_size": tokenizer.get_vocab_size()}
    hf_config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    source = transformers.AutoModelForCausalLM.from_config(hf_config_class(**config))
    path = folder / f"{arch}.gguf"
    write_gguf(path, arch, source, qtype, tokenizer)
    return path


@pytest.mark.parametrize(("arch", "qtype"), CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_gguf_matches_transformers(arch: str, qtype: str, tokenizer, tmp_path: Path) -> None:
    path = random_gguf(arch, qtype, tokenizer, tmp_path)

    model, ours_tokenizer = load_causal_lm(path, activations="float")  # the file's numbers, as transformers
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert type(model).__name__.lower().startswith(arch)
    text = "hello world, the quick brown fox 12345"
    ids = ours_tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        actual = model(torch.tensor([ids])).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    messages = [{"role": "user", "content": "hi"}]
    assert ours_tokenizer.apply_chat_template(messages, tokenize=False) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q5_0"])
@pytest.mark.parametrize("dequantize", [False, True])
def test_k_quants_match_transformers(kind: str, dequantize: bool, tokenizer, tmp_path: Path) -> None:
    """Q4_K, Q6_K and Q5_0 (the types of a Q4_K_M file) and Q5_K (a Q5_K_M file's) load packed by default
    (int4 groups of 32, int8 groups of 16 and 32, int8 groups of 32 with offsets), or dequantised: either
    way the weights equal transformers' dequantised ones bit for bit."""
    from specformer.runtime.quantization import Int4Linear, Int8Linear

    config = CONFIG | {"vocab_size": tokenizer.get_vocab_size(), "intermediate_size": 256}
    source = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    raw = {"model.layers.0.mlp.down_proj.weight": (k_quant_blocks(64, 256, kind), kind)}
    path = tmp_path / "k.gguf"
    write_gguf(path, "llama", source, "Q8_0", tokenizer, raw)
    model, _ = load_causal_lm(path, activations="float", dequantize=dequantize)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    layer = model.model.layers[0].mlp.down_proj
    packed = {"Q4_K": Int4Linear, "Q5_K": Int8Linear, "Q6_K": Int8Linear, "Q5_0": Int8Linear}[kind]
    assert isinstance(layer, torch.nn.Linear if dequantize else packed)
    weight = layer.dequantize() if isinstance(layer, Int4Linear | Int8Linear) else layer.weight
    torch.testing.assert_close(weight, reference.model.layers[0].mlp.down_proj.weight, atol=0, rtol=0)
    assert weight.abs().max() > 0 and torch.isfinite(weight).all()
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_unsupported_architecture_names_the_file(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    _tiny_gguf(path, "mamba")
    with pytest.raises(
        CheckpointError,
        match=r"mamba\.gguf: general\.architecture is `mamba`; supported: gemma, gemma2, .*llama",
    ):
        load_causal_lm(path)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x00\x01broken")
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        load_causal_lm(tmp_path / "junk.gguf")


@pytest.mark.parametrize(("arch", "qtype"), [("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2", "Q4_1")])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_quantized_blocks_load_without_dequantising(
    arch: str, qtype: str, activations: str, tokenizer, tmp_path: Path
) -> None:
    """Q8_0/Q4_0/Q4_1 linears become int8/int4 layers holding the file's blocks (q/k rows un-permuted).
    With float activations they compute the dequantised model's numbers; with int8 ones (the default,
    llama.cpp's arithmetic) the dequantised model's on inputs rounded to int8 per block of 32."""
    from specformer.runtime.quantization import Int4Linear, Int8Linear

    path = random_gguf(arch, qtype, tokenizer, tmp_path)
    dense = load_causal_lm(path, dequantize=True)[0]
    packed = type(dense).from_gguf(path, activations=activations)
    kind = Int8Linear if qtype == "Q8_0" else Int4Linear
    q_proj = packed.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, kind)
    assert q_proj.scales.dtype == torch.float16  # the blocks' own scales: two bytes a group, as in the file
    if qtype != "Q8_0":  # Q4_0 is symmetric ((q - 8) * d, nothing more stored), Q4_1 keeps its minimums
        assert (q_proj.offsets is None) == (qtype == "Q4_0")
    assert packed.get_memory_footprint() < dense.get_memory_footprint()
    if activations == "int8":
        for name, module in packed.named_modules():
            if isinstance(module, Int8Linear | Int4Linear):
                dense.get_submodule(name).register_forward_pre_hook(lambda _, args: (int8_blocks(args[0]),))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 (scale max|x| / 127, half to even), dequantised."""
    blocks = x.unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).flatten(-2)


def _tiny_gguf(path: Path, arch: str = "llama") -> bytes:
    """A GGUF file of one tiny tensor and one metadata entry besides the architecture."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (8, 2**40, "claims 1,099,511,627,776 tensors"),  # tensor count
        (16, 2**50, "metadata entries, more than its"),  # metadata count
        (24, 2**60, "not a readable GGUF file"),  # the first key's length
    ],
)
def test_lying_gguf_headers_are_refused_at_once(
    tmp_path: Path, offset: int, value: int, message: str
) -> None:
    import struct

    data = bytearray(_tiny_gguf(tmp_path / "ok.gguf"))
    data[offset : offset + 8] = struct.pack("<Q", value)
    (tmp_path / "lying.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=message):
        load_causal_lm(tmp_path / "lying.gguf")


@settings(max_examples=80, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_corrupted_gguf_files_raise_only_checkpoint_errors(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]], cut: int | None
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    data = bytearray(_tiny_gguf(folder / "ok.gguf"))
    for at, byte in flips:
        data[at % len(data)] = byte
    if cut is not None:
        data = data[: cut % len(data)]
    (folder / "bad.gguf").write_bytes(bytes(data))
    with contextlib.suppress(CheckpointError):  # or it reads: anything else fails the test
        read_gguf(folder / "bad.gguf")

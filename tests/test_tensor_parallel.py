"""Tensor parallelism from the spec's `parallel` lines: 2 gloo processes on the CPU against one process."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.runtime.generation import generate
from specformer.runtime.tensor_parallel import check_divisible, full_tp_plan, planned_modules

IDS = torch.tensor([[3, 14, 15, 9, 26, 5], [35, 8, 9, 7, 9, 3]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from specformer.generated.bert import BertForSequenceClassification

        encoder = BertForSequenceClassification.from_pretrained(Path(folder) / "bert", tp_plan="auto")
        with torch.no_grad():
            encoder_logits = encoder(IDS, attention_mask=(IDS > 4).long()).logits
        model = LlamaForCausalLM.from_pretrained(folder, tp_plan="auto")
        shapes = {
            name: tuple(p.to_local().shape) for name, p in model.named_parameters() if hasattr(p, "to_local")
        }
        with torch.no_grad():
            logits = model(IDS).logits
        tokens = generate(model, IDS, max_new_tokens=5, eos_token_id=None)
        result = {"shapes": shapes, "logits": logits, "tokens": tokens, "encoder": encoder_logits}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's threads at exit sometimes abort the process
    # ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    os._exit(0)


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = reference(IDS).logits
    expected_tokens = generate(reference, IDS, max_new_tokens=5, eos_token_id=None)
    from specformer.generated.bert import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        )
    ).eval()
    bert.save_pretrained(tmp_path / "bert")
    with torch.no_grad():
        expected_encoder = bert(IDS, attention_mask=(IDS > 4).long()).logits
    mp.spawn(_rank, args=(2, str(tmp_path), free_port()), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=0)
        assert result["tokens"].tolist() == expected_tokens.tolist()
        torch.testing.assert_close(result["encoder"], expected_encoder, atol=1e-5, rtol=0)
        shapes = result["shapes"]
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16, 32)  # half the output rows
        assert shapes["model.layers.0.self_attn.q_proj.bias"] == (16,)
        assert shapes["model.layers.0.self_attn.k_proj.weight"] == (8, 32)  # one of two kv heads
        assert shapes["model.layers.1.self_attn.o_proj.weight"] == (32, 16)  # half the input columns
        assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 24)
        assert shapes["lm_head.weight"] == (32, 32)  # split, output gathered


def test_plan_comes_from_the_spec() -> None:
    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    plan = full_tp_plan(model)
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise" and plan["lm_head"] == "gather"
    modules = planned_modules(model, plan)
    assert modules["model.layers.1.mlp.down_proj"] == "rowwise" and len(modules) == 2 * 7 + 1
    assert full_tp_plan(model.model)["layers.*.self_attn.o_proj"] == "rowwise"


def test_heads_must_divide_the_world_size() -> None:
    config = LlamaConfig(num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads = 3 is not divisible by 2"):
        check_divisible(config, 2)
    with pytest.raises(ValueError, match="num_attention_heads = 6 is not divisible by 4"):
        check_divisible(config, 4)


def test_auto_plan_needs_a_process_group(tmp_path: Path) -> None:
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(RuntimeError, match="launch with `torchrun"):
        LlamaForCausalLM.from_pretrained(tmp_path, tp_plan="auto")


def _moe_rank(rank: int, world: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from specformer.generated.mixtral import MixtralForCausalLM

        model = MixtralForCausalLM.from_pretrained(folder, tp_plan="auto")
        experts = model.model.layers[0].mlp.experts
        with torch.no_grad():
            logits = model(IDS).logits
        tokens = generate(model, IDS, max_new_tokens=5, eos_token_id=None)
        shapes = {"gate_up_proj": tuple(experts.gate_up_proj.shape), "first": experts.first_expert}
        torch.save({"logits": logits, "tokens": tokens, "shapes": shapes}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_experts_split_over_two_ranks_match_one_process(tmp_path: Path) -> None:
    """Expert parallelism (`parallel experts: experts`): each rank holds half the experts, read from a
    checkpoint that stores them one by one (transformers' save), and attention is split as usual."""
    import transformers

    from specformer.generated.mixtral import MixtralForCausalLM

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    transformers.MixtralForCausalLM(config).eval().save_pretrained(tmp_path)
    reference = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = reference(IDS).logits
    expected_tokens = generate(reference, IDS, max_new_tokens=5, eos_token_id=None)
    mp.spawn(_moe_rank, args=(2, str(tmp_path), free_port()), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=0)
        assert result["tokens"].tolist() == expected_tokens.tolist()
        assert result["shapes"] == {"gate_up_proj": (2, 96, 32), "first": 2 * rank}

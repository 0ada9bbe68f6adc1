"""Decoding a mixture of experts on the CPU: specformer against transformers (eager), same random
Mixtral-style model (8 experts, top 2, ~0.5B parameters), batch 1, rounds alternating between the two.

Prints each side's decode tokens/s and the ratio, and the weight bytes specformer reads per token (the
dense weights, plus each layer's experts the step chose, counted as the experts run) next to the
active-parameter bound (dense weights plus top_k experts a layer): reading only the chosen experts keeps
the two equal at batch 1.

    python bench/moe.py --threads 2 --tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def config_values(args: argparse.Namespace) -> dict:
    return dict(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)  # fmt: skip


Generate = Callable[[torch.nn.Module, torch.Tensor, int, Callable[..., torch.Tensor]], None]


def decode_rate(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, generate: Generate) -> float:
    """Tokens/s of `tokens` greedy steps after the prompt, timed from the first new token."""
    arrivals: list[float] = []

    def clock(input_ids: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:  # a stopping criterion
        arrivals.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    generate(model, prompt, tokens + 1, clock)
    return tokens / (arrivals[-1] - arrivals[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    import transformers
    from transformers import StoppingCriteriaList

    from specformer.generated.mixtral import MixtralForCausalLM
    from specformer.runtime.moe import Experts

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="specformer-moe-")
    reference = transformers.MixtralForCausalLM(transformers.MixtralConfig(**config_values(args))).eval()
    reference.save_pretrained(folder)
    ours = MixtralForCausalLM.from_pretrained(folder).eval()
    prompt = torch.randint(100, 30000, (1, 16))

    def theirs_generate(model: torch.nn.Module, ids: torch.Tensor, n: int, clock: Callable) -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                           stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)  # fmt: skip

    def ours_generate(model: torch.nn.Module, ids: torch.Tensor, n: int, clock: Callable) -> None:
        model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                       on_token=lambda _: clock(ids, None))  # fmt: skip

    read: list[int] = []  # weight bytes of the experts each Experts call ran

    def count(module: Experts, inputs: tuple) -> None:
        chosen = inputs[1]
        per_expert = (
            module.gate_up_proj[0].numel() + module.down_proj[0].numel()
        ) * module.gate_up_proj.element_size()
        read.append(int(chosen.unique().numel()) * per_expert)

    theirs_rates, our_rates = [], []
    for _ in range(args.rounds):  # alternating, so drifts in machine load hit both sides alike
        theirs_rates.append(decode_rate(reference, prompt, args.tokens, theirs_generate))
        our_rates.append(decode_rate(ours, prompt, args.tokens, ours_generate))
    hooks = [m.register_forward_pre_hook(count) for m in ours.modules() if isinstance(m, Experts)]
    with torch.no_grad():
        ours(prompt[:, :1])  # one token's step: what each layer's experts read
    for hook in hooks:
        hook.remove()
    experts = [m for m in ours.modules() if isinstance(m, Experts)]
    expert_bytes = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in experts) * 4
    dense_bytes = sum(p.numel() * p.element_size() for p in ours.parameters()) - expert_bytes
    dense_bytes -= ours.model.embed_tokens.weight.numel() * 4  # a lookup reads one row
    per_expert = expert_bytes // (len(experts) * experts[0].num_experts)
    bound = dense_bytes + len(experts) * ours.config.num_experts_per_tok * per_expert
    total = sum(p.numel() for p in ours.parameters())
    print(f"model: {total / 1e6:.0f}M parameters, {len(experts)} layers of 8 experts, top 2, float32")
    print(f"{'side':12} {'decode tok/s':>13}")
    print(f"{'transformers':12} {statistics.median(theirs_rates):13.2f}")
    print(f"{'specformer':12} {statistics.median(our_rates):13.2f}")
    ratio = statistics.median(o / t for o, t in zip(our_rates, theirs_rates, strict=True))
    print(f"{'ratio':12} {ratio:12.2f}x")
    print(f"weight bytes read per token: {(dense_bytes + sum(read)) / 1e6:.1f} MB; active-parameter bound "
          f"{bound / 1e6:.1f} MB ({(dense_bytes + sum(read)) / bound:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()

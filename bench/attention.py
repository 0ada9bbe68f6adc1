"""Attention backends: forward time of each against SDPA, in one run, on the same model and inputs.

A random small Llama (SmolLM2-135M's shape, 4 layers) over a left-padded batch of 2 x `--length` tokens,
with causal attention and, with `--window`, a Mistral-style sliding window shorter than the sequence.
FlashAttention-2 is measured only where it can run (CUDA, half precision).

    python bench/attention.py [--length 512 --window 128 --repeats 5 --threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def _ms(run, repeats: int) -> float:
    run()  # warm up (and compile, where a backend compiles)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    from specformer.generated.mistral import MistralConfig, MistralForCausalLM
    from specformer.runtime.hardware import is_flash_attn_2_available

    config = MistralConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, sliding_window=args.window, max_position_embeddings=8192,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = MistralForCausalLM(config).to(device, dtype).eval()
    ids = torch.randint(0, config.vocab_size, (2, args.length), device=device)
    mask = torch.ones_like(ids)
    mask[0, : args.length // 4] = 0  # left padding in the first row
    backends = ["sdpa", "eager", "flex_attention"]
    if is_flash_attn_2_available(dtype, device):
        backends.append("flash_attention_2")
    times = {}
    for backend in backends:
        model.set_attention(backend)

        def run() -> None:
            with torch.no_grad():
                model(ids, attention_mask=mask, logits_to_keep=1)

        times[backend] = _ms(run, args.repeats)
        window = f", window {args.window}" if args.window else ""
        print(
            f"{backend:<18} {times[backend]:8.1f} ms   {times['sdpa'] / times[backend]:.2f}x sdpa   "
            f"(2 x {args.length} tokens{window}, {device}, {str(dtype).removeprefix('torch.')})",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Forward-pass time of specformer vs Hugging Face Transformers on the same Llama weights (fp32, CPU).

Both models are measured in the same process, interleaved, so machine noise hits both alike; the figure
that matters is the ratio. Transformers is the reference here, never a dependency of specformer.

    python bench/forward.py [--layers 8 --hidden 768 --seq 256 --batch 2 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    import transformers

    from specformer.generated.llama import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
    )
    reference = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = LlamaForCausalLM.from_pretrained(folder).eval()

    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    models = {"specformer": ours, "transformers": reference}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(ids)
                times[name].append(time.perf_counter() - start)

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(
        f"Llama {args.layers}x{args.hidden} ({params:.0f}M params), batch {args.batch} x seq {args.seq}, fp32, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, value in medians.items():
        print(f"  {name:<13} {value * 1000:8.1f} ms")
    print(
        f"  ratio specformer / transformers = {medians['specformer'] / medians['transformers']:.3f} (lower is faster)"
    )


if __name__ == "__main__":
    main()

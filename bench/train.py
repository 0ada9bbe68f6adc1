"""Training speed: tokens/s of specformer's Trainer vs transformers.Trainer, same model and batches, one run.

A random Llama (`--hidden`, `--layers`), each side's default optimizer (fused AdamW), batches of
`--batch` x `--length` tokens, fp32 on the CPU. Each side trains `--steps` optimizer steps after one warm-up
run of two steps. transformers' rate moves the most between runs: its full-size logits (tokens x vocab) are
fresh memory every step, page-faulted in by glibc's default allocator, which our fused loss never builds.

    python bench/train.py [--hidden 512 --layers 4 --batch 8 --length 256 --steps 10 --threads 2 --compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch_compile=True on both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from specformer.generated.llama import LlamaForCausalLM
    from specformer.runtime.training import Trainer, TrainingArguments

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(
            0, 32000, (args.batch * (args.steps + 2), args.length), generator=generator
        ).tolist()
    ]
    settings = {"per_device_train_batch_size": args.batch, "learning_rate": 1e-4, "logging_steps": 1000,
                "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
                "train_sampling_strategy": "sequential", "dataloader_pin_memory": False,
                "torch_compile": args.compile}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(Path(folder) / "init")

        def ours(steps: int) -> None:
            model = LlamaForCausalLM.from_pretrained(Path(folder) / "init").train()
            run = TrainingArguments(output_dir=f"{folder}/ours", max_steps=steps, plot=False, **settings)
            Trainer(model, run, train_dataset=data).train()

        def theirs(steps: int) -> None:
            model = transformers.LlamaForCausalLM.from_pretrained(Path(folder) / "init").train()
            run = transformers.TrainingArguments(
                output_dir=f"{folder}/hf", max_steps=steps, use_cpu=True, **settings
            )
            transformers.Trainer(model, run, train_dataset=data).train()

        rates = {}
        for name, train in (("specformer", ours), ("transformers", theirs)):
            train(2)  # warm up
            start = time.perf_counter()
            train(args.steps + 2)
            elapsed = time.perf_counter() - start
            start = time.perf_counter()
            train(2)
            elapsed -= time.perf_counter() - start  # fixed costs (loading, set-up) cancel out
            rates[name] = args.steps * args.batch * args.length / elapsed
        print(
            f"Llama {args.layers}x{args.hidden}, batch {args.batch} x {args.length}, fp32"
            f"{', compiled' if args.compile else ''}: specformer "
            f"{rates['specformer']:.0f} tok/s, transformers {rates['transformers']:.0f} tok/s, "
            f"ratio {rates['specformer'] / rates['transformers']:.2f}"
        )


if __name__ == "__main__":
    main()

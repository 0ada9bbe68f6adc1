"""Weight-only quantization: decode tokens/s of int8 and int4 SmolLM2-135M against fp32, in one run.

Every variant decodes greedily from the same prompt with a static cache and the decode step compiled
(where quantized layers are fast: the multiply-and-sum over integer weights fuses into one pass), and
also eagerly. int4 is the GGUF file's own Q4_1 weights, loaded without a float round trip; int8 is the
fp32 model quantized per output channel on load. The tied embedding / lm_head stays fp32 except in
the last variant, which also quantizes the output projection to int8 (groups of 32), as llama.cpp does.

    python bench/quant.py [--prefill 128 --decode 128 --repeats 3 --threads 2 --no-eager]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import decode_rates, median_ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-eager", action="store_true", help="only the compiled static-cache decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from specformer.generated.llama import LlamaForCausalLM
    from specformer.runtime.auto import default_model_path
    from specformer.runtime.generation import generate
    from specformer.runtime.quantization import WeightOnlyConfig, quantize

    path = default_model_path()
    models = {
        "fp32": LlamaForCausalLM.from_gguf(path),
        "int8": quantize(LlamaForCausalLM.from_gguf(path), WeightOnlyConfig(bits=8)),
        "int4 (Q4_1)": LlamaForCausalLM.from_gguf(path, dequantize=False),
        # llama.cpp's own choice: the output projection quantized too (opt-in here, see quantization.py)
        "int4+int8 head": quantize(
            LlamaForCausalLM.from_gguf(path, dequantize=False),
            WeightOnlyConfig(bits=8, group_size=32, modules_to_convert=["lm_head"]),
        ),
    }
    ids = torch.randint(10, 40000, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    modes = {"static+compile": {"cache_implementation": "static", "compile": True}}
    if not args.no_eager:
        modes["eager"] = {}
    for mode, extra in modes.items():
        runs = {}
        for name, model in models.items():

            def run(n: int, model: torch.nn.Module = model, extra: dict = extra) -> object:
                return generate(model, ids, eos_token_id=None, max_new_tokens=n, **extra)

            runs[name] = run
        samples = decode_rates(runs, 1, args.decode, args.repeats)  # rounds alternate between variants
        for name, model in models.items():
            megabytes = model.get_memory_footprint() / 1e6
            rate, ratio = statistics.median(samples[name]), median_ratio(samples[name], samples["fp32"])
            print(
                f"{mode:<15} {name:<12} {rate:7.1f} tok/s   {ratio:.2f}x fp32   ({megabytes:.0f} MB)",
                flush=True,
            )


if __name__ == "__main__":
    main()

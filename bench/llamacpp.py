"""llama.cpp itself as the anchor for CPU inference: the same GGUF file decoded by llama.cpp (through the
`llama-cpp-python` package, a bench-only extra: `pip install llama-cpp-python`, which compiles llama.cpp)
and by specformer, with the same threads, rounds alternating between the two sides. Prints prefill and
decode tokens/s per storage type and specformer's ratio to llama.cpp (above 1: faster).

Files: SmolLM2-135M-Instruct as shipped (Q4_1), and copies written here in other types with the `gguf`
package's own quantizers (Q8_0, Q4_0, F32, BF16) or, for the K-quant mixes Q4_K_M and Q5_K_M (which gguf
cannot write), with llama.cpp's own quantizer from the F32 copy.

    python bench/llamacpp.py --threads 2 --types Q4_1 Q8_0 Q4_0 Q4_K_M F32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def requantize(source: Path, kind: str, target: Path) -> Path:
    """The same model in another storage type: 2-D weights dequantised and quantised again as `kind`."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, entry in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = entry.types[-1] if entry.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, entry.contents(), entry.types[0], sub_type=sub)
    qtype = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.ndim == 2 and data.shape[-1] % block == 0 and kind not in ("F32",):
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def llamacpp_quantize(source: Path, kind: str, target: Path) -> Path:
    """`kind` (Q4_K_M) written by llama.cpp's quantizer (llama-quantize) from a float file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {source} to {kind}")
    return target


def llamacpp_round(path: Path, prompt: list[int], tokens: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, tokens / decode


def specformer_round(model: torch.nn.Module, prompt: list[int], tokens: int) -> tuple[float, float]:
    """generate(), as users decode: the prompt in one forward, then one-token steps (through the fused
    C++ step where the model has one); the first token's arrival splits prefill from decoding."""
    arrivals: list[float] = []
    start = time.perf_counter()
    model.generate(
        torch.tensor([prompt]),
        max_new_tokens=tokens + 1,
        do_sample=False,
        eos_token_id=None,
        on_token=lambda _: arrivals.append(time.perf_counter()),
    )
    return len(prompt) / (arrivals[0] - start), tokens / (arrivals[-1] - arrivals[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per round")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--types", nargs="+", default=["Q4_1", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "F32", "BF16"]
    )
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("bench/llamacpp.py needs llama.cpp: pip install llama-cpp-python")
    from specformer.generated.llama import LlamaForCausalLM
    from specformer.runtime.auto import default_model_path

    torch.set_num_threads(args.threads)
    shipped = Path(default_model_path())
    prompt = list(np.random.default_rng(0).integers(100, 20000, args.prompt_tokens))
    prompt = [int(t) for t in prompt]
    folder = Path(tempfile.mkdtemp(prefix="specformer-llamacpp-"))
    print(f"{'type':6} {'side':11} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for kind in args.types:
        path = folder / f"smollm2.{kind}.gguf"
        if kind == "Q4_1":
            path = shipped
        elif kind.endswith(("_K_M", "_K_S")):
            f32 = folder / "smollm2.F32.gguf"
            path = llamacpp_quantize(f32 if f32.exists() else requantize(shipped, "F32", f32), kind, path)
        else:
            path = requantize(shipped, kind, path)
        # float files run in their own dtype (a BF16 file as bfloat16); quantized ones stay packed
        floats = {"F32": torch.float32, "F16": torch.float32, "BF16": torch.bfloat16}
        model = LlamaForCausalLM.from_gguf(path, dtype=floats.get(kind)).eval()
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternating, so drifts in machine load hit both sides alike
            theirs.append(llamacpp_round(path, prompt, args.tokens, args.threads))
            ours.append(specformer_round(model, prompt, args.tokens))
        for side, runs in (("llama.cpp", theirs), ("specformer", ours)):
            prefill = statistics.median(r[0] for r in runs)
            decode = statistics.median(r[1] for r in runs)
            print(f"{kind:6} {side:11} {prefill:14.1f} {decode:13.1f}")
        ratio_prefill = statistics.median(o[0] / t[0] for o, t in zip(ours, theirs, strict=True))
        ratio_decode = statistics.median(o[1] / t[1] for o, t in zip(ours, theirs, strict=True))
        print(f"{kind:6} {'ratio':11} {ratio_prefill:13.2f}x {ratio_decode:12.2f}x")


if __name__ == "__main__":
    main()

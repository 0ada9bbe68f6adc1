"""Loading a ~500 MB fp32 checkpoint: peak memory and time, specformer vs Hugging Face Transformers.

Each measurement runs in a fresh process, so peak RSS (ru_maxrss) belongs to that load alone; the import
cost is measured first and subtracted. "+forward" runs one forward pass after loading, which touches every
weight (specformer's weights are memory-mapped: their pages are read when first used).

    python bench/load.py [--layers 11 --hidden 768 --vocab 16000 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
which, folder = sys.argv[1], sys.argv[2]


def peak_kib():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])


def reset_peak():  # Linux: writing 5 to clear_refs resets the high-water mark to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

import torch
if which == "specformer":
    from specformer.generated.llama import LlamaForCausalLM
else:
    from transformers import LlamaForCausalLM
torch.set_num_threads(2)
reset_peak()
base = peak_kib()
start = time.perf_counter()
model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
seconds = time.perf_counter() - start
after_load = peak_kib()
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
after_forward = peak_kib()
print(json.dumps({"seconds": seconds, "load_kib": after_load - base, "forward_kib": after_forward - base}))
"""


def measure(which: str, folder: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        results: dict[str, list[dict[str, float]]] = {"specformer": [], "transformers": []}
        for _ in range(args.repeats):
            for which in results:  # interleaved, so machine noise hits both alike
                results[which].append(measure(which, folder))

    mib = size / 2**20
    print(f"checkpoint: {mib:.0f} MiB fp32 safetensors, median of {args.repeats} fresh processes each")
    summary = {}
    for which, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        load = statistics.median(r["load_kib"] for r in runs) / 1024
        forward = statistics.median(r["forward_kib"] for r in runs) / 1024
        summary[which] = (seconds, load, forward)
        print(
            f"  {which:<13} load {seconds:6.2f} s   peak RSS growth: {load:6.0f} MiB after load "
            f"({load / mib:.2f}x), {forward:6.0f} MiB after a forward ({forward / mib:.2f}x)"
        )
    ours, theirs = summary["specformer"], summary["transformers"]
    print(
        f"  ratio specformer / transformers: load time {ours[0] / theirs[0]:.2f}, "
        f"peak RSS after forward {ours[2] / max(theirs[2], 1):.2f}"
    )


if __name__ == "__main__":
    main()

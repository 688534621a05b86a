"""Host cost of one attention launch under MAAS_ATTENTION_TMA off / auto / on (direct launches, bf16); run 26.

On a CUDA machine, from the repository root: ``PYTHONPATH=. python bench/results/gpu/<this file>``.
"""
import cProfile
import importlib
import io
import os
import pstats
import time

import torch

import kernels

A = importlib.import_module("kernels.attention")

torch.manual_seed(0)
for b, h, s, d in ((128, 16, 128, 128), (128, 32, 128, 64)):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for setting in ("off", "auto", "on"):
        os.environ[A.TMA_ENV_VAR] = setting
        for _ in range(30):
            kernels.attention(q, k, v)
        torch.cuda.synchronize()
        n = 300
        t = time.perf_counter()
        for _ in range(n):
            kernels.attention(q, k, v)
        host = (time.perf_counter() - t) / n * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            kernels.attention(q, k, v)
        end.record()
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / n
        chosen = [c for key, c in A._KERNEL_CHOICE.fastest.items() if key[2] == d]
        desc_t = time.perf_counter()
        for _ in range(n):
            A._tma_descriptors(q, k, v)
        desc = (time.perf_counter() - desc_t) / n * 1e3
        print(f"B{b} H{h} S{s} D{d} {setting:>4}: host issue {host:.4f} ms/call, wall {wall:.4f}, "
              f"events {gpu:.4f}, _tma_descriptors {desc:.4f} ms, chosen {chosen}", flush=True)
        if setting != "on":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                kernels.attention(q, k, v)
            prof.disable()
            torch.cuda.synchronize()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
            print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()), flush=True)

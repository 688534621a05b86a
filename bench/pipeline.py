"""Pipeline benchmark: the Kafka worker against a plain consume -> produce loop, side by side, in one run.

It starts its own local stack (Tansu broker + moto on loopback; a fresh stack for each group of phases, since
the broker's memory store never frees) and runs every phase on it:

1. ceiling   a plain aiokafka consume -> produce loop (one same-size record out per record in, commit per poll)
2. overhead  the real worker (`KafkaWorker` + `InferenceEngine` + `ModelCache` + `ModelRepository`) with a trivial
             model (mlp [4, 4], identity weights, max_batch_size 256) on JSON requests, as a share of (1)
3. batching  the MNIST MLP on JSON requests: dynamic batching (max_batch_size 64, max_queue_delay 5 ms) vs one
             request at a time (max_batch_size 1), both through the worker; plus the issue-7 baseline, a plain
             per-message JSON inference loop (stdlib json, the model on one row, no batching)
4. binary    the same MNIST phase in the binary tensor extension (inputs and outputs), against (3)'s plain JSON loop
             and against the raw consume -> produce loop on the same binary records
5. latency   p50 / p99 end-to-end latency (produce call -> result read, same process, same clock) at 25 / 50 /
             90 % of (3)'s measured peak, with a fixed-rate producer, for max_queue_delay 1 / 5 / 20 ms

Every worker and loop runs in its own child process (`bench/_pipeline_child.py`); requests are pre-encoded and
pre-produced before it starts. Drain throughput = requests / (time the child got its partitions -> time the
broker acknowledged its last answer, acks=all); "steady" = (requests - 1) / (last - first answer CreateTime).

The machine is shared and noisy (the raw loop alone has moved by 1.6x between runs), so each group of phases runs
`--rounds` times (default 3), interleaved (raw, worker, raw, worker, ...) over the same backlog with a fresh
consumer group each time: a phase reports its median rate and its range, and a ratio is the median of the
per-round ratios of phases that ran next to each other.

Usage: ``python bench/pipeline.py [--quick] [--rounds K] [--requests N] [--seconds S] [--no-plot]``. Writes
``bench/results/pipeline.json`` and, when matplotlib is installed, ``bench/results/pipeline_latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0] and this very file would shadow the `pipeline` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from bench._stack import (  # noqa: E402
    PARTITIONS,
    PRODUCER_BATCH_BYTES,
    BenchStack,
    Child,
    create_topics,
    produce_all,
    read_all,
    time_span,
)
from models.artifact import BatchingPolicy, ModelConfig, TensorSpec  # noqa: E402
from models.examples import MNIST_MLP, mnist_mlp_config, synthetic_digits, train_mnist_mlp  # noqa: E402
from models.repository import ModelRepository  # noqa: E402
from pipeline.codec import decode_response, encode_request, header_map  # noqa: E402
from pipeline.settings import Settings, Topics  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TRIVIAL = "trivial"
DELAYS_MS = (1.0, 5.0, 20.0)
# The worker's consumer waits at most MAAS_KAFKA_FETCH_MAX_WAIT_MS for a fetch (Tansu holds a fetch that long
# even when records arrive meanwhile, so every hop costs up to that wait).
WORKER_FETCH_MAX_WAIT_MS = Settings().kafka_fetch_max_wait_ms
LOAD_FRACTIONS = (0.25, 0.5, 0.9)
TARGETS = {
    "overhead": 0.70,  # worker with a trivial model / raw consume->produce
    "batching_gain": 10.0,  # MNIST JSON, batch 64 / batch 1, both through the worker
    "binary_vs_json_loop": 3.0,  # worker, binary requests / plain per-message JSON loop
    "binary_vs_raw": 0.70,  # worker, binary requests / raw consume->produce on the same records
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------------------------------------

def trivial_config() -> ModelConfig:
    return ModelConfig(
        architecture="mlp",
        params={"layers": [4, 4], "activations": ["none"], "head": "none"},
        inputs=(TensorSpec("input", "FP32", (-1, 4)),),
        outputs=(TensorSpec("output", "FP32", (-1, 4)),),
        batching=BatchingPolicy(max_batch_size=256, max_queue_delay_ms=2.0),
        description="identity-like 4 -> 4 linear layer: the cost of the pipeline, not of a model",
    )


def build_repositories(root: Path) -> dict[str, Path]:
    """One repository per batching setting, each holding `mnist_mlp` v1 with the same trained weights."""
    weights = train_mnist_mlp()
    repos: dict[str, Path] = {}
    settings = {"b64_d5": (64, 5.0), "b1": (1, 0.0), **{f"b64_d{d:g}": (64, d) for d in DELAYS_MS}}
    for name, (size, delay) in settings.items():
        repos[name] = root / name
        repo = ModelRepository(repos[name])
        if not repo.versions(MNIST_MLP):
            repo.publish(MNIST_MLP, mnist_mlp_config(max_batch_size=size, max_queue_delay_ms=delay), weights)
    repos[TRIVIAL] = root / TRIVIAL
    ModelRepository(repos[TRIVIAL]).publish(
        TRIVIAL, trivial_config(), {"layers.0.weight": torch.eye(4), "layers.0.bias": torch.zeros(4)})
    return repos


# -- requests ----------------------------------------------------------------------------------------------

def encode_many(prefix: str, model: str, rows: np.ndarray, binary: bool = False
                ) -> tuple[list[bytes], list[bytes], list[list[tuple[str, bytes]]]]:
    values, keys, headers = [], [], []
    for i, row in enumerate(rows):
        request_id = f"{prefix}-{i:07d}"
        # binary requests ask for binary outputs, as `maas submit --binary` (`pipeline.client.as_binary`) does
        framed = encode_request(request_id, model, {"input": row[None, :]}, binary=binary, binary_outputs=binary)
        values.append(framed.body)
        keys.append(request_id.encode())
        headers.append(framed.kafka_headers())
    return values, keys, headers


# -- phases ------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:6]
        self.repos = build_repositories(workdir / "repos")
        self.stack = BenchStack().start()
        self.runs: dict[str, list[dict[str, Any]]] = {}  # every round of each phase
        self.phases: dict[str, dict[str, Any]] = {}  # the median round of each phase, with every round's rate
        self.latency: list[dict[str, Any]] = []
        self.broker_rss: dict[str, float | None] = {}

    def topic(self, *parts: str) -> str:
        return ".".join(["b" + self.run_id, *parts])

    def worker_env(self, name: str, requests: str, repo: Path, prefix: str) -> dict[str, str]:
        settings = Settings(
            kafka_bootstrap_servers=self.stack.bootstrap, aws_endpoint_url=self.stack.endpoint_url,
            model_repository=str(repo), topics=Topics(requests, *(self.topic(prefix, t) for t in
                                                                  ("results", "metrics", "dlq"))),
            topic_partitions=PARTITIONS, consumer_group=self.topic(prefix, "group"),
        )
        return {**settings.to_env(), "MAAS_WORKER_ID": f"bench-{name}"}

    async def restart_stack(self, label: str) -> None:
        self.broker_rss[label] = self.stack.broker_rss_mb()
        log(f"broker RSS before restart ({label}): {self.broker_rss[label]:.0f} MB; starting a fresh stack")
        self.stack.restart()

    async def backlog(self, name: str, values: list[bytes], keys: list[bytes],
                      headers: list[list[tuple[str, bytes]]] | None) -> str:
        topic = self.topic(name, "requests")
        await create_topics(self.stack.bootstrap, [topic])
        seconds = await produce_all(self.stack.bootstrap, topic, values, keys, headers)
        mb = sum(map(len, values)) / 1e6
        log(f"pre-produced {len(values)} requests ({mb:.0f} MB, {len(values[0])} B each) to {topic} in "
            f"{seconds:.1f}s ({len(values) / seconds:,.0f}/s)")
        return topic

    async def rounds(self, phases: list[dict[str, Any]]) -> None:
        """Run the phases (`drain` keyword arguments) one after another, `--rounds` times over."""
        for round_ in range(self.args.rounds):
            for phase in phases:
                await self.drain(**phase, round_=round_)
        for phase in phases:
            runs = self.runs[phase["name"]]
            median = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
            self.phases[phase["name"]] = {**median, "rates": [r["rate"] for r in runs]}

    async def drain(self, name: str, mode: str, requests: str, n: int, *, round_: int = 0, repo: Path | None = None,
                    model: str = MNIST_MLP, truth: np.ndarray | None = None, description: str = "",
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one child over a pre-produced backlog of `n` requests; throughput from assignment to last result."""
        prefix = f"{name}{round_}"
        results = self.topic(prefix, "results")
        await create_topics(self.stack.bootstrap, [results, self.topic(prefix, "metrics"), self.topic(prefix, "dlq")])
        if mode == "worker":
            assert repo is not None
            cfg: dict[str, Any] = {"model": model, "n": n, **(extra or {})}
            child = Child("worker", cfg, self.worker_env(name, requests, repo, prefix))
        else:
            cfg = {"bootstrap": self.stack.bootstrap, "requests": requests, "results": results,
                   "group": self.topic(prefix, "group"), "n": n, "repo": str(repo) if repo else None, "model": model}
            child = Child(mode, cfg)
        spy = None
        try:
            assigned = (await child.wait_event("assigned", timeout=120))["t"]
            if self.args.profile:
                spy = start_pyspy(child.proc.pid, RESULTS / f"pipeline_profile_{name}.txt")
            timeout = 60 + n / 50
            if mode == "worker":
                finished = (await child.wait_event("answered", timeout))["t"]
                stop_pyspy(spy)
                done = await child.finish()
            else:
                done = await child.wait_event("done", timeout)
                finished = done["t_last_ack"]
        finally:
            stop_pyspy(spy)
            child.kill()
        if spy is not None:
            summarize_pyspy(RESULTS / f"pipeline_profile_{name}.txt", name)
        first_ms, last_ms = await time_span(self.stack.bootstrap, results)
        seconds = finished - assigned
        out: dict[str, Any] = {
            "phase": name, "mode": mode, "description": description, "requests": n, "seconds": seconds,
            "rate": n / seconds,
            "steady_rate": (n - 1) / ((last_ms - first_ms) / 1000) if last_ms > first_ms else math.nan,
            "first_answer_after_s": first_ms / 1000 - assigned, "child": done,
        }
        if mode == "worker":  # the worker's per-batch metrics records: how full the batches were
            batches = [orjson.loads(r.value) for r in
                       await read_all(self.stack.bootstrap, self.topic(prefix, "metrics"), 0, quiet_s=0.5)]
            if batches:
                out["batches"] = len(batches)
                out["mean_batch"] = sum(b["batch_size"] for b in batches) / len(batches)
                out["compute_ms_per_batch"] = sum(b["compute_ms"] for b in batches) / len(batches)
                out["compute_s_total"] = sum(b["compute_ms"] for b in batches) / 1000
        if mode != "raw":  # small answers: read them back and check them
            records = await read_all(self.stack.bootstrap, results, n)
            dlq = await read_all(self.stack.bootstrap, self.topic(prefix, "dlq"), 0)
            out["results"] = len(records)
            out["errors"] = sum(1 for r in records if b'"error"' in r.value) + len(dlq)
            out["duplicates"] = len(records) - len({r.key for r in records})
            if truth is not None:
                right = 0
                for r in records:
                    body = decode_response(r.value, header_map(r.headers))
                    if "outputs" in body:
                        classes = {o["name"]: o["data"] for o in body["outputs"]}["class"]
                        right += int(classes[0] == truth[int(body["id"].rsplit("-", 1)[1])])
                out["accuracy"] = right / max(1, len(records))
        self.runs.setdefault(name, []).append(out)
        log(f"{name} (round {round_ + 1}): {out['rate']:,.0f} req/s over {seconds:.2f}s "
            f"(steady {out['steady_rate']:,.0f}/s)" + (f", errors {out['errors']}" if "errors" in out else ""))
        return out

    # -- latency -------------------------------------------------------------------------------------------

    async def latency_setting(self, delay_ms: float, rates: list[float], seconds: float,
                              values: list[bytes], keys: list[bytes], warmup: int) -> None:
        name = f"lat_d{delay_ms:g}"
        requests = self.topic(name, "requests")
        results = self.topic(name, "results")
        await create_topics(self.stack.bootstrap, [requests, results, self.topic(name, "metrics"),
                                                   self.topic(name, "dlq")])
        child = Child("worker", {"model": MNIST_MLP},
                      self.worker_env(name, requests, self.repos[f"b64_d{delay_ms:g}"], name))
        sent = np.full(len(values), np.nan)
        received = np.full(len(values), np.nan)
        collector = AIOKafkaConsumer(bootstrap_servers=self.stack.bootstrap, group_id=None, enable_auto_commit=False,
                                     fetch_max_wait_ms=5, check_crcs=False)
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.bootstrap, acks="all", linger_ms=1,
                                    max_batch_size=PRODUCER_BATCH_BYTES)
        await collector.start()
        await producer.start()

        async def collect() -> None:
            while True:
                fetched = await collector.getmany(timeout_ms=100)
                now = time.perf_counter()
                for records in fetched.values():
                    for r in records:
                        j = int(r.key[4:])
                        if math.isnan(received[j]):
                            received[j] = now

        async def wait_answers(lo: int, hi: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while np.isnan(received[lo:hi]).any() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        collecting = None
        try:
            tps = [TopicPartition(results, p) for p in range(PARTITIONS)]
            collector.assign(tps)
            await collector.seek_to_beginning(*tps)
            collecting = asyncio.create_task(collect())
            await child.wait_event("assigned", timeout=120)
            for j in range(warmup):  # the first answers prove the group is joined and the model warm
                sent[j] = time.perf_counter()
                await producer.send(requests, values[j], key=keys[j])
            await wait_answers(0, warmup, 60)
            base = warmup
            for fraction, rate in zip(LOAD_FRACTIONS, rates, strict=True):
                count = int(rate * seconds)
                futures = []
                started = time.perf_counter()
                i = 0
                while i < count:
                    due = min(count, int((time.perf_counter() - started) * rate) + 1)
                    while i < due:
                        sent[base + i] = time.perf_counter()
                        futures.append(await producer.send(requests, values[base + i], key=keys[base + i]))
                        i += 1
                    await asyncio.sleep(0.001)
                offered_s = time.perf_counter() - started
                await asyncio.gather(*futures)
                await wait_answers(base, base + count, max(15.0, 3 * seconds))
                lat = (received[base:base + count] - sent[base:base + count]) * 1000
                answered = lat[~np.isnan(lat)]
                span = np.nanmax(received[base:base + count]) - sent[base]
                point = {
                    "max_queue_delay_ms": delay_ms,
                    "worker_fetch_max_wait_ms": WORKER_FETCH_MAX_WAIT_MS, "load_fraction": fraction,
                    "target_rate": rate,
                    "offered_rate": count / offered_s, "achieved_rate": len(answered) / span,
                    "requests": count, "answered": len(answered),
                    "p50_ms": float(np.percentile(answered, 50)), "p90_ms": float(np.percentile(answered, 90)),
                    "p99_ms": float(np.percentile(answered, 99)), "max_ms": float(answered.max()),
                }
                self.latency.append(point)
                log(f"latency {name} @ {fraction:.0%} ({rate:,.0f}/s): p50 {point['p50_ms']:.1f} ms, "
                    f"p99 {point['p99_ms']:.1f} ms, achieved {point['achieved_rate']:,.0f}/s")
                base += count
        finally:
            if collecting is not None:
                collecting.cancel()
            await producer.stop()
            await collector.stop()
            await child.finish()
            child.kill()


# -- profiling (--profile) ---------------------------------------------------------------------------------

def start_pyspy(pid: int, path: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        log("py-spy is not installed (pip install py-spy): no profile")
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking",
                             "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_pyspy(spy: subprocess.Popen | None) -> None:
    if spy is not None and spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()


# Where the worker's event-loop thread spends its samples: the first category whose marker appears in a stack.
PROFILE_CATEGORIES = [
    ("decode (decode_request / parse_request)", ("decode_request",)),
    ("encode answer (encode_response)", ("encode_response", "_externalize")),
    ("claim-check input resolve", ("resolved_inputs",)),
    ("engine.infer: model_config (to_thread) + validate + submit", ("infer (pipeline/engine.py",)),
    ("engine: batch collect / run (event loop side)", ("_collect (pipeline/batcher.py", "_run_batch", "_run_group")),
    ("model compute (executor thread)", ("infer (models/loaded.py",)),
    ("produce (aiokafka producer, send_and_wait)", ("_send_answer", "aiokafka/producer")),
    ("consume (aiokafka fetcher / getmany)", ("aiokafka/consumer",)),
    ("commit", ("_commit",)),
    ("metrics / batch records", ("pipeline/batch_metrics.py", "prometheus_client")),
    ("asyncio / selectors / other", ("",)),
]


def summarize_pyspy(path: Path, name: str) -> None:
    if not path.exists():
        return
    totals: dict[str, int] = {}
    all_samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        all_samples += samples
        for label, markers in PROFILE_CATEGORIES:
            if any(m in stack for m in markers):
                totals[label] = totals.get(label, 0) + samples
                break
    log(f"py-spy profile of {name} ({all_samples} samples at 250 Hz, CPU only): {path}")
    for label, samples in sorted(totals.items(), key=lambda kv: -kv[1]):
        log(f"  {samples / max(1, all_samples):6.1%}  {label}")


# -- the run -----------------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="maas-bench-"))
    log(f"training the example MNIST MLP and publishing the benchmark repositories under {workdir}")
    bench = Bench(args, workdir)
    n, nt = args.requests, args.trivial_requests
    try:
        # 1 + 2: ceiling and overhead on tiny JSON requests
        trivial_rows = np.random.default_rng(1).random((nt, 4), dtype=np.float32)
        values, keys, headers = encode_many("t", TRIVIAL, trivial_rows)
        topic = await bench.backlog("trivial", values, keys, headers)
        await bench.rounds([
            dict(name="raw_trivial", mode="raw", requests=topic, n=nt, description="raw consume->produce, trivial "
                 "JSON records"),
            dict(name="worker_trivial", mode="worker", requests=topic, n=nt, repo=bench.repos[TRIVIAL], model=TRIVIAL,
                 description="worker, trivial model, JSON"),
        ])

        # 3: MNIST JSON: batching gain and the plain per-message JSON loop
        await bench.restart_stack("after trivial")
        images, labels = synthetic_digits(n, seed=11)
        values, keys, headers = encode_many("m", MNIST_MLP, images)
        topic = await bench.backlog("mnist_json", values, keys, headers)
        await bench.rounds([
            dict(name="raw_mnist_json", mode="raw", requests=topic, n=n, description="raw consume->produce, MNIST "
                 "JSON records"),
            dict(name="worker_b64_json", mode="worker", requests=topic, n=n, repo=bench.repos["b64_d5"], truth=labels,
                 description="worker, MNIST MLP, batch 64 / 5 ms, JSON"),
            dict(name="worker_b1_json", mode="worker", requests=topic, n=n, repo=bench.repos["b1"], truth=labels,
                 description="worker, MNIST MLP, batch 1, JSON"),
            dict(name="json_loop", mode="jsonloop", requests=topic, n=n, repo=bench.repos["b64_d5"], truth=labels,
                 description="plain per-message JSON loop (stdlib json, 1 row)"),
        ])

        # 4: MNIST binary tensor extension
        await bench.restart_stack("after MNIST JSON")
        nb = args.binary_requests
        images, labels = synthetic_digits(nb, seed=11)
        values, keys, headers = encode_many("m", MNIST_MLP, images, binary=True)
        topic = await bench.backlog("mnist_bin", values, keys, headers)
        await bench.rounds([
            dict(name="raw_mnist_bin", mode="raw", requests=topic, n=nb, description="raw consume->produce, MNIST "
                 "binary records"),
            dict(name="worker_b64_bin", mode="worker", requests=topic, n=nb, repo=bench.repos["b64_d5"], truth=labels,
                 description="worker, MNIST MLP, batch 64 / 5 ms, binary in and out"),
        ])
        del values, keys, headers

        # 5: latency at fixed rates, relative to the JSON peak of (3)
        if not args.skip_latency:
            await bench.restart_stack("after MNIST binary")
            peak = bench.phases["worker_b64_json"]["rate"]
            rates = [f * peak for f in LOAD_FRACTIONS]
            warmup = 64
            total = warmup + sum(int(r * args.seconds) for r in rates)
            lat_images, _ = synthetic_digits(total, seed=12)
            lat_values, lat_keys, _ = encode_many("lat", MNIST_MLP, lat_images)
            for delay in DELAYS_MS:
                await bench.latency_setting(delay, rates, args.seconds, lat_values, lat_keys, warmup)
        bench.broker_rss["end"] = bench.stack.broker_rss_mb()
    finally:
        bench.stack.stop()
    return {
        "meta": {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
                       "(the 2-core shared CPU machine unless stated)",
            "python": platform.python_version(), "torch": torch.__version__, "args": vars(args),
            "wall_seconds": time.perf_counter() - started, "broker_rss_mb": bench.broker_rss,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "phases": bench.phases,
        "latency": bench.latency,
    }


# -- reporting ---------------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    if not cell or not (cell[0].isdigit() or cell[0] in "-+>"):
        return False
    return cell.endswith("x") or not cell[-1].isalpha()


RATIOS = [  # (key, definition, numerator phase, denominator phase, target)
    ("overhead", "worker trivial / raw trivial", "worker_trivial", "raw_trivial", TARGETS["overhead"]),
    ("batching_gain", "worker b64 JSON / worker b1 JSON", "worker_b64_json", "worker_b1_json",
     TARGETS["batching_gain"]),
    ("json_vs_json_loop", "worker b64 JSON / plain JSON loop", "worker_b64_json", "json_loop", None),
    ("json_vs_raw", "worker b64 JSON / raw MNIST JSON", "worker_b64_json", "raw_mnist_json", None),
    ("binary_vs_json_loop", "worker b64 binary / plain JSON loop", "worker_b64_bin", "json_loop",
     TARGETS["binary_vs_json_loop"]),
    ("binary_vs_raw", "worker b64 binary / raw MNIST binary", "worker_b64_bin", "raw_mnist_bin",
     TARGETS["binary_vs_raw"]),
]


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio per round (phases that ran side by side), its median and range."""
    out = []
    phases = report["phases"]
    for key, definition, top, bottom, target in RATIOS:
        per_round = [a / b for a, b in zip(phases[top]["rates"], phases[bottom]["rates"], strict=True)]
        out.append({"key": key, "definition": definition, "value": float(np.median(per_round)),
                    "rounds": per_round, "target": target})
    return out


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 2 else f"{value:.0%}"


def _wanted(target: float) -> str:
    return f">= {target:.0%}" if target < 2 else f">= {target:g}x"


def print_report(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(f"\nPipeline benchmark, {meta['date']}: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}")
    print("Throughput: pre-produced backlog drained by one child process (requests / s, assignment -> last answer; "
          f"median of {meta['args']['rounds']} interleaved rounds, the other columns from that round)")
    rows = []
    for v in report["phases"].values():
        rows.append([v["phase"], v["description"], v["requests"], f"{v['seconds']:.2f}", f"{v['rate']:,.0f}",
                     f"{min(v['rates']):,.0f}-{max(v['rates']):,.0f}", f"{v['steady_rate']:,.0f}",
                     f"{v['first_answer_after_s']:.2f}",
                     f"{v['mean_batch']:.1f}" if "mean_batch" in v else "-",
                     f"{v['compute_s_total']:.2f}" if "compute_s_total" in v else "-", v.get("errors", "-"),
                     f"{v['accuracy']:.3f}" if "accuracy" in v else "-"])
    print(table(["phase", "what", "requests", "s", "req/s", "range", "steady/s", "1st answer s", "mean batch",
                 "model s", "errors", "accuracy"], rows))
    print("(s: assignment -> last answer acked; steady: between first and last answer; 1st answer s: assignment -> "
          "first answer; mean batch / model s: from the worker's per-batch metrics records)")
    print("\nRatios (same run, side by side: the median of the per-round ratios)")
    rows = [[r["key"], r["definition"], _ratio(r["value"]), " ".join(_ratio(v) for v in r["rounds"]),
             "-" if r["target"] is None else _wanted(r["target"]),
             "-" if r["target"] is None else ("yes" if r["value"] >= r["target"] else "NO")]
            for r in report["ratios"]]
    print(table(["ratio", "definition", "value", "rounds", "target", "met"], rows))
    if report["latency"]:
        print("\nLatency: fixed-rate JSON producer, produce call -> result read (ms); MNIST MLP, max_batch_size 64")
        rows = [[f"{p['max_queue_delay_ms']:g} ms",
                 f"{p['worker_fetch_max_wait_ms']} ms",
                 f"{p['load_fraction']:.0%}", f"{p['target_rate']:,.0f}",
                 f"{p['achieved_rate']:,.0f}", f"{p['p50_ms']:.1f}", f"{p['p90_ms']:.1f}", f"{p['p99_ms']:.1f}",
                 f"{p['answered']}/{p['requests']}"] for p in report["latency"]]
        print(table(["max_queue_delay", "worker fetch_max_wait", "load", "target/s", "achieved/s", "p50", "p90",
                     "p99", "answered"], rows))
    print("\nSummary")
    rows = [[r["key"], r["definition"], _wanted(r["target"]), _ratio(r["value"]),
             "yes" if r["value"] >= r["target"] else "NO"] for r in report["ratios"] if r["target"] is not None]
    print(table(["target", "definition", "wanted", "measured", "met"], rows))
    print(f"\nwall time {meta['wall_seconds']:.0f}s; broker RSS (MB) {meta['broker_rss_mb']}")


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(8, 6))
    for delay in DELAYS_MS:
        points = sorted((p for p in report["latency"] if p["max_queue_delay_ms"] == delay),
                        key=lambda p: p["achieved_rate"])
        if not points:
            continue
        label = f"delay {delay:g} ms, fetch wait {WORKER_FETCH_MAX_WAIT_MS} ms"
        x = [p["achieved_rate"] for p in points]
        (line,) = ax.plot(x, [p["p50_ms"] for p in points], marker="o", label=f"p50, {label}")
        ax.plot(x, [p["p99_ms"] for p in points], marker="s", linestyle="--", color=line.get_color(),
                label=f"p99, {label}")
    peak = report["phases"].get("worker_b64_json", {}).get("rate")
    if peak:
        ax.axvline(peak, color="grey", linestyle=":", label=f"drain peak {peak:,.0f}/s")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (answered requests / s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("maas Kafka worker, MNIST MLP, JSON requests, max_batch_size 64")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts and shorter latency points (~2 min)")
    parser.add_argument("--requests", type=int, help="MNIST JSON requests per phase (default 20000; quick 4000)")
    # The trivial and binary phases drain 20,000 requests in about a second: three times as many average out more
    # of the machine's noise.
    parser.add_argument("--trivial-requests", type=int, help="trivial-model requests (default: 3 x --requests)")
    parser.add_argument("--binary-requests", type=int, help="binary MNIST requests (default: 3 x --requests)")
    parser.add_argument("--seconds", type=float, help="seconds per latency point (default 6; quick 3)")
    parser.add_argument("--skip-latency", action="store_true", help="throughput phases only")
    parser.add_argument("--profile", action="store_true",
                        help="sample the workers with py-spy (slower!) into bench/results/pipeline_profile_*")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each group of phases")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "pipeline.json")
    args = parser.parse_args()
    args.requests = args.requests or (4000 if args.quick else 20000)
    args.trivial_requests = args.trivial_requests or 3 * args.requests
    args.binary_requests = args.binary_requests or 3 * args.requests
    args.seconds = args.seconds or (3.0 if args.quick else 6.0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args))
    report["ratios"] = ratios(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report["meta"]["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    if report["latency"] and not args.no_plot:
        path = plot(report, RESULTS / "pipeline_latency.png")
        if path:
            print(f"plot: {path.relative_to(ROOT)}")
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()

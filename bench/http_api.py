"""HTTP API throughput (JSON vs binary tensors, N concurrent connections, vs a plain per-request server), and
a batch-job benchmark on the local stack (lines/s and peak RSS).

    .venv/bin/python bench/http_api.py                          # HTTP table
    .venv/bin/python bench/http_api.py --concurrency 1,16,64 --requests 3000
    .venv/bin/python bench/http_api.py --batch-job 100000       # maas batch worker + maas batch submit

The servers run as child processes (`maas serve`, and `--plain-server`: aiohttp that parses JSON with the
stdlib and runs the model once per request, no batching), so the client's CPU is not the server's; on a
small machine the client still competes for the same cores, which the table says.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import orjson

MODEL = "mnist_mlp"


# -- the plain baseline server --------------------------------------------------------------------------

def plain_server(port: int, repository: str) -> None:
    """aiohttp, stdlib JSON, one model call per request on the event loop: what a naive server does."""
    from aiohttp import web

    from models.repository import ModelRepository

    repo = ModelRepository(repository)
    model = repo.load(MODEL, 1)
    model.warmup()

    async def infer(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        tensor = body["inputs"][0]
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        outputs = model.infer({"input": array})
        return web.json_response({
            "id": body.get("id", ""), "model_name": MODEL, "model_version": "1",
            "outputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32" if v.dtype == np.float32 else "INT64",
                         "data": v.reshape(-1).tolist()} for k, v in outputs.items()],
        })

    app = web.Application(client_max_size=8 << 20)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    app.router.add_get("/v2/health/ready", lambda r: web.json_response({"ready": True}))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- helpers ------------------------------------------------------------------------------------------

def free_port() -> int:
    from infra.stack import free_port as pick

    return pick()


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def wait_ready(url: str, timeout: float = 60.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def payloads(count: int, binary: bool) -> list[tuple[bytes, dict[str, str]]]:
    from models.examples import synthetic_digits
    from pipeline.codec import encode_request

    images, _ = synthetic_digits(count, seed=1)
    out = []
    for i in range(count):
        framed = encode_request(f"b{i}", MODEL, {"input": images[i:i + 1]}, binary=binary, binary_outputs=binary)
        out.append((framed.body, dict(framed.headers)))
    return out


async def load(url: str, bodies: list[tuple[bytes, dict[str, str]]], connections: int, total: int,
               path: str = f"/v2/models/{MODEL}/versions/1/infer") -> tuple[float, np.ndarray, int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    next_index = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def client() -> None:
            nonlocal next_index, errors
            while next_index < total:
                body, headers = bodies[next_index % len(bodies)]
                next_index += 1
                started = time.perf_counter()
                async with session.post(path, data=body, headers=headers) as r:
                    await r.read()
                    errors += r.status != 200
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, np.array(latencies) * 1000, errors


def start_child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_child(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def bench_http(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from safetensors.torch import load_file

    from models.examples import ensure_examples
    from models.repository import ModelRepository

    repo = tempfile.mkdtemp(prefix="maas-bench-repo-")
    repository = ModelRepository(repo)
    ensure_examples(repository)
    # Version 2: the same model and weights with `close_when_idle`, served by the same `maas serve`.
    config = repository.config(MODEL, 1)
    idle = replace(config, batching=replace(config.batching, close_when_idle=True))
    assert repository.publish(MODEL, idle, load_file(Path(repo) / MODEL / "1" / "model.safetensors")) == 2
    env = {**os.environ, "MAAS_MODEL_REPOSITORY": repo, "KAFKA_BOOTSTRAP_SERVERS": "unused:9092",
           "AWS_ENDPOINT_URL": "http://unused"}
    maas_port, plain_port = free_port(), free_port()
    servers = {
        "maas serve": start_child([sys.executable, "-m", "pipeline", "serve", "--port", str(maas_port)], env),
        "plain aiohttp": start_child([sys.executable, __file__, "--plain-server", str(plain_port), repo], env),
    }
    urls = {"maas serve": f"http://127.0.0.1:{maas_port}", "plain aiohttp": f"http://127.0.0.1:{plain_port}"}
    try:
        for url in urls.values():
            await wait_ready(url)
        json_bodies, binary_bodies = payloads(256, binary=False), payloads(256, binary=True)
        rows, ratios = [], []
        for connections in args.concurrency:
            v1, v2 = (f"/v2/models/{MODEL}/versions/{v}/infer" for v in (1, 2))
            cells = [("maas serve", "JSON", json_bodies, v1), ("maas serve", "binary", binary_bodies, v1),
                     ("maas serve", "binary, idle", binary_bodies, v2), ("plain aiohttp", "JSON", json_bodies, v1)]
            runs: dict[int, list[tuple[float, np.ndarray, int]]] = {i: [] for i in range(len(cells))}
            for round_ in range(args.rounds):  # interleaved, so that a noisy spell hits every cell of a round
                for i, (server, payload, bodies, path) in enumerate(cells):
                    await load(urls[server], bodies, connections, min(200, args.requests), path)  # warm-up
                    runs[i].append(await load(urls[server], bodies, connections, args.requests, path))
                    print(f"  round {round_ + 1} {server:<14} {payload:<12} c={connections:<4} "
                          f"{runs[i][-1][0]:8.0f} req/s", file=sys.stderr)
            for i, (server, payload, _, _) in enumerate(cells):
                rates = [rate for rate, _, _ in runs[i]]
                rate, lat, _ = sorted(runs[i], key=lambda run: run[0])[len(rates) // 2]
                rows.append((server, payload, connections, rate, min(rates), max(rates), np.percentile(lat, 50),
                             np.percentile(lat, 99), sum(errors for _, _, errors in runs[i])))
            plain = [rate for rate, _, _ in runs[3]]
            for i in (0, 1, 2):
                per_round = [run[0] / p for run, p in zip(runs[i], plain, strict=True)]
                ratios.append((f"{cells[i][1]} c={connections}", float(np.median(per_round)), per_round))
        print(f"\nHTTP V2 infer, {MODEL} (784 FP32 in, 10 FP32 + 1 INT64 out), {args.requests} requests per cell, "
              f"median of {args.rounds} interleaved rounds, {os.cpu_count()} CPU cores shared by client and server\n")
        print("(binary, idle: the same model with batching.close_when_idle, published as version 2)")
        print(f"{'server':<14} {'payload':<13} {'conns':>5} {'req/s':>9} {'range':>13} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>6}")
        for server, payload, connections, rate, low, high, p50, p99, errors in rows:
            print(f"{server:<14} {payload:<13} {connections:>5} {rate:>9.0f} {f'{low:.0f}-{high:.0f}':>13} "
                  f"{p50:>8.2f} {p99:>8.2f} {errors:>6}")
        print("\nmaas / plain server (median of the per-round ratios; target >= 2x at 64 connections)")
        for what, value, per_round in ratios:
            print(f"  {what:<22} {value:5.2f}x   rounds " + " ".join(f"{r:.2f}x" for r in per_round))
        print(f"\npeak RSS: maas serve {peak_rss_mb(servers['maas serve'].pid):.0f} MB, "
              f"plain {peak_rss_mb(servers['plain aiohttp'].pid):.0f} MB")
        if any(row[-1] for row in rows):
            raise SystemExit("some requests failed: the figures above are not comparable")
    finally:
        for proc in servers.values():
            stop_child(proc)


# -- batch job ----------------------------------------------------------------------------------------

def write_job(path: Path, lines: int) -> None:
    """Shorthand lines {"id", "model_name", "data"} with 3-decimal pixels, written in chunks (bounded memory)."""
    from models.examples import synthetic_digits

    with path.open("wb") as f:
        for start in range(0, lines, 5000):
            n = min(5000, lines - start)
            images, _ = synthetic_digits(n, seed=start)
            images = np.round(images, 3)
            f.write(b"".join(orjson.dumps({"id": f"j{start + i}", "model_name": MODEL, "data": images[i]},
                                          option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for i in range(n)))


async def bench_batch(args: argparse.Namespace) -> None:
    from infra.stack import LocalStack
    from models.examples import ensure_examples
    from models.repository import ModelRepository

    work = Path(tempfile.mkdtemp(prefix="maas-bench-batch-"))
    repo = work / "model_repository"
    ensure_examples(ModelRepository(repo))
    job = work / "bench-job.jsonl"
    started = time.perf_counter()
    write_job(job, args.batch_job)
    print(f"wrote {args.batch_job:,} lines ({job.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f}s",
          file=sys.stderr)
    with LocalStack(work / "stack") as stack:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers, "AWS_ENDPOINT_URL": stack.endpoint_url,
               "MAAS_MODEL_REPOSITORY": str(repo), "MAAS_BATCH_BUCKET": "maas-bench"}
        worker = start_child([sys.executable, "-m", "pipeline", "batch", "worker", "--wait", "2"], env)
        try:
            assert worker.stdout is not None
            while "batch worker watching" not in (line := worker.stdout.readline()):
                if not line:
                    raise RuntimeError("batch worker exited")
            started = time.perf_counter()
            submit = subprocess.Popen([sys.executable, "-m", "pipeline", "batch", "submit", str(job), "--poll", "1"],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            submit_peak = 0.0
            while submit.poll() is None:
                submit_peak = max(submit_peak, peak_rss_mb(submit.pid))
                await asyncio.sleep(0.5)
            elapsed = time.perf_counter() - started
            output = submit.stdout.read() if submit.stdout else ""
            worker_peak = peak_rss_mb(worker.pid)
        finally:
            stop_child(worker)
    summary = json.loads(output[output.index("{"):])
    results = job.with_name("bench-job.results.jsonl")
    print(f"\nbatch job: {summary['lines']:,} lines, {summary['ok']:,} ok, {summary['errors']} errors; "
          f"{os.cpu_count()} CPU cores\n")
    print(f"{'measure':<44} {'value':>12}")
    for name, value in [
        ("input size (MB)", f"{job.stat().st_size / 1e6:.0f}"),
        ("results size (MB)", f"{results.stat().st_size / 1e6:.0f}"),
        ("worker throughput (lines/s, summary)", f"{summary['throughput_lines_per_s']:,.0f}"),
        ("end to end incl. upload + download (lines/s)", f"{summary['lines'] / elapsed:,.0f}"),
        ("end to end wall (s)", f"{elapsed:.1f}"),
        ("latency per line p50 / p99 (ms)", f"{summary['latency_ms']['p50']:.1f} / {summary['latency_ms']['p99']:.1f}"),
        ("peak RSS, maas batch worker (MB)", f"{worker_peak:.0f}"),
        ("peak RSS, maas batch submit (MB)", f"{submit_peak:.0f}"),
    ]:
        print(f"{name:<44} {value:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    parser.add_argument("--requests", type=int, default=3000, help="requests per table cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every cell (the table: medians)")
    parser.add_argument("--batch-job", type=int, default=0, metavar="LINES", help="run the batch-job benchmark")
    parser.add_argument("--plain-server", nargs=2, metavar=("PORT", "REPO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        plain_server(int(args.plain_server[0]), args.plain_server[1])
    elif args.batch_job:
        asyncio.run(bench_batch(args))
    else:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        asyncio.run(bench_http(args))


if __name__ == "__main__":
    main()

"""Decoding one JSON request: the simdjson path (bodies of 2 KB and more) against orjson on the same body.

Both run in one process, interleaved, on the same bytes: an MNIST-sized request (784 FP32 values) as
`maas submit` generates it, and a small one (10 values) that stays on the orjson path in production. Each row
is the best of `--rounds` rounds of 3 x 2,000 decodes; the ratio compares the two paths' best times.

Usage: ``python bench/json_decode.py [--rounds K]``.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0], and bench/pipeline.py would shadow the `pipeline` package.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

import orjson  # noqa: E402

from pipeline import codec  # noqa: E402
from pipeline.client import example_requests  # noqa: E402


def _best(body: bytes, rounds: int) -> tuple[float, float]:
    """Best seconds per decode on each path: (simdjson, orjson)."""
    fast, plain = [], []
    default = codec._TENSOR_JSON_BYTES
    for _ in range(rounds):
        for path, times in ((0, fast), (1 << 30, plain)):  # 0: every body takes the simdjson path
            codec._TENSOR_JSON_BYTES = path
            times.append(min(timeit.repeat(lambda: codec.decode_request(body, {}, max_bytes=1 << 22),
                                           number=2000, repeat=3)) / 2000)
    codec._TENSOR_JSON_BYTES = default
    return min(fast), min(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    mnist = orjson.dumps(example_requests(1)[0][0], option=orjson.OPT_SERIALIZE_NUMPY)
    small = orjson.dumps({"id": "s", "model_name": "regressor_mlp", "inputs": [
        {"name": "input", "shape": [1, 10], "datatype": "FP32", "data": [0.125 * i for i in range(10)]}]})
    print(f"{'request':<24}{'bytes':>7}{'simdjson us':>13}{'orjson us':>11}{'orjson / simdjson':>19}")
    for name, body in (("MNIST (784 x FP32)", mnist), ("small (10 x FP32)", small)):
        fast, plain = _best(body, args.rounds)
        print(f"{name:<24}{len(body):>7}{fast * 1e6:>13.1f}{plain * 1e6:>11.1f}{plain / fast:>19.2f}")


if __name__ == "__main__":
    main()

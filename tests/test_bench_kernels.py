"""``bench/kernels.py``: its cases build, and their torch baselines run, on the ``meta`` device (a GPU session
is too short to find a broken case on it); and for a GEMM tuning round that timed thin tiles both ways, it says
which way of handling rows past M was faster: the question the masked-row configs were added to answer."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import triton
from bench_support import load_bench_script


def _bench_kernels():
    return load_bench_script("kernels")


def config(block_m: int, masked: bool | None, block_n: int = 64) -> triton.Config:
    mask = {} if masked is None else {"MASK_ROWS": masked}
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64, **mask}, num_warps=4)


def test_the_fastest_of_each_way_is_reported():
    note = _bench_kernels().masked_rows_note({config(16, False): [0.034, 0.033, 0.035], config(16, True): [0.0245],
                                              config(32, False): 0.030, config(16, True, 128): 0.026})
    assert note == " (autotuning: rows masked 24.5 us, wrapped 30.0 us)"


def test_nothing_is_said_when_only_one_way_was_timed():
    bench = _bench_kernels()
    assert bench.masked_rows_note({config(16, False): [0.01], config(64, False): [0.02]}) == ""
    assert bench.masked_rows_note({config(128, None): [0.01]}) == ""  # the TMA kernel's configs: no such choice
    assert bench.masked_rows_note({}) == ""


def test_the_runner_up_of_an_attention_round_is_reported_as_a_ratio():
    bench = _bench_kernels()
    note = bench.runner_up_note({config(128, None): [0.25, 0.2, 0.3], config(64, None): 0.2, config(32, None): [0.22]})
    assert note == " (autotuning: 3 configs, the next 1.10x slower)"
    assert bench.runner_up_note({config(128, None): [0.25]}) == "" and bench.runner_up_note({}) == ""


def test_the_tile_sweep_grids_survive_their_kernels_pruning():
    """``bench/tile_sweep.py``'s grids hold what each kernel's pruning reads, keep tiles for the rows they are
    for, and never split K past the split-K scratch."""
    from kernels.attention import _prune_configs as prune_attention
    from kernels.linear import MAX_SPLIT_K, _prune_configs, _prune_tma_configs

    sweep = load_bench_script("tile_sweep")
    grids = sweep.linear_grids()
    rows16, rows512 = (torch.empty(m, 4096, dtype=torch.bfloat16, device="meta") for m in (16, 512))
    kept = {
        "thin": _prune_configs(grids["thin"], {"x_ptr": rows16, "M_BUCKET": 16}),
        "split": _prune_configs(grids["split"], {"x_ptr": rows16, "M_BUCKET": 16}),
        "thin_tma": _prune_tma_configs(grids["thin_tma"], {"x_desc": SimpleNamespace(base=rows16), "M_BUCKET": 16}),
        "wide": _prune_configs(grids["wide"], {"x_ptr": rows512, "M_BUCKET": 512}),
        "wide_tma": _prune_tma_configs(grids["wide_tma"], {"x_desc": SimpleNamespace(base=rows512),
                                                          "M_BUCKET": 512}),
    }
    assert all(len(kept[name]) >= 20 for name in kept), {k: len(v) for k, v in kept.items()}
    assert {c.kwargs["BLOCK_M"] for c in kept["thin"] + kept["split"]} == {16}
    assert max(c.kwargs["SPLIT_K"] for c in grids["split"]) <= MAX_SPLIT_K
    q = torch.empty(1, 1, 512, 64, dtype=torch.bfloat16, device="meta")
    for d in (64, 128):
        assert prune_attention(sweep.attention_grid(), {"q_ptr": q, "SQ_BUCKET": 512, "SK_BUCKET": 512}, HEAD_DIM=d)
    rows = sweep.cases(dev="meta")  # shapes only: each row's baseline runs there
    assert len({(op, shape) for op, shape, *_ in rows}) == len(rows) == 11
    with torch.no_grad():
        for op, shape, _, grid, _, baseline in rows:
            assert grid and baseline().device.type == "meta", (op, shape)


@pytest.mark.parametrize("quick", [True, False])
def test_every_case_builds_and_its_baseline_runs_on_the_meta_device(quick):
    """Shapes only: a baseline that reads a size from a variable the later cases rebind fails here."""
    found = _bench_kernels().cases(quick, dev="meta")
    assert len({(c.op, c.size) for c in found}) == len(found)
    with torch.no_grad():
        for case in found:
            assert case.eager(*case.args).device.type == "meta", case.op


def test_the_chart_has_a_series_per_ratio_some_row_has_and_no_bar_where_a_row_lacks_it():
    rows = [{"speedup_vs_eager": 2.09, "speedup_vs_compile": None, "speedup_vs_eager_graphs": 2.26},
            {"speedup_vs_eager": 0.71, "speedup_vs_compile": None, "speedup_vs_eager_graphs": None}]
    assert _bench_kernels().chart_series(rows) == [("vs torch eager, CUDA-graph replay", [2.26, 0]),
                                                  ("vs torch eager, launches timed (do_bench)", [2.09, 0.71])]


def test_a_saved_run_s_chart_is_redrawn_without_a_gpu(tmp_path):
    """Rows without CUDA-graph figures (the LSTM's) or a torch.compile column still draw."""
    pytest.importorskip("matplotlib")
    saved = tmp_path / "run_kernels.json"
    rows = [{"op": "softmax", "size": "4096x4096", "speedup_vs_eager": 2.09, "speedup_vs_compile": None,
             "speedup_vs_eager_graphs": 2.26},
            {"op": "lstm", "size": "B64 S128", "speedup_vs_eager": 0.71, "speedup_vs_compile": None,
             "speedup_vs_eager_graphs": None}]
    saved.write_text(json.dumps({"meta": {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0"}, "results": rows}))
    assert _bench_kernels().main(["--plot", str(saved)]) == 0
    assert (tmp_path / "run_kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_attention_variant_row_runs_that_variant_or_fails_and_leaves_the_settings_as_they_were(monkeypatch):
    """A row labelled with a variant must time that variant: where it would not run (129 keys for the persistent
    one) it fails rather than time the tiled kernel, and the settings it forced are back as they were."""
    from kernels.attention import PERSISTENT_ENV_VAR, TMA_ENV_VAR, attention_reference

    monkeypatch.setenv("MAAS_KERNEL_BACKEND", "triton")  # CPU tensors: the interpreter (tests/conftest.py)
    monkeypatch.setenv(TMA_ENV_VAR, "auto")
    monkeypatch.delenv(PERSISTENT_ENV_VAR, raising=False)
    run = _bench_kernels()._attention_variant("persistent")
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    assert torch.allclose(run(q, k, v), attention_reference(q, k, v), atol=1e-5)
    long_k = torch.randn(1, 2, 129, 16)
    with pytest.raises(ValueError, match="the persistent variant does not run this problem"):
        run(q, long_k, long_k)
    assert os.environ[TMA_ENV_VAR] == "auto" and PERSISTENT_ENV_VAR not in os.environ

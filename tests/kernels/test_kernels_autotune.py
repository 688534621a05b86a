"""Autotuning: which tile configs a launch compiles and times, how many threads compile them, how they are
timed (the precompile itself: ``test_kernels_compile.py``)."""

import importlib
import json
import os
import threading

import pytest
import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import _autotune, _tuning_table
from kernels._autotune import (
    TimedChoice,
    borrowing,
    bucket_positions,
    compile_threads,
    nearest_key,
    tuned_shapes_only,
    within_bucket,
)
from kernels.attention import GPU_CONFIGS as ATTENTION_CONFIGS
from kernels.attention import KERNELS as ATTENTION_KERNELS
from kernels.attention import TMA_CONFIGS as ATTENTION_TMA_CONFIGS
from kernels.attention import _prune_configs as prune_attention
from kernels.embedding_pool import GPU_CONFIGS as EMBEDDING_POOL_CONFIGS
from kernels.embedding_pool import _prune_configs as prune_embedding_pool
from kernels.embedding_pool import fits_registers as embedding_pool_fits_registers
from kernels.linear import (
    _GEMV_CONFIGS,
    _GPU_CONFIGS,
    _SPLIT_K_CONFIGS,
    _TMA_CONFIGS,
    _prune_configs,
    _prune_tma_configs,
    fits_shared_memory,
)

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the GEMM autotuner picked on an H200, by M, in bf16
# (bench/results/gpu/2026-11-26_0444_run4_kernels.json): pruning must never take them away.
TILED_PICKS = [(1, (16, 64, 128, 4, 4)), (1, (16, 32, 256, 2, 4)), (16, (16, 64, 128, 4, 4)),
               (16, (16, 32, 256, 2, 4)), (128, (64, 64, 64, 4, 4)), (512, (64, 64, 64, 4, 4)),
               (512, (128, 128, 128, 8, 3)), (4096, (256, 128, 64, 8, 4)), (24576, (256, 128, 64, 8, 3)),
               (24576, (256, 128, 64, 8, 4)), (24576, (128, 128, 64, 4, 4))]
TMA_PICKS = [(512, (128, 128, 128, 8, 3)), (4096, (128, 256, 64, 8, 3)), (24576, (256, 128, 64, 8, 3)),
             (24576, (128, 256, 64, 8, 3)), (24576, (128, 128, 64, 8, 4))]


def tiles(config: triton.Config) -> tuple[int, ...]:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def gemm_args(m: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    x = torch.empty(16, 16, dtype=dtype)
    return {"x_ptr": x, "x_desc": TensorDescriptor.from_tensor(x, [16, 16]), "M_BUCKET": triton.next_power_of_2(m)}


@pytest.mark.parametrize("m, picked", TILED_PICKS)
def test_gemm_pruning_keeps_every_tile_measured_fastest(m, picked):
    assert picked in [tiles(c) for c in _prune_configs(_GPU_CONFIGS, gemm_args(m))]


@pytest.mark.parametrize("m, picked", TMA_PICKS)
def test_tma_pruning_keeps_every_tile_measured_fastest(m, picked):
    assert picked in [tiles(c) for c in _prune_tma_configs(_TMA_CONFIGS, gemm_args(m))]


@pytest.mark.parametrize("m, masked", [(1, True), (7, True), (16, False)])
def test_a_few_rows_tune_only_the_thin_tiles(m, masked):
    kept = _prune_configs(_GPU_CONFIGS, gemm_args(m))
    assert {c.kwargs["BLOCK_M"] for c in kept} == {16}
    wrapped = [tiles(c) for c in kept if not c.kwargs["MASK_ROWS"]]
    assert len(wrapped) == len(set(wrapped)) == 4
    # Fewer rows than the tile: each thin tile also with rows past M masked, timed against the wrapped one.
    assert sorted(tiles(c) for c in kept if c.kwargs["MASK_ROWS"]) == (sorted(wrapped) if masked else [])


@pytest.mark.parametrize("configs", [_GPU_CONFIGS, _SPLIT_K_CONFIGS], ids=["tiled", "split_k"])
def test_masked_rows_only_where_rows_wrap(configs):
    for m in (1, 8, 9, 16, 17, 64, 4096):
        for c in _prune_configs(configs, gemm_args(m)):
            assert not c.kwargs["MASK_ROWS"] or triton.next_power_of_2(m) < c.kwargs["BLOCK_M"], (m, c)


@pytest.mark.parametrize("m, block_m", [(17, 32), (33, 64), (100, 128), (129, 256), (70000, 256)])
def test_tiles_up_to_the_bucket_are_kept(m, block_m):
    kept = _prune_configs(_GPU_CONFIGS, gemm_args(m))
    assert max(c.kwargs["BLOCK_M"] for c in kept) == block_m
    assert kept == [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_M"] <= block_m and not c.kwargs["MASK_ROWS"]]


def test_fp32_pruning_also_drops_tiles_beyond_shared_memory():
    kept = _prune_configs(_GPU_CONFIGS, gemm_args(8192, torch.float32))
    assert kept == [c for c in _GPU_CONFIGS if fits_shared_memory(c, 4) and not c.kwargs["MASK_ROWS"]]
    assert len(kept) < len(_GPU_CONFIGS)


def test_fp8_keeps_every_tile_bf16_keeps():
    """fp8 tiles take half bf16's shared memory and chain one accumulator: nothing to drop that bf16 keeps."""
    def tiles(dtype: torch.dtype) -> list[triton.Config]:
        return _prune_configs(_GPU_CONFIGS, gemm_args(8192, dtype))

    assert tiles(torch.float8_e4m3fn) == tiles(torch.bfloat16)


def test_the_smallest_tiles_stay_when_every_tile_is_taller_than_the_bucket():
    tma_small = _prune_tma_configs(_TMA_CONFIGS, gemm_args(1))
    assert tma_small and {c.kwargs["BLOCK_M"] for c in tma_small} == {min(c.kwargs["BLOCK_M"] for c in _TMA_CONFIGS)}
    assert within_bucket(_GPU_CONFIGS, "BLOCK_K", 8) == [c for c in _GPU_CONFIGS if c.kwargs["BLOCK_K"] == 32]


@pytest.mark.parametrize("sq, sk, expected", [(16, 16, {(32, 32)}), (64, 16, {(64, 32), (32, 32)}),
                                              (16, 64, {(32, 32)}), (64, 64, {(64, 64), (64, 32), (32, 32)})])
def test_attention_tunes_tiles_no_longer_than_the_sequences(sq, sk, expected):
    q = torch.empty(1, dtype=torch.bfloat16)
    kept = prune_attention(ATTENTION_CONFIGS, {"q_ptr": q, "SQ_BUCKET": sq, "SK_BUCKET": sk}, HEAD_DIM=64)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == expected


def test_head_dim_128_skips_the_tile_whose_accumulator_spills():
    """128 x 128 fp32 on 4 warps is 128 registers a thread: ptxas spilled it inside the key loop."""
    q = torch.empty(1, dtype=torch.bfloat16)
    kept = prune_attention(ATTENTION_CONFIGS, {"q_ptr": q, "SQ_BUCKET": 512, "SK_BUCKET": 512}, HEAD_DIM=128)
    tiles = {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept}
    assert (128, 8) in tiles and (128, 4) not in tiles


def test_long_sequences_tune_every_attention_tile_that_fits():
    q = torch.empty(1, dtype=torch.bfloat16)
    kept = prune_attention(ATTENTION_CONFIGS, {"q_ptr": q, "SQ_BUCKET": 512, "SK_BUCKET": 512}, HEAD_DIM=64)
    assert kept == ATTENTION_CONFIGS


@pytest.mark.parametrize("s, d, expected", [
    (10, 16, {(16, 16)}),  # short texts of a narrow table: the smallest tiles only
    (128, 32, {(32, 32)}),
    (64, 384, {(64, 128), (64, 256), (32, 256), (64, 64), (32, 128), (16, 128)}),
    (128, 384, {(64, 128), (128, 128), (64, 256), (32, 256), (128, 64), (32, 128), (64, 64), (16, 128)}),
    (128, 64, {(128, 64), (64, 64)}),
])
def test_embedding_pool_tunes_tiles_no_longer_than_the_sequences_nor_wider_than_the_rows(s, d, expected):
    kept = prune_embedding_pool(EMBEDDING_POOL_CONFIGS, {"S_BUCKET": s if s & (s - 1) == 0 else 16, "D": d})
    assert {(c.kwargs["BLOCK_S"], c.kwargs["BLOCK_D"]) for c in kept} == expected
    assert all(embedding_pool_fits_registers(c) for c in kept)


def test_embedding_pool_skips_tiles_past_64_accumulator_registers_a_thread():
    """128 x 128 fp32 on 4 warps would be 128 registers a thread for the accumulator alone."""
    kept = prune_embedding_pool(EMBEDDING_POOL_CONFIGS, {"S_BUCKET": 128, "D": 128})
    assert (128, 128, 8) in {(c.kwargs["BLOCK_S"], c.kwargs["BLOCK_D"], c.num_warps) for c in kept}
    assert all(c.kwargs["BLOCK_S"] * c.kwargs["BLOCK_D"] <= 64 * 32 * c.num_warps for c in kept)


def test_threads_compile_unless_the_setting_says_processes(monkeypatch):
    monkeypatch.delenv("MAAS_COMPILE_WORKERS", raising=False)
    assert _autotune.compile_workers() == "threads"
    monkeypatch.setenv("MAAS_COMPILE_WORKERS", "processes")
    assert _autotune.compile_workers() == "processes"
    monkeypatch.setenv("MAAS_COMPILE_WORKERS", "auto")
    with pytest.raises(ValueError, match="MAAS_COMPILE_WORKERS"):
        _autotune.compile_workers()


def test_compile_threads_follow_the_cpus_or_the_setting(monkeypatch):
    monkeypatch.delenv("MAAS_COMPILE_THREADS", raising=False)
    assert compile_threads(1000) == max(1, len(os.sched_getaffinity(0)) - 1)
    assert compile_threads(1) == 1
    monkeypatch.setenv("MAAS_COMPILE_THREADS", "3")
    assert (compile_threads(2), compile_threads(10)) == (2, 3)
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("MAAS_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="MAAS_COMPILE_THREADS"):
            compile_threads(4)


def test_autotune_timing_is_triton_s_own_a_shorter_one_or_graph_replays(monkeypatch):
    """``MAAS_AUTOTUNE_TIMING`` (read when the kernels are defined): the options given to triton.autotune."""
    monkeypatch.delenv("MAAS_AUTOTUNE_TIMING", raising=False)
    assert _autotune._timing_options() == {"do_bench": _autotune._quick_timing}  # the default
    monkeypatch.setenv("MAAS_AUTOTUNE_TIMING", "graph")
    assert _autotune._timing_options() == {"do_bench": _autotune._graph_timing}
    monkeypatch.setenv("MAAS_AUTOTUNE_TIMING", " Quick ")
    assert _autotune._timing_options() == {"do_bench": _autotune._quick_timing}
    monkeypatch.setenv("MAAS_AUTOTUNE_TIMING", "full")
    assert _autotune._timing_options() == {}
    monkeypatch.setenv("MAAS_AUTOTUNE_TIMING", "fast")
    with pytest.raises(ValueError, match="MAAS_AUTOTUNE_TIMING"):
        _autotune._timing_options()



def test_stored_choices_outlive_the_process_that_timed_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    first = _autotune.StoredChoices("choices")
    assert first.get("H100|3.6.0|bf16|4096") is None
    first.put("H100|3.6.0|bf16|4096", "tma")
    first.put("H100|3.6.0|bf16|8192", "tiled")
    restarted = _autotune.StoredChoices("choices")  # another worker on the same cache volume
    assert restarted.get("H100|3.6.0|bf16|4096") == "tma"
    assert restarted.get("H100|3.6.0|bf16|8192") == "tiled"
    assert restarted.get("H200|3.6.0|bf16|4096") is None
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / "choices.json"]  # no temporary left


def test_an_unreadable_choices_file_reads_as_empty_and_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    (tmp_path / "choices.json").write_text("{not json")
    choices = _autotune.StoredChoices("choices")
    assert choices.get("k") is None
    choices.put("k", "split_k")
    assert choices.get("k") == "split_k"
    (tmp_path / "choices.json").write_text('{"k": true, "j": "tiled"}')  # a value that is not a name is ignored
    assert (choices.get("k"), choices.get("j")) == (None, "tiled")


def test_a_read_only_cache_costs_only_a_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker / "cache"))  # a directory under a file: cannot exist
    choices = _autotune.StoredChoices("choices")
    choices.put("k", "tiled")
    assert choices.get("k") is None
    assert "could not store k" in caplog.text


# Tuning keys as Triton's autotuner builds them: the key arguments (a bucket first here), then dtypes.
KNOWN = [(16, 768, 256, "bf16"), (64, 768, 256, "bf16"), (1024, 768, 256, "bf16"), (4096, 768, 256, "fp16"),
         (2048, 384, 256, "bf16")]


@pytest.mark.parametrize("key, lender", [((128, 768, 256, "bf16"), (64, 768, 256, "bf16")),
                                         ((256, 768, 256, "bf16"), (64, 768, 256, "bf16")),  # a tie: the smaller
                                         ((16384, 768, 256, "bf16"), (1024, 768, 256, "bf16")),
                                         ((1, 768, 256, "bf16"), (16, 768, 256, "bf16")),
                                         ((4096, 768, 256, "bf16"), (1024, 768, 256, "bf16")),
                                         ((4096, 768, 128, "bf16"), None), ((16, 768, 256, "fp32"), None)])
def test_an_untuned_bucket_borrows_from_the_nearest_tuned_one_of_the_same_problem(key, lender):
    assert nearest_key(key, KNOWN, [0]) == lender


def test_borrowing_across_several_buckets_sums_their_distances():
    known = [(16, 16, 2, 64), (128, 128, 64, 64), (16, 16, 64, 64), (128, 128, 64, 128)]
    assert nearest_key((128, 128, 32, 64), known, [0, 1, 2]) == (128, 128, 64, 64)
    assert nearest_key((32, 32, 2, 64), known, [0, 1, 2]) == (16, 16, 2, 64)
    assert nearest_key((32, 32, 2, 64), known, []) is None  # no bucket: only the very key would do


def test_bucket_positions_are_those_of_key_arguments():
    assert bucket_positions(["SQ_BUCKET", "SK_BUCKET", "BH_BUCKET", "HEAD_DIM"], ["BH_BUCKET", "SQ_BUCKET"]) == (0, 2)
    with pytest.raises(ValueError, match="M_BUCKET"):
        bucket_positions(["N", "K"], ["M_BUCKET"])


def test_only_a_serving_thread_borrows_and_only_by_default(monkeypatch):
    monkeypatch.delenv("MAAS_AUTOTUNE_UNSEEN", raising=False)
    assert not borrowing()
    seen = []
    with tuned_shapes_only():
        seen.append(borrowing())
        with tuned_shapes_only():
            seen.append(borrowing())
        seen.append(borrowing())  # the inner block leaves the outer one's state
        other = threading.Thread(target=lambda: seen.append(borrowing()))
        other.start()
        other.join()
        monkeypatch.setenv("MAAS_AUTOTUNE_UNSEEN", " Tune ")
        seen.append(borrowing())
        monkeypatch.setenv("MAAS_AUTOTUNE_UNSEEN", "guess")
        with pytest.raises(ValueError, match="MAAS_AUTOTUNE_UNSEEN='guess': expected borrow or tune"):
            borrowing()
    assert seen == [True, True, True, False, False]
    assert not borrowing()


def test_a_serving_block_counts_its_borrows_and_hands_them_to_the_block_around_it():
    _autotune.note_borrowed()  # outside any block: counted nowhere
    with tuned_shapes_only() as outer:
        _autotune.note_borrowed()
        with tuned_shapes_only() as inner:
            _autotune.note_borrowed()
            _autotune.note_borrowed()
        assert inner.count == 2
    assert outer.count == 3


def test_a_gemm_kernel_choice_is_borrowed_where_that_kernel_may_run():
    """The choice between tiled, TMA and split-K kernels (timed once per kernel_key), borrowed like tiles."""
    def key(rows: int, bias: bool = True) -> tuple:
        return "cuda:0", "bf16", "bf16", rows, 768, 256, bias, "gelu", False

    choice = TimedChoice("test_choice", bucket_at=3)
    choice.fastest |= {key(64): "split_k", key(1024): "tma"}
    assert choice.borrow(key(32), ["tiled", "split_k"]) == "split_k"
    assert choice.borrow(key(8192), ["tiled", "tma"]) == "tma"
    # Nothing is timed while serving: where the nearest choice may not run, or there is none, the first candidate.
    assert choice.borrow(key(4096), ["tiled", "split_k"]) == "tiled"  # TMA's pick, and TMA may not run it
    assert choice.borrow(key(8192, bias=False), ["tiled", "tma"]) == "tiled"  # another epilogue: another problem
    assert choice.borrowed == {key(32), key(8192), key(4096), key(8192, bias=False)}
    # A borrowed choice lends nothing on: 16,384 rows borrow from 1,024 rows, not from 8,192.
    choice.fastest |= {key(8192): "split_k", key(1024): "tma"}
    assert choice.borrow(key(16384), ["tiled", "tma", "split_k"]) == "tma"


def test_a_choice_is_timed_once_then_kept_and_borrowed_only_while_serving(tmp_path, monkeypatch):
    """Timing picks the fastest and stores it; a second choice for the key times nothing; inside
    tuned_shapes_only a new key borrows instead of timing."""
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    timed = []

    def time(name: str) -> float:
        timed.append(name)
        return {"tiled": 2.0, "fused": 1.0}[name]

    choice = TimedChoice("test_timed_choice", bucket_at=0)
    assert choice.choose((64, 384), "k64", ["tiled", "fused"], time) == "fused"
    assert timed == ["tiled", "fused"]
    assert choice.choose((64, 384), "k64", ["tiled", "fused"], time) == "fused"
    assert TimedChoice("test_timed_choice", bucket_at=0).choose((64, 384), "k64", ["tiled", "fused"], time) == "fused"
    assert timed == ["tiled", "fused"]  # the second worker found it on disk
    with tuned_shapes_only() as borrowed:
        assert choice.choose((128, 384), "k128", ["tiled", "fused"], time) == "fused"
    assert timed == ["tiled", "fused"] and borrowed.count == 1


def _write_table(path, autotuners=None, choices=None):
    path.write_text(json.dumps({"device": "stand-in", "autotuners": autotuners or {}, "choices": choices or {}}))
    return path


def test_a_tuning_table_hands_a_key_the_candidate_config_it_names(tmp_path, monkeypatch):
    """The table names configs as Triton prints them; the pick is the candidate itself (a TMA config keeps
    its descriptor hook), and a key or a config the table does not hold gives nothing."""
    candidates = _prune_tma_configs(_TMA_CONFIGS, gemm_args(4096))
    key = (4096, 1536, 384, "torch.bfloat16")
    picked = candidates[1]
    table = _write_table(tmp_path / "t.json", {"_linear_tma_kernel": {
        _tuning_table.key_text(key): _tuning_table.config_text(picked),
        _tuning_table.key_text((8192, 1536, 384, "torch.bfloat16")): "BLOCK_M: 48, num_warps: 4"}})
    monkeypatch.setenv("MAAS_TUNING_TABLE", str(table))
    assert _tuning_table.shipped_config("_linear_tma_kernel", key, candidates) is picked
    assert picked.pre_hook is not None
    assert _tuning_table.shipped_config("_linear_tma_kernel", (2048, 1536, 384, "torch.bfloat16"), candidates) is None
    assert _tuning_table.shipped_config("_linear_kernel", key, candidates) is None


def test_a_stale_pick_is_ignored_with_one_warning_naming_the_kernel(tmp_path, monkeypatch, caplog):
    candidates = _prune_tma_configs(_TMA_CONFIGS, gemm_args(4096))
    stale = {_tuning_table.key_text((m, 1536, 384, "torch.bfloat16")): "BLOCK_M: 48, num_warps: 4"
             for m in (8192, 4096)}
    monkeypatch.setenv("MAAS_TUNING_TABLE", str(_write_table(tmp_path / "t.json", {"_linear_tma_kernel": stale})))
    monkeypatch.setattr(_tuning_table, "_warned_stale", set())
    with caplog.at_level("WARNING", logger="kernels._tuning_table"):
        for m in (8192, 4096, 8192):
            assert _tuning_table.shipped_config("_linear_tma_kernel", (m, 1536, 384, "torch.bfloat16"),
                                                candidates) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "_linear_tma_kernel" in warnings[0] and "BLOCK_M: 48" in warnings[0], warnings


def test_the_tuning_table_setting(tmp_path, monkeypatch, caplog):
    """MAAS_TUNING_TABLE: a file, or none; unset on a machine without a GPU, no table. An unreadable table
    warns and tunes as usual."""
    table = _write_table(tmp_path / "t.json", choices={"c": {"k": "tma"}})
    monkeypatch.delenv("MAAS_TUNING_TABLE", raising=False)
    assert _tuning_table.current() == {}  # this machine has no GPU: no shipped table applies
    monkeypatch.setenv("MAAS_TUNING_TABLE", str(table))
    assert _tuning_table.shipped_choice("c", "k") == "tma"
    monkeypatch.setenv("MAAS_TUNING_TABLE", "None")
    assert _tuning_table.shipped_choice("c", "k") is None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setenv("MAAS_TUNING_TABLE", str(broken))
    assert _tuning_table.current() == {}
    assert "tuning table" in caplog.text and "unreadable" in caplog.text
    monkeypatch.setenv("MAAS_TUNING_TABLE", str(tmp_path / "missing.json"))
    assert _tuning_table.current() == {} and "missing.json: no such file" in caplog.text
    assert _tuning_table.device_file("NVIDIA H100 80GB HBM3").name == "nvidia-h100-80gb-hbm3.json"


def test_a_timed_choice_takes_the_table_s_choice_after_its_own_timings(tmp_path, monkeypatch):
    """No timing where the table has the key; a choice this worker timed (on disk) comes first; inside
    compile_only only the table's choice compiles."""
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    monkeypatch.setenv("MAAS_TUNING_TABLE", str(_write_table(
        tmp_path / "t.json", choices={"test_table_choice": {"gpu|k16": "tma", "gpu|k32": "tma"}})))
    timed = []

    def time(name: str) -> float:
        timed.append(name)
        return {"tiled": 1.0, "tma": 2.0}[name]

    choice = TimedChoice("test_table_choice", bucket_at=0)
    assert choice.choose((16,), "gpu|k16", ["tiled", "tma"], time) == "tma" and timed == []
    _autotune.StoredChoices("test_table_choice").put("gpu|k32", "tiled")  # timed here before: it wins
    assert choice.choose((32,), "gpu|k32", ["tiled", "tma"], time) == "tiled" and timed == []
    fresh = TimedChoice("test_table_choice", bucket_at=0)
    monkeypatch.setattr(_autotune, "compiling_only", lambda: True)
    assert fresh.choose((16,), "gpu|k16", ["tiled", "tma"], time) == "tma" and timed == ["tma"]


def test_a_tuning_table_holds_what_this_process_tuned_but_not_what_it_borrowed(tmp_path, monkeypatch):
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    def _test_table_kernel():
        pass

    tuner = _autotune.PrecompilingAutotuner(_test_table_kernel, [], _GPU_CONFIGS, ["M_BUCKET"], reset_to_zero=None,
                                            restore_value=None)
    tuner.cache = {(16, "torch.bfloat16"): _GPU_CONFIGS[0], (64, "torch.bfloat16"): _GPU_CONFIGS[1],
                   (128, "torch.bfloat16"): _GPU_CONFIGS[1]}
    tuner._borrowed = frozenset({(128, "torch.bfloat16")})
    monkeypatch.setattr(_autotune, "_TUNERS", {tuner})
    _autotune.StoredChoices("test_export_choice").put("GPU X|3.6.0|64", "tma")
    _autotune.StoredChoices("test_export_choice").put("GPU Y|3.6.0|64", "tiled")  # another GPU model's
    choice = TimedChoice("test_export_choice", bucket_at=0)
    monkeypatch.setattr(_autotune, "_CHOICES", {choice})
    table = _autotune.tuning_table("GPU X")
    assert table["autotuners"] == {"_test_table_kernel": {
        '[16, "torch.bfloat16"]': _tuning_table.config_text(_GPU_CONFIGS[0]),
        '[64, "torch.bfloat16"]': _tuning_table.config_text(_GPU_CONFIGS[1])}}
    assert table["choices"] == {"test_export_choice": {"GPU X|3.6.0|64": "tma"}}
    assert table["device"] == "GPU X" and table["triton"] == triton.__version__
    assert table["binaries"] == []  # nothing recorded in this process (kernels.precompile.record_binaries)
    assert _tuning_table.summary(table) == ("2 autotuner picks, 1 kernel choices and 0 kernel binaries to "
                                            "precompile")


# Every autotuned kernel's full config list, by the name a tuning table files its picks under.
SHIPPED_KERNEL_CONFIGS = {"_attention_kernel": ATTENTION_CONFIGS, "_attention_tma_kernel": ATTENTION_TMA_CONFIGS,
                          "_embedding_pool_kernel": EMBEDDING_POOL_CONFIGS,
                          "_linear_kernel": _GPU_CONFIGS, "_linear_tma_kernel": _TMA_CONFIGS,
                          "_linear_split_k_kernel": _SPLIT_K_CONFIGS, "_linear_gemv_kernel": _GEMV_CONFIGS}
SHIPPED_CHOICES = {"maas_linear_kernel": {"tiled", "tma", "split_k", "gemv"},
                   "maas_linear_layer_norm": {"fused", "separate"}, "maas_attention_kernel": set(ATTENTION_KERNELS)}


@pytest.mark.parametrize("path", sorted(_tuning_table.TABLE_DIR.glob("*.json")), ids=lambda p: p.name)
def test_a_shipped_tuning_table_names_only_configs_and_choices_the_kernels_still_have(path):
    """A pick the configs no longer hold is ignored at run time, silently slower: a config list changed since
    the table's export must fail here, so that the table is exported again on its GPU model."""
    table = json.loads(path.read_text())
    assert _tuning_table.device_file(table["device"]) == path
    for kernel, picks in table["autotuners"].items():
        have = {_tuning_table.config_text(c) for c in SHIPPED_KERNEL_CONFIGS[kernel]}
        stale = {key: pick for key, pick in picks.items() if pick not in have}
        assert not stale, f"{path.name}: {kernel} picks configs it no longer has: {stale}"
        assert all(isinstance(json.loads(key), list) for key in picks)
    for name, choices in table["choices"].items():
        assert set(choices.values()) <= SHIPPED_CHOICES[name], (name, set(choices.values()))
        assert all(key.startswith(f"{table['device']}|") for key in choices)
    for binary in table.get("binaries", []):  # what `maas models precompile` compiles: kernels still defined
        module, _, name = binary["kernel"].partition(":")
        assert hasattr(importlib.import_module(module), name), f"{path.name}: no kernel {binary['kernel']}"
        assert binary["target"]["backend"] == "cuda" and json.loads(binary["specialization"])["name"]

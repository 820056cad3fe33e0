#!/usr/bin/env bash
# The prepared one-command GPU check (../shared/docs/GPU.md). On the build machine:
#     bash tools/install_nvcc.sh && cargo build --release --features cuda
# then, on the GPU machine, from the repository root with the binary copied over (FACELLM_BIN, default
# target/release/facellm):
#     bash tools/gpu_check.sh [quick|all]      (quick: facellm only, no HF reference)
# It prints the card, runs `facellm selfcheck --device cuda` (every kernel against its CPU twin, then whole
# models and the batching engine on the GPU against the CPU model), then `facellm bench --device cuda` and the HF
# transformers reference (tools/bench_gpu_hf.py) on the same card in the same run, and leaves every output
# under $OUT (default /tmp/facellm-gpu-check) with a Markdown summary. If a v2 paged-decode row of the
# selfcheck fails, the benches run with the verified v1 kernel (FACELLM_ATTN=v1) and say so. Between the
# selfcheck and the benches, tools/gpu_serve_check.py drives `facellm serve` and `chat` with --device cuda; the
# LLM bench runs once more with FACELLM_GEMV=1 (the decode GEMV experiment). Exit status: the
# selfcheck's (else the serve check's), so a failing kernel fails the check even when the benchmarks ran.
#
# The device tool brings back at most 8 files from $OUT: the three that matter (selfcheck.txt, summary.md,
# gpu.txt) stay at the top and everything else is packed into raw.tar.gz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-/tmp/facellm-gpu-check}
mkdir -p "$out"
bin=${FACELLM_BIN:-target/release/facellm}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
"$bin" --version

# 1. Correctness first: a failure here is the finding, the timings after it are for the record.
timeout 120 "$bin" selfcheck --device cuda --seed "${SEED:-20261126}" >"$out/selfcheck.txt" 2>&1
status=$?
# Failing rows with their note line, then the count.
grep -E -A1 "  FAIL$" "$out/selfcheck.txt" | head -60
grep -E "checks," "$out/selfcheck.txt"
if grep -E "^linear_bf16.*FAIL" "$out/selfcheck.txt" >/dev/null; then
    echo "the cached cuBLASLt plans failed their check: rerun with FACELLM_BLAS=simple" | tee "$out/blas_fallback.txt"
    export FACELLM_BLAS=simple
    timeout 120 "$bin" selfcheck --device cuda --seed "${SEED:-20261126}" >"$out/selfcheck_simple.txt" 2>&1
    status=$?
    grep -E "FAIL|checks," "$out/selfcheck_simple.txt" | head -20
fi
if grep -E "paged_attention_decode_bf16.*v2.*FAIL" "$out/selfcheck.txt" >/dev/null; then
    echo "v2 paged decode failed its check: benches use FACELLM_ATTN=v1" | tee "$out/attn_fallback.txt"
    export FACELLM_ATTN=v1
fi

# The OpenAI server with its engine on the GPU (demo model): answers, cache hits, every block freed.
timeout 120 python3 tools/gpu_serve_check.py --facellm "$bin" >"$out/serve.json" 2>"$out/serve.err"
serve_status=$?
echo "serve --device cuda check exit $serve_status"
cat "$out/serve.json"
[[ $serve_status -ne 0 && $status -eq 0 ]] && status=$serve_status

# 2. facellm's timings, then HF's, on the same card in this same run.
timeout 60 "$bin" bench --device cuda --vision 300m,6b --tiles 1,7,13 --kernels >"$out/bench_facellm_vision.json" \
    2>"$out/bench_facellm_vision.err"
echo "facellm bench (vision, kernels) exit $?"
timeout 120 "$bin" bench --device cuda --llm 1b,8b --batch 1,8,32,64 --engine >"$out/bench_facellm_llm.json" \
    2>"$out/bench_facellm_llm.err"
echo "facellm bench (llm) exit $?"
# The decode GEMV experiment (kernels/gemv.cu) in the whole decode step, same shapes, small batches.
FACELLM_GEMV=1 timeout 60 "$bin" bench --device cuda --llm 1b,8b --batch 1,2,4,8 >"$out/bench_facellm_llm_gemv.json" \
    2>"$out/bench_facellm_llm_gemv.err"
echo "facellm bench (llm, FACELLM_GEMV=1) exit $?"
if [[ $what == all ]]; then
    timeout 70 python3 tools/bench_gpu_hf.py --vision 300m,6b --tiles 1,7,13 >"$out/bench_hf_vision.json" \
        2>"$out/bench_hf_vision.err"
    echo "HF bench (vision) exit $?"
    for shape in 1b 8b; do
        timeout "${HF_LLM_TIMEOUT:-75}" python3 tools/bench_gpu_hf.py --vision "" --llm "$shape" --batch 1,8,16,64 \
            --decode-tokens 16 --compile-batch "${HF_COMPILE_BATCH:-1}" >"$out/bench_hf_llm_$shape.json" \
            2>"$out/bench_hf_llm_$shape.err"
        echo "HF bench (llm $shape) exit $?"
    done
    python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
merged = {"llm": []}
for shape in ("1b", "8b"):
    try:
        merged["llm"] += json.load(open(os.path.join(out, f"bench_hf_llm_{shape}.json")))["llm"]
    except (OSError, ValueError, KeyError):
        pass
json.dump(merged, open(os.path.join(out, "bench_hf_llm.json"), "w"), indent=1)
PY
fi
python3 tools/gpu_summary.py "$out" >"$out/summary.md"
grep -E -A1 "  FAIL$" "$out/selfcheck.txt" >>"$out/summary.md"
{ echo; echo "serve --device cuda (tools/gpu_serve_check.py), exit $serve_status:"; cat "$out/serve.json"; } >>"$out/summary.md"
cat "$out/summary.md"
(cd "$out" && tar czf raw.tar.gz --remove-files ./*.json ./*.err 2>/dev/null)
exit "$status"

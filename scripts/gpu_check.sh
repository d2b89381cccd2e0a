#!/usr/bin/env bash
# GPU evidence in one go (docs/array_adapter.md, "Which backends have run"). Run from the
# repository root on a machine with a GPU, CUDA torch and CuPy installed:
#     bash scripts/gpu_check.sh            # everything below, logs under gpu-check/
#     GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh   # asv --quick (each benchmark once)
# Nothing here passes by skipping: CURVLIN_REQUIRE_BACKENDS makes a missing cupy or
# torch-cuda backend fail every test that would run on it.
set -u -o pipefail
out=gpu-check
mkdir -p "$out"
export CURVLIN_REQUIRE_BACKENDS=numpy,array_api_strict,torch,torch-cuda,cupy
status=0
run() {  # run NAME CMD...: log to $out/NAME.log, remember a failure, go on
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" >"$out/$name.log" 2>&1; then
        echo "   FAILED (see $out/$name.log)"
        status=1
    fi
    tail -n 3 "$out/$name.log"
}
run env python -c "import cupy, torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0)); print('cupy', cupy.__version__); cupy.show_config()"
# 1. the full suite, with the xp fixture's cupy and torch-cuda backends required
run pytest python -m pytest tests -q -rs -p no:cacheprovider
# 2. synchronisation check, DLPack hand-over, the array adapter's step ratios on CuPy
run adapter python scripts/gpu_check.py --out "$out/results.json"
# 3. the asv suite on the GPU (the ratio tracks compare with SGD in the same process)
asv machine --yes >/dev/null 2>&1
run asv asv run --python=same --show-stderr ${GPU_CHECK_QUICK:+--quick} \
    --set-commit-hash "$(git rev-parse HEAD)"
echo "done (status $status); record the figures in docs/benchmarks.md"
exit $status

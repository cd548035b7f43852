#!/usr/bin/env bash
# The one-shot GPU check (gspo_benchmarks.gpu_check; BENCHMARKS.md, "One-shot GPU check").
#
#   bash benchmarks/gpu_check.sh [--cpu]       # on an NVIDIA GPU (tiny CPU shapes with --cpu): writes
#                                              # $OUT/gpu_check.json (runs/gpu_check/ without $OUT)
#   bash benchmarks/gpu_check.sh --prepare     # with package-index access, once: the wheels into .whl/ (git-ignored)
#
# A GPU machine without package-index access but with torch, transformers, accelerate and peft gets the rest from
# .whl/, copied with the checkout: trl_gspo, gspo_examples and gspo_benchmarks built here, and trl plus the
# datasets dependencies such a machine lacks (dill, multiprocess), downloaded for Python 3.12. Without .whl/ the
# installed packages are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GSPO_CHECK_WHEELS:-.whl}  # the test points it at an empty folder: the installed packages are used
# trl's version is pinned by pyproject.toml (trl>=1.16,<1.17); datasets, dill, multiprocess: as tested in .venv
DOWNLOADS=("trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19")

if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" . ./examples ./benchmarks
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${DOWNLOADS[@]}"
    ls -l "$WHEELS"
    wheels_kib=$(du -sk "$WHEELS" | cut -f1)
    tree_kib=$(git ls-files -z | du -ck --files0-from=- | tail -1 | cut -f1)
    echo "wheels ${wheels_kib} KiB + tracked tree ${tree_kib} KiB to copy to the GPU machine"
    exit 0
fi

out_dir=$(mkdir -p "${OUT:-runs/gpu_check}" && cd "${OUT:-runs/gpu_check}" && pwd)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/gspo-site.XXXX)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    cd "$site"  # so that the installed wheels, not the checkout's trl_gspo/, are imported
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m gspo_benchmarks.gpu_check --out "$out_dir/gpu_check.json" "$@"

#!/usr/bin/env bash
# Run HERE (the CPU machine, with the package registries) before a device check: downloads the
# wheels the GPU machine's image lacks into .whl/ and copies the rib reference checkpoint into
# .ref/ (both git-ignored), so that `check.sh` can run there with nothing fetched.
#
#   bash benchmarks/device/fetch.sh            # then the device tool's run, carry [".whl", ".ref"]
#
# The image (the device README's KINDS.md: torch, lightning, transformers, networkx, scipy,
# safetensors, scikit-learn, pyarrow, ...) lacks these; versions are this venv's, so that the
# device runs the code CI tests. Installed there with --no-deps: only what the GPU tests, the rib
# benchmark and a recipe's training import is fetched (wandb, devinterp and the rest are not).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
PACKAGES=(transformer-lens datasets dill multiprocess jsonargparse docstring-parser typeshed-client)
cd "$ROOT"
rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
REF="${REF:-$ROOT/../shared/ref/rib_modadd_seed0}"
if [[ -d "$REF" ]]; then
    rm -rf .ref && mkdir -p .ref && cp -r "$REF" .ref/
else
    echo "no rib reference at $REF: check.sh will skip the rib benchmark" >&2
fi
ls -la .whl; du -sh .whl .ref 2>/dev/null || true

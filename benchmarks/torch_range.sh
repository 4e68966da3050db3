#!/usr/bin/env bash
# The core library (dsd.Pruner, dsd.Recipe, dsd.DSD) on a torch other than the pipeline's pin: for each version
# given (default 2.3.1, the lowest pyproject.toml allows), a throwaway venv with only torch, numpy, pytest and
# pyyaml (tests/conftest.py imports it), then the core's tests, the README quick start among them.
# Not part of `make test`: each venv is a few GB. Usage: benchmarks/torch_range.sh [VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
# these need what the core does not: torchvision, Lightning / transformers, the trainer (dsd.engine)
DESELECT=(
    --deselect tests/test_driver.py::test_the_readme_framework_quick_starts_run_as_written
    --deselect tests/test_masks.py::test_first_conv_names_the_first_convolution_of_any_model
    --deselect tests/test_masks.py::test_masks_hold_under_torch_compile_and_training_matches_eager
)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for version in "${@:-2.3.1}"; do
    rm -rf "$scratch/venv"
    "$PYTHON" -m venv "$scratch/venv"
    "$scratch/venv/bin/pip" install --quiet "torch==$version" numpy pytest pyyaml
    "$scratch/venv/bin/python" -c "import numpy, torch; print('== torch', torch.__version__, 'numpy', numpy.__version__)"
    PYTHONPATH=src "$scratch/venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_driver.py tests/test_masks.py "${DESELECT[@]}" || status=1
done
exit $status

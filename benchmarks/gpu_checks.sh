#!/usr/bin/env bash
# The GPU checks still open (README, paper section), in one call on a CUDA machine, most wanted first, each
# part under its own time limit (a part that runs out leaves what it printed):
# 1. the trainer's own phases under CUDA's sync debug mode (ResNet-18 with both decoders, Deep Speech 2 at the
#    paper's size) and Deep Speech 2 compiled (benchmarks/gpu_trainer_check.py): whether the `decode: device`
#    step now waits once (the drain before nvJPEG), and whether compiled Deep Speech 2 trains since its frame
#    indices run eagerly (on 2026-11-27 its first compiled step failed in Dynamo);
# 2. GoogLeNet's step without its auxiliary heads, compiled with CUDA graphs too (h100_step_profile_googlenet.txt
#    has 12.5 ms with them).
# Needs the project's packages (the speech part: espeakng-loader, soundfile, jiwer; pyproject.toml).
# Writes into $OUT when set (the device runner's folder), else results/benchmarks/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/benchmarks/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
card="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower())')"
part() {  # part SECONDS FILE COMMAND...: its output to the console and FILE
    local seconds=$1 file=$2
    shift 2
    timeout "$seconds" "$@" 2>&1 | grep --line-buffered -v '^features \|%|' | tee "$file"
    echo "== $* -> exit ${PIPESTATUS[0]}"
}
part 240 "$out/${card}_trainer_check.txt" python3 benchmarks/gpu_trainer_check.py
part 120 "$out/${card}_step_profile_googlenet_graphs.txt" python3 benchmarks/gpu_step_profile.py cuda 0 googlenet

#!/usr/bin/env bash
# The GPU measurements still open (README, paper section), in one call on a CUDA machine: the step with the
# trainer's late loss read against the waiting read and none (ResNet-50 and VGG-16; GoogLeNet too, which the
# paper config now builds without its auxiliary heads: against h100_step_profile_googlenet.txt's 22.3 ms), and
# the layout checks.
# Writes into $OUT when set (the device runner's folder), else results/benchmarks/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/benchmarks/gpu}"
mkdir -p "$out"
card="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower())')"
for row in resnet50 vgg16 googlenet; do
    python3 benchmarks/gpu_step_profile.py cuda 0 "$row" --no-graphs > "$out/${card}_step_profile_${row}_late_read.txt"
    head -n 3 "$out/${card}_step_profile_${row}_late_read.txt"
done
python3 benchmarks/gpu_layout_check.py | tee "$out/${card}_layout_check.txt"

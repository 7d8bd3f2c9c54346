#!/bin/bash
# The sweeps of issue 21 on a finished cifar10 run, in the cheap feature space (the dataset
# classifier, 1000 samples per setting): the CFG scale of both generators, and the diffusion
# samplers and steps. Each evaluate call rewrites RUN/report/report.json, so each one's report is
# copied to RUN/report/sweeps/; run the recipe's own `vqdiff evaluate RUN` last (samples and
# metrics are cached, so it only recomputes what its settings need).
#   bash docs/scripts/cifar10_sweeps.sh runs/cifar10
set -euo pipefail
RUN=$1
OUT=$RUN/report/sweeps
mkdir -p "$OUT"
ev() { name=$1; shift; vqdiff evaluate "$RUN" --num 1000 --extractor classifier "$@"; cp "$RUN/report/report.json" "$OUT/$name.json"; }
for cfg in 1.0 1.5 2.0 3.0; do
  ev "cfg-$cfg" --cfg "$cfg" --steps 16 --sampler ancestral
done
ev samplers --steps 4,8,16,32 --sampler ancestral,maskgit,halton --generators diffusion

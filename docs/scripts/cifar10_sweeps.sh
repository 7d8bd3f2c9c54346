#!/bin/bash
# The sweeps of issue 21 on a finished cifar10 run, in the cheap feature space (the dataset
# classifier, 1000 samples per setting, against the recipe's reference): the CFG scale of both
# generators, then the diffusion samplers at 8, 16 and 32 steps. Each `vqdiff evaluate` call rewrites
# RUN/report/, so the recipe's report is kept aside and put back at the end; each sweep's
# report.json is copied to RUN/report/sweeps/NAME.json.
#   bash docs/scripts/cifar10_sweeps.sh runs/cifar10      # CFGS="1.0 2.0" STEPS=16: a shorter sweep
#   CFGS="4.0 5.0" SAMPLERS= bash docs/scripts/cifar10_sweeps.sh runs/cifar10   # CFG scales only
set -euo pipefail
RUN=$1
KEEP=$(mktemp -d)  # the recipe's report
NEW=$(mktemp -d)   # this sweep's report.json files
cp -r "$RUN/report/." "$KEEP/"
trap 'rm -rf "$RUN/report" && mkdir -p "$RUN/report" && cp -r "$KEEP/." "$RUN/report/" && mkdir -p "$RUN/report/sweeps" && cp "$NEW"/*.json "$RUN/report/sweeps/" 2>/dev/null; rm -rf "$KEEP" "$NEW"' EXIT
ev() { name=$1; shift; vqdiff evaluate "$RUN" --num 1000 --extractor classifier --one-space "$@"; cp "$RUN/report/report.json" "$NEW/$name.json"; }
for cfg in ${CFGS:-1.0 1.5 2.0 3.0}; do
  ev "cfg-$cfg" --cfg "$cfg" --steps 16
done
SAMPLERS=${SAMPLERS-ancestral,maskgit,halton}
if [ -n "$SAMPLERS" ]; then
  ev samplers --steps "${STEPS:-8,16,32}" --sampler "$SAMPLERS" --generators diffusion
fi

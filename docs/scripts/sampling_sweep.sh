#!/bin/bash
# Sampling settings of a finished run's generators in Inception's space, one `vqdiff evaluate` call per
# setting (NUM samples each, default 2000, against the recipe's reference); each call's report row is
# appended to OUT (jsonl). The recipe's report is kept aside and put back at the end.
#   bash docs/scripts/sampling_sweep.sh RUN OUT.jsonl "ar --cfg 3 --temperatures 0.9" "diffusion --cfg 3 --sampler maskgit --steps 16" ...
set -euo pipefail
RUN=$1; OUT=$2; shift 2
KEEP=$(mktemp -d)
[ -d "$RUN/report" ] && cp -r "$RUN/report/." "$KEEP/"
# context.json (rFID and the data floor at NUM) is a cache the next sweep reuses: it stays
trap 'cp -n "$RUN/report/context.json" "$KEEP/" 2>/dev/null; rm -rf "$RUN/report" && mkdir -p "$RUN/report" && cp -r "$KEEP/." "$RUN/report/"; rm -rf "$KEEP"' EXIT
for setting in "$@"; do
  set -- $setting
  gen=$1; shift
  t0=$(date +%s)
  vqdiff evaluate "$RUN" --generators "$gen" --num "${NUM:-2000}" --extractor inception --one-space "$@" > /dev/null
  python - "$RUN/report/report.json" "$setting" "$(( $(date +%s) - t0 ))" >> "$OUT" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["results"]:
    keep = {k: r.get(k) for k in ("generator", "sampler", "temperature", "steps", "cfg", "top_k", "top_p", "fid", "precision", "recall", "class_accuracy", "images_per_second")}
    print(json.dumps({"setting": sys.argv[2], "seconds": int(sys.argv[3]), **keep}))
PY
  tail -n 1 "$OUT"
done

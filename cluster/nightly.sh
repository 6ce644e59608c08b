#!/usr/bin/env bash
# The nightly evaluation and its comparison with the night before: the entrypoint of
# cluster/kuberay/raycronjob.yaml (it runs on the Ray head as the job's driver), usable by any
# other scheduler too (cron + `ray job submit -- bash cluster/nightly.sh`).
#
#   1. opticam run CONFIG --run-id nightly-YYYY-MM-DD --output OUTPUT      (resumes if rerun today)
#   2. opticam report OUTPUT/run=ID --against previous --fail-on THRESHOLDS --out REPORT
#      `previous` = the latest earlier run under OUTPUT. The first night has none: the report is
#      written and the comparison skipped.
#   3. the report folder is copied to OUTPUT/report=ID when OUTPUT is remote (s3://), since the
#      pod's disk goes away with the cluster.
#
# Exit status, for the scheduler to alert on: 0 all well; 1 a metric moved beyond its threshold
# (opticam report's alert; the report is still written and copied); 2 the report failed (opticam
# report's error status); 3 the evaluation failed (no report then), or the report could not be
# copied.
#
# Settings (environment):
#   OPTICAM_OUTPUT          output root (required; e.g. s3://my-bucket/opticam/nightly)
#   OPTICAM_CONFIG          run config (default: imagenet-nightly.yaml beside this script)
#   OPTICAM_RUN_ID          run id (default: nightly-$(date -u +%F), the UTC date)
#   OPTICAM_FAIL_ON         thresholds, opticam report --fail-on syntax (default below)
#   OPTICAM_FAIL_DIRECTION  worse (default: only changes for the worse alert) or any
#   OPTICAM_REPORT_DIR      local folder for the report (default: ./reports/RUN_ID)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${OPTICAM_CONFIG:-$here/configs/imagenet-nightly.yaml}"
output="${OPTICAM_OUTPUT:?set OPTICAM_OUTPUT to the nightly output root, e.g. s3://my-bucket/opticam/nightly}"
output="${output%/}"
run_id="${OPTICAM_RUN_ID:-nightly-$(date -u +%F)}"
# Percentage points for AD/AG/AI and insertion/deletion (×100); failed=0: any row that worked
# the night before and fails tonight.
fail_on="${OPTICAM_FAIL_ON:-AD=2,AG=2,AI=2,I=2,D=2,failed=0}"
direction="${OPTICAM_FAIL_DIRECTION:-worse}"
report_dir="${OPTICAM_REPORT_DIR:-reports/$run_id}"

echo "nightly: run $run_id of $config into $output"
opticam run "$config" --run-id "$run_id" --output "$output" || {
    rc=$?
    echo "nightly: the evaluation failed (opticam run exit $rc); rerun to resume run $run_id" >&2
    exit 3
}

status=0
opticam report "$output/run=$run_id" --against previous --fail-on "$fail_on" \
    --fail-direction "$direction" --out "$report_dir" || status=$?

if [ -d "$report_dir" ] && [[ "$output" == *://* ]]; then
    dest="$output/report=$run_id"
    if ! python - "$report_dir" "$dest" <<'PY'
import sys
from pipeline import storage  # honours AWS_ENDPOINT_URL(_S3) like the job itself

src, dest = sys.argv[1:]
fs, path = storage.fsspec_filesystem(dest)
fs.put(src.rstrip("/") + "/", path, recursive=True)
print(f"nightly: report copied to {dest}")
PY
    then
        echo "nightly: could not copy the report to $dest (it stays in $report_dir on the head)" >&2
        [ "$status" -ne 0 ] || status=3
    fi
fi

case "$status" in
    0) echo "nightly: $run_id done, no threshold exceeded" ;;
    1) echo "nightly: ALERT: $run_id moved beyond a threshold ($fail_on); see the report" >&2 ;;
    *) echo "nightly: the report failed or was not copied (exit $status)" >&2 ;;
esac
exit "$status"

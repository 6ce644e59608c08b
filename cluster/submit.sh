#!/usr/bin/env bash
# Submit an opticam run config to a running Ray cluster with `ray job submit`.
#
#   cluster/submit.sh [options] CONFIG [-- extra `opticam run` arguments]
#
#   --run-id ID        run id (default: the config's run_id, else CONFIG-NAME-YYYYmmddTHHMMSSZ).
#                      Submitting again with the same run id resumes: only missing rows are computed.
#   --output URI       results root, overriding the config's `output`
#   --no-wait          return once submitted (default: follow the job's logs until it ends, and exit
#                      non-zero if it failed)
#   --no-pip           the cluster already has opticam installed (the image of cluster/Dockerfile):
#                      leave `pip` out of the runtime env
#   --runtime-env FILE runtime env YAML (default: cluster/runtime_env.yaml)
#   --dry-run          print what would be submitted, submit nothing
#
# Environment:
#   RAY_ADDRESS         the cluster's dashboard/job address (default http://127.0.0.1:8265, e.g.
#                       through `ray dashboard cluster/aws.yaml` or `kubectl port-forward`)
#   RAY_AUTH_MODE       Ray 2.60 token authentication: set to `token` here when a token is found
#                       (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) and the mode is unset.
#                       The token is the cluster's: the one `ray up` copied from ~/.ray/auth_token
#                       (cluster/aws.yaml), or KubeRay's Secret (cluster/README.md).
#   AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION, AWS_REGION
#                       copied into the job's env_vars when set here. Credentials never are: they
#                       would be visible in the dashboard; the nodes hold their own (role, IRSA).
#   OPTICAM_ENTRYPOINT  the command the job runs (default `opticam`; e.g. `python -m pipeline`)
#   PYTHON              interpreter with PyYAML for reading the config (default: .venv/bin/python
#                       if present, else python3)
#
# The run config is uploaded with the repository (runtime env working_dir), so it must lie inside
# this checkout; the job reads it by its path relative to the repository root.
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runtime_env="$root/cluster/runtime_env.yaml"
run_id="" output="" wait=1 pip=1 dry=0 config=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --run-id) run_id="${2:?--run-id needs a value}"; shift 2 ;;
        --output) output="${2:?--output needs a value}"; shift 2 ;;
        --no-wait) wait=0; shift ;;
        --wait) wait=1; shift ;;
        --no-pip) pip=0; shift ;;
        --runtime-env) runtime_env="$(cd "$(dirname "${2:?--runtime-env needs a file}")" && pwd)/$(basename "$2")"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$config" ] || die "one CONFIG only (extra opticam arguments go after --)"; config="$1"; shift ;;
    esac
done
[ -n "$config" ] || die "usage: cluster/submit.sh [options] CONFIG [-- extra opticam run arguments]"
[ -f "$config" ] || die "no such run config: $config"
[ -f "$runtime_env" ] || die "no such runtime env: $runtime_env"

config_abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
case "$config_abs" in
    "$root"/*) config_rel="${config_abs#"$root"/}" ;;
    *) die "$config is outside the repository ($root): the job only sees the uploaded checkout" ;;
esac

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

# The config's output and run_id (for the default run id and the closing hints), and the runtime
# env as JSON with the pass-through variables added.
mapfile -t facts < <("$PYTHON" - "$config_abs" "$runtime_env" "$pip" <<'PY'
import json, os, sys

import yaml

config_path, env_path, keep_pip = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with open(config_path) as fh:
    config = yaml.safe_load(fh) or {}
with open(env_path) as fh:
    runtime_env = yaml.safe_load(fh) or {}
if not keep_pip:
    runtime_env.pop("pip", None)
env_vars = dict(runtime_env.get("env_vars") or {})
for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
if env_vars:
    runtime_env["env_vars"] = {k: str(v) for k, v in env_vars.items()}
print(config.get("output") or "")
print(config.get("run_id") or "")
print(json.dumps(runtime_env, separators=(",", ":")))
PY
)
[ "${#facts[@]}" -eq 3 ] || die "could not read $config or $runtime_env with $PYTHON (needs PyYAML)"
config_output="${facts[0]}" config_run_id="${facts[1]}" runtime_env_json="${facts[2]}"

stem="$(basename "$config" .yaml)"; stem="${stem%.yml}"
run_id="${run_id:-${config_run_id:-$stem-$(date -u +%Y%m%dT%H%M%SZ)}}"
results="${output:-$config_output}"
[ -n "$results" ] || die "$config has no output and --output was not given"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"

if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] || [ -f "$HOME/.ray/auth_token" ]; }; then
    export RAY_AUTH_MODE=token
    echo "submit.sh: found a Ray auth token; RAY_AUTH_MODE=token" >&2
fi

read -r -a entry <<< "${OPTICAM_ENTRYPOINT:-opticam}"
submission_id="opticam-$run_id-$(date -u +%H%M%S)"
cmd=(ray job submit --address "$address" --submission-id "$submission_id"
     --runtime-env-json "$runtime_env_json")
[ "$wait" -eq 1 ] || cmd+=(--no-wait)
cmd+=(-- "${entry[@]}" run "$config_rel" --run-id "$run_id")
[ -z "$output" ] || cmd+=(--output "$output")
cmd+=("${extra[@]}")

hints() {
    cat <<EOF

run $run_id (submission $submission_id on $address)
  status:   ray job status $submission_id
  logs:     ray job logs $submission_id --follow
  stop:     ray job stop $submission_id        (resume later: cluster/submit.sh --run-id $run_id $config)
  results:  ${results%/}/run=$run_id/dataset=DATASET/model=MODEL/*.parquet
  report:   opticam report ${results%/}/run=$run_id --out reports/$run_id
            (add --against previous to compare with the run before it under ${results%/})
EOF
}

if [ "$dry" -eq 1 ]; then
    echo "RAY_AUTH_MODE=${RAY_AUTH_MODE:-}"
    printf '%q ' "${cmd[@]}"; echo
    hints
    exit 0
fi
command -v ray >/dev/null || die "the ray CLI is not on PATH (pip install 'ray[default]==<the cluster's version>')"

cd "$root"   # working_dir "." in the runtime env is this checkout
status=0
"${cmd[@]}" || status=$?
hints
exit "$status"

"""cluster/: the files an operator uses to run the job on a real Ray cluster, checked without one.

Every YAML parses; the run configs have the documented shape and name only real methods, options,
metric groups, models and weights; the ray-up config passes Ray's own validation; the KubeRay
manifests and the runtime env agree with the run configs, with pyproject.toml and with each
other (Ray version, image, GPUs, token auth); submit.sh and nightly.sh do what they say, run
against stub `ray` / `opticam` commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from opticam_core import metrics
from tests._peers import require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = CLUSTER / "configs"
DEMO_CONFIG = ROOT / "pipeline" / "demo" / "demo.yaml"  # packaged, for `opticam demo` from a wheel
IMAGE_ROOT = "/home/ray/opticam/"       # where cluster/Dockerfile puts the repository

PAPER_MODELS = ["resnet50", "vgg16_bn", "vit_base_patch16_224", "deit_base_patch16_224"]


def load(path: Path):
    return yaml.safe_load(path.read_text())


def run_configs() -> list[Path]:
    # finetune-*.yaml are `opticam finetune` configs (checked in tests/test_finetune.py)
    return sorted([*(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("finetune-")), DEMO_CONFIG])


def pyproject_dependencies() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["job"]  # what a cluster node runs
    return {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower(): re.sub(r"\[.*?\]", "", d) for d in deps}


def ray_version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    return {p.stem: load(p) for p in run_configs()}


def test_every_yaml_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text())]
        assert docs and all(isinstance(d, dict) and d for d in docs), path


def test_the_run_configs_are_there():
    assert {p.stem for p in run_configs()} >= {"imagenet-val", "chestxray", "kvasir", "demo"}


@pytest.mark.parametrize("path", run_configs(), ids=lambda p: p.stem)
def test_run_configs_pass_the_jobs_validator(path):
    """The same validation `opticam run --check` does (the rules live in pipeline.config only)."""
    from pipeline.config import load_config

    assert load_config(path).pairs()


# --------------------------------------------------------------------------------------------
# What each run config promises


def _normalised(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_paper_configs_use_every_method_at_the_papers_defaults(configs):
    from opticam_core.methods import METHODS, REGISTRY, method_options
    from pipeline.config import load_config

    cnn_methods = {k for k in METHODS if REGISTRY[k].family != "attention"}
    for name in ("imagenet-val", "imagenet-nightly"):
        assert set(configs[name]["methods"]) == set(METHODS), name
        # each model runs its table's methods: Table 1 (CNNs), Table 2 (transformers: no Ablation-CAM)
        plans = {m.key: set(methods) for _, m, methods in load_config(CONFIGS / f"{name}.yaml").plans()}
        assert plans["resnet50"] == plans["vgg16_bn"] == cnn_methods
        assert plans["vit_base_patch16_224"] == plans["deit_base_patch16_224"] == set(METHODS) - {"ablationcam"}
    for name in ("chestxray", "kvasir"):  # ResNet50 and VGG16 only
        assert set(configs[name]["methods"]) == cnn_methods, name
    for name in ("imagenet-val", "imagenet-nightly", "chestxray", "kvasir"):
        methods = configs[name]["methods"]
        for key, options in methods.items():
            defaults = method_options(key)
            for option, value in options.items():
                assert _normalised(value) == _normalised(defaults[option]), (name, key, option)
    assert configs["imagenet-val"]["methods"]["opticam"]["iterations"] == 100      # SPEC §3
    assert configs["imagenet-val"]["methods"]["extremal"]["iterations"] == 800     # TorchRay


def test_imagenet_val_is_the_full_paper_setup(configs):
    from opticam_core.models import BUILTIN

    cfg = configs["imagenet-val"]
    [ds] = cfg["datasets"]
    assert ds["limit"] is None and ds["uri"].startswith("s3://")
    assert [m["name"] for m in cfg["models"]] == PAPER_MODELS
    for m in cfg["models"]:
        assert m["layer"] == BUILTIN[m["name"]].layer, m  # the paper's target layers (SPEC §6)
        assert m.get("weights") and "checkpoint" not in m and "num_classes" not in m
    # every group of the val tables; those that re-run the method (Table 4's MS/ADCC) have their own config
    assert cfg["metrics"] == [g for g in metrics.default_groups() if g != "selectivity"]
    table4 = configs["imagenet-table4"]
    assert set(table4["metrics"]) == {"aopc", "sensitivity", "adcc"}
    assert [m["name"] for m in table4["models"]] == ["resnet50", "vgg16_bn"]
    assert cfg["compute"]["gpus_per_actor"] >= 1


def test_the_nightly_config_is_a_fixed_subset_of_imagenet_val(configs):
    full, nightly = configs["imagenet-val"], configs["imagenet-nightly"]
    for key in ("models", "methods", "metrics"):
        assert nightly[key] == full[key], key
    [ds_full], [ds_night] = full["datasets"], nightly["datasets"]
    assert ds_night["uri"] == ds_full["uri"] and ds_night["name"] == ds_full["name"]
    assert isinstance(ds_night["limit"], int) and 0 < ds_night["limit"] < 50_000
    assert nightly["output"] != full["output"]  # its own root: `previous` is the night before


def test_pretrained_weights_exist_for_their_architectures(configs):
    """Checked against torchvision's and timm's registries, without downloading anything."""
    import timm
    import torchvision

    timm_tags = set(timm.list_pretrained())
    for cfg in configs.values():
        for m in cfg["models"]:
            weights = m.get("weights")
            if weights in (None, "default", "DEFAULT"):
                continue
            try:
                enum = torchvision.models.get_model_weights(m["name"])
            except (ValueError, KeyError):
                assert f"{m['name']}.{weights}" in timm_tags, m
            else:
                assert weights in enum.__members__, m


def test_study_configs_hold_the_papers_settings(configs):
    """Tables 6/A.12/A.13 (1k, VGG16), A.9 (other classes, ResNet50), A.14 (no normalisation)."""
    from opticam_core.methods import METHODS, REGISTRY
    from pipeline.config import load_config

    ablations = load_config(CONFIGS / "imagenet-1k-ablations.yaml")
    [ds] = ablations.datasets
    assert ds.subset.size == 1000 and ds.uri == configs["imagenet-val"]["datasets"][0]["uri"]
    assert {m.name for m in ablations.models} == {"vgg16_bn"}
    opticam = {k: v for k, v in ablations.resolved_methods().items() if k.split(":")[0] == "opticam"}
    assert {(v["objective"], v["normalization"]) for v in opticam.values()} == {
        *((f, n) for f in ("mask", "diff") for n in ("range", "max", "sigmoid")), ("iomask", "range"), ("iodiff", "range")}
    assert {v["iterations"] for v in opticam.values()} == {50}  # Table A.12's setting
    assert opticam["opticam"]["objective"] == "mask" and opticam["opticam"]["normalization"] == "range"
    baselines = ["fakecam", "gradcam", "gradcampp", "scorecam", "ablationcam", "xgradcam", "layercam", "extremal"]
    assert [k for k in ablations.methods if ":" not in k and k != "opticam"] == baselines  # Table 6's rows
    layers = [m.layer for _, m in ablations.pairs() if "@" in m.key]
    assert layers == [f"features.{i}" for i in (42, 36, 32, 29, 26, 22, 19, 16, 12, 9, 6)]  # Table A.13

    other = load_config(CONFIGS / "imagenet-other-classes.yaml")
    assert other.targets == ("label", "top1", "top2", "least")
    assert [m.name for m in other.models] == ["resnet50"] and other.datasets[0].limit is None
    assert list(other.methods) == ["gradcam", "gradcampp", "scorecam", "opticam"]

    raw = load_config(CONFIGS / "imagenet-unnormalized.yaml")
    assert [(m.name, m.key, m.normalize) for m in raw.models] == [
        ("resnet50", "resnet50-unnormalized", False), ("vgg16_bn", "vgg16_bn-unnormalized", False)]
    table1 = {k for k in METHODS if REGISTRY[k].family != "attention"} - {"hirescam", "lime", "gradshap"}
    assert set(raw.methods) == table1  # Table A.14's rows
    for cfg in (other, raw):
        assert cfg.resolved_methods()["opticam"]["iterations"] == 100  # Table 1's setting


@pytest.mark.parametrize("name,classes", [("chestxray", 2), ("kvasir", 8)])
def test_medical_configs(configs, name, classes):
    from opticam_core.models import BUILTIN

    cfg = configs[name]
    [ds] = cfg["datasets"]
    assert {m["name"] for m in cfg["models"]} == {"resnet50", "vgg16_bn"}
    for m in cfg["models"]:
        assert m["checkpoint"].startswith("s3://") and m["checkpoint"].endswith(".pt")
        assert m["num_classes"] == classes
        assert m["layer"] == BUILTIN[m["name"]].layer
        assert m["key"].startswith(name) and m["datasets"] == [ds["name"]]
        assert "weights" not in m  # the checkpoint replaces them; nothing to download
    # No boxes in these datasets: the box-based groups are not asked for.
    assert set(cfg["metrics"]) == {"classification", "insertion_deletion"}


def test_demo_config(configs):
    from opticam_core.methods import METHODS, method_options

    cfg = configs["demo"]
    assert cfg["output"] == "runs/demo"
    assert cfg["datasets"] == [{"name": "demo", "uri": "demo", "limit": None}]
    assert [m["name"] for m in cfg["models"]] == ["efficientnet_lite0"]
    # every method that serves its CNN: the attention methods need a transformer, and no ViT
    # ships its weights in a package (the config says so)
    from opticam_core.methods import REGISTRY

    assert set(cfg["methods"]) == {k for k in METHODS if REGISTRY[k].family != "attention"}
    assert "transformer" in DEMO_CONFIG.read_text()
    # every group but those that re-run the methods (the config says why)
    assert list(cfg["metrics"]) == metrics.default_groups()
    assert "re-run each" in DEMO_CONFIG.read_text()
    compute = cfg["compute"]
    assert compute["actors"] == 1 and compute["batch_size"] == 8 and compute["gpus_per_actor"] == 0
    # A local Ray on a 2-core laptop has 4 logical CPUs (pipeline.job.ensure_ray): the actors must
    # leave some to Ray Data's read and write tasks, or the job hangs.
    from pipeline.job import local_cpus

    assert compute["actors"] * compute["cpus_per_actor"] < local_cpus(2)

    # Every setting that departs from the paper says why, in a comment just above or beside it.
    lines = DEMO_CONFIG.read_text().splitlines()
    from opticam_core.metrics import GROUPS as METRIC_GROUPS

    settings = [(key, options, method_options(key)) for key, options in cfg["methods"].items()]
    settings += [(group, options or {}, METRIC_GROUPS[group].defaults()) for group, options in cfg["metrics"].items()]
    for key, options, defaults in settings:
        changed = [o for o, v in options.items() if _normalised(v) != _normalised(defaults[o])]
        if not changed:
            continue
        at = next(i for i, line in enumerate(lines) if re.match(rf"\s+{key}:", line))
        above = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            above.append(line)
        note = " ".join(above) + lines[at].partition("#")[2]
        assert re.search(r"reduc", note, re.I), f"demo.yaml changes {key} {changed} without saying why"


# --------------------------------------------------------------------------------------------
# Runtime env, ray-up config, image: consistent with pyproject.toml and with each other


def test_runtime_env(tmp_path):
    env = load(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "."
    for pattern in (".venv/", ".git/", "runs/"):
        assert pattern in env["excludes"]
    packages = env["pip"]["packages"]
    assert packages[-1] == "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"  # installs opticam: the command
    deps = pyproject_dependencies()
    assert sorted(packages[:-1]) == sorted(v for k, v in deps.items() if k != "ray")
    for name, value in env.get("env_vars", {}).items():
        assert isinstance(value, str), name
        assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", name), f"{name}: no secrets in the runtime env"


def test_ray_up_config_passes_rays_own_validation():
    require("jsonschema")
    require("boto3")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(CLUSTER / "aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    validate_config(prepare_config(json.loads(json.dumps(cfg))))

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu_types = [v for v in workers.values() if re.match(r"(g5|g6|p4d|p5)\.", v["node_config"]["InstanceType"])]
    assert gpu_types and len(gpu_types) == len(workers)
    assert any(v["max_workers"] >= 1 for v in gpu_types)
    for v in gpu_types:
        assert 0 <= v["min_workers"] <= v["max_workers"] <= cfg["max_workers"]
        assert "IamInstanceProfile" in v["node_config"]  # workers read and write S3
    # Token auth on every node: the operator's token is copied and the mode set before ray start.
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for cmd in (cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]):
        assert "export RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
    # The setup pre-installs exactly the project's dependencies except Ray itself.
    [setup] = cfg["setup_commands"]
    installed = sorted(shlex.split(setup)[3:])
    assert installed == sorted(v for k, v in pyproject_dependencies().items() if k != "ray")


def _images() -> dict[str, str]:
    found = {"aws.yaml": load(CLUSTER / "aws.yaml")["docker"]["image"]}
    m = re.search(r"^ARG RAY_IMAGE=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    found["Dockerfile"] = m.group(1)
    return found


def test_one_ray_version_everywhere():
    """ray>=2.50 and Python 3.11 per pyproject; one Ray version across image tags and KubeRay."""
    versions = set()
    for where, image in _images().items():
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", image)
        assert m, (where, image)
        versions.add(m.group(1))
    for name in ("rayjob.yaml", "raycronjob.yaml"):
        doc = load(CLUSTER / "kuberay" / name)
        spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
        versions.add(spec["rayClusterSpec"]["rayVersion"])
    assert len(versions) == 1, versions
    [version] = versions
    floor = re.search(r"ray>=([\d.]+)", pyproject_dependencies()["ray"]).group(1)
    assert ray_version_tuple(version) >= ray_version_tuple(floor)
    assert ray_version_tuple(version) >= (2, 52)  # token authentication


def test_dockerfile_installs_the_project_and_keeps_the_context_small():
    text = (CLUSTER / "Dockerfile").read_text()
    for part in ("pyproject.toml", "README.md", "opticam_core", "pipeline", "cluster"):
        assert re.search(rf"^COPY .*\b{re.escape(part)}\b", text, re.M), part
        assert (ROOT / part).exists(), part
    assert re.search(r"^RUN pip install --no-cache-dir \.", text, re.M)
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text
    ignore = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*"  # an allow-list: .venv, runs/, .git stay out of the build context
    assert not any(line.startswith(("!.venv", "!runs", "!.git")) for line in ignore)


# --------------------------------------------------------------------------------------------
# KubeRay


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT), image_path
    return ROOT / image_path[len(IMAGE_ROOT):]


def _job_specs():
    job = load(CLUSTER / "kuberay" / "rayjob.yaml")
    cron = load(CLUSTER / "kuberay" / "raycronjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    return {"rayjob": job["spec"], "raycronjob": cron["spec"]["jobTemplate"]}


def _check_cluster_spec(spec: dict, run_config: dict):
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    service_account = load(CLUSTER / "kuberay" / "serviceaccount.yaml")["metadata"]["name"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == service_account
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    images = {head["containers"][0]["image"]}
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == service_account
        [container] = pod["containers"]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        assert limits == container["resources"]["requests"]
        per_pod = int(limits.get("nvidia.com/gpu", 0))
        assert per_pod >= 1
        assert int(limits["cpu"]) >= run_config["compute"]["cpus_per_actor"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus += per_pod * group["maxReplicas"]
    compute = run_config["compute"]
    assert gpus >= compute["actors"] * compute["gpus_per_actor"]  # every actor finds a GPU
    assert len(images) == 1


def test_rayjob_runs_opticam_on_a_repository_config():
    spec = _job_specs()["rayjob"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["opticam", "run"]
    config = _repo_path(argv[2])
    assert config.parent == CONFIGS and config.is_file()
    assert "--run-id" in argv  # fixed, so a retry resumes instead of starting over
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec, load(config))


def test_raycronjob_runs_the_nightly_script_with_a_valid_threshold():
    cron = load(CLUSTER / "kuberay" / "raycronjob.yaml")
    assert len(cron["spec"]["schedule"].split()) == 5
    spec = _job_specs()["raycronjob"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "bash" and _repo_path(argv[1]) == CLUSTER / "nightly.sh"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    config = _repo_path(env["OPTICAM_CONFIG"])
    assert config.is_file()
    assert env["OPTICAM_OUTPUT"] == load(config)["output"].rstrip("/")
    from pipeline.report.compare import parse_thresholds

    thresholds = parse_thresholds(env["OPTICAM_FAIL_ON"])
    assert {"AD", "AG", "AI", "failed"} <= set(thresholds)
    assert spec["backoffLimit"] == 0 and spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec, load(config))


# --------------------------------------------------------------------------------------------
# The scripts, against stub commands


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _env(tmp_path: Path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "OPTICAM_"))}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}", HOME=str(home),
               PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _submit(tmp_path, *args, **env):
    return subprocess.run(["bash", str(CLUSTER / "submit.sh"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(tmp_path, **env), timeout=60)


def _dry_run_command(out: str) -> list[str]:
    line = next(l for l in out.splitlines() if l.startswith("ray job submit"))
    return shlex.split(line)


def test_submit_dry_run(tmp_path):
    r = _submit(tmp_path, "--dry-run", "--run-id", "r1", "--output", "s3://b/out", "--no-wait",
                str(DEMO_CONFIG), "--", "--extra-flag",
                RAY_ADDRESS="http://10.0.0.5:8265", AWS_ENDPOINT_URL="http://127.0.0.1:9000",
                AWS_SECRET_ACCESS_KEY="do-not-leak", AWS_ACCESS_KEY_ID="AKIA-do-not-leak")
    assert r.returncode == 0, r.stderr
    argv = _dry_run_command(r.stdout)
    assert argv[argv.index("--address") + 1] == "http://10.0.0.5:8265"
    assert "--no-wait" in argv
    sep = argv.index("--")
    assert argv[sep + 1:] == ["opticam", "run", "pipeline/demo/demo.yaml", "--run-id", "r1",
                              "--output", "s3://b/out", "--extra-flag"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == "." and "pip" in runtime_env
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "do-not-leak" not in r.stdout + r.stderr
    assert "RAY_AUTH_MODE=\n" in r.stdout  # no token anywhere: the mode stays unset
    assert "s3://b/out/run=r1/dataset=DATASET/model=MODEL/*.parquet" in r.stdout
    assert "opticam report s3://b/out/run=r1" in r.stdout


def test_submit_finds_the_token_and_defaults(tmp_path):
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("secret-token")
    r = _submit(tmp_path, "--dry-run", "--no-pip", str(CONFIGS / "chestxray.yaml"))
    assert r.returncode == 0, r.stderr
    assert "RAY_AUTH_MODE=token" in r.stdout and "secret-token" not in r.stdout
    argv = _dry_run_command(r.stdout)
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert "--no-wait" not in argv
    run_id = argv[argv.index("--run-id") + 1]
    assert re.fullmatch(r"chestxray-\d{8}T\d{6}Z", run_id)
    assert "pip" not in json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert f"s3://my-bucket/opticam/runs/run={run_id}/" in r.stdout  # the config's output


def test_submit_runs_ray_and_returns_its_status(tmp_path):
    log = tmp_path / "ray.args"
    _env(tmp_path)  # creates bin/
    _stub(tmp_path / "bin", "ray",
          f'printf "%s\\n" "$PWD" "$@" > {shlex.quote(str(log))}\nexit "${{STUB_RAY_EXIT:-0}}"\n')
    ok = _submit(tmp_path, "--run-id", "r2", str(DEMO_CONFIG))
    assert ok.returncode == 0, ok.stderr
    called = log.read_text().splitlines()
    assert called[0] == str(ROOT)  # submitted from the repository root: working_dir "." is the checkout
    assert called[1:4] == ["job", "submit", "--address"]
    assert "ray job logs opticam-r2-" in ok.stdout
    failed = _submit(tmp_path, "--run-id", "r2", str(DEMO_CONFIG), STUB_RAY_EXIT="1")
    assert failed.returncode == 1


def test_submit_refuses_a_config_outside_the_checkout(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text(DEMO_CONFIG.read_text())
    r = _submit(tmp_path, "--dry-run", str(outside))
    assert r.returncode == 2 and "outside the repository" in r.stderr


@pytest.mark.parametrize("report_status", [0, 1, 2])
def test_nightly_script(tmp_path, report_status):
    env = _env(tmp_path, OPTICAM_OUTPUT=f"file://{tmp_path}/out/", STUB_REPORT_EXIT=str(report_status))
    calls = tmp_path / "opticam.calls"
    _stub(tmp_path / "bin", "opticam", f"""
printf '%s\\n' "$*" >> {shlex.quote(str(calls))}
if [ "$1" = report ]; then
    out="${{@: -1}}"; mkdir -p "$out"; echo '# report' > "$out/report.md"
    exit "$STUB_REPORT_EXIT"
fi
""")
    r = subprocess.run(["bash", str(CLUSTER / "nightly.sh")], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == report_status, r.stdout + r.stderr
    run_id = "nightly-" + datetime.now(timezone.utc).strftime("%Y-%m-%d")
    run, report = calls.read_text().splitlines()
    assert run == (f"run {CONFIGS / 'imagenet-nightly.yaml'} --run-id {run_id} --output file://{tmp_path}/out")
    assert report == (f"report file://{tmp_path}/out/run={run_id} --against previous "
                      f"--fail-on AD=2,AG=2,AI=2,I=2,D=2,failed=0 --fail-direction worse --out reports/{run_id}")
    # A remote output gets the report copied beside the runs (file:// stands in for s3:// here).
    assert (tmp_path / "out" / f"report={run_id}" / "report.md").read_text() == "# report\n"
    if report_status == 1:
        assert "ALERT" in r.stderr


def test_nightly_script_stops_when_the_evaluation_fails(tmp_path):
    calls = tmp_path / "opticam.calls"
    env = _env(tmp_path, OPTICAM_OUTPUT=str(tmp_path / "out"))  # creates bin/
    _stub(tmp_path / "bin", "opticam", f'echo "$1" >> {shlex.quote(str(calls))}; [ "$1" != run ] || exit 1\n')
    r = subprocess.run(["bash", str(CLUSTER / "nightly.sh")], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=60)
    assert r.returncode == 3  # never 1: that status means "a metric moved", which this is not
    assert calls.read_text().split() == ["run"]  # no report on a failed evaluation


def test_scripts_are_executable_bash():
    for name in ("submit.sh", "nightly.sh"):
        path = CLUSTER / name
        assert path.stat().st_mode & stat.S_IXUSR, name
        subprocess.run(["bash", "-n", str(path)], check=True)

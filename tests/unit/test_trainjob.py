"""Multi-node training as a Kubeflow TrainJob, tested against the official contracts.

- Every generated TrainJob is validated against the CRD's ``openAPIV3Schema``
  (``contracts/kubeflow-trainjob-crd.yaml``) with jsonschema, read as the API server reads a
  structural schema: unknown fields are errors unless ``x-kubernetes-preserve-unknown-fields``,
  ``x-kubernetes-int-or-string`` is an integer-or-string, list-type ``map``/``set`` must be
  unique, and the CRD's CEL rules (all seven are simple) are evaluated in Python.
- The pod-level pieces (volumes, mounts, env, resources, tolerations, node selector) are
  assembled into a Pod and checked with kubernetes-validate (strict).
- The backend and the trigger are driven against a recording client that validates every
  body it receives and answers like the API server (409 on a duplicate create, 404 on a
  missing object, 422 on an invalid body), with status conditions progressing over time.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmops_provider.recipes import load_recipe
from llmops_provider.specs.train import TrainJobSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT.parent / "shared" / "contracts"
if not CONTRACTS.exists():  # a checkout with shared/ inside it
    CONTRACTS = ROOT / "shared" / "contracts"
K8S_VERSION = "1.33"
NS = "ml-train"


# ---------------------------------------------------------------- the CRD as a validator


def _structural(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as a JSON schema with the API server's pruning made strict."""
    out = {k: v for k, v in schema.items() if k != "description"}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if "items" in out:
        out["items"] = _structural(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_structural(s) for s in out[key]]
    return out


_CEL = {
    "self >= 1": lambda v: v >= 1,
    "has(self.lastUpdatedTime)": lambda v: "lastUpdatedTime" in v,
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']": lambda v: (
        v in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
    ),
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')": lambda v: (
        v == "" or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://.+$", v) is not None
    ),
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": lambda v: (
        re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", v["metadata"]["name"]) is not None
    ),
    "size(self.metadata.name) <= 63": lambda v: len(v["metadata"]["name"]) <= 63,
    "self == oldSelf": None,  # a transition rule: checked on update (RecordingCustomObjects.patch)
}


def _make_validator(schema: dict):
    import jsonschema
    from jsonschema.exceptions import ValidationError

    def list_type(validator, kind, instance, schema):
        if not validator.is_type(instance, "array"):
            return
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                yield ValidationError(f"duplicate entries for list-map keys {keys}: {seen}")
        elif kind == "set" and len(instance) != len({json.dumps(i, sort_keys=True) for i in instance}):
            yield ValidationError("duplicate entries in a list-type set")

    def cel(validator, rules, instance, schema):
        for rule in rules:
            if rule["rule"] not in _CEL:
                yield ValidationError(f"CEL rule not understood by this test: {rule['rule']}")
                continue
            check = _CEL[rule["rule"]]
            if check is not None and not check(instance):
                yield ValidationError(rule.get("message", rule["rule"]))

    cls = jsonschema.validators.extend(
        jsonschema.Draft7Validator,
        {
            "x-kubernetes-list-type": list_type,
            "x-kubernetes-validations": cel,
        },
    )
    return cls(_structural(schema))


@pytest.fixture(scope="module")
def crd():
    raw = yaml.safe_load((CONTRACTS / "kubeflow-trainjob-crd.yaml").read_text())
    version = next(v for v in raw["spec"]["versions"] if v["name"] == "v1alpha1")
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(crd):
    return _make_validator(crd)


_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def object_errors(validator, obj: dict) -> list[str]:
    """Schema errors plus the ObjectMeta checks the API server applies to every object."""
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    for key, value in (obj.get("metadata", {}).get("labels") or {}).items():
        if not _LABEL_KEY.match(key) or len(key.split("/")[-1]) > 63:
            errors.append(f"metadata.labels: invalid key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(f"metadata.labels[{key}]: invalid value {value!r}")
    return errors


def pod_templates(obj: dict) -> list[dict]:
    patches = obj["spec"].get("runtimePatches") or []
    return [
        rj["template"]["spec"]["template"]
        for p in patches
        for rj in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    ]


def as_pod(obj: dict, template: dict) -> dict:
    """The pod-level core types of one replicated job's patch, merged with the trainer, as a Pod."""
    trainer = obj["spec"]["trainer"]
    spec = copy.deepcopy(template["spec"])
    container = {
        **spec.pop("containers")[0],
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
    }
    spec["containers"] = [container]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "x",
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
        },
        "spec": spec,
    }


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_recipe():
    return load_recipe(ROOT / "dags/recipes/tiny-llama.yaml")


def make_recipe(base, *, gpus=8, num_nodes=4, pvc=True, scheduling=True):
    raw = base.model_dump(mode="json")
    raw["training"]["backend"] = "kubeflow"
    raw["training"]["world_size"] = num_nodes * (gpus or 2)
    raw["training"]["kubernetes"] = {
        "image": "registry.example.com/llmops-runtime:0.1.0",
        "namespace": NS,
        "gpus": gpus,
        "cpu": "16",
        "memory": "128Gi",
        "num_nodes": num_nodes,
        "service_account": "llmops-train",
        "shm_size": "16Gi",
        "checkpoint_pvc": "llmops-checkpoints" if pvc else None,
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} if scheduling else {},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300},
        ]
        if scheduling
        else [],
    }
    return type(base).model_validate(raw)


def make_spec(recipe, tmp_path) -> TrainJobSpec:
    return TrainJobSpec.from_recipe(
        recipe,
        dataset_dir="/data/tiny-corpus/5f1c0a",
        dataset_repo="tiny-corpus",
        dataset_commit="5f1c0a9e" * 8,
        output_dir=str(tmp_path / "out"),
        tags={"airflow_dag_id": "tiny-llama_train"},
    )


def make_context(try_number=1, run_id="manual__2026-11-28T03:00:00+00:00"):
    ti = SimpleNamespace(dag_id="tiny-llama_train", task_id="train", try_number=try_number, map_index=-1, run_id=run_id)
    return {"ti": ti, "run_id": run_id, "dag": SimpleNamespace(dag_id=ti.dag_id)}


def build(recipe, spec, context=None):
    from llmops_provider.backends import trainjob

    context = context or make_context()
    return trainjob.build_trainjob(
        spec,
        recipe.training.kubernetes,
        name=trainjob.trainjob_name(spec.recipe, context),
        namespace=NS,
        labels=trainjob.identity_labels(context),
        mlflow_secret="llmops-mlflow",
    )


@pytest.fixture
def recipe(base_recipe):
    return make_recipe(base_recipe)


@pytest.fixture
def spec(recipe, tmp_path):
    return make_spec(recipe, tmp_path)


@pytest.fixture
def obj(recipe, spec):
    return build(recipe, spec)


# ---------------------------------------------------------------- (a) the object

VARIANTS = list(itertools.product([0, 8], [1, 4], [True, False], [True, False]))


@pytest.mark.parametrize(("gpus", "num_nodes", "pvc", "scheduling"), VARIANTS)
def test_every_variant_is_valid_against_the_crd_and_kubernetes(
    base_recipe, tmp_path, validator, gpus, num_nodes, pvc, scheduling
):
    import kubernetes_validate

    recipe = make_recipe(base_recipe, gpus=gpus, num_nodes=num_nodes, pvc=pvc, scheduling=scheduling)
    obj = build(recipe, make_spec(recipe, tmp_path))
    assert object_errors(validator, obj) == []
    json.dumps(obj)  # a plain JSON document: what the API client sends

    trainer = obj["spec"]["trainer"]
    assert trainer["numNodes"] == num_nodes
    assert trainer["numProcPerNode"] == (gpus or 2)
    assert ("nvidia.com/gpu" in trainer["resourcesPerNode"]["limits"]) == bool(gpus)
    for template in pod_templates(obj):
        spec = template["spec"]
        assert ("checkpoints" in {v["name"] for v in spec["volumes"]}) == pvc
        assert ("tolerations" in spec) == scheduling and ("nodeSelector" in spec) == scheduling
        kubernetes_validate.validate(as_pod(obj, template), K8S_VERSION, strict=True)


def test_schema_check_is_not_vacuous(obj, validator):
    """Misspelt fields, wrong types and broken CEL rules fail the same validation."""
    assert object_errors(validator, obj) == []

    bad = copy.deepcopy(obj)
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in object_errors(validator, bad))

    bad = copy.deepcopy(obj)
    bad["spec"]["runtimeRef"] = {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"}  # no name
    assert object_errors(validator, bad)

    bad = copy.deepcopy(obj)
    volume = next(v for v in pod_templates(bad)[0]["spec"]["volumes"] if v["name"] == "checkpoints")
    volume["persistentVolumeClam"] = volume.pop("persistentVolumeClaim")
    assert any("persistentVolumeClam" in e for e in object_errors(validator, bad))

    bad = copy.deepcopy(obj)
    bad["spec"]["trainer"]["numProcPerNode"] = 0
    assert any("greater than or equal to 1" in e for e in object_errors(validator, bad))

    bad = copy.deepcopy(obj)
    bad["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"] = "lots"
    assert object_errors(validator, bad)

    bad = copy.deepcopy(obj)
    bad["metadata"]["name"] = "Train_Job"
    assert any("RFC 1035" in e for e in object_errors(validator, bad))

    bad = copy.deepcopy(obj)
    bad["metadata"]["labels"]["run_id"] = "manual__2026-11-28T03:00:00+00:00"
    assert any("run_id" in e for e in object_errors(validator, bad))

    bad = copy.deepcopy(obj)
    bad["spec"]["trainer"]["env"].append(dict(bad["spec"]["trainer"]["env"][0]))
    assert any("duplicate" in e for e in object_errors(validator, bad))


def test_pod_check_is_not_vacuous(obj):
    import kubernetes_validate

    pod = as_pod(obj, pod_templates(obj)[0])
    pod["spec"]["tolerations"][0]["tolerationSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_refers_to_the_deepspeed_runtime_and_patches_what_it_has(obj):
    runtime = yaml.safe_load((CONTRACTS / "kubeflow-deepspeed-runtime.yaml").read_text())
    assert obj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": runtime["kind"],
        "name": runtime["metadata"]["name"],
    }
    jobs = {rj["name"]: rj for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    patches = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert {p["name"] for p in patches} == set(jobs) == {"launcher", "node"}
    for patch in patches:
        containers = {c["name"] for c in jobs[patch["name"]]["template"]["spec"]["template"]["spec"]["containers"]}
        assert {c["name"] for c in patch["template"]["spec"]["template"]["spec"]["containers"]} <= containers
    # the runtime runs trainer.command in the launcher, which is also a node (rank 0 is there)
    assert (
        jobs["launcher"]["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    )
    assert runtime["spec"]["mlPolicy"]["mpi"]["runLauncherAsNode"] is True


def test_command_runs_the_same_entrypoint_under_mpirun(obj):
    from llmops_provider.backends.trainjob import HOSTFILE

    command = obj["spec"]["trainer"]["command"]
    assert command[:2] == ["bash", "-c"]
    launcher, ranks, per_rank = command[2], command[4], command[5]
    assert ranks == "32"
    assert f"mpirun --hostfile {HOSTFILE}" in launcher and '-np "$1"' in launcher
    assert per_rank.endswith("exec python -m llmops_provider.runtime.train --spec /etc/llmops/spec.json")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        assert f'{var}="$OMPI_COMM_WORLD_' in per_rank
    assert "MASTER_ADDR" in launcher and "MLFLOW_TRACKING_URI" in launcher


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_launch_script_is_valid_bash(obj, tmp_path):
    """Run the launcher script with a fake mpirun that records what it would start."""
    import os
    import subprocess

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mpirun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    (bindir / "mpirun").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-launcher-0-0.job slots=8\njob-node-0-0.job slots=8\n")
    command = [part.replace("/etc/mpi/hostfile", str(hostfile)) for part in obj["spec"]["trainer"]["command"]]
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "RECORD": str(tmp_path / "argv"),
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    }
    subprocess.run(command, env=env, check=True, timeout=30)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:4] == ["--hostfile", str(hostfile), "-np", "32"]
    forwarded = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert forwarded == ["MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED", "MLFLOW_TRACKING_URI"]  # unset: not sent
    assert argv[-3:-1] == ["bash", "-c"]
    # the per-rank script maps OpenMPI's variables onto torch's, then runs the entrypoint
    out = subprocess.run(
        ["bash", "-c", argv[-1].replace("exec python", "echo $RANK/$WORLD_SIZE/$LOCAL_RANK python")],
        env={
            "OMPI_COMM_WORLD_RANK": "9",
            "OMPI_COMM_WORLD_SIZE": "32",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
            "PATH": os.environ["PATH"],
        },
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("9/32/1 python -m llmops_provider.runtime.train")


def test_spec_travels_by_annotation_and_downward_api(obj, spec):
    from llmops_provider.backends.kubernetes import SPEC_ANNOTATION

    for template in pod_templates(obj):
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "train-spec")
        item = volume["downwardAPI"]["items"][0]
        assert item == {"path": "spec.json", "fieldRef": {"fieldPath": f"metadata.annotations['{SPEC_ANNOTATION}']"}}
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["train-spec"] == {"name": "train-spec", "mountPath": "/etc/llmops", "readOnly": True}
        inner = TrainJobSpec.model_validate_json(template["metadata"]["annotations"][SPEC_ANNOTATION])
        assert inner.dataset_commit == spec.dataset_commit and inner.idempotency_key == spec.idempotency_key
        assert inner.checkpoint_dir == f"/checkpoints/tiny-llama/{spec.idempotency_key}"
        assert inner.result_path == "/workspace/out/result.json"


def test_mlflow_credentials_only_by_secret_reference(obj, spec):
    env = {e["name"]: e for e in obj["spec"]["trainer"]["env"]}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "llmops-mlflow"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert "password" not in spec.model_dump_json().lower()
    assert env["LLMOPS_IMAGE"]["value"] == obj["spec"]["trainer"]["image"], "runs are tagged with the image"


def test_identity_labels_and_deterministic_name(recipe, spec, obj):
    labels = obj["metadata"]["labels"]
    assert labels["dag_id"] == "tiny-llama_train" and labels["task_id"] == "train" and labels["try_number"] == "1"
    assert labels["run_id"].startswith("manual__2026-11-28T03") and ":" not in labels["run_id"]
    name = obj["metadata"]["name"]
    assert re.match(r"^train-tiny-llama-[0-9a-f]{12}$", name)
    retry = build(recipe, spec, make_context(try_number=2))
    assert retry["metadata"]["name"] == name and retry["metadata"]["labels"]["try_number"] == "2"
    other = build(recipe, spec, make_context(run_id="scheduled__2026-11-29T03:00:00+00:00"))
    assert other["metadata"]["name"] != name
    for template in pod_templates(obj):
        assert template["metadata"]["labels"]["llmops.apache.org/trainjob"] == name


def test_ranks_must_split_evenly_over_nodes_and_fit_the_gpus(base_recipe, tmp_path):
    from llmops_provider.backends.trainjob import procs_per_node

    recipe = make_recipe(base_recipe, gpus=8, num_nodes=4)
    spec = make_spec(recipe, tmp_path)
    k8s = recipe.training.kubernetes
    uneven = spec.model_copy(update={"training": spec.training.model_copy(update={"world_size": 30})})
    with pytest.raises(
        ValueError, match=r"training.world_size \(30\) is not a multiple of training.kubernetes.num_nodes"
    ):
        procs_per_node(uneven, k8s)
    wide = spec.model_copy(update={"training": spec.training.model_copy(update={"world_size": 64})})
    with pytest.raises(ValueError, match=r"set training.world_size: 32 or training.kubernetes.gpus: 16"):
        procs_per_node(wide, k8s)


def test_bad_name_is_refused(recipe, spec):
    from llmops_provider.backends.trainjob import build_trainjob

    with pytest.raises(ValueError, match="DNS-1035"):
        build_trainjob(spec, recipe.training.kubernetes, name="Train_1", namespace=NS, labels={}, mlflow_secret="s")


# ---------------------------------------------------------------- result parsing

RESULT = {
    "mlflow_run_id": "r1",
    "model_name": "tiny-llama",
    "model_version": "3",
    "dataset_commit": "ab" * 32,
    "reused": False,
    "final_loss": 5.5,
    "val_loss": 5.9,
    "tokens_per_s": 1234.5,
}


def launcher_log(result=RESULT) -> str:
    lines = [
        "Warning: Permanently added '[train-x-node-0-0.train-x]:2222' (ED25519) to the list of known hosts.",
        "2026-11-28 03:01:00,000 INFO [rank 0] llmops.train: step 50/50 loss 5.50",
        '2026-11-28 03:01:00,100 INFO [rank 3] llmops.train: result: {"not": "rank 0"}',
    ]
    if result is not None:
        lines.append("2026-11-28 03:01:02,000 INFO [rank 0] llmops.train: result: " + json.dumps(result))
    lines.append("2026-11-28 03:01:03,000 WARNING [rank 1] deepspeed: barrier")
    return "\n".join(lines) + "\n"


def test_parse_result_takes_rank_zero_result_line():
    from llmops_provider.backends.trainjob import parse_result

    assert parse_result(launcher_log()) == RESULT
    twice = launcher_log({**RESULT, "model_version": "2"}) + launcher_log()
    assert parse_result(twice)["model_version"] == "3"  # the last one (a restarted launcher logs again)


def test_parse_result_fails_closed():
    from llmops_provider.backends.trainjob import TrainJobFailed, parse_result

    with pytest.raises(TrainJobFailed, match="no rank-0"):
        parse_result(launcher_log(result=None))
    with pytest.raises(TrainJobFailed, match="not a valid TrainResult"):
        parse_result(launcher_log(result={"mlflow_run_id": "r1"}))


def test_runtime_still_logs_the_result_line_the_parser_reads():
    """The log line is the contract: runtime/train.py's rank-0 log format and its result message."""
    source = (ROOT / "llmops_provider/runtime/train.py").read_text()
    assert 'log.info("result: %s", result.model_dump_json())' in source
    assert '"%(asctime)s %(levelname)s [rank " +' in source and '"] %(name)s: %(message)s"' in source
    assert 'getLogger("llmops.train")' in source


# ---------------------------------------------------------------- (b) a recording API server


def _api_error(status: int, reason: str, message: str):
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason.replace(" ", ""),
            "code": status,
        }
    )
    return exc


def _cond(kind: str, reason: str, message: str, status: str = "True") -> dict:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-28T03:00:00Z",
    }


def _jobs(active: int, ready: int, succeeded: int = 0, failed: int = 0) -> list[dict]:
    return [
        {"name": job, "active": active, "ready": ready, "succeeded": succeeded, "failed": failed, "suspended": 0}
        for job in ("launcher", "node")
    ]


PLANS = {
    "success": [
        {"conditions": [_cond("Created", "JobSetCreated", "the JobSet was created")]},
        {"conditions": [_cond("Created", "JobSetCreated", "the JobSet was created")], "jobsStatus": _jobs(1, 1)},
        {
            "conditions": [
                _cond("Created", "JobSetCreated", "the JobSet was created"),
                _cond("Complete", "JobsCompleted", "jobset completed successfully"),
            ],
            "jobsStatus": _jobs(0, 0, succeeded=1),
        },
    ],
    "failure": [
        {"conditions": [_cond("Created", "JobSetCreated", "the JobSet was created")]},
        {"conditions": [_cond("Created", "JobSetCreated", "the JobSet was created")], "jobsStatus": _jobs(1, 1)},
        {
            "conditions": [
                _cond("Created", "JobSetCreated", "the JobSet was created"),
                _cond("Failed", "FailedJobs", "jobset failed: job launcher-0 failed: BackoffLimitExceeded"),
            ],
            "jobsStatus": _jobs(0, 0, failed=1),
        },
    ],
    "forever": [
        {"conditions": [_cond("Created", "JobSetCreated", "the JobSet was created")], "jobsStatus": _jobs(1, 1)},
    ],
}


class RecordingCustomObjects:
    """CustomObjectsApi for TrainJobs that validates every body and answers like the API server."""

    def __init__(self, validator, plan: str = "success", log_text: str | None = None):
        self.validator = validator
        self.plan = PLANS[plan]
        self.log_text = launcher_log() if log_text is None else log_text
        self.objects: dict[tuple[str, str], dict] = {}
        self.steps: dict[tuple[str, str], int] = {}
        self.plans: dict[tuple[str, str], list[dict]] = {}
        self.calls: list[tuple[str, str]] = []
        self._uid = itertools.count(1)

    def _check(self, group, version, plural):
        if (group, version, plural) != ("trainer.kubeflow.org", "v1alpha1", "trainjobs"):
            raise _api_error(404, "Not Found", f"the server could not find the resource {group}/{version}/{plural}")

    def _validate(self, obj):
        errors = object_errors(self.validator, obj)
        if obj.get("apiVersion") != "trainer.kubeflow.org/v1alpha1" or obj.get("kind") != "TrainJob":
            errors.append(f"apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')} is not a TrainJob")
        if errors:
            raise _api_error(422, "Unprocessable Entity", "TrainJob is invalid: " + "; ".join(errors))

    def _get(self, namespace, name):
        key = (namespace, name)
        if key not in self.objects:
            raise _api_error(404, "Not Found", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        return key

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self._check(group, version, plural)
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        self._validate(body)
        if body["metadata"].get("namespace", namespace) != namespace:
            raise _api_error(400, "Bad Request", "the namespace of the object does not match the request")
        if "status" in body:
            raise _api_error(422, "Unprocessable Entity", "status is a subresource: not set on create")
        if (namespace, name) in self.objects:
            raise _api_error(409, "Conflict", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
        stored = copy.deepcopy(body)
        stored["metadata"].update(
            namespace=namespace,
            uid=f"uid-{next(self._uid)}",
            generation=1,
            resourceVersion="1",
            creationTimestamp="2026-11-28T03:00:00Z",
        )
        stored["spec"].setdefault("suspend", False)
        stored["spec"].setdefault("managedBy", "trainer.kubeflow.org/trainjob-controller")
        self._validate(stored)
        self.objects[(namespace, name)] = stored
        self.steps[(namespace, name)] = 0
        self.plans[(namespace, name)] = self.plan  # each object follows the plan it was created under
        return copy.deepcopy(stored)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        self.calls.append(("get", name))
        key = self._get(namespace, name)
        obj = self.objects[key]
        if not obj["spec"].get("suspend"):
            plan = self.plans[key]
            obj["status"] = copy.deepcopy(plan[min(self.steps[key], len(plan) - 1)])
            self.steps[key] += 1
        self._validate(obj)  # the status we answer with is valid too
        return copy.deepcopy(obj)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs):
        self._check(group, version, plural)
        self.calls.append(("patch", name))
        key = self._get(namespace, name)
        old = self.objects[key]
        new = copy.deepcopy(old)
        for section, values in body.items():
            new.setdefault(section, {}).update(values)
        for field in ("runtimeRef", "trainer", "initializer", "managedBy", "activeDeadlineSeconds"):
            if old["spec"].get(field) != new["spec"].get(field):  # x-kubernetes-validations: self == oldSelf
                raise _api_error(422, "Unprocessable Entity", f"spec.{field}: field is immutable")
        self._validate(new)
        self.objects[key] = new
        return copy.deepcopy(new)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        self.calls.append(("delete", name))
        key = self._get(namespace, name)
        assert kwargs.get("propagation_policy") in (None, "Foreground", "Background", "Orphan")
        self.objects.pop(key)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}

    # -- the launcher pod (CoreV1Api), present while its TrainJob exists

    def list_namespaced_pod(self, namespace, label_selector="", **kwargs):
        wanted = dict(part.split("=", 1) for part in label_selector.split(","))
        pods = []
        for (ns, name), obj in self.objects.items():
            for template in pod_templates(obj):
                labels = template["metadata"]["labels"]
                if ns == namespace and all(labels.get(k) == v for k, v in wanted.items()):
                    job = labels["llmops.apache.org/replicated-job"]
                    pods.append(
                        SimpleNamespace(
                            metadata=SimpleNamespace(
                                name=f"{name}-{job}-0-0-x7k2p", labels=labels, creation_timestamp="2026-11-28T03:00:05Z"
                            ),
                            status=SimpleNamespace(phase="Succeeded"),
                        )
                    )
        return SimpleNamespace(items=pods)

    def read_namespaced_pod_log(self, name, namespace, container=None, tail_lines=None, **kwargs):
        self.calls.append(("log", name))
        job = name.rsplit("-launcher-", 1)[0]
        if (namespace, job) not in self.objects:
            raise _api_error(404, "Not Found", f'pods "{name}" not found')
        assert container == "node"
        lines = self.log_text.splitlines(keepends=True)
        return "".join(lines[-tail_lines:] if tail_lines else lines)


def backend_for(client, cleanup="on_success"):
    from llmops_provider.backends.trainjob import TrainJobBackend

    return TrainJobBackend(client, NS, core=client, cleanup=cleanup, sleep=lambda s: None)


def test_recording_client_answers_like_the_api_server(obj, validator):
    from kubernetes.client.exceptions import ApiException

    client = RecordingCustomObjects(validator)
    ref = {"group": "trainer.kubeflow.org", "version": "v1alpha1", "namespace": NS, "plural": "trainjobs"}
    client.create_namespaced_custom_object(body=obj, **ref)
    with pytest.raises(ApiException) as exc:
        client.create_namespaced_custom_object(body=obj, **ref)
    assert exc.value.status == 409
    bad = copy.deepcopy(obj)
    bad["metadata"]["name"] = "another"
    bad["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(ApiException) as exc:
        client.create_namespaced_custom_object(body=bad, **ref)
    assert exc.value.status == 422 and "numNode" in exc.value.body
    with pytest.raises(ApiException) as exc:
        client.patch_namespaced_custom_object(name=obj["metadata"]["name"], body={"spec": {"trainer": {}}}, **ref)
    assert exc.value.status == 422 and "immutable" in exc.value.body
    for call in (client.get_namespaced_custom_object, client.delete_namespaced_custom_object):
        with pytest.raises(ApiException) as exc:
            call(name="missing", **ref)
        assert exc.value.status == 404


def test_submit_wait_conclude_success(obj, validator):
    client = RecordingCustomObjects(validator, "success")
    backend = backend_for(client)
    name, adopted = backend.submit(obj)
    assert not adopted
    assert backend.status(name)[0] == "Pending"
    assert backend.status(name)[0] == "Running"
    assert backend.wait(name, poll_interval_s=0) == ("Complete", "JobsCompleted: jobset completed successfully")
    assert backend.conclude(name, "Complete", "done") == RESULT
    # the result was read before the job went: log, then delete (on_success)
    assert [c for c, _ in client.calls[-2:]] == ["log", "delete"]
    assert client.objects == {}


def test_submit_wait_conclude_failure_keeps_the_job(obj, validator):
    from llmops_provider.backends.trainjob import TrainJobFailed

    client = RecordingCustomObjects(validator, "failure", log_text="Traceback ...\nRuntimeError: NCCL timeout\n")
    backend = backend_for(client)
    name, _ = backend.submit(obj)
    phase, message = backend.wait(name, poll_interval_s=0)
    assert phase == "Failed" and "BackoffLimitExceeded" in message
    with pytest.raises(TrainJobFailed, match=r"(?s)Failed: FailedJobs.*NCCL timeout"):
        backend.conclude(name, phase, message)
    assert ("delete", name) not in client.calls  # on_success keeps a failed job for debugging
    assert list(client.objects) == [(NS, name)]


def test_complete_without_result_line_is_a_failure(obj, validator):
    from llmops_provider.backends.trainjob import TrainJobFailed

    client = RecordingCustomObjects(validator, "success", log_text=launcher_log(result=None))
    backend = backend_for(client)
    name, _ = backend.submit(obj)
    with pytest.raises(TrainJobFailed, match="no rank-0"):
        backend.conclude(name, *backend.wait(name, poll_interval_s=0))
    assert (NS, name) in client.objects  # kept: it did not succeed


@pytest.mark.parametrize(
    ("cleanup", "plan", "kept"),
    [
        ("always", "success", False),
        ("always", "failure", False),
        ("on_success", "success", False),
        ("on_success", "failure", True),
        ("never", "success", True),
        ("never", "failure", True),
    ],
)
def test_cleanup_policy(obj, validator, cleanup, plan, kept):
    client = RecordingCustomObjects(validator, plan)
    backend = backend_for(client, cleanup)
    name, _ = backend.submit(obj)
    phase, message = backend.wait(name, poll_interval_s=0)
    try:
        backend.conclude(name, phase, message)
    except Exception:  # noqa: BLE001 - the failure plan raises; only cleanup is under test
        assert plan == "failure"
    assert ((NS, name) in client.objects) == kept


def test_timeout_suspends_a_kept_job_and_deletes_with_always(obj, validator):
    from llmops_provider.backends.trainjob import TrainJobFailed

    client = RecordingCustomObjects(validator, "forever")
    backend = backend_for(client, "on_success")
    name, _ = backend.submit(obj)
    phase, message = backend.wait(name, timeout_s=0, poll_interval_s=0)
    assert phase == "Timeout" and "Running" in message
    with pytest.raises(TrainJobFailed, match="Timeout"):
        backend.conclude(name, phase, message)
    assert client.objects[(NS, name)]["spec"]["suspend"] is True  # kept, but holds no nodes

    client = RecordingCustomObjects(validator, "forever")
    backend = backend_for(client, "always")
    backend.submit(obj)
    with pytest.raises(TrainJobFailed):
        backend.conclude(name, *backend.wait(name, timeout_s=0, poll_interval_s=0))
    assert client.objects == {}


def test_a_job_deleted_while_waiting_fails_with_that_reason(obj, validator):
    from llmops_provider.backends.trainjob import TrainJobFailed

    client = RecordingCustomObjects(validator, "forever")
    backend = backend_for(client, "never")
    name, _ = backend.submit(obj)
    client.delete_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", name)
    with pytest.raises(TrainJobFailed, match=r"(?s)Missing: the TrainJob was deleted.*no launcher log"):
        backend.conclude(name, "Missing", "the TrainJob was deleted while waiting")


def test_retry_reattaches_instead_of_creating_twice(recipe, spec, validator):
    client = RecordingCustomObjects(validator, "success")
    backend = backend_for(client)
    first = build(recipe, spec, make_context(try_number=1))
    name, adopted = backend.submit(first)
    assert not adopted
    backend.status(name)  # Pending
    retry = build(recipe, spec, make_context(try_number=2))
    assert backend.submit(retry) == (name, True)
    assert [c for c in client.calls if c[0] == "create"] == [("create", name), ("create", name)]  # the 2nd got 409
    assert len(client.objects) == 1
    assert client.objects[(NS, name)]["metadata"]["labels"]["try_number"] == "1"  # the adopted one
    assert backend.wait(name, poll_interval_s=0)[0] == "Complete"


def test_retry_replaces_a_failed_earlier_try(recipe, spec, validator):
    client = RecordingCustomObjects(validator, "failure")
    backend = backend_for(client, "never")
    name, _ = backend.submit(build(recipe, spec, make_context(try_number=1)))
    assert backend.wait(name, poll_interval_s=0)[0] == "Failed"
    client.plan = PLANS["success"]
    assert backend.submit(build(recipe, spec, make_context(try_number=2))) == (name, False)
    assert client.objects[(NS, name)]["metadata"]["labels"]["try_number"] == "2"
    assert ("delete", name) in client.calls


def test_a_foreign_job_with_our_name_is_a_conflict(obj, validator):
    from llmops_provider.backends.trainjob import TrainJobConflict

    client = RecordingCustomObjects(validator)
    foreign = copy.deepcopy(obj)
    foreign["metadata"]["labels"]["dag_id"] = "someone_else"
    backend_for(client).submit(foreign)
    with pytest.raises(TrainJobConflict, match="belongs to"):
        backend_for(client).submit(obj)


def test_delete_of_a_missing_job_is_not_an_error(validator):
    backend = backend_for(RecordingCustomObjects(validator), "always")
    assert backend.delete("train-gone-000000000000", succeeded=True) is False


def test_bad_cleanup_policy_names_the_choices(validator):
    from llmops_provider.backends.trainjob import TrainJobBackend

    with pytest.raises(ValueError, match=r"use one of \['always', 'on_success', 'never'\]"):
        TrainJobBackend(RecordingCustomObjects(validator), NS, cleanup="sometimes")


# ---------------------------------------------------------------- the trigger


@pytest.fixture
def patched_clients(monkeypatch):
    def install(client):
        monkeypatch.setattr("llmops_provider.backends.trainjob.kube_clients", lambda conn_id: (client, client))
        return client

    return install


def _run_trigger(trigger) -> list[dict]:
    async def collect():
        return [event.payload async for event in trigger.run()]

    return asyncio.run(collect())


def test_trigger_serializes_primitives_and_round_trips():
    from llmops_provider.triggers.trainjob import TrainJobTrigger

    trigger = TrainJobTrigger(
        name="train-x-1", namespace=NS, deadline=1.9e9, kubernetes_conn_id="k8s", poll_interval_s=5
    )
    path, kwargs = trigger.serialize()
    assert path == "llmops_provider.triggers.trainjob.TrainJobTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert TrainJobTrigger(**kwargs).serialize() == (path, kwargs)


@pytest.mark.parametrize(
    ("plan", "status", "phase"), [("success", "success", "Complete"), ("failure", "failed", "Failed")]
)
def test_trigger_fires_on_terminal_state(obj, validator, patched_clients, plan, status, phase):
    from llmops_provider.triggers.trainjob import TrainJobTrigger

    client = patched_clients(RecordingCustomObjects(validator, plan))
    backend_for(client).submit(obj)
    name = obj["metadata"]["name"]
    events = _run_trigger(TrainJobTrigger(name=name, namespace=NS, deadline=4e9, poll_interval_s=0))
    assert len(events) == 1
    assert events[0]["status"] == status and events[0]["phase"] == phase and events[0]["name"] == name
    assert [c for c, n in client.calls if n == name].count("get") == 3  # Created -> Running -> terminal


def test_trigger_times_out_and_reports_a_vanished_job(obj, validator, patched_clients):
    from llmops_provider.triggers.trainjob import TrainJobTrigger

    client = patched_clients(RecordingCustomObjects(validator, "forever"))
    backend_for(client).submit(obj)
    name = obj["metadata"]["name"]
    events = _run_trigger(TrainJobTrigger(name=name, namespace=NS, deadline=0, poll_interval_s=0))
    assert events == [
        {
            "status": "timeout",
            "phase": "Timeout",
            "message": "still Running at the deadline",
            "name": name,
            "namespace": NS,
        }
    ]
    events = _run_trigger(
        TrainJobTrigger(name="train-gone-000000000000", namespace=NS, deadline=4e9, poll_interval_s=0)
    )
    assert events[0]["status"] == "error" and "deleted" in events[0]["message"]


# ---------------------------------------------------------------- the operator


@pytest.fixture
def operator_env(base_recipe, tmp_path, monkeypatch):
    recipe = make_recipe(base_recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    commit = "ab" * 32
    store = SimpleNamespace(
        local_path=lambda repo, c: tmp_path / c, head=lambda repo, branch: SimpleNamespace(commit_id=commit)
    )
    monkeypatch.setattr("llmops_provider.datasets.get_store", lambda name=None: store, raising=False)
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    return path


def _context():
    from airflow.sdk.execution_time.context import OutletEventAccessors

    return {**make_context(), "triggering_asset_events": {}, "outlet_events": OutletEventAccessors()}


def test_operator_defers_to_the_trigger_and_publishes_on_resume(operator_env, validator, patched_clients):
    from airflow.sdk.exceptions import TaskDeferred

    from llmops_provider.compat import Asset
    from llmops_provider.operators.training import DeepSpeedTrainOperator
    from llmops_provider.triggers.trainjob import TrainJobTrigger

    client = patched_clients(RecordingCustomObjects(validator, "success"))
    model = Asset("llmops://tiny-llama/model")
    context = _context()
    op = DeepSpeedTrainOperator(
        task_id="train", recipe_path=str(operator_env), outlets=[model], trainjob_poll_interval_s=0
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert isinstance(deferred.value.trigger, TrainJobTrigger)
    assert deferred.value.method_name == "execute_trainjob_complete"
    json.dumps(deferred.value.kwargs)
    json.dumps(deferred.value.trigger.serialize()[1])
    name = deferred.value.kwargs["name"]
    assert [c for c in client.calls if c[0] == "create"] == [("create", name)]

    [event] = _run_trigger(deferred.value.trigger)
    result = op.execute_trainjob_complete(context, event=event, **deferred.value.kwargs)
    assert result == {
        k: RESULT[k] for k in ("mlflow_run_id", "model_name", "model_version", "dataset_commit", "reused", "final_loss")
    }
    assert context["outlet_events"][model].extra["model_version"] == "3"
    assert client.objects == {}  # on_success: deleted after the result was read


def test_operator_waits_in_the_worker_when_not_deferrable_and_fails_with_the_log(
    operator_env, validator, patched_clients
):
    from llmops_provider.compat import AirflowException
    from llmops_provider.operators.training import DeepSpeedTrainOperator

    client = patched_clients(RecordingCustomObjects(validator, "failure", log_text="RuntimeError: out of memory\n"))
    op = DeepSpeedTrainOperator(
        task_id="train", recipe_path=str(operator_env), deferrable=False, trainjob_poll_interval_s=0
    )
    with pytest.raises(AirflowException, match=r"(?s)Failed.*out of memory"):
        op.execute(_context())
    assert len(client.objects) == 1  # kept for debugging (on_success)

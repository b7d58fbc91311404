"""cluster/: every manifest checked against the schema its consumer uses -- KubeRay's own CRDs
(strictly: an unknown key is an error, as kubeconform -strict does), the upstream Kubernetes
schemas for core resources, Ray's cluster-launcher schema -- and consistent with the project."""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
CRDS = os.environ.get("CURATION_K8S_CRDS") or os.path.join(ROOT, "..", "shared", "k8s", "kuberay-v1.7.0-crds")
KUBERNETES_VERSION = "1.33.0"
KUBERAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml",
                 "RayCronJob": "ray.io_raycronjobs.yaml"}


def _documents():
    for name in sorted(os.listdir(CLUSTER)):
        if name.endswith(".yaml") and name != "ray-cluster.yaml":
            with open(os.path.join(CLUSTER, name)) as fh:
                for doc in yaml.safe_load_all(fh):
                    if doc:
                        yield name, doc


def strict(schema):
    """Every object schema that lists properties and does not preserve unknown fields forbids
    other keys (Kubernetes itself prunes them silently, hiding typos)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")
                    and "additionalProperties" not in node):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str):
    path = os.path.join(CRDS, KUBERAY_KINDS[kind])
    if not os.path.exists(path):
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    with open(path) as fh:
        return strict(yaml.safe_load(fh)["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def validate(doc):
    import jsonschema

    if doc["kind"] in KUBERAY_KINDS:
        jsonschema.Draft7Validator(crd_schema(doc["kind"])).validate(doc)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name, doc", list(_documents()), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_is_valid(name, doc):
    validate(doc)


def test_a_misspelt_key_fails_validation():
    import jsonschema
    import kubernetes_validate

    job = next(doc for _, doc in _documents() if doc["kind"] == "RayJob")
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinshes"] = typo["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinshes"):
        validate(typo)
    deep = copy.deepcopy(job)  # deep inside the pod template too
    deep["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["workDir"] = "/app"
    with pytest.raises(jsonschema.ValidationError, match="workDir"):
        validate(deep)
    secret = next(doc for _, doc in _documents() if doc["kind"] == "Secret")
    secret = {**secret, "stringdata": secret["stringData"]}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(secret)


def test_manifests_agree_with_the_project():
    docs = {doc["kind"]: doc for _, doc in _documents()}
    job, cron, config_map = docs["RayJob"], docs["RayCronJob"], docs["ConfigMap"]
    assert cron["spec"]["jobTemplate"] == job["spec"], "the nightly RayCronJob runs the RayJob's spec"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "/app/jobs/curate.py", "run"]
    assert os.path.exists(os.path.join(ROOT, "jobs", "curate.py"))
    with open(os.path.join(CLUSTER, "Dockerfile")) as fh:
        dockerfile = fh.read()
    assert "WORKDIR /app" in dockerfile and "COPY --chown=ray:users jobs ./jobs" in dockerfile
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    config_path = entry[entry.index("--config") + 1]
    assert config_path.startswith(mount["mountPath"] + "/")
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert os.path.basename(config_path) in config_map["data"]

    from curation.config import load_config

    config = load_config(data=yaml.safe_load(config_map["data"][os.path.basename(config_path)]))
    gpu_group = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-embed")
    assert config.embedder.max_actors == gpu_group["maxReplicas"], "the embedding pool grows with the GPU group"
    secrets = {ref["secretRef"]["name"] for g in [job["spec"]["rayClusterSpec"]["headGroupSpec"],
                                                   *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
               for c in g["template"]["spec"]["containers"] for ref in c.get("envFrom", [])}
    assert secrets == {docs["Secret"]["metadata"]["name"]}
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == _ray_version()


def _ray_version() -> str:
    import ray

    return ray.__version__


def test_cluster_launcher_config_matches_rays_schema():
    import jsonschema
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as fh:
        schema = json.load(fh)
    with open(os.path.join(CLUSTER, "ray-cluster.yaml")) as fh:
        launcher = yaml.safe_load(fh)
    jsonschema.Draft7Validator(schema).validate(launcher)
    typo = {**launcher, "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(typo)

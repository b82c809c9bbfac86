"""The Kubernetes manifests of k8s/, validated offline: no Kubernetes cluster
runs on the development machines or in CI, so nothing here has been applied.

- The RayService: jsonschema against the openAPIV3Schema of KubeRay's
  RayService CRD (tests/data/k8s-schemas/, KubeRay v1.7.0, Apache-2.0), made
  strict the way `kubectl apply`'s default field validation is: an unknown
  field is an error. Its ``serveConfigV2`` string (a plain string to the
  CRD) is parsed and validated with Ray's `ServeDeploySchema`, plus a check
  for unknown fields, which that schema ignores; the serving config it names
  is loaded as `mars-serve validate` loads it.
- The built-in kinds (Namespace, Service, StatefulSet, ConfigMap,
  Deployment): `kubernetes-validate` with Kubernetes 1.37's strict schemas.
- The PodMonitor: no prometheus-operator CRD schema is available offline
  here, so only the cross-resource checks below see it.
- Between resources: selectors match pod labels, the serving config's Redis
  URL names the Redis Service, the Grafana ConfigMap holds the dashboards of
  cluster/dashboards, every Ray container has the Serve environment of
  cluster/serve_env.py, and serveConfigV2 is configs/serve/deploy/'s file.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import load_serving_config
from cluster.dashboards import CONFIGMAP_NAME, configmap_yaml, load_dashboards
from cluster.serve_env import SERVE_ENV

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRD = REPO / "tests" / "data" / "k8s-schemas" / "ray.io_rayservices.yaml"
SERVE_DEPLOY_YAML = REPO / "configs" / "serve" / "deploy" / "gpu-kuberay.serve.yaml"
KUBERNETES_VERSION = "1.37"
KUBERAY_POD_LABELS = {"ray.io/is-ray-node": "yes"}
"""Labels KubeRay puts on every Ray pod itself (not in our pod templates)."""


# --------------------------------------------------------------------------
# loading


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _objects() -> list[dict[str, Any]]:
    """Every object of every file the kustomization lists, in order."""
    return [
        obj
        for name in _kustomization()["resources"]
        for obj in yaml.safe_load_all((K8S / name).read_text())
        if obj is not None
    ]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in _objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def _rayservice() -> dict[str, Any]:
    return _one("RayService")


def _ray_pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]


def _dotted(path: typing.Iterable[str | int]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


# --------------------------------------------------------------------------
# the RayService against KubeRay's CRD


def _strict(schema: Any) -> Any:
    """`schema` with unknown fields forbidden wherever it lists properties
    (unless it preserves unknown fields), as `kubectl apply --validate=strict`,
    kubectl's default, treats them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema:
        strict["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            strict["additionalProperties"] = False
    return strict


@functools.cache
def _rayservice_validator() -> jsonschema.Draft7Validator:
    # libyaml's loader: the CRD is 1 MB of YAML (seconds with the pure-Python one).
    crd = yaml.load(CRD.read_text(), Loader=yaml.CSafeLoader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _rayservice_errors(obj: dict[str, Any]) -> list[str]:
    validator = _rayservice_validator()
    return [
        f"{_dotted(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


def test_rayservice_matches_kuberays_crd() -> None:
    rayservice = _rayservice()
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert _rayservice_errors(rayservice) == []


def test_rayservice_wrong_field_fails_with_its_path() -> None:
    broken = copy.deepcopy(_rayservice())
    head = broken["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")  # a typo
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert _rayservice_errors(broken) == [
        "spec.rayClusterConfig.headGroupSpec: Additional properties are not allowed "
        "('rayStartParam' was unexpected)",
        "spec.rayClusterConfig.workerGroupSpecs.0.replicas: 'two' is not of type 'integer'",
    ]


def test_rayservice_runs_the_pinned_ray_with_the_serve_environment() -> None:
    rayservice = _rayservice()
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    for template in _ray_pod_templates(rayservice):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            missing = {k: v for k, v in SERVE_ENV.items() if env.get(k) != v}
            assert not missing, f"{container['name']} lacks {missing} (cluster/serve_env.py)"


def test_ray_containers_work_in_the_images_checkout() -> None:
    """The Serve deploy YAML names its serving config relative to the Ray
    processes' working directory: the checkout that k8s/Dockerfile copies."""
    dockerfile = (K8S / "Dockerfile").read_text()
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, flags=re.MULTILINE)
    for template in _ray_pod_templates(_rayservice()):
        for container in template["spec"]["containers"]:
            assert container["workingDir"] == workdir
            assert container["image"] == "mars-serve"  # set by the kustomization's `images`
    images = {i["name"] for i in _kustomization()["images"]}
    assert images == {"mars-serve"}


# --------------------------------------------------------------------------
# serveConfigV2


def _unknown_fields(model: type[pydantic.BaseModel], data: Any, path: str) -> Iterator[str]:
    """Fields of `data` that `model` does not declare: Ray's Serve schemas
    ignore them silently (a typo like ``num_replica`` would deploy)."""
    if not isinstance(data, dict):
        return
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    for key, value in data.items():
        if key not in fields:
            yield f"{path}.{key}"
            continue
        for sub in _models_in(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                where = f"{path}.{key}.{i}" if isinstance(value, list) else f"{path}.{key}"
                yield from _unknown_fields(sub, item, where)


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _serve_config_errors(text: str) -> list[str]:
    data = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(data)
    except pydantic.ValidationError as exc:
        return [f"{_dotted(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return [f"{p}: unknown field" for p in _unknown_fields(ServeDeploySchema, data, "<root>")]


def test_serve_config_is_the_serve_deploy_yaml() -> None:
    serve_config = _rayservice()["spec"]["serveConfigV2"]
    assert yaml.safe_load(serve_config) == yaml.safe_load(SERVE_DEPLOY_YAML.read_text()), (
        f"k8s/rayservice.yaml spec.serveConfigV2 differs from {SERVE_DEPLOY_YAML.name}: "
        "copy that file's YAML into it"
    )


def test_serve_config_passes_rays_serve_schema() -> None:
    assert _serve_config_errors(_rayservice()["spec"]["serveConfigV2"]) == []


def test_serve_config_wrong_field_fails_with_its_path() -> None:
    data = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    data["applications"][0]["deployments"] = [{"name": "ingress", "num_replica": 2}]
    assert _serve_config_errors(yaml.safe_dump(data)) == [
        "<root>.applications.0.deployments.0.num_replica: unknown field"
    ]
    data["applications"][0]["deployments"] = [{"name": "ingress", "num_replicas": "many"}]
    (error,) = _serve_config_errors(yaml.safe_dump(data))
    assert error.startswith("applications.0.deployments.0: Value error, `num_replicas`")


def test_serve_config_names_a_valid_serving_config_with_the_redis_service() -> None:
    (app,) = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    config = load_serving_config(REPO / app["args"]["config"])
    url = urlsplit(config.state_store.url or "")
    redis = _one("Service", "mars-redis")
    assert (url.scheme, url.hostname) == ("redis", redis["metadata"]["name"])
    assert url.port in {p["port"] for p in redis["spec"]["ports"]}


# --------------------------------------------------------------------------
# built-in kinds


def _builtin_objects() -> list[dict[str, Any]]:
    return [o for o in _objects() if o["apiVersion"] in ("v1", "apps/v1")]


@pytest.mark.parametrize(
    "obj", _builtin_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_builtin_kinds_pass_kubernetes_validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_kind_is_validated_somewhere() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for o in _objects()}
    assert kinds == {
        ("v1", "Namespace"),
        ("v1", "Service"),
        ("v1", "ConfigMap"),
        ("apps/v1", "StatefulSet"),
        ("apps/v1", "Deployment"),
        ("ray.io/v1", "RayService"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
    }


def test_builtin_wrong_field_fails_with_its_path() -> None:
    statefulset = copy.deepcopy(_one("StatefulSet", "mars-redis"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSION, strict=True)
    assert _dotted(caught.value.absolute_path) == (
        "spec.template.spec.containers.0.ports.0.containerPort"
    )
    deployment = copy.deepcopy(_one("Deployment", "mars-grafana"))
    deployment["spec"]["replica"] = 1  # a typo of replicas
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    assert _dotted(caught.value.absolute_path) == "spec"
    assert "'replica' was unexpected" in caught.value.message


# --------------------------------------------------------------------------
# between resources


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_redis_persists_to_its_volume() -> None:
    statefulset = _one("StatefulSet", "mars-redis")
    service = _one("Service", "mars-redis")
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir


def test_podmonitor_scrapes_every_ray_pod_keeping_our_instance_label() -> None:
    monitor = _one("PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # ray_mars_* metrics have an `instance` label; without honorLabels
    # Prometheus renames it `exported_instance` and the dashboards lose it.
    assert endpoint["honorLabels"] is True
    rayservice = _rayservice()
    for template in _ray_pod_templates(rayservice):
        labels = {**template["metadata"]["labels"], **KUBERAY_POD_LABELS}
        assert selector.items() <= labels.items()
        for container in template["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports[endpoint["port"]] == 8080
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_grafana_configmap_is_the_packaged_dashboards() -> None:
    text = (K8S / "grafana-dashboards.yaml").read_text()
    assert text == configmap_yaml(load_dashboards()), (
        "k8s/grafana-dashboards.yaml is stale: "
        "mars-serve dashboards configmap > k8s/grafana-dashboards.yaml"
    )


def test_grafana_provisions_the_dashboards_configmap() -> None:
    deployment = _one("Deployment", "mars-grafana")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    provisioning = _one("ConfigMap", "mars-grafana-provisioning")
    (provider,) = yaml.safe_load(provisioning["data"]["dashboards.yaml"])["providers"]
    dashboards_mount = mounts[provider["options"]["path"]]
    assert volumes[dashboards_mount["name"]] == CONFIGMAP_NAME
    for key in ("dashboards.yaml", "datasources.yaml"):
        (mount,) = [m for m in mounts.values() if m.get("subPath") == key]
        assert volumes[mount["name"]] == provisioning["metadata"]["name"]
    (datasource,) = yaml.safe_load(provisioning["data"]["datasources.yaml"])["datasources"]
    # The dashboards' ${datasource} variable picks the default Prometheus.
    assert (datasource["type"], datasource["isDefault"]) == ("prometheus", True)
    service = _one("Service", "mars-grafana")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_same_objects() -> None:
    """`kubectl kustomize` (offline; no cluster) renders what the tests above
    validated, in the kustomization's namespace, with its image."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o is not None]
    names = lambda objs: sorted((o["kind"], o["metadata"]["name"]) for o in objs)  # noqa: E731
    assert names(objects) == names(_objects())
    namespace = _kustomization()["namespace"]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        namespace
    }
    (rayservice,) = [o for o in objects if o["kind"] == "RayService"]
    (image,) = _kustomization()["images"]
    for template in _ray_pod_templates(rayservice):
        for container in template["spec"]["containers"]:
            assert container["image"] == f"{image['newName']}:{image['newTag']}"

"""KubeRay manifests (infra/k8s/): each validates STRICTLY (unknown fields rejected, as
`kubectl apply --validate=strict` does) against its CRD's OpenAPI v3 schema from
tests/data/schemas/kuberay/ (published, shipped with the project), the checked-in files equal a fresh
render, secrets are only referenced, pods fit their node types and run locked down, S3 works on AWS
without static keys, the RayService embeds the serve config the local endpoint uses, and the env
names are settings the code really reads."""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

from detailflow.platform import kuberay
from detailflow.platform.settings import all_env_names

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "data" / "schemas" / "kuberay"  # published CRDs, see its README
K8S = ROOT / "infra" / "k8s"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
SECRETISH = ("SECRET", "KEY", "TOKEN", "PASSWORD", "MLFLOW_TRACKING_URI")


def strict(schema):
    """The schema as the API server's strict field validation applies it: an object with declared
    properties admits no others unless it says x-kubernetes-preserve-unknown-fields (or declares its
    own additionalProperties, i.e. a map)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k == "example" else strict(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


METADATA = {"type": "object", "additionalProperties": False, "required": ["namespace"],
            "properties": {k: {"type": "string"} for k in ("name", "generateName", "namespace")}
            | {"labels": {"type": "object", "additionalProperties": {"type": "string"}},
               "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


@functools.cache
def _schema(kind: str) -> dict:
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=yaml.CSafeLoader)  # 1 MB each
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = METADATA  # the CRD leaves ObjectMeta to the API server
    return schema


def _pod_template_schema() -> dict:
    """PodTemplateSpec as the RayCluster CRD spells it (the full core/v1 schema): the fallback
    CronJob's pod is checked against it too."""
    head = _schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]
    return head["properties"]["template"]


def _validate(doc: dict) -> None:
    # jsonschema.validate() would first meta-validate the (huge) CRD schema on every call
    jsonschema.Draft7Validator(_schema(doc["kind"])).validate(doc)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.cache
def _ray_docs_cached() -> tuple:
    return tuple(_ray_docs_uncached())


def _ray_docs() -> list[tuple[str, dict]]:
    import copy

    return copy.deepcopy(list(_ray_docs_cached()))


def _ray_docs_uncached() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            if doc["apiVersion"] == kuberay.API:
                out.append((path.name, doc))
            elif doc["kind"] == "ConfigMap":  # the fallback CronJob creates the RayJob it holds
                for body in doc["data"].values():
                    out.append((f"{path.name} (embedded)", yaml.safe_load(body)))
    return out


def _dicts(obj):
    """Every mapping nested in a manifest, depth first."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _dicts(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _dicts(v)


def _env_entries(obj):
    for d in _dicts(obj):
        if isinstance(d.get("env"), list):
            yield from d["env"]


def _ray_containers(obj):
    """The containers that start Ray (head and workers) in a manifest."""
    return [d for d in _dicts(obj) if d.get("name") in ("ray-head", "ray-worker") and "image" in d]


def test_every_crd_kind_is_shipped_and_validates():
    docs = _ray_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds
    for name, doc in docs:
        _validate(doc)  # raises with the failing path
        assert doc["metadata"]["namespace"], name


def test_a_broken_manifest_is_rejected_by_the_schema():
    doc = kuberay.ray_job(kuberay.ClusterSpec())
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas|eight"):
        _validate(doc)


@pytest.mark.parametrize("where", [
    lambda d: d["spec"],  # spec.concurrencyPolicy of a RayCronJob: what strict kubectl apply refused
    lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"],
    lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    ["containers"][0]["securityContext"],
    lambda d: d["metadata"],
])
def test_an_unknown_field_is_rejected(where):
    doc = kuberay.ray_cron_job(kuberay.ClusterSpec())
    _validate(doc)
    where(doc)["concurrencyPolicy"] = "Forbid"
    with pytest.raises(jsonschema.ValidationError, match="concurrencyPolicy"):
        _validate(doc)


def test_preserve_unknown_fields_and_maps_stay_open():
    """Strictness stops where the CRD says so: labels (a map) take any key."""
    doc = kuberay.ray_job(kuberay.ClusterSpec())
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["any-flag"] = "1"
    doc["metadata"]["labels"]["team"] = "vision"
    _validate(doc)


def test_fallback_cronjob_pod_is_a_valid_pod_template_with_a_real_kubectl():
    docs = {d["kind"]: d for d in _docs(K8S / "cronjob-fallback.yaml")}
    job = docs["CronJob"]["spec"]
    assert set(job) <= {"schedule", "timeZone", "concurrencyPolicy", "jobTemplate", "suspend",
                        "startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"}
    assert job["concurrencyPolicy"] == "Forbid" and job["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
    template = job["jobTemplate"]["spec"]["template"]
    jsonschema.Draft7Validator(_pod_template_schema()).validate(template)
    (container,) = template["spec"]["containers"]
    # bitnami/kubectl's tags left Docker Hub (2025); the upstream image has no shell, so no heredoc
    assert container["image"].startswith("registry.k8s.io/kubectl:v1."), container["image"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"][3].startswith(mount + "/")
    cm = template["spec"]["volumes"][0]["configMap"]["name"]
    assert docs["ConfigMap"]["metadata"]["name"] == cm
    assert container["command"][3].rsplit("/", 1)[1] in docs["ConfigMap"]["data"]


def _pods(doc):
    if isinstance(doc, dict):
        if "containers" in doc:
            yield doc
        for v in doc.values():
            yield from _pods(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _pods(v)


def _quantity(q) -> float:
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for u, f in units.items():
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q)


def test_pods_fit_their_node_types_and_run_locked_down():
    """Every pod's requests fit its node type's capacity less the kubelet/daemonset reserve (p4d:
    96 vCPU, 1152 GiB, 8 GPUs, 4 EFA; AWS's published sizes), pods run non-root without privilege
    escalation and with every capability dropped, and EFA nodes get their devices and NCCL's EFA env."""
    spec = kuberay.ClusterSpec()
    published = {"p4d.24xlarge": (96, 1152, 8, 4), "m6i.4xlarge": (16, 64, 0, 0),
                 "c6i.8xlarge": (32, 64, 0, 0)}
    checked = 0
    for name, doc in _ray_docs() + [(p.name, d) for p in K8S.glob("cronjob-*.yaml") for d in _docs(p)]:
        for pod in _pods(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            node = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
                if node is None:
                    continue
                cpu, mem_gi, gpus, efa = published[node]
                t = kuberay.NODE_TYPES[node]
                assert (t.cpu, t.memory_gi, t.gpus, t.efa) == (cpu, mem_gi, gpus, efa)
                req = c["resources"]["requests"]
                assert _quantity(req["cpu"]) <= cpu - t.reserved_cpu and t.reserved_cpu >= 2, (name, req)
                assert _quantity(req["memory"]) <= (mem_gi - t.reserved_memory_gi) * 2**30, (name, req)
                assert int(req.get("nvidia.com/gpu", 0)) <= gpus
                env = {e["name"]: e.get("value") for e in c["env"]}
                if int(req.get("nvidia.com/gpu", 0)):
                    assert int(req["vpc.amazonaws.com/efa"]) == efa and env["FI_PROVIDER"] == "efa"
                    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
                checked += 1
    assert checked >= 12
    assert _quantity(spec.worker_cpu) < 96, "a 96-vCPU node cannot hold a 96-CPU pod beside its daemonsets"


def test_jobs_have_deadlines_and_dashboards_stay_inside():
    for name, doc in _ray_docs():
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        if doc["kind"] in ("RayJob", "RayCronJob"):
            assert 0 < spec["activeDeadlineSeconds"] <= 7 * 24 * 3600, name
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), name
    (policy,) = [d for d in _docs(K8S / "namespace-access.yaml") if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    (rule,) = [r for r in policy["spec"]["ingress"] if {"port": 8265, "protocol": "TCP"} in r["ports"]]
    for peer in rule["from"]:  # this namespace's pods or the operator's namespace: never ipBlock / all
        assert "ipBlock" not in peer
        assert peer.get("podSelector") == {} or \
            "kubernetes.io/metadata.name" in peer["namespaceSelector"]["matchLabels"]


def test_s3_works_on_aws_without_static_keys():
    """Region and bucket are plain settings; the endpoint is AWS's regional one unless another store
    is named; the static keys are optional references (IRSA role on the ServiceAccount instead)."""
    from detailflow.platform.settings import load_settings

    for _, doc in _ray_docs():
        for entry in _env_entries(doc):
            if entry["name"].startswith("AWS_"):
                assert entry["valueFrom"]["secretKeyRef"]["optional"] is True, entry
        env = {e["name"]: e.get("value", "") for e in _env_entries(doc) if "value" in e}
        settings = load_settings(environ=env)
        assert settings.s3_endpoint_url == f"https://s3.{settings.s3_region}.amazonaws.com"
        assert settings.s3_credentials == "chain"
    spec = kuberay.ClusterSpec(s3_role_arn="arn:aws:iam::123456789012:role/detailflow-s3")
    (sa,) = [d for d in kuberay.namespace_access(spec) if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/detailflow-s3")
    pod = kuberay.ray_cluster_spec(spec)["headGroupSpec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_checked_in_manifests_equal_a_fresh_render(tmp_path):
    kuberay.write_all(kuberay.ClusterSpec(), tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in K8S.glob("*.yaml")}
    assert fresh == shipped, "infra/k8s is stale: run `detailflow infra render-k8s --out infra/k8s`"


def test_secrets_are_referenced_never_inline_and_env_names_are_real():
    known = set(all_env_names()) | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI",
                                    "MLFLOW_TRACKING_TOKEN", "RAY_USAGE_STATS_ENABLED",
                                    "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DETAILFLOW_API_KEYS_FILE",
                                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "RAY_SERVE_ENABLE_HA_PROXY",
                                    *kuberay.nccl_env(kuberay.NODE_TYPES["p4d.24xlarge"])}
    seen = 0
    for _, doc in _ray_docs():
        for entry in _env_entries(doc):
            seen += 1
            assert entry["name"] in known, f"{entry['name']} is not a setting the code reads"
            if any(s in entry["name"] for s in SECRETISH) and not entry["name"].endswith("_FILE"):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry
    assert seen > 20
    assert "DETAILFLOW_RAY_ADDRESS" in {e["name"] for _, d in _ray_docs() for e in _env_entries(d)}


def test_every_ray_pod_starts_serves_proxy_with_the_json_502_middleware():
    """A replica killed on KubeRay must give the client a 502 JSON with its request id, not uvicorn's
    plain-text 500: the proxy reads the callback path from the env of the pod that starts Ray."""
    import importlib

    def heads(obj):
        if isinstance(obj, dict):
            if "headGroupSpec" in obj:
                yield obj["headGroupSpec"]
            for v in obj.values():
                yield from heads(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from heads(v)

    checked = 0
    for _, doc in _ray_docs():
        for head in heads(doc):
            env = {e["name"]: e.get("value") for e in _env_entries(head)}
            module, _, attr = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
            assert getattr(importlib.import_module(module), attr)(), env  # what Serve's proxy calls
            checked += 1
    assert checked >= 3  # RayCluster, RayJob, RayCronJob, RayService heads


def test_only_the_rayservice_runs_haproxy_on_every_node():
    """The serving cluster's front is HAProxy straight to the replicas on every Ray pod (Serve reads
    the flag where Ray starts, head and workers); the training clusters keep Serve's defaults."""
    from ray.serve._private import constants

    assert "RAY_SERVE_ENABLE_HA_PROXY" in open(constants.__file__).read()  # the name this Ray reads
    fronts = {}
    for path, doc in _ray_docs():
        pods = list(_ray_containers(doc))
        flags = {next((e.get("value") for e in c.get("env", []) if e["name"] == "RAY_SERVE_ENABLE_HA_PROXY"),
                      None) for c in pods}
        fronts[(Path(path).name, doc["kind"])] = flags
    assert fronts[("rayservice.yaml", "RayService")] == {"1"}, fronts  # head and every worker group
    assert all(f == {None} for k, f in fronts.items() if k[1] != "RayService"), fronts


def test_jobs_run_the_pipeline_file_that_exists():
    for _, doc in _ray_docs():
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        if "entrypoint" in spec:
            path = spec["entrypoint"].split()[-1]
            assert spec["entrypoint"].startswith("detailflow pipeline run ")
            if not (ROOT / path).exists():
                pytest.xfail(f"{path} is written with the pipeline runner (issue 14)")


def test_rayservice_embeds_the_serve_config_the_local_endpoint_uses():
    spec = kuberay.ClusterSpec()
    if not (ROOT / spec.serve_config).exists():
        pytest.skip(f"{spec.serve_config} not written yet")
    (doc,) = _docs(K8S / "rayservice.yaml")
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / spec.serve_config).read_text())
    assert embedded.get("applications"), "a Serve config lists its applications"


def test_chain_credentials_reach_the_clients_not_the_dev_keys(monkeypatch):
    """s3_credentials=chain (what the pods set): boto3 and the child-process env take the SDK's chain
    (here its env step), never the settings' development keys; static passes the keys as before."""
    from detailflow.platform.settings import DEV_ACCESS_KEY_ID, load_settings
    from detailflow.platform.storage import s3_client, storage_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMTHECHAIN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret")
    base = {"DETAILFLOW_S3_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com"}
    chain = load_settings(environ={**base, "DETAILFLOW_S3_CREDENTIALS": "chain"})
    static = load_settings(environ=base)
    assert s3_client(chain)._request_signer._credentials.access_key == "AKIAFROMTHECHAIN"
    assert s3_client(static)._request_signer._credentials.access_key == DEV_ACCESS_KEY_ID
    assert "AWS_ACCESS_KEY_ID" not in storage_env(chain) and "AWS_ACCESS_KEY_ID" in storage_env(static)
    with pytest.raises(ValueError, match="DETAILFLOW_S3_CREDENTIALS"):
        load_settings(environ={**base, "DETAILFLOW_S3_CREDENTIALS": "irsa"})


def test_cluster_pipelines_end_by_checking_the_rayservice_not_deploying_serve():
    """No Serve inside the RayJob: the GPU pipelines' last stage checks the RayService's endpoint
    (the in-cluster Service KubeRay creates for the rendered RayService) for the new champion."""
    from detailflow.pipelines.runner.spec import load_pipeline

    for path in sorted((ROOT / "configs" / "pipelines").glob("detailflow-*.yaml")):
        pipe = load_pipeline(path)
        kinds = [s.kind for s in pipe.stages]
        assert "deploy" not in kinds and kinds[-1] == "check-rayservice", (path.name, kinds)
        params = pipe.stages[-1].params
        assert params["version"] == "${stages.promote.champion}"
        if path.name == "detailflow-16.yaml":
            assert params["url"] == kuberay.serve_url(kuberay.ClusterSpec())


def _readyz_server(answers: list):
    """A stand-in for the serving app's GET /readyz (same JSON contract as serving/app.py): it
    answers the given (status, body) pairs in turn, the last one forever."""
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = answers.pop(0) if len(answers) > 1 else answers[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_check_rayservice_waits_for_the_champion_and_fails_naming_what_it_served():
    from types import SimpleNamespace

    from detailflow.pipelines.runner.stages import KINDS

    kind = KINDS["check-rayservice"]
    ctx = SimpleNamespace(log=lambda line: None)
    old = {"status": "ready", "model": "detailflow-16-generator", "model_version": "3"}
    new = dict(old, model_version="4")
    server, url = _readyz_server([(503, {"detail": "no model loaded yet"}), (200, old), (200, new)])
    try:
        out = kind.fn({"url": url, "model": "detailflow-16", "version": "4", "poll_s": 0.05,
                       "timeout_s": 10}, ctx)
        assert out == {"url": url, "model": "detailflow-16", "version": "4"}
        with pytest.raises(RuntimeError, match=r"does not serve detailflow-16-generator v5.*'4'"):
            kind.fn({"url": url, "model": "detailflow-16", "version": "5", "poll_s": 0.05,
                     "timeout_s": 0.3}, ctx)
    finally:
        server.shutdown()
    assert kind.volatile, "serving is outside the pipeline: every run checks it"

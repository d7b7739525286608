"""KubeRay manifests rendered from one cluster description: RayCluster, RayJob, RayCronJob (+ a plain
Kubernetes CronJob fallback), RayService whose serveConfigV2 is the same serve config the local
endpoint uses.

Usage:
    detailflow infra render-k8s --out infra/k8s                 # rewrite the checked-in manifests
    detailflow infra render-k8s --out /tmp/k8s --image registry.example.com/detailflow:1.2.0 \\
        --pipeline configs/pipelines/detailflow-32.yaml --schedule "0 3 * * 0"

    from detailflow.platform.kuberay import ClusterSpec, render_all
    manifests = render_all(ClusterSpec())                         # {file name: manifest dict}

Why rendered: the cluster (image, head/worker groups, env, secrets) appears in four CRDs; written
by hand they drift. tests/test_kuberay.py checks that infra/k8s/ equals a fresh render and that
every manifest validates against the KubeRay CRD schemas in ../shared/schemas/kuberay/.
Secrets are never inline: S3 keys, the MLflow URI and the API keys come from Kubernetes Secrets by
reference (secretKeyRef), whose names are fields below.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

API = "ray.io/v1"


@dataclass
class ClusterSpec:
    name: str = "detailflow"  # prefix of every resource name
    namespace: str = "detailflow"  # Kubernetes namespace
    image: str = "detailflow:0.1.0"  # infra/Dockerfile built and pushed (CUDA base, pinned versions)
    ray_version: str = "2.60.0"  # must equal the Ray inside the image
    head_cpu: str = "8"  # head pod CPU (drivers, Ray Data scheduling, MLflow client)
    head_memory: str = "32Gi"  # head pod memory
    gpu_workers_min: int = 0  # autoscaler floor of the GPU group (0: nodes only while jobs run)
    gpu_workers_max: int = 8  # autoscaler ceiling: 8 nodes x 8 GPUs = the paper's 64 GPUs
    gpus_per_worker: int = 8  # GPUs per worker pod (one node)
    worker_cpu: str = "96"  # CPUs per GPU worker pod (Ray Data decode runs here)
    worker_memory: str = "900Gi"  # memory per GPU worker pod
    cpu_workers_max: int = 16  # CPU-only group for Ray Data decode/ingest at scale
    s3_secret: str = "detailflow-s3"  # Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, endpoint, bucket
    mlflow_secret: str = "detailflow-mlflow"  # Secret with MLFLOW_TRACKING_URI (+ token if any)
    api_keys_secret: str = "detailflow-api-keys"  # Secret with the serving API keys file
    api_keys_key: str = "keys.txt"  # the file's key inside that Secret (one key per line)
    pipeline: str = "configs/pipelines/detailflow-16.yaml"  # pipeline file the jobs run
    schedule: str = "0 2 * * 0"  # weekly retraining: Sundays 02:00
    time_zone: str = "Etc/UTC"  # schedule time zone
    serve_config: str = "configs/serve-gpu.yaml"  # the Serve config the RayService embeds
    extra_env: dict = field(default_factory=dict)  # more plain (non-secret) env vars for every pod


def _secret_env(spec: ClusterSpec) -> list[dict]:
    def ref(name, secret, key, optional=False):
        sel = {"name": secret, "key": key}
        if optional:
            sel["optional"] = True
        return {"name": name, "valueFrom": {"secretKeyRef": sel}}

    return [
        ref("AWS_ACCESS_KEY_ID", spec.s3_secret, "AWS_ACCESS_KEY_ID"),
        ref("AWS_SECRET_ACCESS_KEY", spec.s3_secret, "AWS_SECRET_ACCESS_KEY"),
        ref("DETAILFLOW_S3_ENDPOINT_URL", spec.s3_secret, "DETAILFLOW_S3_ENDPOINT_URL", optional=True),
        ref("DETAILFLOW_S3_BUCKET", spec.s3_secret, "DETAILFLOW_S3_BUCKET"),
        ref("MLFLOW_TRACKING_URI", spec.mlflow_secret, "MLFLOW_TRACKING_URI"),
        ref("MLFLOW_TRACKING_TOKEN", spec.mlflow_secret, "MLFLOW_TRACKING_TOKEN", optional=True),
    ]


def _env(spec: ClusterSpec) -> list[dict]:
    plain = {"DETAILFLOW_RAY_ADDRESS": "auto",  # inside the cluster: join it, never start a local Ray
             "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
             "DETAILFLOW_DEVICE": "auto",
             # the serving app reads its bearer keys from the mounted Secret (re-read on change)
             "DETAILFLOW_API_KEYS_FILE": f"/etc/detailflow/api-keys/{spec.api_keys_key}", **spec.extra_env}
    return _secret_env(spec) + [{"name": k, "value": str(v)} for k, v in sorted(plain.items())]


def _container(spec: ClusterSpec, name: str, cpu: str, memory: str, gpus: int = 0) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent", "env": _env(spec),
            "resources": {"limits": dict(limits), "requests": dict(limits)},
            # /dev/shm: Ray's object store and NCCL need more than the 64 MB container default
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                             {"name": "api-keys", "mountPath": "/etc/detailflow/api-keys", "readOnly": True}]}


def _pod(spec: ClusterSpec, container: dict, gpu: bool) -> dict:
    pod = {"containers": [container],
           "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
                       {"name": "api-keys",
                        "secret": {"secretName": spec.api_keys_secret, "optional": True}}]}
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": pod}


def ray_cluster_spec(spec: ClusterSpec) -> dict:
    """The spec of a RayCluster (also embedded in RayJob, RayCronJob and RayService)."""
    head = _container(spec, "ray-head", spec.head_cpu, spec.head_memory)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    gpu = _container(spec, "ray-worker", spec.worker_cpu, spec.worker_memory, spec.gpus_per_worker)
    cpu = _container(spec, "ray-worker", spec.worker_cpu, "192Gi")
    return {
        "rayVersion": spec.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
        # num-cpus 0 on the head: drivers and controllers live there, training/decoding never does
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": _pod(spec, head, gpu=False)},
        "workerGroupSpecs": [
            {"groupName": "gpu", "replicas": spec.gpu_workers_min, "minReplicas": spec.gpu_workers_min,
             "maxReplicas": spec.gpu_workers_max, "rayStartParams": {},
             "template": _pod(spec, gpu, gpu=True)},
            {"groupName": "cpu", "replicas": 0, "minReplicas": 0, "maxReplicas": spec.cpu_workers_max,
             "rayStartParams": {}, "template": _pod(spec, cpu, gpu=False)},
        ],
    }


def _meta(spec: ClusterSpec, name: str, component: str) -> dict:
    return {"name": f"{spec.name}-{name}", "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": "detailflow", "app.kubernetes.io/component": component}}


def ray_cluster(spec: ClusterSpec) -> dict:
    return {"apiVersion": API, "kind": "RayCluster", "metadata": _meta(spec, "cluster", "cluster"),
            "spec": ray_cluster_spec(spec)}


def _entrypoint(spec: ClusterSpec) -> str:
    return f"detailflow pipeline run {spec.pipeline}"


def ray_job_spec(spec: ClusterSpec) -> dict:
    return {"entrypoint": _entrypoint(spec), "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
            # a pipeline run is resumable (skips finished stages): a retry continues, never restarts
            "backoffLimit": 2, "rayClusterSpec": ray_cluster_spec(spec)}


def ray_job(spec: ClusterSpec) -> dict:
    return {"apiVersion": API, "kind": "RayJob", "metadata": _meta(spec, "pipeline", "pipeline"),
            "spec": ray_job_spec(spec)}


def ray_cron_job(spec: ClusterSpec) -> dict:
    """RayCronJob (alpha in KubeRay >= 1.6, behind the RayCronJob feature gate on the operator)."""
    return {"apiVersion": API, "kind": "RayCronJob", "metadata": _meta(spec, "weekly", "schedule"),
            "spec": {"schedule": spec.schedule, "timeZone": spec.time_zone, "suspend": False,
                     "concurrencyPolicy": "Forbid", "jobTemplate": ray_job_spec(spec)}}


def cron_job_fallback(spec: ClusterSpec) -> list[dict]:
    """A plain Kubernetes CronJob that creates the RayJob with kubectl, for operators without the
    RayCronJob gate; plus the ServiceAccount/Role it needs (create RayJobs, nothing else)."""
    job = ray_job(spec)
    job["metadata"] = {"generateName": f"{spec.name}-pipeline-", "namespace": spec.namespace,
                       "labels": job["metadata"]["labels"]}
    sa = f"{spec.name}-scheduler"
    script = "kubectl create -f - <<'EOF'\n" + yaml.safe_dump(job, sort_keys=False) + "EOF\n"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": spec.namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": sa, "namespace": spec.namespace},
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": sa, "namespace": spec.namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": spec.namespace}]},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": _meta(spec, "weekly-fallback", "schedule"),
         "spec": {"schedule": spec.schedule, "timeZone": spec.time_zone, "concurrencyPolicy": "Forbid",
                  "jobTemplate": {"spec": {"backoffLimit": 1, "template": {"spec": {
                      "serviceAccountName": sa, "restartPolicy": "Never",
                      "containers": [{"name": "create-rayjob", "image": "bitnami/kubectl:1.31",
                                      "command": ["/bin/sh", "-c", script]}]}}}}}},
    ]


def serve_config_v2(serve_config: str | Path) -> str:
    """The Serve config file's text, normalised (the RayService embeds it as a multi-line string)."""
    return yaml.safe_dump(yaml.safe_load(Path(serve_config).read_text()), sort_keys=False)


def ray_service(spec: ClusterSpec, root: Path) -> dict:
    cluster = ray_cluster_spec(spec)
    # serving keeps one GPU node up: replicas autoscale inside it, the node group above it
    cluster["workerGroupSpecs"][0].update(replicas=1, minReplicas=1)
    return {"apiVersion": API, "kind": "RayService", "metadata": _meta(spec, "serve", "serve"),
            "spec": {"serveConfigV2": serve_config_v2(root / spec.serve_config),
                     "upgradeStrategy": {"type": "NewCluster"}, "rayClusterConfig": cluster}}


def render_all(spec: ClusterSpec, root: Path | None = None) -> dict[str, list[dict]]:
    """{file name: [manifest, ...]} for infra/k8s/. RayService only when the serve config exists."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    out = {"raycluster.yaml": [ray_cluster(spec)], "rayjob-pipeline.yaml": [ray_job(spec)],
           "raycronjob-weekly.yaml": [ray_cron_job(spec)], "cronjob-fallback.yaml": cron_job_fallback(spec)}
    if (root / spec.serve_config).exists():
        out["rayservice.yaml"] = [ray_service(spec, root)]
    return copy.deepcopy(out)


HEADER = ("# Rendered by `detailflow infra render-k8s --out infra/k8s` from detailflow/platform/kuberay.py;\n"
          "# edit the ClusterSpec (or pass flags), not this file. Secrets are referenced, never inline.\n")


def dump(manifests: list[dict]) -> str:
    return HEADER + "".join("---\n" + yaml.safe_dump(m, sort_keys=False, width=100) for m in manifests)


def write_all(spec: ClusterSpec, out_dir: str | Path, root: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, manifests in render_all(spec, root).items():
        path = out_dir / name
        path.write_text(dump(manifests))
        written.append(path)
    return written

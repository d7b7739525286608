"""KubeRay manifests rendered from one cluster description: RayCluster, RayJob, RayCronJob (+ a plain
Kubernetes CronJob fallback), RayService whose serveConfigV2 is the same serve config the local
endpoint uses, and the namespace's ServiceAccount and NetworkPolicy.

Usage:
    detailflow infra render-k8s --out infra/k8s                 # rewrite the checked-in manifests
    detailflow infra render-k8s --out /tmp/k8s --image registry.example.com/detailflow:1.2.0 \\
        --pipeline configs/pipelines/detailflow-32.yaml --schedule "0 3 * * 0"

    from detailflow.platform.kuberay import ClusterSpec, render_all
    manifests = render_all(ClusterSpec())                         # {file name: manifest dict}

Why rendered: the cluster (image, head/worker groups, env, secrets) appears in four CRDs; written
by hand they drift. tests/test_kuberay.py checks that infra/k8s/ equals a fresh render and that
every manifest validates STRICTLY (unknown fields rejected, as `kubectl apply --validate=strict`)
against the KubeRay CRD schemas shipped in tests/data/schemas/kuberay/.

Node types (NODE_TYPES): pod requests leave `reserved_cpu`/`reserved_memory` of each node to the
kubelet, system reserve and daemonsets (CNI, EFA/NVIDIA device plugins, log and metrics agents), so
a GPU pod fits its node. On EFA nodes (p4d: 4 EFA devices, p5: 32) the GPU pods request the
`vpc.amazonaws.com/efa` devices and set FI_PROVIDER=efa / FI_EFA_USE_DEVICE_RDMA=1 so NCCL's
aws-ofi-nccl plugin (built into the image with `--build-arg EFA_INSTALLER_VERSION=...`, see
infra/Dockerfile) takes the EFA path; without EFA NCCL falls back to TCP sockets (~10x slower
all-reduce across nodes). NCCL_DEBUG=WARN and TORCH_NCCL_ASYNC_ERROR_HANDLING=1 are set everywhere
so a hung collective fails the rank instead of holding 64 GPUs.

S3 on AWS out of the box: the endpoint is the region's (`https://s3.<region>.amazonaws.com`) unless
`s3_endpoint_url` names another store; credentials come from the pods' ServiceAccount (IRSA: the
`eks.amazonaws.com/role-arn` annotation, `s3_role_arn`; GKE/AKS workload identity alike) with
DETAILFLOW_S3_CREDENTIALS=chain; the static keys of the `s3_secret` Secret are optional references.

Exposure: the Ray dashboard (whose Jobs API runs any command, unauthenticated) listens on the head
pod's loopback and pod IP only (KubeRay's probes use localhost:8265, the operator the head Service),
the head Service is ClusterIP (no LoadBalancer/NodePort, no Ingress), and the NetworkPolicy admits
the GCS/dashboard/client ports only from this namespace's pods and the KubeRay operator's namespace,
and Serve's port 8000 (bearer keys) from the namespace. Reach the dashboard with
`kubectl port-forward`, never an Ingress.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

API = "ray.io/v1"


@dataclass(frozen=True)
class NodeType:
    cpu: int  # vCPUs of the instance
    memory_gi: int  # memory (GiB) of the instance
    gpus: int  # GPUs (0: CPU node)
    efa: int  # EFA devices (0: none; NCCL then uses TCP sockets)
    reserved_cpu: int  # vCPUs left to kubelet, system reserve and daemonsets
    reserved_memory_gi: int  # memory left to them (GiB)


# The documented node types (AWS instance sizes; equivalents elsewhere have the same shape).
NODE_TYPES: dict[str, NodeType] = {
    "p4d.24xlarge": NodeType(cpu=96, memory_gi=1152, gpus=8, efa=4, reserved_cpu=8, reserved_memory_gi=72),
    "p5.48xlarge": NodeType(cpu=192, memory_gi=2048, gpus=8, efa=32, reserved_cpu=12, reserved_memory_gi=128),
    "g6e.48xlarge": NodeType(cpu=192, memory_gi=1536, gpus=8, efa=0, reserved_cpu=12, reserved_memory_gi=96),
    "m6i.4xlarge": NodeType(cpu=16, memory_gi=64, gpus=0, efa=0, reserved_cpu=2, reserved_memory_gi=8),
    "c6i.8xlarge": NodeType(cpu=32, memory_gi=64, gpus=0, efa=0, reserved_cpu=2, reserved_memory_gi=8),
}


@dataclass
class ClusterSpec:
    name: str = "detailflow"  # prefix of every resource name
    namespace: str = "detailflow"  # Kubernetes namespace
    image: str = "detailflow:0.1.0"  # infra/Dockerfile built and pushed (CUDA base, constraints-gpu.txt)
    ray_version: str = "2.60.0"  # must equal the Ray inside the image
    head_node_type: str = "m6i.4xlarge"  # node type of the head (drivers only: num-cpus 0)
    head_cpu: str = "8"  # head pod CPU (drivers, Ray Data scheduling, MLflow client)
    head_memory: str = "32Gi"  # head pod memory
    gpu_node_type: str = "p4d.24xlarge"  # NODE_TYPES key of the GPU nodes (8 GPUs, 96 vCPUs, 4 EFA)
    gpu_workers_min: int = 0  # autoscaler floor of the GPU group (0: nodes only while jobs run)
    gpu_workers_max: int = 8  # autoscaler ceiling: 8 nodes x 8 GPUs = the paper's 64 GPUs
    gpus_per_worker: int = 8  # GPUs per worker pod (one node)
    worker_cpu: str = "88"  # CPUs per GPU worker pod: the node's 96 less 8 for kubelet/daemonsets
    worker_memory: str = "1000Gi"  # memory per GPU worker pod (node 1152 GiB less reserve and /dev/shm slack)
    cpu_node_type: str = "c6i.8xlarge"  # node type of the CPU-only group
    cpu_worker_cpu: str = "30"  # CPUs per CPU worker pod (node 32 less 2)
    cpu_worker_memory: str = "52Gi"  # memory per CPU worker pod (node 64 GiB less reserve)
    cpu_workers_max: int = 16  # CPU-only group for Ray Data decode/ingest at scale
    active_deadline_s: int = 5 * 24 * 3600  # a pipeline RayJob is failed (and its GPUs freed) after this
    s3_region: str = "us-east-1"  # bucket region (request signing; selects the AWS endpoint)
    s3_bucket: str = "detailflow"  # bucket of datasets, checkpoints and MLflow artefacts
    s3_endpoint_url: str = ""  # "" = AWS's regional endpoint; else e.g. https://minio.example:9000
    s3_role_arn: str = ""  # IRSA role for the ServiceAccount (""= none: node role or static keys)
    service_account: str = "detailflow"  # every Ray pod runs as this ServiceAccount (S3 identity)
    s3_secret: str = "detailflow-s3"  # optional Secret with static AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    mlflow_secret: str = "detailflow-mlflow"  # Secret with MLFLOW_TRACKING_URI (+ token if any)
    api_keys_secret: str = "detailflow-api-keys"  # Secret with the serving API keys file
    api_keys_key: str = "keys.txt"  # the file's key inside that Secret (one key per line)
    operator_namespace: str = "kuberay-system"  # where the KubeRay operator runs (dashboard access)
    pipeline: str = "configs/pipelines/detailflow-16.yaml"  # pipeline file the jobs run
    schedule: str = "0 2 * * 0"  # weekly retraining: Sundays 02:00
    time_zone: str = "Etc/UTC"  # schedule time zone
    kubectl_image: str = "registry.k8s.io/kubectl:v1.33.4"  # the fallback CronJob's kubectl (upstream image)
    serve_config: str = "configs/serve-gpu.yaml"  # the Serve config the RayService embeds
    extra_env: dict = field(default_factory=dict)  # more plain (non-secret) env vars for every pod

    def s3_endpoint(self) -> str:
        return self.s3_endpoint_url or f"https://s3.{self.s3_region}.amazonaws.com"


def _secret_env(spec: ClusterSpec) -> list[dict]:
    def ref(name, secret, key, optional=False):
        sel = {"name": secret, "key": key}
        if optional:
            sel["optional"] = True
        return {"name": name, "valueFrom": {"secretKeyRef": sel}}

    return [
        ref("AWS_ACCESS_KEY_ID", spec.s3_secret, "AWS_ACCESS_KEY_ID", optional=True),
        ref("AWS_SECRET_ACCESS_KEY", spec.s3_secret, "AWS_SECRET_ACCESS_KEY", optional=True),
        ref("MLFLOW_TRACKING_URI", spec.mlflow_secret, "MLFLOW_TRACKING_URI"),
        ref("MLFLOW_TRACKING_TOKEN", spec.mlflow_secret, "MLFLOW_TRACKING_TOKEN", optional=True),
    ]


def nccl_env(node: NodeType) -> dict[str, str]:
    """NCCL / libfabric settings for a GPU node type (EFA path where the node has EFA devices)."""
    env = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if node.efa:
        env.update(FI_PROVIDER="efa", FI_EFA_USE_DEVICE_RDMA="1", NCCL_PROTO="simple")
    return env


def _env(spec: ClusterSpec, extra: dict | None = None) -> list[dict]:
    # names only: rendering manifests needs no web stack (proxy_errors imports starlette via front)
    from detailflow.platform.serving.proxy_errors import ENV as PROXY_ERRORS_ENV
    from detailflow.platform.serving.proxy_errors import IMPORT_PATH as PROXY_ERRORS_IMPORT_PATH

    plain = {"DETAILFLOW_RAY_ADDRESS": "auto",  # inside the cluster: join it, never start a local Ray
             "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
             "DETAILFLOW_DEVICE": "auto", "DETAILFLOW_S3_REGION": spec.s3_region,
             "DETAILFLOW_S3_BUCKET": spec.s3_bucket, "DETAILFLOW_S3_ENDPOINT_URL": spec.s3_endpoint(),
             # the default credential chain (IRSA web identity, then the optional static keys)
             "DETAILFLOW_S3_CREDENTIALS": "chain",
             # the serving app reads its bearer keys from the mounted Secret (re-read on change)
             "DETAILFLOW_API_KEYS_FILE": f"/etc/detailflow/api-keys/{spec.api_keys_key}",
             # Serve's proxy answers 502 JSON + request id when a replica dies (read when Ray starts)
             PROXY_ERRORS_ENV: PROXY_ERRORS_IMPORT_PATH,
             **(extra or {}), **spec.extra_env}
    return _secret_env(spec) + [{"name": k, "value": str(v)} for k, v in sorted(plain.items())]


CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                      "runAsNonRoot": True}
# uid 1000 / gid 100: the `ray` user of the rayproject images (infra/Dockerfile keeps it)
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"}}


def _container(spec: ClusterSpec, name: str, cpu: str, memory: str, node: NodeType | None = None,
               gpus: int = 0) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    extra = {}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
        extra = nccl_env(node)
        if node.efa:
            limits["vpc.amazonaws.com/efa"] = node.efa
    return {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent", "env": _env(spec, extra),
            "resources": {"limits": dict(limits), "requests": dict(limits)},
            "securityContext": copy.deepcopy(CONTAINER_SECURITY),
            # /dev/shm: Ray's object store and NCCL need more than the 64 MB container default
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                             {"name": "api-keys", "mountPath": "/etc/detailflow/api-keys", "readOnly": True}]}


def _pod(spec: ClusterSpec, container: dict, gpu: bool) -> dict:
    pod = {"serviceAccountName": spec.service_account, "securityContext": copy.deepcopy(POD_SECURITY),
           "containers": [container],
           "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
                       {"name": "api-keys",
                        "secret": {"secretName": spec.api_keys_secret, "optional": True}}]}
    node_type = spec.gpu_node_type if gpu else (
        spec.head_node_type if container["name"] == "ray-head" else spec.cpu_node_type)
    pod["nodeSelector"] = {"node.kubernetes.io/instance-type": node_type}
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": pod}


def ray_cluster_spec(spec: ClusterSpec) -> dict:
    """The spec of a RayCluster (also embedded in RayJob, RayCronJob and RayService)."""
    head = _container(spec, "ray-head", spec.head_cpu, spec.head_memory)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    gpu_node = NODE_TYPES[spec.gpu_node_type]
    gpu = _container(spec, "ray-worker", spec.worker_cpu, spec.worker_memory, gpu_node, spec.gpus_per_worker)
    cpu = _container(spec, "ray-worker", spec.cpu_worker_cpu, spec.cpu_worker_memory)
    return {
        "rayVersion": spec.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600,
                              "securityContext": copy.deepcopy(CONTAINER_SECURITY)},
        # num-cpus 0 on the head: drivers and controllers live there, training/decoding never does.
        # dashboard-host 0.0.0.0 inside a pod = its loopback (KubeRay's probes) + its pod IP (the
        # operator, via the ClusterIP head Service); the NetworkPolicy admits nobody else
        "headGroupSpec": {"serviceType": "ClusterIP",
                          "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
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
            # a hung run frees its GPU nodes; a resumed run continues from its checkpoints
            "activeDeadlineSeconds": spec.active_deadline_s,
            # a pipeline run is resumable (skips finished stages): a retry continues, never restarts
            "backoffLimit": 2, "rayClusterSpec": ray_cluster_spec(spec)}


def ray_job(spec: ClusterSpec) -> dict:
    return {"apiVersion": API, "kind": "RayJob", "metadata": _meta(spec, "pipeline", "pipeline"),
            "spec": ray_job_spec(spec)}


def ray_cron_job(spec: ClusterSpec) -> dict:
    """RayCronJob (alpha in KubeRay >= 1.6, behind the RayCronJob feature gate on the operator). It has
    no concurrencyPolicy: an overlapping run is refused by the pipeline's own lease (runner/lease.py)."""
    return {"apiVersion": API, "kind": "RayCronJob", "metadata": _meta(spec, "weekly", "schedule"),
            "spec": {"schedule": spec.schedule, "timeZone": spec.time_zone, "suspend": False,
                     "jobTemplate": ray_job_spec(spec)}}


def cron_job_fallback(spec: ClusterSpec) -> list[dict]:
    """A plain Kubernetes CronJob that creates the RayJob (from a ConfigMap) with the upstream kubectl
    image, for operators without the RayCronJob gate; plus the ServiceAccount/Role it needs (create
    RayJobs, nothing else). The image has no shell: the manifest is a mounted file, not a heredoc."""
    job = ray_job(spec)
    job["metadata"] = {"generateName": f"{spec.name}-pipeline-", "namespace": spec.namespace,
                       "labels": job["metadata"]["labels"]}
    sa = f"{spec.name}-scheduler"
    cm = f"{spec.name}-weekly-rayjob"
    pod = {"serviceAccountName": sa, "restartPolicy": "Never", "securityContext": copy.deepcopy(POD_SECURITY),
           "containers": [{"name": "create-rayjob", "image": spec.kubectl_image,
                           "command": ["kubectl", "create", "-f", "/etc/rayjob/rayjob.yaml"],
                           "securityContext": copy.deepcopy(CONTAINER_SECURITY),
                           "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                         "limits": {"cpu": "500m", "memory": "256Mi"}},
                           "volumeMounts": [{"name": "rayjob", "mountPath": "/etc/rayjob",
                                             "readOnly": True}]}],
           "volumes": [{"name": "rayjob", "configMap": {"name": cm}}]}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": spec.namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": sa, "namespace": spec.namespace},
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": sa, "namespace": spec.namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": spec.namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": cm, "namespace": spec.namespace},
         "data": {"rayjob.yaml": yaml.safe_dump(job, sort_keys=False)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": _meta(spec, "weekly-fallback", "schedule"),
         "spec": {"schedule": spec.schedule, "timeZone": spec.time_zone, "concurrencyPolicy": "Forbid",
                  "jobTemplate": {"spec": {"backoffLimit": 1, "activeDeadlineSeconds": 600,
                                           "template": {"spec": pod}}}}},
    ]


def namespace_access(spec: ClusterSpec) -> list[dict]:
    """The Ray pods' ServiceAccount (IRSA annotation when a role is given) and the NetworkPolicy that
    keeps the head's GCS/dashboard/client ports inside the Ray cluster and the operator."""
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": {"name": spec.service_account, "namespace": spec.namespace}}
    if spec.s3_role_arn:
        sa["metadata"]["annotations"] = {"eks.amazonaws.com/role-arn": spec.s3_role_arn}
    ray_ports = [{"protocol": "TCP", "port": p} for p in (6379, 8265, 10001)]
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": f"{spec.name}-ray-head", "namespace": spec.namespace},
              "spec": {"podSelector": {"matchLabels": {"ray.io/node-type": "head"}},
                       "policyTypes": ["Ingress"],
                       "ingress": [
                           {"from": [{"podSelector": {}},  # this namespace's Ray pods and submitters
                                     {"namespaceSelector": {"matchLabels": {
                                         "kubernetes.io/metadata.name": spec.operator_namespace}}}],
                            "ports": ray_ports},
                           {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8000}]}]}}
    return [sa, policy]


def serve_config_v2(serve_config: str | Path) -> str:
    """The Serve config file's text, normalised (the RayService embeds it as a multi-line string)."""
    return yaml.safe_dump(yaml.safe_load(Path(serve_config).read_text()), sort_keys=False)


def ray_service(spec: ClusterSpec, root: Path) -> dict:
    from detailflow.platform.serving.ingress import DEFAULT_FRONT, front_env

    cluster = ray_cluster_spec(spec)
    # serving keeps one GPU node up: replicas autoscale inside it, the node group above it
    cluster["workerGroupSpecs"][0].update(replicas=1, minReplicas=1)
    # the HTTP front (serving/ingress.py): HAProxy on every node's :8000, straight to the replicas
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            c["env"] += [{"name": k, "value": v} for k, v in sorted(front_env(DEFAULT_FRONT).items())]
    return {"apiVersion": API, "kind": "RayService", "metadata": _meta(spec, "serve", "serve"),
            "spec": {"serveConfigV2": serve_config_v2(root / spec.serve_config),
                     "upgradeStrategy": {"type": "NewCluster"}, "rayClusterConfig": cluster}}


def serve_url(spec: ClusterSpec) -> str:
    """In-cluster URL of the RayService's Serve endpoint (KubeRay names the Service <name>-serve-svc)."""
    return f"http://{spec.name}-serve-serve-svc.{spec.namespace}.svc:8000"


def render_all(spec: ClusterSpec, root: Path | None = None) -> dict[str, list[dict]]:
    """{file name: [manifest, ...]} for infra/k8s/. RayService only when the serve config exists."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    out = {"namespace-access.yaml": namespace_access(spec), "raycluster.yaml": [ray_cluster(spec)],
           "rayjob-pipeline.yaml": [ray_job(spec)], "raycronjob-weekly.yaml": [ray_cron_job(spec)],
           "cronjob-fallback.yaml": cron_job_fallback(spec)}
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

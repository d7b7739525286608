"""`detailflow infra`: render the KubeRay manifests (see detailflow/platform/kuberay.py).

Usage:
    detailflow infra render-k8s --out infra/k8s
    detailflow infra render-k8s --out /tmp/k8s --image registry.example.com/detailflow:1.2.0 \
        --gpu-workers-max 4
"""

from __future__ import annotations

import dataclasses

import click


@click.group()
def infra():
    """Deployment manifests (KubeRay RayCluster, RayJob, RayCronJob, RayService)."""


@infra.command("render-k8s")
@click.option("--out", "out_dir", default="infra/k8s", show_default=True, help="folder to write")
@click.option("--image", default=None, help="container image (infra/Dockerfile, pushed)")
@click.option("--namespace", default=None, help="Kubernetes namespace")
@click.option("--pipeline", default=None, help="pipeline file the RayJob / RayCronJob run")
@click.option("--schedule", default=None, help="cron schedule of the weekly retraining")
@click.option("--gpu-workers-max", type=int, default=None, help="autoscaler ceiling of GPU nodes")
def render_k8s(out_dir, image, namespace, pipeline, schedule, gpu_workers_max):
    """Write raycluster / rayjob / raycronjob / cronjob-fallback / rayservice YAML files."""
    from detailflow.platform.kuberay import ClusterSpec, write_all

    given = {"image": image, "namespace": namespace, "pipeline": pipeline, "schedule": schedule,
             "gpu_workers_max": gpu_workers_max}
    spec = dataclasses.replace(ClusterSpec(), **{k: v for k, v in given.items() if v is not None})
    for path in write_all(spec, out_dir):
        click.echo(f"wrote {path}")

"""Autoscaling in images: Serve's custom autoscaling policy over the replicas' image queue.

    autoscaling_config:
      policy:
        policy_function: detailflow.platform.serving.autoscale:ImageQueuePolicy
        policy_kwargs: {target_images_per_replica: 32}

A request costs 1..16 images, so counting requests (Serve's default policy) scales a deployment of
16-image requests like one of 1-image requests. Each Generator replica reports the images it holds
(admitted, running or queued for the engine's KV slots) through `record_autoscaling_stats`
({"pending_images": n}); Serve averages each replica's reports over look_back_period_s and calls this
policy with them. Requests still queued in front of the replicas (at the proxy's router) are counted as
one image each, the least they can cost. The demand is then

    desired replicas = (sum of the replicas' pending images + queued requests) / target_images_per_replica

and Serve's wrapper applies upscaling/downscaling factors, min/max replicas and the up/down delays.
Scale-down drains: a replica Serve removes takes no new request and finishes the ones it holds within
graceful_shutdown_timeout_s (the serve files set it above the request deadline).
"""

from __future__ import annotations

from typing import Any

PENDING_IMAGES = "pending_images"  # the metric GeneratorCore.record_autoscaling_stats reports
IMAGE_POLICY = "detailflow.platform.serving.autoscale:ImageQueuePolicy"  # policy_function in serve files


def desired_replicas(pending_images: float, queued_requests: float,
                     target_images_per_replica: float) -> float:
    """Replicas needed to hold the image demand at the target per replica (unrounded: Serve rounds up)."""
    if target_images_per_replica <= 0:
        raise ValueError(f"target_images_per_replica must be > 0 (got {target_images_per_replica})")
    return (max(0.0, pending_images) + max(0.0, queued_requests)) / target_images_per_replica


class ImageQueuePolicy:
    """Serve custom autoscaling policy (a class: Serve builds it once with policy_kwargs, then calls it
    with an AutoscalingContext every control-loop tick); returns (desired replicas, policy state)."""

    def __init__(self, target_images_per_replica: float = 32.0):
        if target_images_per_replica <= 0:
            raise ValueError(f"target_images_per_replica must be > 0 (got {target_images_per_replica})")
        self.target = float(target_images_per_replica)  # images one replica should hold on average

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:  # Serve's cold-start path decides from requests; keep its target
            return ctx.target_num_replicas, {}
        per_replica = (ctx.aggregated_metrics or {}).get(PENDING_IMAGES, {})
        images = float(sum(per_replica.values()))
        queued = float(ctx.total_queued_requests or 0.0)
        desired = desired_replicas(images, queued, self.target)
        return desired, {"pending_images": images, "queued_requests": queued}

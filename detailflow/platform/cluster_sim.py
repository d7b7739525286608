"""A KubeRay-shaped Ray cluster on one machine, for tests (Ray's own ray.cluster_utils.Cluster).

Usage:
    from detailflow.platform.cluster_sim import SIM_GPU, simulated_cluster
    with simulated_cluster() as sim:         # this process is connected to it (ray.init) inside
        sim.head, sim.gpu_nodes, sim.cpu_nodes               # node ids
        raytrain.launch(..., accelerator={SIM_GPU: 1})       # one rank per "GPU node"
        sim.kill(sim.gpu_nodes[0])                           # a node lost
        new_id = sim.replace(sim.gpu_nodes[1])               # lost, and a like node added (autoscaler)

Shape (DESIGN.md "Where work runs"): a head with num-cpus 0 (it runs drivers only, like KubeRay's
head with `num-cpus: "0"`), `gpu_nodes` raylets that carry one SIM_GPU each (the custom resource that
stands in for a GPU on CPU: a rank asks for it in its bundle exactly where it would ask for a GPU),
and `cpu_nodes` CPU-only raylets; each raylet is labelled ray.io/node-type as the KubeRay manifests
label their groups (head / worker-gpu / worker-cpu). CPUs are tiny on purpose: the whole cluster
shares this machine's cores. The nodes use the machine's own IP (not 127.0.0.1: ray.init resolves
a loopback cluster address to that IP, where a loopback-bound GCS is not listening).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

SIM_GPU = "sim_gpu"  # custom resource standing in for one GPU
NODE_TYPE = "ray.io/node-type"  # the node label KubeRay's groups carry


@dataclass
class SimCluster:
    cluster: object  # ray.cluster_utils.Cluster
    head: str  # node id of the head (0 CPUs)
    gpu_nodes: list[str] = field(default_factory=list)  # node ids of the SIM_GPU raylets
    cpu_nodes: list[str] = field(default_factory=list)  # node ids of the CPU-only raylets
    handles: dict = field(default_factory=dict)  # node id -> the Cluster's node handle
    node_args: dict = field(default_factory=dict)  # node id -> the add_node arguments that started it

    def kill(self, node_id: str) -> None:
        """Remove a raylet as a lost node would go (its workers die with it)."""
        self.cluster.remove_node(self.handles.pop(node_id), allow_graceful=False)

    def add(self, **node_args) -> str:
        """Start one more raylet (Cluster.add_node arguments); returns its node id."""
        node = self.cluster.add_node(**node_args)
        self.handles[node.node_id] = node
        self.node_args[node.node_id] = node_args
        return node.node_id

    def replace(self, node_id: str) -> str:
        """Kill a node, then add one like it (same resources and labels), as an autoscaler replaces a
        lost pod; the node lists name the new id in its place. Returns the new node id."""
        args = self.node_args.pop(node_id)
        self.kill(node_id)
        new = self.add(**args)
        for nodes in (self.gpu_nodes, self.cpu_nodes):
            if node_id in nodes:
                nodes[nodes.index(node_id)] = new
        self.cluster.wait_for_nodes()
        return new


@contextlib.contextmanager
def simulated_cluster(*, gpu_nodes: int = 2, cpu_nodes: int = 1, cpus_per_gpu_node: float = 2,
                      cpus_per_cpu_node: float = 1, object_store_mb: int = 150,
                      runtime_env: dict | None = None) -> Iterator[SimCluster]:
    """Start the cluster, connect this process to it, yield it; disconnect and stop it on exit."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("simulated_cluster needs a process not connected to Ray (ray.shutdown() first)")
    store = object_store_mb * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "labels": {NODE_TYPE: "head"}, "object_store_memory": store,
        "include_dashboard": False})
    try:
        sim = SimCluster(cluster, cluster.head_node.node_id)

        def add(cpus: float, kind: str, resources: dict) -> str:
            return sim.add(num_cpus=cpus, resources=resources, labels={NODE_TYPE: kind},
                           object_store_memory=store)

        sim.gpu_nodes = [add(cpus_per_gpu_node, "worker-gpu", {SIM_GPU: 1}) for _ in range(gpu_nodes)]
        sim.cpu_nodes = [add(cpus_per_cpu_node, "worker-cpu", {}) for _ in range(cpu_nodes)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=runtime_env or {})
        yield sim
    finally:
        ray.shutdown()
        cluster.shutdown()

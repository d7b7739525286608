"""Run a stage's own work (evaluation, extraction driver, consolidation) on a WORKER node with the
resources the stage declares, never in the pipeline driver on the head (DESIGN.md "Where work runs").

Usage:
    from detailflow.platform.placement import Placement, run_placed
    placement = Placement.from_resources({"cpus": 8, "gpus": 1})     # a stage's `resources:` block
    result = run_placed(evaluate_tokenizer, cfg, settings, placement=placement, name="eval-tokenizer",
                        log=print)                                       # fn(*args) -> result

Where fn runs (`where(placement)`):
- in this process when this process is not connected to Ray (a laptop CLI) or Ray is this one node with
  CPUs (a local `ray.init`: tests, `make demo`): nothing to place, and no task start-up to pay;
- otherwise (a multi-node cluster, or a head with no CPUs such as KubeRay's `num-cpus: "0"`) as ONE Ray
  task that reserves `cpus` (always > 0, so a 0-CPU head can never take it), `gpus` and the custom
  `accelerator` resources (e.g. {"sim_gpu": 1} on platform/cluster_sim.py's simulated cluster); where
  the nodes carry the `ray.io/node-type` label (the simulated cluster, a cluster started with
  `--labels`), also the label selector NOT_HEAD. Work the task starts (Ray Data, actor pools, reader tasks)
  is scheduled from there by its own resources; a task blocked in ray.get lends its CPUs back meanwhile.
Either way the caller's `log` gets one line naming the node that ran fn (the node id is read where fn
ran), e.g. "[placement] eval-tokenizer ran on node 4f1c... (worker-gpu) in a task with {'CPU': 1.0, ...}".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

NODE_TYPE = "ray.io/node-type"  # node label naming a KubeRay group (head / worker-gpu / worker-cpu)
NOT_HEAD = {NODE_TYPE: "!head"}  # Ray label selector: any node but one labelled head


@dataclass(frozen=True)
class Placement:
    cpus: float = 1.0  # CPUs the task reserves (> 0: a head with num-cpus 0 never takes it)
    gpus: float = 0.0  # GPUs the task reserves (fn then runs with CUDA_VISIBLE_DEVICES set by Ray)
    accelerator: dict = field(default_factory=dict)  # custom resources, e.g. {"sim_gpu": 1}

    def __post_init__(self):
        if not self.cpus > 0:
            raise ValueError(f"placement cpus must be > 0 (got {self.cpus}): a 0-CPU task may land on "
                             "the head")
        if self.gpus < 0 or any(float(v) <= 0 for v in self.accelerator.values()):
            raise ValueError(f"placement gpus ({self.gpus}) must be >= 0 and accelerator amounts "
                             f"({self.accelerator}) > 0")

    @classmethod
    def from_resources(cls, resources: dict, *, cpus: float = 1.0) -> Placement:
        """A stage's `resources:` block -> its task's placement: `cpus` (default `cpus`), `gpus`,
        `accelerator` ({resource: amount}); other keys (num_actors, gpus_per_worker, ...) are the
        stage's inner workers' and are ignored here."""
        return cls(cpus=float(resources.get("cpus", cpus)), gpus=float(resources.get("gpus", 0)),
                   accelerator={str(k): float(v) for k, v in (resources.get("accelerator") or {}).items()})

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0

    def ray_resources(self) -> dict[str, float]:
        """The resources as Ray names them (CPU, GPU, custom)."""
        out = {"CPU": self.cpus, **self.accelerator}
        if self.gpus:
            out["GPU"] = self.gpus
        return out

    def task_options(self, not_head: bool) -> dict:
        out = {"num_cpus": self.cpus, "num_gpus": self.gpus, "resources": dict(self.accelerator),
               "max_retries": 0}
        if not_head:
            out["label_selector"] = dict(NOT_HEAD)
        return out


def where(placement: Placement) -> str:
    """"task" when fn must run as a placed Ray task, "here" when this process runs it (module docstring)."""
    import ray

    if not ray.is_initialized():
        return "here"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    me = ray.get_runtime_context().get_node_id()
    if len(alive) == 1 and alive[0]["NodeID"] == me and alive[0]["Resources"].get("CPU", 0) > 0:
        return "here"
    return "task"


def nodes_labelled() -> bool:
    """Whether any live node carries the NODE_TYPE label (then the head is told apart by it)."""
    import ray

    return any(NODE_TYPE in (n.get("Labels") or {}) for n in ray.nodes() if n.get("Alive"))


def node_report() -> dict:
    """Where the calling process runs: {node_id, node_type} ("" without Ray)."""
    import ray

    if not ray.is_initialized():
        return {"node_id": "", "node_type": ""}
    node_id = ray.get_runtime_context().get_node_id()
    labels = next((n.get("Labels") or {} for n in ray.nodes() if n["NodeID"] == node_id), {})
    return {"node_id": node_id, "node_type": labels.get(NODE_TYPE, "")}


def _call(fn: Callable, args: tuple, kwargs: dict):
    return fn(*args, **kwargs), node_report()


def run_placed(fn: Callable, *args, placement: Placement, name: str, log: Callable[[str], None] = print,
               **kwargs):
    """fn(*args, **kwargs) where `where(placement)` says; returns its result (its exception propagates,
    the task's own traceback included). The arguments and the result travel by pickle; a `log`
    keyword of fn is kept in this process and becomes `print` in a task (Ray brings a task's lines to
    the driver's console)."""
    import ray

    if where(placement) == "here":
        out, node = _call(fn, args, kwargs)
        how = "in this process"
    else:
        if "log" in kwargs:  # the caller's own function stays here; task lines reach the driver anyway
            kwargs = {**kwargs, "log": print}
        task = ray.remote(_call).options(name=name, **placement.task_options(nodes_labelled()))
        out, node = ray.get(task.remote(fn, args, kwargs))
        how = f"in a task with {placement.ray_resources()}"
    if node["node_id"]:
        log(f"[placement] {name} ran on node {node['node_id']} ({node['node_type'] or 'unlabelled'}) {how}")
    return out

"""Where work lands on a KubeRay-shaped cluster (platform/cluster_sim.py: a 0-CPU head, two "GPU"
raylets, one CPU raylet): a Ray Train run through raytrain.launch with the simulated GPU in each
rank's bundle; every rank's reader tasks run on the rank's node, inside its placement-group bundle
(which reserves their CPUs), never on the head."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
from sim_cluster import module_cluster

from detailflow.platform.cluster_sim import NODE_TYPE, SIM_GPU

pytestmark = pytest.mark.integration
READER_CPUS, CPUS_PER_WORKER = 1.0, 0.5


@pytest.fixture(scope="module")
def sim(services):
    with module_cluster(__name__) as cluster:
        yield cluster


def _reader_loop(config: dict) -> None:
    """Each rank: read a few batches of its CodeStream, write where it and its readers ran."""
    import ray
    import ray.train
    from ray.util import get_current_placement_group, placement_group_table

    from detailflow.pipelines.data.code_stream import CodeStream, CodeStreamConfig
    from detailflow.platform.storage import Storage

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    stream = CodeStream(Storage(config["_settings"]), "placed", "train",
                        CodeStreamConfig(micro_batch=4, window_groups=1), rank=rank,
                        world=ctx.get_world_size())
    batches = list(islice(stream, 6))
    pg = get_current_placement_group()
    out = {"node": ray.get_runtime_context().get_node_id(), "pg": pg.id.hex(),
           "bundles": placement_group_table(pg)["bundles"],
           "readers": sorted({(b["reader_node"], b["reader_pg"]) for b in batches})}
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def test_reader_tasks_run_on_their_ranks_node_inside_its_bundle(sim, services, storage, tmp_path):
    import ray

    from detailflow.pipelines.data import codes
    from detailflow.platform import raytrain

    n = 64
    img = np.repeat(np.arange(n), 2)
    tok = np.tile(np.arange(8), (2 * n, 1))
    codes.write_codes(storage, "placed", "train", {"key": [f"i{i:03d}" for i in img], "label": img % 4,
                      "view": np.tile([0, 1], n), "clean": tok, "input": tok, "target": tok})
    alive = {nd["NodeID"]: nd for nd in ray.nodes() if nd["Alive"]}
    assert alive[sim.head]["Resources"].get("CPU", 0) == 0 and ray.cluster_resources().get(SIM_GPU) == 2
    if "Labels" in alive[sim.head]:  # KubeRay's node-type labels, where this Ray reports them
        assert {alive[n]["Labels"].get(NODE_TYPE) for n in sim.gpu_nodes} == {"worker-gpu"}
    raytrain.launch(_reader_loop, {"out": str(tmp_path), "experiment": "placement-test"}, services,
                    run_name="placement-test", num_workers=2, cpus_per_worker=CPUS_PER_WORKER,
                    reader_cpus=READER_CPUS, accelerator={SIM_GPU: 1}, max_failures=0)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["node"] for r in ranks) == sorted(sim.gpu_nodes)  # one rank per "GPU node"
    for r in ranks:
        # the rank's bundle reserves its own CPU + its readers' CPUs next to the accelerator
        assert all(b == {"CPU": CPUS_PER_WORKER + READER_CPUS, SIM_GPU: 1.0} for b in r["bundles"].values())
        assert r["readers"] == [[r["node"], r["pg"]]], r  # the rank's node and placement group only
        assert sim.head not in {node for node, _ in r["readers"]}

"""The simulated KubeRay-shaped cluster for a test module (platform/cluster_sim.py), one per module:

    @pytest.fixture(scope="module")
    def sim(services):
        with module_cluster(__name__) as cluster:
            yield cluster

The session's local Ray (tests/conftest.py's ray_session), if started, is shut down for the module and
started again afterwards with the same arguments; the test module is pickled by value (workers cannot
import tests/)."""

from __future__ import annotations

import contextlib
import re
import sys

PLACED = re.compile(r"\[placement\] (.+) ran on node ([0-9a-f]+) ")  # platform.placement's log line


@contextlib.contextmanager
def module_cluster(module_name: str, **kwargs):
    import ray
    import ray.cloudpickle

    from detailflow.platform.cluster_sim import simulated_cluster
    from detailflow.platform.raytrain import ray_runtime_env

    was = ray.is_initialized()
    if was:  # this module needs its own cluster; the session's local Ray comes back afterwards
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[module_name])
    try:
        with simulated_cluster(runtime_env=ray_runtime_env(), **kwargs) as cluster:
            yield cluster
    finally:
        if was:  # as tests/conftest.py's ray_session starts it
            ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
                     object_store_memory=2 * 1024**3, runtime_env=ray_runtime_env())


def placed_nodes(lines: list[str]) -> dict[str, str]:
    """{what: node id} from the "[placement] <what> ran on node <id> ..." lines of a stage log."""
    return {m.group(1): m.group(2) for m in map(PLACED.search, lines) if m}

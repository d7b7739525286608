"""A "GPU node" lost mid-training on the simulated KubeRay-shaped cluster (platform/cluster_sim.py):
the real tokenizer stage (tokenizer.run: 2 Ray Train ranks, one per sim_gpu raylet, ZeRO-2,
checkpoints on S3) runs in a thread; once a checkpoint is on S3 the test kills the raylet of one rank
and adds a like node (as KubeRay's autoscaler replaces a lost pod). Ray Train restarts the group from
the last checkpoint (FailureConfig max_failures) and finishes with nothing lost: every step trained
once in the final lineage, one MLflow run that records the resume, the final checkpoint at the last
step. The consolidation that follows runs placed on a sim_gpu worker, never the head (the driver)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from sim_cluster import module_cluster, placed_nodes

from detailflow.pipelines.train.stage_config import load_stage_config
from detailflow.pipelines.train.tokenizer import TokenizerStageConfig
from detailflow.platform.cluster_sim import SIM_GPU

pytestmark = pytest.mark.integration
DATASET = "node-loss-shapes"
STEPS, EVERY = 40, 4
DEADLINE_S = 420  # a hang guard only: on 2 busy vCPUs the run takes 90-200 s (restart + consolidation)


@pytest.fixture(scope="module")
def sim(services):
    with module_cluster(__name__) as cluster:
        yield cluster


def _attempts(path) -> list[list[int]]:
    """The steps a rank consumed, one list per worker process in the order they ran: a restart is a new
    pid. (A step falling back misses the restart whose rank had not logged the checkpoint's step yet.)"""
    attempts, last_pid = [], None
    for line in path.read_text().splitlines():
        step, pid = int(line.split()[0]), int(line.split()[4])
        if pid != last_pid:
            attempts.append([])
            last_pid = pid
        attempts[-1].append(step)
    return attempts


def test_gpu_node_lost_mid_training_resumes_from_checkpoint(sim, services, storage, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.train.stage_config import run_name
    from detailflow.pipelines.train.tokenizer import STAGE, resolve_batch, run
    from detailflow.platform import checkpoints, raytrain
    from detailflow.platform.placement import Placement
    from detailflow.platform.tracking import RUN_NAME_TAG

    synth.write_folder(tmp_path / "shapes", size=32, per_class=8, val_per_class=1, seed=1)  # 80 images
    ingest(storage, str(tmp_path / "shapes"), IngestConfig(name=DATASET, split="train", shard_mb=0.05,
                                                           row_group_rows=8, use_ray=False))
    consumed = tmp_path / "consumed"
    version = storage.read_manifest(f"datasets/{DATASET}/train")["version"]  # the run pins it in its name
    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-smoke.yaml", [
        f"dataset_version={version}", f"dataset={DATASET}", "name=node-loss", f"steps={STEPS}",
        f"checkpoint_every={EVERY}",
        "eval_every=1000", "log_every=1", "micro_batch=4", "window_groups=2", "max_failures=2",
        f"consumed_log={consumed}"])
    name = run_name(STAGE, cfg.name, cfg.date, dataclasses.asdict(resolve_batch(cfg)))
    lines, outcome = [], {}

    def log(line: str) -> None:
        lines.append(f"{time.time() - t0:6.1f}s {line}")

    def train():
        try:
            outcome["info"] = run(cfg, services, placement=Placement(cpus=0.5, accelerator={SIM_GPU: 1}),
                                  log=log, accelerator={SIM_GPU: 1})
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    t0 = time.time()
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    killed_after = None
    while thread.is_alive() and time.time() - t0 < 150:
        latest = raytrain.latest_checkpoint(services, name)
        if latest is not None and checkpoints.read_client_state(latest)["step"] >= EVERY:
            killed_after = checkpoints.read_client_state(latest)["step"]
            lost = sim.gpu_nodes[1]
            sim.replace(lost)  # the raylet and its rank die; a like node joins (the autoscaler's job)
            break
        time.sleep(0.3)
    assert killed_after is not None, f"no checkpoint before the run ended: {outcome}"
    thread.join(timeout=DEADLINE_S - (time.time() - t0))
    assert not thread.is_alive(), "training did not finish after the node loss:\n" + "\n".join(lines[-15:])
    if "error" in outcome:
        raise outcome["error"]
    print(f"node lost after checkpoint step {killed_after}; took {time.time() - t0:.0f}s", *lines, sep="\n")
    assert lost not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    # nothing lost: the final checkpoint is the last step, every step of each rank's final lineage ran
    final = checkpoints.read_client_state(raytrain.latest_checkpoint(services, name))
    assert final["step"] == STEPS
    resumed_at = set()
    for rank in (0, 1):
        first, second = _attempts(consumed.parent / f"{consumed.name}.rank{rank}")  # one restart
        assert first == list(range(len(first))), (rank, first)
        assert second == list(range(second[0], STEPS)), (rank, second)
        assert second[0] <= len(first)  # it resumed at or before the first step it had not consumed
        resumed_at.add(second[0])
    (resume,) = resumed_at  # both ranks restarted at the same checkpoint
    assert resume > 0 and resume % EVERY == 0 and resume >= killed_after
    client = MlflowClient(services.mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id],
                              filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the retry logged to the same run
    run_id = runs[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [float(resume)]
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(STEPS))
    assert client.get_run(run_id).data.tags["detailflow.checkpoint.latest_step"] == str(STEPS)

    # the consolidation ran placed: on a sim_gpu worker node, not on the head where this driver runs
    node = placed_nodes(lines)[f"consolidate {name}"]
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert node != sim.head and node in sim.gpu_nodes and alive[node]["Resources"].get(SIM_GPU) == 1
    assert storage.list_keys(f"runs/{name}/export/")

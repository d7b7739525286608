"""platform.placement without a cluster: a stage's resources block -> its task's Ray resources, the
refusals (a 0-CPU task could land on a KubeRay head), the in-process path of a laptop / one-node
Ray, and the pipeline schema keys (cpus, gpus, accelerator). Placement on a simulated multi-node
cluster: tests/test_stage_placement.py, tests/test_node_loss.py."""

from __future__ import annotations

import os

import pytest

from detailflow.platform.placement import NOT_HEAD, Placement, run_placed, where


def test_stage_resources_become_the_tasks_ray_resources():
    p = Placement.from_resources({"cpus": 2, "gpus": 1, "accelerator": {"sim_gpu": 1}, "num_actors": 4,
                                  "gpus_per_worker": 1})  # the inner actors' keys are not the task's
    assert p.ray_resources() == {"CPU": 2.0, "GPU": 1.0, "sim_gpu": 1.0} and p.uses_gpu
    opts = p.task_options(not_head=True)
    assert (opts["num_cpus"], opts["num_gpus"], opts["resources"]) == (2.0, 1.0, {"sim_gpu": 1.0})
    assert opts["label_selector"] == NOT_HEAD == {"ray.io/node-type": "!head"}
    assert "label_selector" not in Placement().task_options(not_head=False)  # unlabelled nodes (KubeRay)
    assert Placement.from_resources({}).ray_resources() == {"CPU": 1.0}  # default: one CPU, never 0


@pytest.mark.parametrize("bad", [{"cpus": 0}, {"gpus": -1}, {"accelerator": {"sim_gpu": 0}}])
def test_placements_that_could_land_on_the_head_or_mean_nothing_are_refused(bad):
    with pytest.raises(ValueError, match="cpus must be > 0|gpus .* must be >= 0"):
        Placement.from_resources(bad)


def test_without_a_cluster_the_work_runs_in_this_process():
    lines = []
    assert where(Placement()) == "here"  # no Ray here (or a one-node local Ray with CPUs)
    assert run_placed(os.getpid, placement=Placement(), name="pid", log=lines.append) == os.getpid()


def test_pipeline_schema_takes_the_stage_task_resources(tmp_path):
    from detailflow.pipelines.runner.spec import PipelineError, load_pipeline

    def pipeline(resources: str):
        f = tmp_path / "p.yaml"
        f.write_text("name: p\nstages:\n  - name: ev\n    kind: evaluate-tokenizer\n    params: {}\n"
                     f"    resources: {resources}\n")
        return load_pipeline(f)

    spec = pipeline("{cpus: 8, gpus: 1, accelerator: {sim_gpu: 1}}")
    assert Placement.from_resources(spec.stages[0].resources).ray_resources() == {
        "CPU": 8.0, "GPU": 1.0, "sim_gpu": 1.0}
    for bad in ("{cpus: 0}", "{accelerator: {sim_gpu: 0}}", "{gpus: -1}", "{accelerator: 1}"):
        with pytest.raises(PipelineError):
            pipeline(bad)

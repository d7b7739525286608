"""Integration tests of the real stage loops on the local services: tokenizer training (2 CPU workers,
ZeRO-2, streaming from S3) -> consolidated export -> code extraction (Ray Data actor pool) -> AR
training with self-correction pairs. The tests share one dataset and run in order (module scope).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mlflow_runs import runs_named

from detailflow.pipelines.train.stage_config import load_stage_config
from detailflow.pipelines.train.tokenizer import TokenizerStageConfig
from detailflow.platform import checkpoints
from detailflow.platform.export_store import export_content

pytestmark = pytest.mark.integration

DATASET = "stage-shapes"


@pytest.fixture(scope="module")
def dataset(storage, tmp_path_factory):
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("shapes")
    synth.write_folder(root, size=32, per_class=8, val_per_class=1, seed=0)  # 80 train images
    ingest(storage, str(root), IngestConfig(name=DATASET, split="train", shard_mb=0.05, use_ray=False))
    return DATASET


@pytest.fixture(scope="module")
def tokenizer_run(services, storage, ray_session, dataset):
    from detailflow.pipelines.train.tokenizer import run

    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-smoke.yaml",
                            [f"dataset={dataset}", "name=stage-test"])
    return cfg, run(cfg, services)


def test_tokenizer_two_workers_zero2_streams_from_s3(services, storage, tokenizer_run):


    cfg, info = tokenizer_run
    name = info["run_name"]
    assert name.startswith("tokenizer-stage-test-")
    keys = storage.list_keys(f"runs/{name}/checkpoint_")
    assert any(k.endswith("ds/zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys)
    client, runs = runs_named(services.mlflow_tracking_uri, cfg.experiment, name)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["zero_stage"] == "2" and run.data.params["model"] == "smoke"
    for metric in ("loss", "mse", "lr", "grad_norm", "codebook_usage", "perplexity", "images_per_s"):
        hist = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in hist) == list(range(cfg.steps)), metric
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert f"reconstructions/step_{cfg.steps:06d}.png" in arts
    assert export_content(storage, f"runs/{name}/export")[0].startswith("exports/")  # the pointer's target


def test_tokenizer_export_equals_consolidated_checkpoint(services, storage, tokenizer_run):
    from detailflow.pipelines.train.exports import load_tokenizer

    cfg, info = tokenizer_run
    tok, config = load_tokenizer(storage, info["run_name"])
    ckpt = checkpoints.find_latest(storage.filesystem(), f"{services.s3_bucket}/runs", info["run_name"])
    assert checkpoints.read_client_state(ckpt)["step"] == cfg.steps
    gathered = checkpoints.consolidated_state_dict(ckpt)
    exported = tok.state_dict()
    # the inference export: every trained tensor except the training-only align head
    assert any(k.startswith("align_head.") for k in gathered)
    gathered = checkpoints.inference_state(gathered)
    assert set(gathered) <= set(exported)
    for k, v in gathered.items():
        torch.testing.assert_close(exported[k].float(), v, rtol=0, atol=0)
    assert config["tokenizer"]["num_tokens"] == 16


@pytest.fixture(scope="module")
def codes_version(services, storage, ray_session, dataset, tokenizer_run):
    from detailflow.pipelines.train.extract_codes import ExtractConfig, extract_codes

    _, info = tokenizer_run
    return extract_codes(ExtractConfig(tokenizer=info["run_name"], dataset=dataset, views="tiny",
                                       batch_size=16, num_actors=1), services)


def test_extraction_clean_codes_equal_direct_tokenizer_call(storage, dataset, tokenizer_run, codes_version):
    import io

    import pyarrow.parquet as pq

    from detailflow.models.extraction import make_views
    from detailflow.pipelines.data.codes import codes_prefix
    from detailflow.pipelines.data.reader import read_manifest_checked
    from detailflow.pipelines.train.exports import load_tokenizer

    manifest = storage.read_manifest(codes_prefix(codes_version["version"], "train"))
    assert manifest["num_rows"] == 80 * 4  # 4 "tiny" views per image
    table = pq.read_table(io.BytesIO(storage.get_bytes(manifest["shards"][0]["key"]))).to_pandas()
    images = {}
    for shard in read_manifest_checked(storage, dataset, "train")["shards"]:
        t = pq.read_table(io.BytesIO(storage.get_bytes(shard["key"]))).to_pandas()
        images.update(dict(zip(t["key"], t["image"], strict=True)))
    tok, _ = load_tokenizer(storage, tokenizer_run[1]["run_name"])
    from PIL import Image

    for key in list(table["key"].unique())[:3]:
        rows = table[table["key"] == key].sort_values("view")
        arr = np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB"))
        img = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
        direct = tok.encode(make_views(img, "tiny", 32).flatten(0, 1))
        stored = torch.tensor(np.stack(rows["clean"].to_list()), dtype=torch.long)
        assert torch.equal(stored, direct), key


def test_ar_training_zero3_on_codes_with_self_correction(services, storage, tokenizer_run, codes_version):

    from detailflow.pipelines.train.ar import ARStageConfig, run

    cfg = load_stage_config(ARStageConfig, "configs/ar-smoke.yaml",
                            [f"tokenizer={tokenizer_run[1]['run_name']}", "name=stage-test",
                             "zero_stage=3"])  # ZeRO-3 here, ZeRO-2 in the tokenizer test
    assert cfg.correction_prob == 0.3
    info = run(cfg, services)
    client, runs = runs_named(services.mlflow_tracking_uri, cfg.experiment, info["run_name"])
    run_id = runs[0].info.run_id
    frac = client.get_metric_history(run_id, "corrected_fraction")
    assert len(frac) == cfg.steps and 0.0 < np.mean([m.value for m in frac]) < 1.0  # pairs really mixed
    assert "samples" in {a.path for a in client.list_artifacts(run_id)}
    assert export_content(storage, f"runs/{info['run_name']}/export")[0].startswith("exports/")
    state = checkpoints.read_client_state(
        checkpoints.find_latest(storage.filesystem(), f"{services.s3_bucket}/runs", info["run_name"]))
    assert state["step"] == cfg.steps and dataclasses.asdict(cfg)["tokenizer"] == state["config"]["tokenizer"]


def test_ar_loop_counts_optimiser_steps_and_reseeds_per_rank(services, storage, tokenizer_run, codes_version,
                                                             monkeypatch):
    """Issue 18 in the AR loop (the tokenizer loop's twin is tests/test_train_accum.py): with grad_accum
    2, `steps` optimiser steps read steps x 2 micro-batches, checkpoints and the LR schedule count
    optimiser steps, and torch is reseeded once from (seed, rank) after the shared init. In-process,
    so the loop runs here and the spies see it."""

    from detailflow.pipelines.data.code_stream import CodeStream
    from detailflow.pipelines.train.ar import ARStageConfig, run
    from detailflow.pipelines.train.loop_common import WorkerContext
    from detailflow.platform.deepspeed_glue import ar_lr

    steps, accum = 3, 2
    cfg = load_stage_config(ARStageConfig, "configs/ar-smoke.yaml", [
        f"tokenizer={tokenizer_run[1]['run_name']}", "name=stage-accum", "num_workers=0", f"steps={steps}",
        f"grad_accum={accum}", "checkpoint_every=2", "eval_every=100", "log_every=1", "micro_batch=4",
        "warmup_frac=0.34"])
    batches, seeded = [], []
    iterate, seed_rank = CodeStream.__iter__, WorkerContext.seed_rank

    def counting(stream):
        for batch in iterate(stream):
            batches.append(batch["input"].shape[0])
            yield batch
    monkeypatch.setattr(CodeStream, "__iter__", counting)
    monkeypatch.setattr(WorkerContext, "seed_rank",
                        lambda ctx, seed: seeded.append((ctx.rank, seed)) or seed_rank(ctx, seed))
    info = run(cfg, services)

    assert batches == [4] * (steps * accum)  # grad_accum micro-batches per optimiser step
    assert seeded == [(0, cfg.seed)]
    done = checkpoints.complete_checkpoints(storage.filesystem(), f"{services.s3_bucket}/runs",
                                            info["run_name"])
    assert [s for s, _ in done] == [2, 3]
    client, (mlrun,) = runs_named(services.mlflow_tracking_uri, cfg.experiment, info["run_name"])
    lrs = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "lr")}
    assert lrs == pytest.approx({k: ar_lr(k, total_steps=steps, base_lr=cfg.lr, warmup_frac=0.34)
                                 for k in range(steps)})
    assert mlrun.data.params["global_batch"] == str(4 * accum)

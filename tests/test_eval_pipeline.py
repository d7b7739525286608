"""Integration: tokenizer and generator evaluations on the real services (SeaweedFS, MLflow, Ray).

A smoke tokenizer and a smoke AR model are trained in-process for a few hundred steps (seconds) with
the model classes directly and published as exports, next to untrained ones (the untrained AR export
names the untrained tokenizer: together they are the untrained generator). The metrics must move the
right way on real data: the rFID of the trained tokenizer's reconstructions and the gFID of the trained
generator's samples lie below the untrained ones', all against the held-out split. The AR learning
itself is checked by the held-out NLL: trained well below ln K, untrained exactly ln K (a zero output
head gives uniform logits). Two evaluations with one seed agree to the last digit whatever the number
of sampling actors, and a run that dies halfway never looks complete.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tempfile

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

DATASET = "eval-shapes"
PER_CLASS, VAL_PER_CLASS = 20, 2


def _split_images(per_class: int, split_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images synth.write_folder writes for a split (same seeds), uint8 B x 3 x 32 x 32."""
    from detailflow.pipelines.data.synth import CLASS_NAMES, render

    imgs, labels = [], []
    for cid in range(len(CLASS_NAMES)):
        for i in range(per_class):
            imgs.append(render(cid, 32, np.random.default_rng([0, split_id, cid, i])))
            labels.append(cid)
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def _publish(storage, run_name: str, module, config: dict) -> str:
    from detailflow.models.export import save_pretrained
    from detailflow.pipelines.train.exports import export_prefix

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(module, config, d)
        for name in ("model.safetensors", "config.json"):
            with open(f"{d}/{name}", "rb") as f:
                storage.put_bytes(f"{export_prefix(run_name)}/{name}", f.read())
    return run_name


def _train_tokenizer(steps: int, seed: int = 0):
    from detailflow.models.configs import get_model_config
    from detailflow.models.degrade import degrade_to_prefix, sample_prefix_len
    from detailflow.models.tokenizer import DetailFlowTokenizer, to_model_range

    cfg = get_model_config("smoke").tokenizer
    torch.manual_seed(seed)
    tok = DetailFlowTokenizer(cfg).train()
    if steps:
        x, _ = _split_images(PER_CLASS, 0)
        opt = torch.optim.Adam(tok.parameters(), lr=1e-3, betas=(0.9, 0.95))
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        for step in range(steps):
            img = to_model_range(x[torch.randint(len(x), (16,), generator=gen)])
            t = sample_prefix_len(tok.rmap, cfg.degrade_prob, rng)
            loss, _ = tok.training_step(img, degrade_to_prefix(img, t, tok.rmap), t, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
            opt.step()
    return tok.eval(), cfg


def _train_ar(codes: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0):
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config

    cfg = get_model_config("smoke").ar
    torch.manual_seed(seed)
    model = DetailFlowGPT(cfg).train()
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(codes), (32,), generator=gen)
        loss = model.loss(codes[idx], codes[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), cfg


@pytest.fixture(scope="module")
def models(services, storage, ray_session, tmp_path_factory):
    from detailflow.pipelines.data import codes as codes_mod
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.train.exports import export_prefix

    root = tmp_path_factory.mktemp("eval-shapes")
    synth.write_folder(root, size=32, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0)
    for split in ("train", "val"):
        ingest(storage, str(root), IngestConfig(name=DATASET, split=split, shard_mb=0.05, use_ray=False))
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on the shared 2-core box
    x, y = _split_images(PER_CLASS, 0)
    vx, vy = _split_images(VAL_PER_CLASS, 1)
    try:
        for name, steps in (("trained", 400), ("untrained", 0)):
            tok, tok_cfg = _train_tokenizer(steps)
            run = _publish(storage, f"tokenizer-eval-{name}", tok, {
                "kind": "tokenizer", "model": "smoke", "tokenizer": dataclasses.asdict(tok_cfg)})
            vcodes = tok.encode(vx).numpy()  # held-out codes of this tokenizer, for the NLL
            codes_mod.write_codes(storage, run, "val", {
                "key": [f"val-{i}" for i in range(len(vy))], "label": vy.numpy(),
                "view": np.zeros(len(vy), np.int64), "clean": vcodes, "input": vcodes, "target": vcodes})
            ar, ar_cfg = _train_ar(tok.encode(x), y, steps)
            out[f"tok_{name}"] = run
            out[f"ar_{name}"] = _publish(storage, f"ar-eval-{name}", ar, {
                "kind": "ar", "model": "smoke", "tokenizer": storage.uri(export_prefix(run)),
                "ar": dataclasses.asdict(ar_cfg)})
    finally:
        torch.set_num_threads(threads)
    return out


def test_tokenizer_eval_trained_beats_untrained_and_logs_curves(services, storage, models):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.evaluate.tokenizer_eval import CURVES, TokenizerEvalConfig, evaluate_tokenizer
    from detailflow.pipelines.evaluate.tracking import read_complete

    res = {name: evaluate_tokenizer(TokenizerEvalConfig(tokenizer=models[f"tok_{name}"], dataset=DATASET,
                                                        micro_batch=16, kid_subsets=20), services)
           for name in ("trained", "untrained")}
    good, bad = res["trained"], res["untrained"]
    print({k: {m: v[m] for m in ("rfid", "rkid", "psnr", "ssim", "codebook_usage", "perplexity")}
           for k, v in res.items()})
    assert good["n_images"] == 10 * VAL_PER_CLASS
    assert good["rfid"] < bad["rfid"] and good["rkid"] < bad["rkid"]
    assert good["psnr"] > bad["psnr"] + 1 and good["ssim"] > bad["ssim"]
    admissible = [1, 2, 3, 4, 8, 12, 16]  # smoke map (spec §6.5)
    assert sorted(good["curves"]["psnr_vs_full"]) == admissible
    assert good["curves"]["psnr_vs_target"][16] == good["curves"]["psnr_vs_full"][16]  # t = N: the image
    assert 0 < good["codebook_usage"] <= 1 and 1 <= good["perplexity"] <= 64
    client = MlflowClient(services.mlflow_tracking_uri)
    run = client.get_run(good["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["eval.complete"] == "true"
    assert run.data.params["tokenizer"] == models["tok_trained"]
    for metric in CURVES:
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == admissible
    arts = {a.path for d in ("plots", "samples") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/prefix_curves.png", "samples/reconstructions.png"} <= arts
    assert read_complete(client, run.info.run_id)["rfid"] == pytest.approx(good["rfid"])


def _tiny_classifier(tmp_path):
    class MeanColour(torch.nn.Module):  # a TorchScript "classifier": logits from the mean colour
        def forward(self, x):
            m = x.float().mean(dim=(2, 3)) / 255.0
            return torch.cat([m, 1 - m, m * m, (1 - m)[:, :1]], dim=1) * 5.0

    from detailflow.platform.storage import sha256_file

    path = tmp_path / "clf.pt"
    torch.jit.save(torch.jit.script(MeanColour()), str(path))
    return str(path), sha256_file(path)


def test_generator_eval_trained_beats_untrained_deterministic_across_actor_counts(services, storage, models,
                                                                                  tmp_path):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, evaluate_generator

    clf, clf_sha = _tiny_classifier(tmp_path)
    base = GeneratorEvalConfig(dataset=DATASET, n=20, seed=3, cfg_scale=1.5, chunk_size=10, num_actors=2,
                               kid_subsets=20, micro_batch=16)
    good = evaluate_generator(dataclasses.replace(base, ar=models["ar_trained"], cfg_sweep=[1.0, 3.0],
                                                  sweep_n=10, classifier_weights=clf,
                                                  classifier_sha256=clf_sha), services)
    again = evaluate_generator(dataclasses.replace(base, ar=models["ar_trained"], num_actors=1), services)
    bad = evaluate_generator(dataclasses.replace(base, ar=models["ar_untrained"], num_actors=1), services)
    print({k: {m: v[m] for m in ("fid", "kid", "precision", "recall", "nll")} for k, v in
           (("trained", good), ("again", again), ("untrained", bad))})
    assert good["fid"] < bad["fid"] and good["kid"] < bad["kid"]
    for key in ("fid", "kid", "kid_std", "precision", "recall", "nll", "bits_per_token"):
        assert again[key] == good[key], key  # bit-identical, 1 actor vs 2
    assert bad["nll"] == pytest.approx(math.log(64), abs=1e-6)  # zero head: uniform over K = 64 codes
    assert good["nll"] < bad["nll"] - 0.5
    assert good["bits_per_token"] == pytest.approx(good["nll"] / math.log(2))
    assert 1.0 <= good["inception_score"] <= 10.0 and "inception_score" not in again
    assert set(good["sweep"]) == {"1", "3"} and all(np.isfinite(v["fid"]) for v in good["sweep"].values())
    client = MlflowClient(services.mlflow_tracking_uri)
    run = client.get_run(good["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["eval.complete"] == "true"
    assert (run.data.params["n"], run.data.params["seed"], run.data.params["cfg_scale"]) == ("20", "3", "1.5")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cfg_sweep/fid")] == [100, 300]
    assert "skipped" in client.get_run(again["mlflow_run_id"]).data.tags["eval.inception_score"]
    arts = {a.path for d in ("plots", "samples") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/cfg_sweep.png", "samples/grid.png", "samples/samples.npz"} <= arts
    npz = []
    for r in (good["mlflow_run_id"], again["mlflow_run_id"]):
        with open(client.download_artifacts(r, "samples/samples.npz", str(tmp_path / r)), "rb") as f:
            npz.append(np.load(io.BytesIO(f.read()))["arr_0"])
    assert npz[0].shape == (20, 32, 32, 3) and npz[0].dtype == np.uint8 and np.array_equal(npz[0], npz[1])


def test_evaluation_failing_halfway_never_looks_complete(services, storage, models):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, evaluate_generator
    from detailflow.pipelines.evaluate.tracking import EXPERIMENT, read_complete

    cfg = GeneratorEvalConfig(ar=models["ar_trained"], dataset=DATASET, n=10, chunk_size=5, num_actors=1,
                              fail_after_chunks=1, kid_subsets=5, micro_batch=16)
    with pytest.raises(RuntimeError, match="fault injection"):
        evaluate_generator(cfg, services)
    client = MlflowClient(services.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "FAILED" and run.data.tags["eval.complete"] == "false"
    assert "fault injection" in run.data.tags["eval.error"]
    assert read_complete(client, run.info.run_id) is None
    from click.testing import CliRunner

    from detailflow.cli import main

    shown = CliRunner().invoke(main, ["eval", "show", run.info.run_id])
    assert shown.exit_code == 1 and "not a complete evaluation" in shown.output


def test_cli_eval_tokenizer_and_show(services, models):
    from click.testing import CliRunner

    from detailflow.cli import main

    runner = CliRunner()
    args = ["eval", "tokenizer", "--tokenizer", models["tok_trained"], "--dataset", DATASET, "micro_batch=16",
            "rfid=false"]  # no Inception pass: PSNR/SSIM curves and codebook statistics only
    res = runner.invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "rfid" not in out and out["psnr"] > 0 and out["n_images"] == 10 * VAL_PER_CLASS
    shown = runner.invoke(main, ["eval", "show", out["mlflow_run_id"]])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["psnr"] == out["psnr"]
    assert runner.invoke(main, ["eval", "generator", "--dataset", DATASET]).exit_code == 2  # no --ar
    assert runner.invoke(main, ["eval", "tokenizer", "--tokenizer", "x", "nosuchfield=1"]).exit_code == 2


def test_sampling_actors_leave_the_reader_a_cpu(ray_session):
    from detailflow.pipelines.evaluate.sampling import READER_CPUS, reserve_cpus

    total = ray_session.cluster_resources()["CPU"]  # 4 in the test session
    assert reserve_cpus(2, 1.0) == 1.0  # 2 of 4: room left for the reader
    shrunk = (total - READER_CPUS) / total  # one actor per CPU would starve the reader: a deadlock
    assert reserve_cpus(int(total), 1.0) == pytest.approx(shrunk)

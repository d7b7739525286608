"""The tokenizer's GAN step under DeepSpeed (spec §1.10): the generator's adversarial loss must not reach
the discriminator's parameters, and the discriminator engine trains in the real 2-worker ZeRO-2 loop.
The real loop run also checks that the consolidated export is logged on its MLflow run as a model
that loads and encodes exactly like the export read straight from S3.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from detailflow.models.configs import get_model_config

GAN_OVERRIDES = {"gan_weight": 0.2, "disc_start": 1, "random_feature_nets": True}  # stand-in D backbone


def _gan_cfg():
    return dataclasses.replace(get_model_config("smoke").tokenizer, gan_weight=0.2, disc_start=0,
                               random_feature_nets=True)


def _engines(cfg):
    from detailflow.models.losses import Discriminator
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.pipelines.train.loop_common import StepAdapter
    from detailflow.pipelines.train.tokenizer import DiscriminatorStep
    from detailflow.platform import deepspeed_glue as dsg

    # no clipping: the discriminator update is then exactly -lr * its gradient (SGD)
    ds_cfg = dsg.build_ds_config(micro_batch=4, zero_stage=2, grad_clip=0.0, precision="fp32")
    torch.manual_seed(0)
    model = DetailFlowTokenizer(cfg)
    gen = dsg.init_engine(StepAdapter(model, "training_step"),
                          dsg.make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3),
                          ds_cfg)
    disc = Discriminator(cfg)
    d_opt = torch.optim.SGD(disc.trainable_parameters(), lr=0.5)
    d_eng = dsg.init_engine(DiscriminatorStep(disc, cfg), d_opt, ds_cfg)
    return model, gen, disc, d_eng


def _disc_update_vs_own_loss(model, gen, disc, d_eng, cfg, img, *, freeze: bool) -> float:
    """One generator step then one D step through the ZeRO-2 engines; returns the largest difference
    between D's actual update and -lr * (gradient of D's own loss alone), computed on a plain copy."""
    from detailflow.models.losses import Discriminator, discriminator_step
    from detailflow.pipelines.train.tokenizer import generator_step

    if freeze:
        generator_step(gen, disc, img, img, cfg.num_tokens, 0)
        assert all(p.grad is None for p in disc.trainable_parameters())  # no generator gradient in D
    else:  # the old loop: forward/backward with D's parameters live
        loss, _ = gen(img, img, cfg.num_tokens, 0, discriminator=disc)
        gen.backward(loss)
        gen.step()
    snapshot = copy.deepcopy(disc.state_dict())  # BN stats, spectral-norm vectors, LeCAM EMAs included
    before = {n: p.detach().clone() for n, p in disc.named_parameters() if p.requires_grad}
    real, fake = model.last_target, model.last_reconstruction
    torch.manual_seed(11)  # the same DiffAugment draws for the engine step and the reference
    d_loss, _ = d_eng(real, fake, 0)
    d_eng.backward(d_loss)
    d_eng.step()
    ref = Discriminator(cfg)
    ref.load_state_dict(snapshot)
    torch.manual_seed(11)
    ref_loss, _ = discriminator_step(ref, real, fake, 0, cfg)
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    live = [(n, p.detach()) for n, p in disc.named_parameters() if p.requires_grad]
    moved = max(float((p - before[n]).abs().max()) for n, p in live)
    assert moved > 1e-4  # D really stepped, so agreement below is not trivial
    return max(float((p - (before[n] - 0.5 * ref_params[n].grad)).abs().max()) for n, p in live)


@pytest.mark.usefixtures("one_torch_thread")
def test_generator_step_leaves_discriminator_gradients_untouched_under_zero2():
    cfg = _gan_cfg()
    img = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    engines = _engines(cfg)
    assert _disc_update_vs_own_loss(*engines, cfg, img, freeze=True) < 1e-6
    # Control, the old loop: D's ZeRO-2 gradient hooks already reduced the generator's gradient, so
    # D's own backward reduces the same partitions a second time, which DeepSpeed refuses (the first
    # GAN step, at step 40,000 in the paper recipe, would have crashed the run).
    engines = _engines(cfg)
    with pytest.raises(AssertionError, match="already been reduced"):
        _disc_update_vs_own_loss(*engines, cfg, img, freeze=False)


# ---- the real loop: 2 workers, ZeRO-2, GAN on from step 1 ----------------------------------------

DATASET = "gan-shapes"


@pytest.fixture(scope="module")
def gan_run(services, storage, ray_session, tmp_path_factory):
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.train.stage_config import load_stage_config
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig, run

    root = tmp_path_factory.mktemp("gan-shapes")
    synth.write_folder(root, size=32, per_class=8, val_per_class=1, seed=1)  # 80 train images
    ingest(storage, str(root), IngestConfig(name=DATASET, split="train", shard_mb=0.05, use_ray=False))
    overrides = [f"dataset={DATASET}", "name=gan-test", "steps=4", "checkpoint_every=4", "eval_every=4"]
    overrides += [f"model_overrides.{k}={v}" for k, v in GAN_OVERRIDES.items()]
    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-smoke.yaml", overrides)
    return cfg, run(cfg, services)


@pytest.mark.integration
def test_two_worker_zero2_tokenizer_trains_its_discriminator(services, storage, gan_run):
    from mlflow.tracking import MlflowClient

    from detailflow.platform.tracking import find_run_id, list_checkpoints

    cfg, info = gan_run
    name = info["run_name"]
    keys = storage.list_keys(f"runs/{name}/checkpoint_")
    for rank in (0, 1):  # the discriminator engine checkpoints its own ZeRO-2 shards
        assert any(k.endswith(f"disc/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt") for k in keys), keys
    client = MlflowClient(services.mlflow_tracking_uri)
    run_id = find_run_id(client, name)
    d_loss = {m.step: m.value for m in client.get_metric_history(run_id, "d_loss")}
    assert d_loss[0] == 0.0 and all(d_loss[s] > 0 for s in range(1, cfg.steps))  # on from disc_start=1
    gan_g = {m.step for m in client.get_metric_history(run_id, "gan_g")}
    assert gan_g == set(range(1, cfg.steps))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [c["step"] for c in list_checkpoints(client, run_id)] == [cfg.steps]


@pytest.mark.integration
def test_tokenizer_export_is_logged_on_the_run_as_a_model(services, storage, gan_run):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.train.exports import load_tokenizer
    from detailflow.platform.tracking import find_run_id, list_exports

    cfg, info = gan_run
    client = MlflowClient(services.mlflow_tracking_uri)
    run_id = find_run_id(client, info["run_name"])
    (export,) = list_exports(client, run_id)
    assert export["uri"] == info["export_uri"]
    assert client.get_run(run_id).data.tags["detailflow.export.model_uri"] == export["model_uri"]
    mlflow.set_tracking_uri(services.mlflow_tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(export["model_uri"])
    sig = pyfunc.metadata.get_input_schema().inputs[0]
    assert sig.type == np.dtype(np.uint8) and sig.shape == (-1, 3, 32, 32)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    tok, _ = load_tokenizer(storage, info["run_name"])  # the export read straight from S3
    direct = tok.encode(torch.from_numpy(images)).numpy()
    assert np.array_equal(pyfunc.predict(images), direct)
    assert client.get_logged_model(export["model_id"]).source_run_id == run_id

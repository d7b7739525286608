"""Unit tests (no Ray, no services) for the training glue: LR schedules, ds_config, stage configs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from detailflow.pipelines.train.stage_config import config_hash, load_stage_config, run_name
from detailflow.platform import deepspeed_glue as dsg
from detailflow.platform.tracking import flatten


@pytest.mark.parametrize("total,warmup", [(100, 10), (1000, 50), (7, 0)])
def test_tokenizer_lr_schedule(total, warmup):
    base = 3e-4
    lrs = [dsg.tokenizer_lr(s, total_steps=total, base_lr=base, warmup_steps=warmup)
           for s in range(total + 1)]
    assert lrs[0] == pytest.approx(1e-5 if warmup else base)
    if warmup:  # linear: constant increments during warm-up
        d = [lrs[i + 1] - lrs[i] for i in range(warmup)]
        assert max(d) == pytest.approx(min(d))
    assert lrs[warmup] == pytest.approx(base)
    assert lrs[total] == pytest.approx(0.1 * base)  # min_lr = 0.1·lr (spec §1.11)
    decay = lrs[warmup:]
    assert all(a >= b - 1e-15 for a, b in zip(decay, decay[1:], strict=False))  # monotone cosine
    mid = warmup + (total - warmup) // 2
    if (total - warmup) % 2 == 0:  # cosine midpoint is the mean of lr and min_lr
        assert lrs[mid] == pytest.approx(0.55 * base)


@pytest.mark.parametrize("total", [200, 2000])
def test_ar_lr_schedule(total):
    base = 1e-3
    warm = int(round(0.05 * total))
    lr = lambda s: dsg.ar_lr(s, total_steps=total, base_lr=base)
    assert lr(0) == pytest.approx(0.005 * base)  # spec §2.4
    assert lr(warm) == pytest.approx(base)
    assert lr(warm // 2) == pytest.approx(0.005 * base + (base - 0.005 * base) * (warm // 2) / warm)
    assert lr(total) == pytest.approx(0.01 * base)
    assert lr(10 * total) == pytest.approx(0.01 * base)  # clamped after the end
    q = warm + (total - warm) // 4
    expected = 0.01 * base + 0.5 * (0.99 * base) * (1 + math.cos(math.pi * (q - warm) / (total - warm)))
    assert lr(q) == pytest.approx(expected)


def test_set_lr_respects_group_scale():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = dsg.make_optimizer([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=1.0, kind="adamw")
    dsg.set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_build_ds_config(stage, precision):
    cfg = dsg.build_ds_config(micro_batch=4, zero_stage=stage, grad_accum=3, grad_clip=0.5,
                              precision=precision)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in cfg and "scheduler" not in cfg  # client torch optimiser, no JIT builds
    assert ("bf16" in cfg) == (precision == "bf16")
    assert "fp16" not in cfg


@pytest.mark.parametrize("kwargs", [dict(zero_stage=4), dict(precision="fp16"), dict(micro_batch=0)])
def test_build_ds_config_rejects_bad_input(kwargs):
    base = dict(micro_batch=2)
    with pytest.raises(ValueError):
        dsg.build_ds_config(**{**base, **kwargs})


def test_select_device_cpu():
    spec = dsg.select_device("cpu")
    assert (spec.device, spec.backend, spec.precision) == ("cpu", "gloo", "fp32")
    if not torch.cuda.is_available():
        assert dsg.select_device("auto") == spec
        with pytest.raises(RuntimeError):
            dsg.select_device("cuda")


@dataclass
class _Cfg:
    name: str = "x"  # config name
    steps: int = 10  # steps
    lr: float = 1e-3  # lr
    flag: bool = False  # flag
    date: str | None = None  # date
    num_workers: int = 2  # workers


def test_stage_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: tiny\nsteps: 5\nlr: 1e-4\n")
    cfg = load_stage_config(_Cfg, f, ["steps=7", "flag=true", "date=2026-01-02"])
    assert (cfg.name, cfg.steps, cfg.lr, cfg.flag, cfg.date) == ("tiny", 7, 1e-4, True, "2026-01-02")
    with pytest.raises(ValueError, match="unknown field"):
        load_stage_config(_Cfg, f, ["nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_stage_config(_Cfg, f, ["steps"])
    f.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_stage_config(_Cfg, f)


def test_run_name_deterministic_and_execution_independent():
    a = {"name": "tiny", "steps": 5, "num_workers": 2, "date": "2026-01-02"}
    b = {**a, "in_process": True, "cpus_per_worker": 3, "max_failures": 9}  # how it runs, not what
    c = {**a, "steps": 6}
    assert run_name("tokenizer", "tiny", "2026-01-02", a) == run_name("tokenizer", "tiny", "2026-01-02", b)
    assert config_hash(a) != config_hash(c)
    assert run_name("ar", "tiny", "2026-01-02", a).startswith("ar-tiny-2026-01-02-")  # a label, when given


def test_bare_cli_run_names_carry_no_calendar_date_and_name_the_content(monkeypatch):
    """Outside a pipeline the name was <stage>-<config>-<today>-<hash>: a resubmission the next day
    started a new run instead of resuming, and new code or data on the same day resumed the old one."""
    import datetime as dt

    from detailflow.pipelines.runner import identity

    base = {"name": "tiny", "steps": 5, "num_workers": 2, "micro_batch": 4, "grad_accum": 1,
            "dataset_version": "v1", "identity": None, "date": None}
    name = run_name("tokenizer", "tiny", None, base)
    assert dt.date.today().isoformat() not in name
    assert name.startswith("tokenizer-tiny-") and len(name.rsplit("-", 1)[1]) == 12
    assert run_name("tokenizer", "tiny", None, dict(base)) == name  # deterministic
    for change in ({"dataset_version": "v2"}, {"num_workers": 4}, {"grad_accum": 2}, {"steps": 6}):
        assert run_name("tokenizer", "tiny", None, {**base, **change}) != name, change
    pkg, (commit, tree) = identity._cached_code()
    monkeypatch.setattr(identity, "_cached_code", lambda: (pkg, ("other-commit", tree)))
    assert run_name("tokenizer", "tiny", None, base) == name  # the commit is lineage, the tree is content
    monkeypatch.setattr(identity, "_cached_code", lambda: (pkg, (commit, "another-tree")))
    assert run_name("tokenizer", "tiny", None, base) != name  # other code: another run


def test_flatten_nested_params():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_cli_train_show_and_bad_override():
    import json

    from click.testing import CliRunner

    from detailflow.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["train", "show", "tokenizer", "--config", "configs/tokenizer-smoke.yaml",
                             "steps=3", "date=2026-01-02"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["config"]["steps"] == 3 and shown["run_name"].startswith("tokenizer-smoke-2026-01-02-")
    r2 = runner.invoke(main, ["train", "show", "tokenizer", "--config", "configs/tokenizer-smoke.yaml",
                              "steps=4", "date=2026-01-02"])
    assert json.loads(r2.output)["run_name"] != shown["run_name"]  # the hash follows the config
    bad = runner.invoke(main, ["train", "tokenizer", "--config", "configs/tokenizer-smoke.yaml", "nope=1"])
    assert bad.exit_code == 2 and "unknown field 'nope'" in bad.output
    assert runner.invoke(main, ["extract-codes", "--help"]).exit_code == 0


PAPER_WEIGHTS = ("align_teacher_path", "perceptual_net_path", "disc_net_path")


def _fake_weight_overrides(tmp_path) -> list[str]:
    out = []
    for name in PAPER_WEIGHTS:
        (tmp_path / f"{name}.pt2").write_bytes(b"stand-in")  # existence is what loading checks
        out.append(f"model_overrides.{name}={tmp_path / f'{name}.pt2'}")
    return out


@pytest.mark.parametrize("path", ["configs/tokenizer-tiny.yaml", "configs/tokenizer-smoke.yaml",
                                  *[f"configs/tokenizer-detailflow-{n}.yaml" for n in (16, 32, 64)],
                                  "configs/ar-tiny.yaml", "configs/ar-smoke.yaml",
                                  *[f"configs/ar-detailflow-{n}.yaml" for n in (16, 32, 64)]])
def test_stage_config_files_load(path, tmp_path):
    from detailflow.pipelines.train.ar import ARStageConfig, ar_config
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig, tokenizer_config

    if "tokenizer" in path:
        paper = "detailflow" in path
        cfg = load_stage_config(TokenizerStageConfig, path, _fake_weight_overrides(tmp_path) if paper else [])
        tok = tokenizer_config(cfg)
        if paper:  # spec §0 numbers: N = 8 x the suffix, g 8, K 8192, 256 px
            n = int(path.rsplit("-", 1)[1].split(".")[0])
            assert (tok.num_tokens, tok.group_size, tok.codebook_size) == (8 * n, 8, 8192)
            assert tok.image_size == 256 and tok.perceptual_weight == 1.0 and tok.gan_weight == 0.2
            assert cfg.micro_batch * cfg.num_workers == 256 and cfg.lr == 1e-4
        assert cfg.micro_batch >= 1 and tok.num_tokens % tok.group_size == 0
    else:
        cfg = load_stage_config(ARStageConfig, path)
        assert ar_config(cfg).num_tokens >= 1 and cfg.correction_prob == 0.3
    dsg.build_ds_config(micro_batch=cfg.micro_batch, zero_stage=cfg.zero_stage,
                        precision="fp32" if cfg.precision == "auto" else cfg.precision)


@pytest.mark.parametrize("n", [16, 32, 64])
def test_paper_tokenizer_recipes_name_the_weights_they_need(n, tmp_path):
    from detailflow.models.configs import WEIGHT_FILES
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig

    path = f"configs/tokenizer-detailflow-{n}.yaml"
    with pytest.raises(ValueError) as err:
        load_stage_config(TokenizerStageConfig, path)
    for name in PAPER_WEIGHTS:  # every missing file is named, with what it must be
        assert f"{name} is not set; it must name {WEIGHT_FILES[name][1]}" in str(err.value)
    assert "encoder_init_path" not in str(err.value)  # optional
    overrides = _fake_weight_overrides(tmp_path)
    disc = lambda value: [*overrides[:2], f"model_overrides.disc_net_path={value}"]  # noqa: E731
    with pytest.raises(ValueError, match="disc_net_path='/nope/dino.pt2' does not exist"):
        load_stage_config(TokenizerStageConfig, path, disc("/nope/dino.pt2"))
    # an s3:// URI is accepted at load time (the driver checks the object, each worker its sha256)
    cfg = load_stage_config(TokenizerStageConfig, path, disc("s3://b/d.pt2"))
    assert cfg.model_overrides["disc_net_path"] == "s3://b/d.pt2"


def test_cli_paper_recipe_without_weights_is_a_usage_error():
    from click.testing import CliRunner

    from detailflow.cli import main

    r = CliRunner().invoke(main, ["train", "tokenizer", "--config", "configs/tokenizer-detailflow-16.yaml"])
    assert r.exit_code == 2 and "align_teacher_path is not set" in r.output


def test_resolve_weights_checks_sha256(tmp_path):
    import dataclasses as dc
    import hashlib

    from detailflow.models.configs import get_model_config
    from detailflow.platform.weights import WeightFileError, resolve_weights

    f = tmp_path / "teacher.pt2"
    f.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(f.read_bytes()).hexdigest()  # independent of weights.sha256_file's chunking
    tok = dc.replace(get_model_config("smoke").tokenizer, align_teacher_path=str(f),
                     align_teacher_sha256=good)
    assert resolve_weights(tok, storage=None).align_teacher_path == str(f)
    bad = dc.replace(tok, align_teacher_sha256="0" * 64)
    with pytest.raises(WeightFileError, match=f"sha256 {good} but align_teacher_sha256 says 0000"):
        resolve_weights(bad, storage=None)


def test_progress_line(capsys):
    from detailflow.platform.progress import Progress
    from detailflow.platform.tracking import Tracker

    tracker = Tracker()  # disabled: only its last_checkpoint is read
    p = Progress("tokenizer", "run-x", total=100, start=20, unit="img", every_s=3600, tracker=tracker)
    assert p.update(21, 64) is None  # not due yet: nothing printed
    p._t0 = p._last = 0.0  # pin the clock: 20 steps and 1,280 images in the last 10 s
    p._items, p.loss = 1280, 0.25
    tracker.last_checkpoint = (40, "s3://b/runs/run-x/checkpoint_step00000040_t")
    line = p.line(40, now=10.0)
    # 2 steps/s since the start at step 20 -> 60 steps left -> 30 s
    assert line == ("[tokenizer run-x] step 40/100 (40%) | loss 0.2500 | 128.0 img/s | ETA 30s | "
                    "last ckpt step 40 s3://b/runs/run-x/checkpoint_step00000040_t")
    assert p.update(100, 64) and "step 100/100 (100%)" in capsys.readouterr().out  # the last step prints


def test_progress_line_prints_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train workers replace print with one that, when sys.stdout is wrapped (it is in a worker),
    prints AND logs to the console: the line must still reach the console exactly once."""
    import builtins
    import io
    import logging

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from detailflow.platform.progress import Progress

    out, console = io.StringIO(), io.StringIO()
    root, handler = logging.getLogger(), logging.StreamHandler(console)
    root.addHandler(handler)  # Train's console handler on the root logger, at INFO
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(builtins, "print", redirected_print)
    monkeypatch.setattr("sys.stdout", out)  # a wrapped stdout, as in a Ray worker
    try:
        assert Progress("tokenizer", "run-x", total=10, start=0, every_s=3600).update(10, 8)
    finally:
        root.removeHandler(handler)
    both = out.getvalue() + console.getvalue()
    assert both.count("[tokenizer run-x] step 10/10") == 1, both


def test_cli_help_lists_only_commands_that_exist(monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from detailflow import cli

    monkeypatch.setitem(cli.PLUGIN_GROUPS, "nope", ("detailflow.pipelines.nope_cli", "nope", "Not written."))
    out = CliRunner().invoke(cli.main, ["--help"]).output
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    for name, (module, _, _) in cli.PLUGIN_GROUPS.items():
        exists = importlib.util.find_spec(module) is not None  # imports the parents: independent check
        assert (name in listed) == exists, name
    assert "nope" not in listed and {"train", "extract-codes", "services", "config"} <= listed
    train_help = CliRunner().invoke(cli.main, ["train", "--help"]).output
    assert "extract-codes" not in train_help  # registered once, at the top level


def test_ray_worker_setup_hook_drops_only_the_cleaner_noise(monkeypatch):
    import logging
    import threading

    from detailflow.platform import raytrain

    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    monkeypatch.setattr(logging.getLogger(name), "filters", [])
    reached = []  # the hook that was in place before: it must still see every other thread's error
    monkeypatch.setattr(threading, "excepthook", lambda args: reached.append(args.thread.name))
    raytrain.quiet_ray_logs()
    raytrain.quiet_ray_logs()  # idempotent
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily "
                       "unavailable. Continuing to monitor.")
        logger.warning("Detected that the Ray Train controller actor (x) is dead.")  # a real one stays
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Detected that the Ray Train controller actor (x) is dead."]

    def boom():
        raise ConnectionError("Found multiple active Ray instances")

    for thread_name in ("PlacementGroupCleanerMonitor", "other-thread"):
        t = threading.Thread(target=boom, name=thread_name)
        t.start()
        t.join()
    assert reached == ["other-thread"]


def test_ray_worker_setup_hook_silences_only_deepspeeds_deprecated_gather_warning():
    import warnings

    from detailflow.platform import raytrain

    with warnings.catch_warnings(record=True) as seen:  # restores the filters afterwards
        warnings.simplefilter("always")
        raytrain.quiet_ray_logs()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.other` is deprecated.", FutureWarning, stacklevel=1)  # stays
    assert [str(w.message) for w in seen] == ["`torch.distributed.other` is deprecated."]

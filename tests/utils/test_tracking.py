"""Tracking backends: console, file, tensorboard / wandb / mlflow when installed (their clear error otherwise)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from verl.utils.tracking import (SUPPORTED_BACKENDS, Tracking, TrackingBackendError, ValidationGenerationsLogger,
                                 normalize_backends, sanitize_mlflow_key)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # e.g. blocked with sys.modules[module] = None
        return False


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT", "TENSORBOARD_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_console_prints_one_line_per_step(in_tmp, capsys):
    tracker = Tracking("proj", "exp", default_backend="console")
    tracker.log({"actor/pg_loss": 0.123456789, "perf/throughput": torch.tensor(1500.0), "n": np.int64(3)}, step=7)
    line = capsys.readouterr().out.strip()
    assert line == "step:7 - actor/pg_loss:0.123457 - perf/throughput:1500 - n:3"
    tracker.finish()
    tracker.finish()  # idempotent


def test_file_backend_appends_jsonl(in_tmp, monkeypatch):
    path = in_tmp / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    tracker = Tracking("proj", "exp", default_backend=["file"])
    tracker.log({"a": torch.tensor(0.5), "b": np.float32(2.0)}, step=1)
    tracker.finish()
    Tracking("proj", "exp", default_backend="jsonl").log({"a": 1.0}, step=2)  # alias; a resumed run appends
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [{"step": 1, "data": {"a": 0.5, "b": 2.0}}, {"step": 2, "data": {"a": 1.0}}]


def test_file_backend_default_location(in_tmp, monkeypatch):
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(in_tmp / "logs"))
    tracker = Tracking("proj", "exp", default_backend=["console", "file"])
    tracker.log({"x": 1}, step=3)
    tracker.finish()
    data = json.loads((in_tmp / "logs" / "proj" / "exp.jsonl").read_text())
    assert data == {"step": 3, "data": {"x": 1}}


def test_unknown_backend_lists_known_ones():
    with pytest.raises(TrackingBackendError) as info:
        Tracking("p", "e", default_backend=["console", "neptune"])
    msg = str(info.value)
    assert "neptune" in msg and all(name in msg for name in SUPPORTED_BACKENDS)
    assert normalize_backends(["console", "jsonl", "console"]) == ["console", "file"]
    assert normalize_backends(None) == []


def test_missing_package_names_the_pip_install():
    missing = [
        b for b, m in (("clearml", "clearml"), ("trackio", "trackio"), ("swanlab", "swanlab"), ("mlflow", "mlflow"),
                       ("wandb", "wandb"), ("tensorboard", "tensorboard")) if not _installed(m)
    ]
    if not missing:
        pytest.skip("every tracker package is installed")
    with pytest.raises(TrackingBackendError, match=rf"pip install {missing[0]}.*pip install -e \.\[tracking\]"):
        Tracking("p", "e", default_backend=["console", missing[0]])


def test_tensorboard(in_tmp, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_DIR", str(in_tmp / "tb"))
    if not _installed("tensorboard"):
        with pytest.raises(TrackingBackendError, match="pip install tensorboard"):
            Tracking("p", "e", default_backend="tensorboard")
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracking("p", "e", default_backend="tensorboard")
    for step in (1, 2):
        tracker.log({"critic/score/mean": 0.25 * step, "text": "ignored"}, step=step)
    tracker.finish()
    acc = EventAccumulator(str(in_tmp / "tb"))
    acc.Reload()
    events = acc.Scalars("critic/score/mean")
    assert [(e.step, e.value) for e in events] == [(1, 0.25), (2, 0.5)]


def test_wandb_offline_without_network(in_tmp, monkeypatch):
    if not _installed("wandb"):
        with pytest.raises(TrackingBackendError, match="pip install wandb"):
            Tracking("p", "e", default_backend="wandb")
        return
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(in_tmp))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_DIR", str(in_tmp))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracking("proj", "exp", default_backend="wandb", config={"a": {"b": 1}})
    tracker.log({"x": 1.0, "val-core/src/acc/mean@4": 0.5}, step=1)
    tracker.finish()
    runs = glob.glob(str(in_tmp / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_mlflow_local_store(in_tmp):
    if not _installed("mlflow"):
        with pytest.raises(TrackingBackendError, match="pip install mlflow"):
            Tracking("p", "e", default_backend="mlflow")
        return
    tracker = Tracking("proj", "exp", default_backend="mlflow", config={"trainer": {"total_epochs": 3}})
    tracker.log({"val-core/src/acc/mean@4": 0.5, "actor/pg_loss": torch.tensor(1.5), "note": "skipped"}, step=2)
    tracker.finish()
    metric_files = glob.glob(str(in_tmp / "mlruns" / "*" / "*" / "metrics" / "**" / "*"), recursive=True)
    names = {os.path.relpath(p, p.split("/metrics/")[0] + "/metrics") for p in metric_files if os.path.isfile(p)}
    assert names == {"val-core/src/acc/mean_at_4", "actor/pg_loss"}
    params = glob.glob(str(in_tmp / "mlruns" / "*" / "*" / "params" / "trainer.total_epochs"))
    assert len(params) == 1


def test_sanitize_mlflow_key():
    assert sanitize_mlflow_key("val-core/gsm8k/acc/mean@4") == "val-core/gsm8k/acc/mean_at_4"
    assert sanitize_mlflow_key("a(b)|c") == "a_b__c"
    assert sanitize_mlflow_key("perf/mfu/actor") == "perf/mfu/actor"


def test_validation_generations_console_and_file(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(in_tmp))
    logger = ValidationGenerationsLogger(project_name="proj", experiment_name="exp")
    samples = [("1+1=", "2", 1.0), ("2+2=", "5", 0.0)]
    logger.log(["console", "file"], samples, step=4)
    logger.log(["console", "file"], [("3+3=", "6", "7", 1.0)], step=5)
    out = capsys.readouterr().out
    assert "validation generations (step 4, 2 samples)" in out
    assert "[input]  2+2=" in out and "[output] 5" in out and "ground truth '7'" in out
    lines = [json.loads(x) for x in (in_tmp / "proj" / "exp_val_generations.jsonl").read_text().splitlines()]
    assert lines[0] == {
        "step": 4,
        "samples": [{
            "input": "1+1=",
            "output": "2",
            "score": 1.0
        }, {
            "input": "2+2=",
            "output": "5",
            "score": 0.0
        }]
    }
    assert lines[1]["samples"][0]["ground_truth"] == "7"
    with pytest.raises(ValueError, match="input, output"):
        logger.log(["console"], [("only", "two")], step=6)


def test_validation_generations_tensorboard(in_tmp, monkeypatch):
    if not _installed("tensorboard"):
        pytest.skip("tensorboard not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_DIR", str(in_tmp / "tb"))
    logger = ValidationGenerationsLogger("p", "e")
    logger.log(["tensorboard"], [("q|x", "a\nb", 1.0)], step=3)
    logger.finish()
    acc = EventAccumulator(str(in_tmp / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert any("val/generations" in t for t in tags)

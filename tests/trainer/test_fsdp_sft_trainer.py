"""The FSDP2 SFT trainer on CPU with the tiny model: it learns (single- and multi-turn), two torchrun processes
give the same losses as one process, a resumed run continues at the right step on the right data, the final
checkpoint loads as a Hugging Face model, bad configs fail with the key to fix, the embedded default's warm-up is
built once and reused, and the example scripts run.

Runs in-process use :func:`run_sft` (it starts and closes a one-rank gloo group); multi-process runs use torchrun in
a subprocess, as users launch it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from verl.models.tiny import get_tiny_model_path
from verl.trainer.fsdp_sft_trainer import run_sft
from verl.utils.config import ConfigError
from verl.utils.dataset.schema import DataFormatError, make_sft_row, write_splits
from verl.utils.dataset.tasks import arithmetic_rows, write_arithmetic_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# losses of the same global batches computed on 1 vs 2 ranks differ only by float summation order
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains little from more, and on a busy machine extra threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_data")
    single = write_arithmetic_task(str(root / "single"), train_size=32, test_size=8, sft=True)
    # multi-turn: two problems per conversation, the second asked after the first answer
    conversations = {}
    used: set = set()
    for split, size in (("train", 16), ("test", 4)):
        rows = arithmetic_rows(2 * size, split, seed=1, sft=True, exclude=used)
        conversations[split] = [
            make_sft_row("arithmetic",
                         list(rows[2 * i]["messages"]) + list(rows[2 * i + 1]["messages"]), split, i)
            for i in range(size)
        ]
    multi = write_splits(conversations, str(root / "multi"))
    return {"single": single, "multi": multi, "model": get_tiny_model_path(), "root": root}


def _config(env, out_dir, multiturn=False, **sections):
    """A tiny SFT config; ``sections`` update the data/model/optim/trainer sections."""
    files = env["multi"] if multiturn else env["single"]
    config = {
        "data": {
            "train_files": files["train"],
            "val_files": files["test"],
            "train_batch_size": 8,
            "micro_batch_size_per_gpu": 2,
            "max_length": 96,
            "truncation": "right",
        },
        "model": {
            "partial_pretrain": env["model"],
            "enable_gradient_checkpointing": False
        },
        "optim": {
            "lr": 2e-3,
            "warmup_steps_ratio": 0.0,
            "lr_scheduler": "constant",
            "weight_decay": 0.0
        },
        "use_remove_padding": True,
        "trainer": {
            "default_local_dir": str(out_dir),
            "total_training_steps": 4,
            "test_freq": -1,
            "logger": [],
            "resume_mode": "disable",
            "seed": 1,
        },
    }
    if multiturn:
        config["data"]["multiturn"] = {"enable": True, "messages_key": "messages"}
    else:  # the single-turn layout of upstream's GSM8K recipe: nested prompt/response fields
        config["data"].update(prompt_key="extra_info",
                              response_key="extra_info",
                              prompt_dict_keys=["question"],
                              response_dict_keys=["answer"])
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def _losses(history, key="train/loss"):
    return {h["step"]: h[key] for h in history if key in h}


# ------------------------------------------------------------------------------------------------------ learning ---
@pytest.mark.parametrize("multiturn", [False, True], ids=["single_turn", "multi_turn"])
def test_sft_lowers_the_loss(data, tmp_path, multiturn):
    out = run_sft(
        _config(data, tmp_path / "ckpt", multiturn=multiturn, trainer={
            "total_training_steps": 8,
            "test_freq": 4
        }))
    assert out["global_step"] == 8
    steps = [h["step"] for h in out["history"]]
    assert steps == list(range(1, 9))
    train = _losses(out["history"])
    val = _losses(out["history"], "val/loss")
    assert sorted(val) == [4, 8]  # every test_freq steps and at the end
    # step 1's loss is the untrained model's (measured before the update): the model must have learnt a lot
    assert val[8] < 0.6 * train[1], (train, val)
    assert val[8] < val[4]
    assert all(torch.isfinite(torch.tensor(h["train/grad_norm"])) for h in out["history"])


def test_loss_counts_only_target_tokens(data, tmp_path):
    """Multi-turn rows train on both assistant turns; the per-step token count is the sum of the loss masks."""
    from transformers import AutoTokenizer

    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    config = _config(data,
                     tmp_path / "ckpt",
                     multiturn=True,
                     trainer={"total_training_steps": 2},
                     data={"shuffle": False})
    out = run_sft(config)
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    dataset = MultiTurnSFTDataset(data["multi"]["train"], tokenizer, {"max_length": 96, "truncation": "right"})
    expected = sum(float(dataset[i]["loss_mask"][1:].sum()) for i in range(8))
    assert out["history"][0]["train/global_tokens"] == expected
    assert expected > 0


# -------------------------------------------------------------------------------------------------- distributed ---
def _torchrun(args, env_extra, timeout=240):
    env = dict(os.environ, **env_extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", *args],
                          capture_output=True,
                          text=True,
                          timeout=timeout,
                          env=env,
                          cwd=str(env_extra.get("CWD", REPO)))


def _overrides(config, prefix=""):
    """Hydra ``key=value`` arguments for a nested config dict."""
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_overrides(value, name + "."))
        elif isinstance(value, list):
            out.append(f"+{name}={json.dumps(value)}" if key.endswith("dict_keys") else f"{name}={json.dumps(value)}")
        else:
            out.append(f"{name}={value}")
    return out


def _file_log(path):
    with open(path) as f:
        return [dict(step=r["step"], **r["data"]) for r in map(json.loads, f)]


def test_two_process_torchrun_matches_one_process(data, tmp_path):
    sections = {"trainer": {"total_training_steps": 3, "test_freq": 1}, "data": {"shuffle": True}}
    one = run_sft(_config(data, tmp_path / "one", **sections))

    config = _config(data, tmp_path / "two", **sections)
    config["trainer"]["logger"] = ["file"]
    log = tmp_path / "two.jsonl"
    proc = _torchrun(["--nproc_per_node=2", "-m", "verl.trainer.fsdp_sft_trainer", *_overrides(config)],
                     {"VERL_FILE_LOGGER_PATH": str(log)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = _file_log(log)
    assert [h["step"] for h in two] == [1, 2, 3]
    for key in ("train/loss", "val/loss"):
        a, b = _losses(one["history"], key), _losses(two, key)
        assert a.keys() == b.keys()
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), (key, step, a, b)
    assert _losses(one["history"], "train/global_tokens") == _losses(two, "train/global_tokens")
    # the 2-rank checkpoint is sharded over 2 ranks and carries full Hugging Face weights too
    ckpt = tmp_path / "two" / "global_step_3"
    assert (ckpt / "model_world_size_2_rank_1.pt").is_file()
    assert (ckpt / "huggingface" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- checkpoints ---
def test_resume_continues_at_the_right_step_and_data(data, tmp_path):
    """32 rows / 8 per step = 4 steps per epoch: stop after 3, resume to 6 (across the epoch boundary) and compare
    with an uninterrupted 6-step run."""
    resumed_dir = tmp_path / "resumed"
    first = run_sft(_config(data, resumed_dir, trainer={"total_training_steps": 3, "save_freq": 2}))
    assert (resumed_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (resumed_dir / "global_step_2").is_dir() and (resumed_dir / "global_step_3").is_dir()

    second = run_sft(
        _config(data, resumed_dir, trainer={
            "total_training_steps": 6,
            "resume_mode": "auto",
            "max_ckpt_to_keep": 1
        }))
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    assert second["global_step"] == 6
    assert (resumed_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert sorted(p.name for p in resumed_dir.glob("global_step_*")) == ["global_step_6"]
    assert torch.load(resumed_dir / "global_step_6" / "data.pt", weights_only=True)["global_step"] == 6

    straight = run_sft(_config(data, tmp_path / "straight", trainer={"total_training_steps": 6}))
    want = _losses(straight["history"])
    got = {**_losses(first["history"]), **_losses(second["history"])}
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)

    # at the end already: nothing to train, no error
    again = run_sft(_config(data, resumed_dir, trainer={"total_training_steps": 6, "resume_mode": "auto"}))
    assert again["global_step"] == 6 and again["history"] == []

    # an explicit resume path
    explicit = run_sft(
        _config(data,
                tmp_path / "other",
                trainer={
                    "total_training_steps": 4,
                    "resume_mode": "resume_path",
                    "resume_from_path": str(resumed_dir / "global_step_6")
                }))
    assert explicit["history"] == [] and explicit["global_step"] == 6


def test_final_model_loads_with_from_pretrained(data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.utils.dataset.sft_dataset import SFTDataset

    config = _config(data, tmp_path / "ckpt", trainer={"total_training_steps": 3})
    out = run_sft(config)
    hf_dir = out["hf_model_dir"]
    assert hf_dir == os.path.join(out["checkpoint_dir"], "huggingface")
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    base = AutoModelForCausalLM.from_pretrained(data["model"])
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # the loaded weights reproduce the trainer's last validation loss
    dataset = SFTDataset(data["single"]["test"], tokenizer, config["data"])
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["loss_mask"][:, 1:].float()
    val_loss = float(-(logp * mask).sum() / mask.sum())
    assert val_loss == pytest.approx(out["history"][-1]["val/loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------------- bad input ---
@pytest.mark.parametrize("change, error, match", [
    ({
        "data": {
            "train_batch_size": 6,
            "micro_batch_size_per_gpu": 4
        }
    }, ConfigError, "data.train_batch_size"),
    ({
        "data": {
            "train_files": "/nonexistent/train.parquet"
        }
    }, ConfigError, "data.train_files"),
    ({
        "data": {
            "response_key": "no_such_column",
            "response_dict_keys": []
        }
    }, DataFormatError, "no_such_column"),
    ({
        "data": {
            "train_batch_size": 64
        }
    }, ConfigError, "training rows"),
    ({
        "model": {
            "partial_pretrain": "/nonexistent/model"
        }
    }, ConfigError, "model.partial_pretrain"),
    ({
        "model": {
            "lora_rank": 8
        }
    }, ConfigError, "model.lora_rank"),
    ({
        "trainer": {
            "resume_mode": "sometimes"
        }
    }, ConfigError, "trainer.resume_mode"),
    ({
        "trainer": {
            "logger": ["nosuchlogger"]
        }
    }, ConfigError, "nosuchlogger"),
],
                         ids=[
                             "batch_not_divisible", "missing_file", "missing_column", "batch_larger_than_data",
                             "missing_model", "lora", "resume_mode", "logger"
                         ])
def test_bad_config_raises_a_clear_error(data, tmp_path, change, error, match):
    import torch.distributed as dist

    with pytest.raises(error, match=match):
        run_sft(_config(data, tmp_path / "ckpt", **change))
    assert not dist.is_initialized()  # the one-rank group it started is closed again


def test_cli_reports_config_errors_in_one_line(data, tmp_path):
    proc = subprocess.run([
        sys.executable, "-m", "verl.trainer.fsdp_sft_trainer", "data.train_files=/nonexistent.parquet",
        f"model.partial_pretrain={data['model']}"
    ],
                          capture_output=True,
                          text=True,
                          timeout=120,
                          cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: data.train_files" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------- embedded warm-up ---
def test_warmup_is_built_once_and_reused(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.trainer import embedded_default

    tiny = dict(train_rows=32, val_rows=8, steps=2, batch_size=16, max_length=64)
    monkeypatch.setenv(embedded_default.CACHE_ENV, str(tmp_path / "cache"))
    path = embedded_default.get_warmed_model_path(**tiny)
    assert path.startswith(str(tmp_path / "cache"))
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".build-")]  # no temp dir left
    with open(os.path.join(path, embedded_default.RECIPE_FILE)) as f:
        summary = json.load(f)
    assert summary["steps"] == 2 and summary["recipe"]["train_rows"] == 32
    model = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(get_tiny_model_path())
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert embedded_default.get_warmed_model_path(**tiny) == path  # reused, not rebuilt
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    assert embedded_default.get_warmed_model_path(cache_dir=str(tmp_path / "cache"), **tiny) == path
    other = embedded_default.get_warmed_model_path(**dict(tiny, lr=1e-3))  # a changed recipe builds anew
    assert other != path and os.path.isfile(os.path.join(other, "model.safetensors"))
    with pytest.raises(ValueError, match="unknown warm-up recipe keys"):
        embedded_default.get_warmed_model_path(stepz=3)


def test_main_ppo_embedded_model_is_the_warmed_model(tmp_path, monkeypatch):
    from verl.trainer import embedded_default, main_ppo

    monkeypatch.setenv(embedded_default.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(embedded_default, "WARMUP_RECIPE",
                        dict(embedded_default.WARMUP_RECIPE, train_rows=32, val_rows=8, steps=1, batch_size=16))
    path = main_ppo._embedded_model_path()
    assert path == embedded_default.get_warmed_model_path()
    assert os.path.dirname(path) == str(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------- examples ---
@pytest.mark.parametrize("script, files, nproc", [("gsm8k/run_qwen_05.sh", "single", 1),
                                                  ("multiturn/run_qwen_05_multiturn.sh", "multi", 2)])
def test_example_script_runs_with_the_tiny_model(data, tmp_path, script, files, nproc):
    env = dict(os.environ,
               MODEL_PATH=data["model"],
               TRAIN_FILES=data[files]["train"],
               VAL_FILES=data[files]["test"],
               NPROC=str(nproc),
               SAVE_DIR=str(tmp_path / "ckpt"),
               TRAIN_BATCH_SIZE="8",
               MICRO_BATCH_SIZE="2",
               MAX_LENGTH="96",
               PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    proc = subprocess.run([
        "bash",
        os.path.join(REPO, "examples", "sft", script), "trainer.total_training_steps=2",
        "model.enable_gradient_checkpointing=False"
    ],
                          capture_output=True,
                          text=True,
                          timeout=240,
                          env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step:2" in proc.stdout and "train/loss" in proc.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "ckpt" / "global_step_2" / "huggingface" / "model.safetensors").is_file()

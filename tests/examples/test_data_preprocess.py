"""The preprocessing scripts run as users run them (subprocesses, tiny sizes) and RLHFDataset / the SFT dataset load
what they write."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from verl.models.tiny import get_tiny_model_path
from verl.utils.dataset import MultiTurnSFTDataset, RLHFDataset
from verl.utils.dataset.tasks import gsm8k_final_answer, last_boxed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "examples", "data_preprocess")
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args],
                          capture_output=True,
                          text=True,
                          timeout=120,
                          cwd=REPO)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_tiny_model_path())


@pytest.fixture(scope="module")
def math_hub_layout(tmp_path_factory):
    """The MATH fixture re-saved as parquet in the Hugging Face hub layout (data/train-00000-of-00001.parquet)."""
    root = tmp_path_factory.mktemp("math_hub")
    (root / "data").mkdir()
    for split in ("train", "test"):
        rows = _jsonl(os.path.join(FIXTURES, "math", f"{split}.jsonl"))
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return str(root)


def _cases(math_hub):
    gsm_train = _jsonl(os.path.join(FIXTURES, "gsm8k", "train.jsonl"))
    gsm_test = _jsonl(os.path.join(FIXTURES, "gsm8k", "test.jsonl"))
    math_train = _jsonl(os.path.join(FIXTURES, "math", "train.jsonl"))
    math_test = _jsonl(os.path.join(FIXTURES, "math", "test.jsonl"))
    boxed = lambda rows: sorted(b for b in (last_boxed(r["solution"]) for r in rows) if b is not None)
    return {
        "arithmetic": ("arithmetic.py", ["--train_size", "12", "--test_size", "4"], "arithmetic", 12, 4, None),
        "countdown": ("countdown.py", ["--train_size", "8", "--test_size", "3", "--num_numbers",
                                       "4"], "countdown", 8, 3, None),
        "gsm8k": ("gsm8k.py", ["--local_dataset_path", os.path.join(FIXTURES, "gsm8k")], "openai/gsm8k", 6, 3,
                  (sorted(gsm8k_final_answer(r["answer"]) for r in gsm_train),
                   sorted(gsm8k_final_answer(r["answer"]) for r in gsm_test))),
        "gsm8k_single_file": ("gsm8k.py", [
            "--local_dataset_path",
            os.path.join(FIXTURES, "gsm8k", "train.jsonl"), "--test_ratio", "0.34", "--train_size", "3"
        ], "openai/gsm8k", 3, 2, None),
        "math": ("math_dataset.py", ["--local_dataset_path", os.path.join(FIXTURES, "math")],
                 "DigitalLearningGmbH/MATH-lighteval", 5, 3, (boxed(math_train), boxed(math_test))),
        "math_hub_parquet": ("math_dataset.py", ["--local_dataset_path", math_hub, "--data_source",
                                                 "lighteval/MATH"], "lighteval/MATH", 5, 3, (boxed(math_train),
                                                                                             boxed(math_test))),
    }


CASE_NAMES = ["arithmetic", "countdown", "gsm8k", "gsm8k_single_file", "math", "math_hub_parquet"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_preprocessor_output_loads_in_rlhf_dataset(case, tokenizer, tmp_path, math_hub_layout):
    script, args, data_source, n_train, n_test, truths = _cases(math_hub_layout)[case]
    out = tmp_path / "out"
    flag = "--local_dir" if case.startswith(("arithmetic", "gsm8k")) else "--local_save_dir"  # both spellings work
    proc = _run(script, *args, flag, str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["test.parquet", "train.parquet"]
    for split, expected in (("train", n_train), ("test", n_test)):
        path = str(out / f"{split}.parquet")
        assert pq.read_table(path).column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        ds = RLHFDataset(path, tokenizer, {"max_prompt_length": 256, "return_raw_chat": True})
        assert len(ds) == expected
        items = [ds[i] for i in range(len(ds))]
        for i, item in enumerate(items):
            assert item["data_source"] == data_source
            assert item["extra_info"]["split"] == split and item["index"] == i
            assert item["reward_model"]["style"] == "rule"
            assert item["raw_prompt"][-1]["role"] == "user"
            assert int(item["attention_mask"].sum()) == len(item["raw_prompt_ids"])
        if truths is not None:
            got = sorted(item["reward_model"]["ground_truth"] for item in items)
            assert got == truths[0 if split == "train" else 1]


@pytest.mark.parametrize("case", ["arithmetic", "countdown", "gsm8k", "math"])
def test_sft_variant_writes_messages(case, tokenizer, tmp_path, math_hub_layout):
    script, args, data_source, n_train, _, _ = _cases(math_hub_layout)[case]
    proc = _run(script, *args, "--sft", "--local_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    path = str(tmp_path / "train.parquet")
    assert "messages" in pq.read_table(path).column_names
    ds = MultiTurnSFTDataset(path, tokenizer, {"max_length": 512})
    assert len(ds) == n_train
    item = ds[0]
    target = tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
    assert target.endswith("<|im_end|>") and len(target) > len("<|im_end|>")
    assert target[:-len("<|im_end|>")] == ds.rows[0]["messages"][-1]["content"]


def test_preprocessor_errors_are_clear(tmp_path):
    proc = _run("gsm8k.py", "--local_dir", str(tmp_path / "a"))
    assert proc.returncode != 0 and "--local_dataset_path is required" in proc.stderr
    proc = _run("gsm8k.py", "--local_dataset_path", str(tmp_path / "missing"), "--local_dir", str(tmp_path / "b"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "missing" in proc.stderr
    proc = _run("gsm8k.py", "--local_dataset_path", os.path.join(FIXTURES, "math"), "--local_dir", str(tmp_path / "c"))
    assert proc.returncode != 0
    assert "no column 'question'" in proc.stderr and "'problem'" in proc.stderr and "train.jsonl" in proc.stderr
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    (only_test / "test.jsonl").write_text(open(os.path.join(FIXTURES, "math", "test.jsonl")).read())
    proc = _run("math_dataset.py", "--local_dataset_path", str(only_test), "--local_dir", str(tmp_path / "d"))
    assert proc.returncode != 0 and "no train* file" in proc.stderr and "--test_ratio" in proc.stderr
    proc = _run("arithmetic.py", "--max_digits", "1", "--train_size", "500", "--local_dir", str(tmp_path / "e"))
    assert proc.returncode != 0 and "max_digits" in proc.stderr
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "e")


@pytest.mark.parametrize("case", ["arithmetic", "countdown", "gsm8k", "math"])
def test_reference_answers_score_full_marks(case, tmp_path, math_hub_layout):
    """The answer format each task asks for is the one ``default_compute_score`` checks for its data_source."""
    from verl.utils.reward_score import default_compute_score

    script, args, data_source, _, _, _ = _cases(math_hub_layout)[case]
    proc = _run(script, *args, "--sft", "--local_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(str(tmp_path / "train.parquet")).to_pylist()
    for row in rows:
        reply = row["messages"][-1]["content"]
        truth = row["reward_model"]["ground_truth"]
        assert row["data_source"] == data_source
        assert default_compute_score(data_source, reply, truth, row["extra_info"]) == 1.0, reply
        assert default_compute_score(data_source, "I do not know.", truth, row["extra_info"]) < 1.0

"""SFTDataset / MultiTurnSFTDataset: fixed-length right-padded items, loss only on assistant tokens."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from verl.models.tiny import get_tiny_model_path
from verl.utils.dataset import MultiTurnSFTDataset, SFTDataset
from verl.utils.dataset.tasks import write_arithmetic_task

CONVERSATION = [
    {
        "role": "system",
        "content": "You are a calculator."
    },
    {
        "role": "user",
        "content": "What is 2 + 3?"
    },
    {
        "role": "assistant",
        "content": "2 + 3 = 5\n#### 5"
    },
    {
        "role": "user",
        "content": "And 10 - 4?"
    },
    {
        "role": "assistant",
        "content": "#### 6"
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_tiny_model_path())


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _valid(item, key="input_ids"):
    return item[key][item["attention_mask"].bool()]


def test_multiturn_loss_mask_covers_exactly_assistant_turns(tokenizer, tmp_path):
    path = _write(tmp_path / "chat.parquet", [{"messages": CONVERSATION}])
    item = MultiTurnSFTDataset(path, tokenizer, {"max_length": 96})[0]
    for key in ("input_ids", "attention_mask", "position_ids", "loss_mask"):
        assert item[key].shape == (96,) and item[key].dtype == torch.long
    n = int(item["attention_mask"].sum())
    assert item["attention_mask"][:n].eq(1).all() and item["attention_mask"][n:].eq(0).all()  # right padding
    assert item["position_ids"][:n].tolist() == list(range(n))
    assert item["loss_mask"][n:].eq(0).all()
    # the tokens are those of the whole rendered conversation
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert _valid(item).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    # the masked tokens are the two replies, each ending with EOS; nothing of system/user/generation prompts
    mask = item["loss_mask"].bool()
    assert tokenizer.decode(item["input_ids"][mask]) == "2 + 3 = 5\n#### 5<|im_end|>#### 6<|im_end|>"
    spans = torch.nonzero(torch.diff(torch.cat([torch.zeros(1), item["loss_mask"].float()]))).flatten().tolist()
    assert len(spans) == 4  # two separate runs of ones
    first = spans[0]
    assert tokenizer.decode(item["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_multiturn_truncation_and_tools(tokenizer, tmp_path):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    rows = [{"messages": CONVERSATION, "tools": json.dumps(tools)}]
    path = _write(tmp_path / "tools.parquet", rows)
    full = MultiTurnSFTDataset(path, tokenizer, {"max_length": 256})[0]
    assert "<tools>" in tokenizer.decode(_valid(full))
    n = int(full["attention_mask"].sum())
    left = MultiTurnSFTDataset(path, tokenizer, {"max_length": 20, "truncation": "left"})[0]
    assert left["input_ids"].tolist() == _valid(full).tolist()[n - 20:]
    assert left["loss_mask"].tolist() == full["loss_mask"][:n].tolist()[n - 20:]
    right = MultiTurnSFTDataset(path, tokenizer, {"max_length": 20, "truncation": "right"})[0]
    assert right["input_ids"].tolist() == _valid(full).tolist()[:20]
    with pytest.raises(ValueError, match=r"row 0 of file .*tools\.parquet.* data\.max_length=20"):
        MultiTurnSFTDataset(path, tokenizer, {"max_length": 20})[0]


def test_single_turn_sft_on_prompt_response_columns(tokenizer, tmp_path):
    rows = [{"prompt": "What is 4 + 4?", "response": "#### 8"}, {"prompt": "Say hi.", "response": "hi"}]
    path = _write(tmp_path / "pairs.parquet", rows)
    ds = SFTDataset(path, tokenizer, {"max_length": 48})
    assert len(ds) == 2
    item = ds[0]
    assert tokenizer.decode(item["input_ids"][item["loss_mask"].bool()]) == "#### 8<|im_end|>"
    prompt_text = tokenizer.apply_chat_template([{
        "role": "user",
        "content": "What is 4 + 4?"
    }],
                                                add_generation_prompt=True,
                                                tokenize=False)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert item["loss_mask"][:n_prompt].eq(0).all() and item["loss_mask"][n_prompt] == 1
    assert tokenizer.decode(item["input_ids"][:n_prompt]) == prompt_text


def test_single_turn_sft_reads_nested_keys_of_rl_parquet(tokenizer, tmp_path):
    paths = write_arithmetic_task(str(tmp_path / "arith"), train_size=5, test_size=2)
    config = {
        "max_length": 64,
        "prompt_key": "extra_info",
        "prompt_dict_keys": ["question"],
        "response_key": "extra_info",
        "response_dict_keys": ["answer"],
    }
    ds = SFTDataset(paths["train"], tokenizer, config)
    item = ds[1]
    answer = ds.raw_row(1)["extra_info"]["answer"]
    assert tokenizer.decode(item["input_ids"][item["loss_mask"].bool()]) == answer + "<|im_end|>"
    # a prompt given as chat messages is used as is
    ds = SFTDataset(paths["train"], tokenizer, {**config, "prompt_key": "prompt", "prompt_dict_keys": None})
    assert torch.equal(ds[1]["input_ids"], item["input_ids"])

"""RLHFDataset and collate_fn on generated task parquet, tokenised by the tiny model's tokenizer."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.utils.dataset import RLHFDataset, collate_fn, create_rl_sampler
from verl.utils.dataset.tasks import write_arithmetic_task, write_countdown_task


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_tiny_model_path())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_data")
    arithmetic = write_arithmetic_task(str(root / "arithmetic"), train_size=24, test_size=6)
    countdown = write_countdown_task(str(root / "countdown"), train_size=10, test_size=4)
    return {"arithmetic": arithmetic, "countdown": countdown}


def test_item_is_left_padded_prompt_with_metadata(tokenizer, files):
    ds = RLHFDataset(files["arithmetic"]["train"], tokenizer, {"max_prompt_length": 64})
    assert len(ds) == 24
    item = ds[3]
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert item[key].shape == (64,) and item[key].dtype == torch.long
    mask = item["attention_mask"]
    n = int(mask.sum())
    assert n == len(item["raw_prompt_ids"]) and 0 < n < 64
    assert mask[:64 - n].eq(0).all() and mask[64 - n:].eq(1).all()  # left padding
    assert item["input_ids"][:64 - n].eq(tokenizer.pad_token_id).all()
    assert item["input_ids"][64 - n:].tolist() == item["raw_prompt_ids"]
    assert item["position_ids"][64 - n:].tolist() == list(range(n))
    assert item["position_ids"][:64 - n].eq(0).all()
    # the prompt went through the chat template with a generation prompt
    text = tokenizer.decode(item["raw_prompt_ids"])
    assert text.startswith("<|im_start|>user\nWhat is ") and text.endswith("<|im_start|>assistant\n")
    # the other columns pass through; the prompt column itself is replaced by tokens
    assert item["data_source"] == "arithmetic" and item["ability"] == "math"
    assert item["reward_model"]["style"] == "rule"
    assert item["extra_info"]["split"] == "train" and item["index"] == 3 == item["extra_info"]["index"]
    info = item["extra_info"]
    assert item["reward_model"]["ground_truth"] == str(eval(f"{info['a']} {info['op']} {info['b']}"))
    assert info["answer"].endswith(f"#### {item['reward_model']['ground_truth']}")
    assert "prompt" not in item and "raw_prompt" not in item and "full_prompts" not in item
    assert item["tools_kwargs"] == {} and item["interaction_kwargs"] == {}


def test_raw_chat_and_full_prompt_on_request(tokenizer, files):
    config = OmegaConf.create({"max_prompt_length": 128, "return_raw_chat": True, "return_full_prompt": True})
    OmegaConf.set_struct(config, True)  # as a Hydra data node is: unknown keys must not be read with []
    ds = RLHFDataset(files["countdown"]["train"], tokenizer, config)
    item = ds[0]
    assert item["raw_prompt"][0]["role"] == "user" and "Using the numbers" in item["raw_prompt"][0]["content"]
    assert item["full_prompts"] == tokenizer.apply_chat_template(item["raw_prompt"],
                                                                 add_generation_prompt=True,
                                                                 tokenize=False)
    assert item["reward_model"]["ground_truth"]["target"] >= 1


@pytest.mark.parametrize("mode", ["left", "right", "middle"])
def test_truncation_modes(tokenizer, files, mode):
    full = RLHFDataset(files["arithmetic"]["train"], tokenizer, {"max_prompt_length": 64})[0]["raw_prompt_ids"]
    cut = RLHFDataset(files["arithmetic"]["train"], tokenizer, {"max_prompt_length": 10, "truncation": mode})[0]
    ids = cut["raw_prompt_ids"]
    assert len(ids) == 10 and cut["input_ids"].tolist() == ids and cut["attention_mask"].eq(1).all()
    expected = {"left": full[-10:], "right": full[:10], "middle": full[:5] + full[-5:]}[mode]
    assert ids == expected


def test_filter_overlong_prompts(tokenizer, files):
    both = [files["arithmetic"]["train"], files["countdown"]["train"]]
    lengths = [len(x["raw_prompt_ids"]) for x in RLHFDataset(both, tokenizer, {"max_prompt_length": 256})]
    limit = max(lengths[:24]) + 1  # every arithmetic prompt fits; countdown prompts are much longer
    assert min(lengths[24:]) > limit
    ds = RLHFDataset(both, tokenizer, {"max_prompt_length": limit, "filter_overlong_prompts": True})
    assert len(ds) == 24
    assert {ds[i]["data_source"] for i in range(len(ds))} == {"arithmetic"}


def test_multiple_files_max_samples_and_dataloader_to_dataproto(tokenizer, files):
    both = [files["arithmetic"]["test"], files["countdown"]["test"]]
    ds = RLHFDataset(both, tokenizer, {"max_prompt_length": 128, "return_raw_chat": True})
    assert len(ds) == 10
    sub = RLHFDataset(both, tokenizer, {"max_prompt_length": 128, "seed": 3}, max_samples=4)
    assert len(sub) == 4
    again = RLHFDataset(both, tokenizer, {"max_prompt_length": 128, "seed": 3}, max_samples=4)
    assert [sub[i]["raw_prompt_ids"] for i in range(4)] == [again[i]["raw_prompt_ids"] for i in range(4)]

    loader = DataLoader(ds,
                        batch_size=4,
                        drop_last=True,
                        collate_fn=collate_fn,
                        sampler=create_rl_sampler({
                            "shuffle": True,
                            "seed": 0
                        }, ds))
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["input_ids"].shape == (4, 128)
    assert isinstance(batch["raw_prompt_ids"], np.ndarray) and batch["raw_prompt_ids"].dtype == object
    assert isinstance(batch["raw_prompt_ids"][0], list)
    data = DataProto.from_single_dict(batch)
    assert len(data) == 4
    assert set(data.batch.keys()) >= {"input_ids", "attention_mask", "position_ids"}
    assert isinstance(data.non_tensor_batch["reward_model"][0], dict)
    assert isinstance(data.non_tensor_batch["raw_prompt"][0], list)


def test_collate_fn_stacks_tensors_and_keeps_objects_per_row():
    rows = [
        {
            "t": torch.tensor([1, 2]),
            "ids": [1, 2, 3],
            "meta": {
                "a": 1
            },
            "s": "x"
        },
        {
            "t": torch.tensor([3, 4]),
            "ids": [4],
            "meta": {
                "a": 2
            },
            "s": "y"
        },
    ]
    out = collate_fn(rows)
    assert torch.equal(out["t"], torch.tensor([[1, 2], [3, 4]]))
    for key in ("ids", "meta", "s"):
        assert out[key].dtype == object and out[key].shape == (2,)
    assert out["ids"][0] == [1, 2, 3] and out["ids"][1] == [4]
    assert out["meta"][1] == {"a": 2}
    # same-length lists must not be turned into a 2-D array
    same = collate_fn([{"ids": [1, 2]}, {"ids": [3, 4]}])["ids"]
    assert same.shape == (2,) and same[1] == [3, 4]
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])


def test_jsonl_data_file(tokenizer, tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    rows = [{
        "prompt": [{
            "role": "user",
            "content": f"What is {i} + 1?"
        }],
        "data_source": "arithmetic"
    } for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = RLHFDataset(str(path), tokenizer, {"max_prompt_length": 32})
    assert len(ds) == 3 and ds[2]["index"] == 2 and "extra_info" not in ds[2]

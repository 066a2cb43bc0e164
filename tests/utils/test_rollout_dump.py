"""The dump format of verl.utils.rollout_dump without a training run: records from a hand-built rollout batch, the
files, and the reader (including dumps in the older flat format). The end-to-end run is in
tests/trainer/test_debug_dump_notebook.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.utils.rollout_dump import (METRICS_FILE, SAMPLE_FIELDS, batch_sample_records, filter_samples, load_dump,
                                     make_sample_records, render_conversation, step_summary, write_metrics,
                                     write_samples)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_tiny_model_path())


def _rollout_batch(tokenizer, prompts: list[str], responses: list[str], width: int = 8, resp_width: int = 6):
    """A scored rollout batch: prompts left-padded to ``width``, responses right-padded to ``resp_width``."""
    pad = tokenizer.pad_token_id
    rows_p, rows_r, masks = [], [], []
    for p, r in zip(prompts, responses):
        p_ids = tokenizer.encode(p, add_special_tokens=False)
        r_ids = tokenizer.encode(r, add_special_tokens=False)
        assert len(p_ids) <= width and len(r_ids) <= resp_width
        rows_p.append([pad] * (width - len(p_ids)) + p_ids)
        rows_r.append(r_ids + [pad] * (resp_width - len(r_ids)))
        masks.append([0] * (width - len(p_ids)) + [1] * len(p_ids) + [1] * len(r_ids) + [0] * (resp_width - len(r_ids)))
    attention = torch.tensor(masks)
    response_mask = attention[:, width:].clone()
    b = len(prompts)
    advantages = torch.arange(b * resp_width, dtype=torch.float32).reshape(b, resp_width)
    old = -torch.ones(b, resp_width) * torch.arange(1, b + 1).unsqueeze(-1)
    scores = torch.zeros(b, resp_width)
    scores[0, 0] = 1.0
    rewards = scores - 0.25
    messages = np.empty(b, dtype=object)  # one list of chat messages per row
    for i, p in enumerate(prompts):
        messages[i] = [{"role": "user", "content": p}]
    return DataProto.from_dict(
        tensors={
            "prompts": torch.tensor(rows_p),
            "responses": torch.tensor(rows_r),
            "attention_mask": attention,
            "response_mask": response_mask,
            "advantages": advantages,
            "old_log_probs": old,
            "token_level_scores": scores,
            "token_level_rewards": rewards,
        },
        non_tensors={
            "uid": np.array(["a", "b"], dtype=object),
            "data_source": np.array(["arithmetic"] * 2, dtype=object),
            "reward_model": np.array([{
                "ground_truth": "4"
            }, {
                "ground_truth": "9"
            }], dtype=object),
            "raw_prompt": messages,
        })


def test_batch_records_decode_valid_tokens_and_average_over_the_response(tokenizer):
    batch = _rollout_batch(tokenizer, ["What is 2 + 2?", "3 * 3"], ["#### 4", ""])
    records = batch_sample_records(batch, tokenizer, step=7, reward_extra_info={"acc": [1.0, float("nan")], "x": [1]})
    assert [set(r) for r in records] == [set(SAMPLE_FIELDS)] * 2
    first, second = records
    assert first["input"] == "What is 2 + 2?" and first["output"] == "#### 4" and second["output"] == ""
    assert first["prompt_length"] == len(tokenizer.encode("What is 2 + 2?", add_special_tokens=False))
    assert first["response_length"] == len(tokenizer.encode("#### 4", add_special_tokens=False))
    assert second["response_length"] == 0
    n = first["response_length"]
    assert first["advantages"] == pytest.approx(sum(range(n)) / n)  # mean over the valid response tokens only
    assert first["old_log_prob"] == pytest.approx(-1.0)
    assert second["advantages"] is None and second["old_log_prob"] is None  # no response token to average over
    assert first["ref_log_prob"] is None and first["rollout_log_prob"] is None  # not in the batch
    assert (first["score"], second["score"]) == (1.0, 0.0)
    assert first["reward"] == pytest.approx(1.0 - 0.25 * 6) and first["step"] == 7
    assert first["gts"] == "4" and first["uid"] == "a" and first["data_source"] == "arithmetic"
    assert first["messages"] == [{"role": "user", "content": "What is 2 + 2?"}]
    # NaN is written as null (strict JSON); batch-level values (not one per sample) are left out
    assert first["reward_extra_info"] == {"acc": 1.0} and second["reward_extra_info"] == {"acc": None}
    json.dumps(records, allow_nan=False)


def test_make_records_rejects_misaligned_columns_and_unknown_fields():
    with pytest.raises(ValueError, match="'acc' has 1 values for 2 samples"):
        make_sample_records(1, ["a", "b"], ["x", "y"], [1, 2], [0.0, 1.0], reward_extra_info={"acc": [1]})
    with pytest.raises(ValueError, match=r"\['foo'\] are not sample fields"):
        make_sample_records(1, ["a"], ["x"], [1], [0.0], fields={"foo": [1]})
    (record,) = make_sample_records(3, ["a"], ["x"], [1], [0.5], fields={"uid": ["u"]})
    assert record["reward"] == 0.5 and record["uid"] == "u" and record["advantages"] is None


def test_write_and_load_round_trip(tmp_path):
    d = str(tmp_path / "dump")
    for step, scores in ((1, [0.0, 1.0]), (2, [1.0, 1.0])):
        records = make_sample_records(step, ["p1", "p2"], ["r1", "r2 long"], ["g1", "g2"],
                                      scores,
                                      reward_extra_info={"acc": [s > 0 for s in scores]},
                                      fields={
                                          "uid": ["u1", "u2"],
                                          "response_length": [3, 9]
                                      })
        write_samples(d, step, records)
        write_metrics(d, step, {"actor/entropy": 2.0 - step, "bad": float("inf"), "arr": np.array([1, 2])})
    write_metrics(d, 2, {"actor/entropy": 0.5})  # a resumed run logs step 2 again: the last record wins
    (tmp_path / "dump" / "notes.txt").write_text("ignored")

    dump = load_dump(d)
    assert len(dump.samples) == 4 and dump.samples["step"].tolist() == [1, 1, 2, 2]
    assert dump.reward_components == ["acc"] and dump.steps == [1, 2]
    assert dump.metrics.loc[1, "actor/entropy"] == 1.0 and dump.metrics.loc[2, "actor/entropy"] == 0.5
    assert dump.metrics.loc[1, "arr"] == [1, 2] and math.isnan(dump.metrics.loc[1, "bad"])
    summary = step_summary(dump)
    assert summary["reward"].tolist() == [0.5, 1.0] and summary["accuracy"].tolist() == [0.5, 1.0]
    assert summary["response_length"].tolist() == [6.0, 6.0] and summary["entropy"].tolist() == [1.0, 0.5]
    assert filter_samples(dump.samples, step=2, max_length=5).index.tolist() == [2]
    assert filter_samples(dump.samples, min_score=1, min_length=4).index.tolist() == [1, 3]

    text = render_conversation(dump.samples.loc[1].to_dict())
    assert "[user]\np2\n\n[assistant]\nr2 long" in text and "acc=True" in text and "uid u2" in text


def test_load_reads_flat_dumps_of_earlier_versions(tmp_path):
    rows = [{"input": "p", "output": "r", "gts": "1", "score": 1.0, "step": 4, "acc": 1.0, "advantages": 0.5}]
    (tmp_path / "4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dump = load_dump(str(tmp_path))
    assert dump.reward_components == ["acc"] and dump.samples.loc[0, "advantages"] == 0.5
    assert dump.metrics.empty and step_summary(dump)["accuracy"].tolist() == [1.0]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*rollout_data_dir"):
        load_dump(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="holds no rollout dump"):
        load_dump(str(tmp_path))
    (tmp_path / "1.jsonl").write_text('{"step": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"line 2 of .*1\.jsonl is not JSON"):
        load_dump(str(tmp_path))
    (tmp_path / "1.jsonl").write_text('{"step": 1}\n')
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "data": {}}\n')
    with pytest.raises(ValueError, match="without 'step' and a 'metrics' object"):
        load_dump(str(tmp_path))

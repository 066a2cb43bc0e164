"""The shared rollout output schema, built from per-sample token lists (vLLM/SGLang style) or a padded tensor (HF
style): keys, shapes, dtypes, right-padding, EOS masking, continuing positions, interleaved repetition."""
import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.workers.rollout.schemas import (ROLLOUT_OUTPUT_KEYS, build_rollout_output, build_rollout_output_from_prompts,
                                          normalize_eos_token_id)

PAD, EOS, R = 0, 9, 6


def _prompts():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    pos = torch.clamp(mask.cumsum(-1) - 1, min=0)
    return ids, mask, pos


def test_token_lists_n1_schema():
    ids, mask, pos = _prompts()
    responses = [[11, 12, EOS, 13], [14, 15, 16, 17, 18, 19]]  # EOS then a stray token; full-length, no EOS
    log_probs = [[-0.1, -0.2, -0.3, -0.4], [-1.0] * 6]
    out = build_rollout_output(ids,
                               mask,
                               pos,
                               responses,
                               R,
                               PAD,
                               EOS,
                               rollout_log_probs=log_probs,
                               non_tensor_batch={"uid": np.array(["a", "b"], dtype=object)})
    b = out.batch
    assert set(ROLLOUT_OUTPUT_KEYS) | {"rollout_log_probs"} == set(b.keys())
    for key in ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask"):
        assert b[key].dtype == torch.long, key
    assert b["rollout_log_probs"].dtype == torch.float32
    assert b["responses"].shape == (2, R) and b["input_ids"].shape == (2, 4 + R)
    assert b["responses"].tolist() == [[11, 12, EOS, 13, PAD, PAD], [14, 15, 16, 17, 18, 19]]
    assert b["response_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert torch.equal(b["prompts"], ids)
    assert torch.equal(b["input_ids"], torch.cat([ids, b["responses"]], dim=1))
    assert torch.equal(b["attention_mask"], torch.cat([mask, b["response_mask"]], dim=1))
    assert b["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 6, 7], list(range(10))]
    torch.testing.assert_close(b["rollout_log_probs"],
                               torch.tensor([[-0.1, -0.2, -0.3, 0, 0, 0], [-1.0] * 6], dtype=torch.float32))
    assert out.non_tensor_batch["uid"].tolist() == ["a", "b"]


def test_n3_repeats_prompts_and_non_tensors_interleaved():
    ids, mask, pos = _prompts()
    responses = [[21 + i] for i in range(6)]  # sample j of prompt i is row i * 3 + j
    extra = np.empty(2, dtype=object)
    extra[0], extra[1] = {"k": 1}, {"k": 2}
    out = build_rollout_output(ids,
                               mask,
                               pos,
                               responses,
                               R,
                               PAD, [EOS, 10],
                               n=3,
                               non_tensor_batch={
                                   "uid": np.array(["u0", "u1"], dtype=object),
                                   "extra_info": extra
                               })
    assert len(out) == 6
    assert out.non_tensor_batch["uid"].tolist() == ["u0"] * 3 + ["u1"] * 3
    assert [d["k"] for d in out.non_tensor_batch["extra_info"]] == [1, 1, 1, 2, 2, 2]
    assert torch.equal(out.batch["prompts"], ids.repeat_interleave(3, dim=0))
    assert out.batch["responses"][:, 0].tolist() == list(range(21, 27))
    assert out.batch["response_mask"].sum(-1).tolist() == [1] * 6  # shorter than R: padding is masked
    assert torch.equal(out.batch["position_ids"][:, :4], pos.repeat_interleave(3, dim=0))
    assert torch.equal(out.batch["position_ids"][3:, 4:], torch.arange(4, 4 + R).expand(3, R))


def test_padded_tensor_input_and_eos_list():
    ids, mask, pos = _prompts()
    responses = torch.tensor([[31, 10, PAD], [32, 33, 34]])  # generate-style: 3 columns, pad after the EOS
    out = build_rollout_output(ids, mask, None, responses, R, PAD, [EOS, 10])
    assert out.batch["responses"].tolist() == [[31, 10, PAD, PAD, PAD, PAD], [32, 33, 34, PAD, PAD, PAD]]
    assert out.batch["response_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert torch.equal(out.batch["position_ids"][:, :4], pos)  # computed from the mask when not given


def test_ignore_eos_masks_by_length_only():
    ids, mask, pos = _prompts()
    out = build_rollout_output(ids, mask, pos, [[EOS, 1, 2], [EOS]], R, PAD, None)
    assert out.batch["response_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert normalize_eos_token_id(None) == [] and normalize_eos_token_id(torch.tensor([3, 4])) == [3, 4]
    assert normalize_eos_token_id(np.int64(7)) == [7]


def test_multi_axis_position_ids_continue_on_every_axis():
    ids, mask, pos = _prompts()
    pos3 = torch.stack([pos, pos + 10, pos + 20], dim=1)  # [B, 3, P] as Qwen2-VL's mrope
    out = build_rollout_output(ids, mask, pos3, [[1], [2], [3], [4]], R, PAD, EOS, n=2)
    p = out.batch["position_ids"]
    assert p.shape == (4, 3, 4 + R)
    assert torch.equal(p[:, :, 4:], p[:, :, 3:4] + torch.arange(1, R + 1))
    assert torch.equal(p[2, 1, :4], pos[1] + 10)


def test_from_prompts_reads_the_dataproto():
    ids, mask, pos = _prompts()
    prompts = DataProto.from_dict({
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos
    },
                                  non_tensors={"data_source": ["x", "y"]},
                                  meta_info={"temperature": 1.0})
    out = build_rollout_output_from_prompts(prompts, [[1, 2], [3, EOS], [4], [5]], R, PAD, EOS, n=2)
    assert out.non_tensor_batch["data_source"].tolist() == ["x", "x", "y", "y"]
    assert out.meta_info == {}  # nothing that could conflict when the trainer unions it into its batch


def test_bad_inputs_are_reported():
    ids, mask, pos = _prompts()
    with pytest.raises(ValueError, match="expected 4"):
        build_rollout_output(ids, mask, pos, [[1]] * 3, R, PAD, EOS, n=2)
    with pytest.raises(ValueError, match="more than response_length"):
        build_rollout_output(ids, mask, pos, [[1] * (R + 1), [1]], R, PAD, EOS)
    with pytest.raises(ValueError, match="more than response_length"):
        build_rollout_output(ids, mask, pos, torch.ones(2, R + 1, dtype=torch.long), R, PAD, EOS)
    with pytest.raises(ValueError, match="non-tensor column 'uid'"):
        build_rollout_output(ids, mask, pos, [[1], [1]], R, PAD, EOS, non_tensor_batch={"uid": np.array(["a"])})
    with pytest.raises(ValueError, match="input_ids"):
        build_rollout_output_from_prompts(DataProto.from_dict({"attention_mask": mask}), [[1], [1]], R, PAD, EOS)

"""metric_utils on a hand-made batch with known numbers; bootstrap / maj@N against hand computation."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.trainer.ppo.metric_utils import (bootstrap_metric, calc_maj_val, compute_data_metrics,
                                           compute_throughout_metrics, compute_timing_metrics,
                                           flatten_validation_metrics, process_validation_metrics, reduce_metrics)
from verl.utils.timer import marked_timer


def make_batch() -> DataProto:
    """Two rows, prompt width 3, response width 4.

    row 0: prompt of 2 tokens (left-padded), response of 3 tokens; row 1: prompt of 3, response of 4 (clipped)."""
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    response_mask = attention_mask[:, 3:].clone()
    return DataProto.from_dict(
        tensors={
            "responses": torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "token_level_scores": torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.5]]),
            "token_level_rewards": torch.tensor([[-0.1, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.5]]),
            "advantages": torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 6.0, 7.0]]),
            "returns": torch.tensor([[1.0, 1.0, 1.0, 50.0], [2.0, 2.0, 2.0, 2.0]]),
            "values": torch.tensor([[0.0, 1.0, 1.0, -9.0], [2.0, 2.0, 2.0, 3.0]]),
        },
        meta_info={"global_token_num": [5, 7]},
    )


def test_compute_data_metrics_known_numbers():
    m = compute_data_metrics(make_batch(), use_critic=True)
    approx = partial(pytest.approx, rel=1e-6, abs=1e-6)
    assert (m["critic/score/mean"], m["critic/score/max"], m["critic/score/min"]) == approx((0.75, 1.0, 0.5))
    assert (m["critic/rewards/mean"], m["critic/rewards/max"], m["critic/rewards/min"]) == approx((0.7, 0.9, 0.5))
    # masked token (99) excluded: valid advantages 1..7
    assert (m["critic/advantages/mean"], m["critic/advantages/max"], m["critic/advantages/min"]) == approx((4, 7, 1))
    assert (m["critic/returns/mean"], m["critic/returns/max"], m["critic/returns/min"]) == approx((11 / 7, 2, 1))
    assert (m["critic/values/mean"], m["critic/values/max"], m["critic/values/min"]) == approx((11 / 7, 3, 0))
    # returns - values over valid tokens = [1,0,0,0,0,0,-1]: unbiased var 2/6; returns [1,1,1,2,2,2,2]: var (84/49)/6
    expected_ev = 1 - (2 / 6) / ((84 / 49) / 6 + 1e-5)
    assert m["critic/vf_explained_var"] == approx(expected_ev)
    assert (m["response_length/mean"], m["response_length/max"], m["response_length/min"]) == approx((3.5, 4, 3))
    assert m["response_length/clip_ratio"] == approx(0.5)
    assert (m["prompt_length/mean"], m["prompt_length/max"], m["prompt_length/min"]) == approx((2.5, 3, 2))
    assert m["prompt_length/clip_ratio"] == approx(0.5)
    assert m["response/aborted_ratio"] == 0.0 and m["response_length_non_aborted/mean"] == approx(3.5)
    assert all(isinstance(v, float) for v in m.values())


def test_compute_data_metrics_without_critic_and_missing_keys():
    batch = make_batch()
    m = compute_data_metrics(batch, use_critic=False)
    assert not any(k.startswith("critic/values") or k == "critic/vf_explained_var" for k in m)
    batch.batch.pop("values")
    with pytest.raises(KeyError, match="values"):
        compute_data_metrics(batch, use_critic=True)


def test_aborted_and_turn_metrics():
    batch = make_batch()
    batch.batch["response_mask"][0] = 0  # an empty (aborted) response
    batch.non_tensor_batch["__num_turns__"] = np.array([2, 4], dtype=object)
    m = compute_data_metrics(batch, use_critic=False)
    assert m["response/aborted_ratio"] == 0.5
    assert m["response_length_non_aborted/mean"] == 4.0 and m["response_length/min"] == 0.0
    assert (m["num_turns/min"], m["num_turns/max"], m["num_turns/mean"]) == (2.0, 4.0, 3.0)


def test_timing_and_throughput():
    timing_raw = {"gen": 0.7, "update_actor": 1.2, "reward": 0.1, "step": 3.0}
    m = compute_timing_metrics(make_batch(), timing_raw)
    assert m["timing_s/gen"] == 0.7 and m["timing_s/step"] == 3.0 and m["timing_s/reward"] == 0.1
    # 7 response tokens; 5 prompt + 7 response = 12 tokens overall
    assert m["timing_per_token_ms/gen"] == pytest.approx(100.0)
    assert m["timing_per_token_ms/update_actor"] == pytest.approx(100.0)
    assert "timing_per_token_ms/reward" not in m and "timing_per_token_ms/step" not in m

    t = compute_throughout_metrics(make_batch(), timing_raw, n_gpus=2)
    assert t == {"perf/total_num_tokens": 12.0, "perf/time_per_step": 3.0, "perf/throughput": 2.0}
    with pytest.raises(KeyError, match="step"):
        compute_throughout_metrics(make_batch(), {"gen": 1.0}, n_gpus=1)


def test_reduce_metrics():
    out = reduce_metrics({
        "actor/pg_loss": [1.0, 2.0, 3.0],
        "critic/score/max": [1.0, 5.0],
        "x/min": [3.0, 2.0],
        "perf/max_memory_allocated_gb": [1.0, 4.0],
        "agent/terminated": [1.0, 3.0],  # contains "min" inside a word: still a mean
        "actor/grad_norm": torch.tensor([2.0, 4.0]),
        "scalar": 7,
    })
    assert out == {
        "actor/pg_loss": 2.0,
        "critic/score/max": 5.0,
        "x/min": 2.0,
        "perf/max_memory_allocated_gb": 4.0,
        "agent/terminated": 2.0,
        "actor/grad_norm": 3.0,
        "scalar": 7.0
    }


def _reference_bootstrap(data, subset_size, reduce_fn, n_bootstrap=1000, seed=42):
    """Plain-loop reference: draw, reduce, repeat."""
    rng = np.random.RandomState(seed)
    estimates = []
    for _ in range(n_bootstrap):
        idx = rng.choice(len(data), size=subset_size, replace=True)
        estimates.append(reduce_fn([data[i] for i in idx]))
    return float(np.mean(estimates)), float(np.std(estimates))


def test_bootstrap_matches_loop_reference_and_expectation():
    data = [0.0, 1.0, 0.0, 1.0, 1.0]
    got = bootstrap_metric(data, 3, [np.max, np.min, np.mean], seed=7)
    for (mean, std), fn in zip(got, [np.max, np.min, np.mean]):
        ref_mean, ref_std = _reference_bootstrap(data, 3, fn, seed=7)
        assert mean == pytest.approx(ref_mean) and std == pytest.approx(ref_std)
    # best of 3 draws from p(1)=0.6: 1 - 0.4^3 = 0.936; worst: 0.6^3 = 0.216
    assert got[0][0] == pytest.approx(0.936, abs=0.03) and got[1][0] == pytest.approx(0.216, abs=0.03)
    # constant data: no spread
    assert bootstrap_metric([2.0, 2.0], 2, [np.max], seed=1) == [(2.0, 0.0)]
    # global numpy RNG untouched
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    bootstrap_metric(data, 2, [np.max])
    assert np.random.rand() == expected


def test_calc_maj_val():
    data = [{"pred": "a", "val": 1.0}, {"pred": "b", "val": 0.0}, {"pred": "b", "val": 0.5}]
    assert calc_maj_val(data, vote_key="pred", val_key="val") == 0.0  # "b" wins; first "b" value
    tie = [{"pred": "x", "val": 1.0}, {"pred": "y", "val": 0.0}]
    assert calc_maj_val(tie, vote_key="pred", val_key="val") == 1.0  # tie: first seen


def test_process_validation_metrics_against_hand_computation():
    # source A: prompt p1 (4 responses, acc [1,0,0,1], preds [7,3,3,7]), p2 (4 responses, acc [0,0,0,1])
    # source B: prompt q (1 response)
    data_sources = ["A"] * 8 + ["B"]
    inputs = ["p1"] * 4 + ["p2"] * 4 + ["q"]
    acc = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    pred = ["7", "3", "3", "7", "1", "2", "2", "9", "5"]
    out = process_validation_metrics(data_sources, inputs, {"acc": acc, "pred": pred}, seed=42)
    assert set(out) == {"A", "B"} and set(out["A"]) == {"acc"}  # text field pred is no metric
    a = out["A"]["acc"]
    assert a["mean@4"] == pytest.approx((0.5 + 0.25) / 2)
    assert a["std@4"] == pytest.approx((np.std([1, 0, 0, 1]) + np.std([0, 0, 0, 1])) / 2)
    for n in (2, 4):
        best = [_reference_bootstrap(v, n, np.max)[0] for v in ([1, 0, 0, 1], [0, 0, 0, 1])]
        assert a[f"best@{n}/mean"] == pytest.approx(np.mean(best))
        worst = [_reference_bootstrap(v, n, np.min)[0] for v in ([1, 0, 0, 1], [0, 0, 0, 1])]
        assert a[f"worst@{n}/mean"] == pytest.approx(np.mean(worst))
        maj_fn = partial(calc_maj_val, vote_key="pred", val_key="val")
        maj = [
            _reference_bootstrap([{
                "val": v,
                "pred": p
            }
                                  for v, p in zip(vals, preds)], n, maj_fn)[0]
            for vals, preds in (([1, 0, 0, 1], ["7", "3", "3", "7"]), ([0, 0, 0, 1], ["1", "2", "2", "9"]))
        ]
        assert a[f"maj@{n}/mean"] == pytest.approx(np.mean(maj))
    assert out["B"]["acc"] == {"mean@1": 1.0}

    flat = flatten_validation_metrics(out)
    assert flat["val-core/A/acc/mean@4"] == a["mean@4"]
    assert "val-core/A/acc/maj@4/mean" in flat and "val-core/A/acc/best@4/mean" in flat
    assert "val-aux/A/acc/best@2/mean" in flat and "val-aux/A/acc/std@4" in flat
    assert "val-core/A/acc/best@4/std" in flat and "val-aux/A/acc/worst@4/mean" in flat
    assert flat["val-core/B/acc/mean@1"] == 1.0


def test_process_validation_metrics_length_mismatch():
    with pytest.raises(ValueError, match="infos_dict"):
        process_validation_metrics(["a", "a"], ["x", "x"], {"score": [1.0]})


def test_marked_timer_accumulates_and_survives_errors():
    timing: dict[str, float] = {}
    with marked_timer("gen", timing):
        pass
    first = timing["gen"]
    with marked_timer("gen", timing, color="red"):
        sum(range(10000))
    assert timing["gen"] > first >= 0.0
    with pytest.raises(RuntimeError):
        with marked_timer("step", timing):
            raise RuntimeError("boom")
    assert "step" in timing

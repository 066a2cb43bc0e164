"""The PPO update schedule shared by the FSDP and Megatron actors and critics (``verl.utils.dp_update``):
``PPOSchedule.from_config`` reads and checks the schedule keys; ``run_ppo_epochs`` walks epochs x mini-batches x
micro-batches, reshuffles each epoch from the caller's generator, collects metrics and counts skipped steps."""
from __future__ import annotations

import logging

import pytest
import torch

from verl.protocol import DataProto
from verl.utils.dp_update import DPInfo, PPOSchedule, run_ppo_epochs


def _data(rows: int = 6) -> DataProto:
    return DataProto.from_dict({"row": torch.arange(rows), "response_mask": torch.ones(rows, 3, dtype=torch.long)})


def _schedule(**overrides) -> PPOSchedule:
    config = {"ppo_mini_batch_size": 4, "ppo_micro_batch_size_per_gpu": 2, "ppo_epochs": 2, **overrides}
    return PPOSchedule.from_config(config, "actor")


def _run(schedule: PPOSchedule, generator: torch.Generator | None = None, stepped=lambda i: True):
    seen, steps = [], []

    def accumulate(micro_batches, global_units):
        seen.append(([m.batch["row"].tolist() for m in micro_batches], global_units))
        return [{"actor/loss": float(i)} for i in range(len(micro_batches))]

    def step():
        steps.append(len(steps))
        return float(len(steps)), stepped(len(steps) - 1)

    metrics, skipped = run_ppo_epochs(_data(),
                                      schedule,
                                      accumulate,
                                      step,
                                      role="actor",
                                      dp=DPInfo(1, None),
                                      generator=generator)
    return seen, metrics, skipped


def test_schedule_reads_config_and_scales_token_budget():
    s = PPOSchedule.from_config(
        {
            "ppo_mini_batch_size": 8,
            "use_dynamic_bsz": True,
            "ppo_max_token_len_per_gpu": 100,
            "shuffle": True,
            "loss_agg_mode": "seq-mean-token-sum"
        },
        "critic",
        token_scale=2)
    assert (s.epochs, s.mini_batch_size, s.use_dynamic_bsz, s.max_token_len, s.shuffle,
            s.loss_agg_mode) == (1, 8, True, 200, True, "seq-mean-token-sum")
    assert _schedule().max_token_len is None  # only with use_dynamic_bsz


def test_schedule_rejects_bad_sizes_naming_the_key():
    with pytest.raises(ValueError, match=r"critic\.ppo_mini_batch_size must be a positive int \(rows per DP rank"):
        PPOSchedule.from_config({"ppo_mini_batch_size": 0}, "critic", rows_per="DP rank")
    with pytest.raises(ValueError, match=r"actor\.use_dynamic_bsz=True needs actor\.ppo_max_token_len_per_gpu"):
        PPOSchedule.from_config({"ppo_mini_batch_size": 2, "use_dynamic_bsz": True}, "actor")


def test_epochs_mini_and_micro_batches_in_order_without_shuffle():
    seen, metrics, skipped = _run(_schedule())
    one_epoch = [([[0, 1], [2, 3]], 12.0), ([[4, 5]], 6.0)]  # token-mean: units = response tokens of the mini-batch
    assert seen == one_epoch * 2
    assert metrics["actor/loss"] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert metrics["actor/grad_norm"] == [1.0, 2.0, 3.0, 4.0]
    assert metrics["actor/skipped_steps"] == [0.0] and skipped == 0


def test_shuffle_permutes_each_epoch_from_the_callers_generator():

    def rows(seed):
        seen, _, _ = _run(_schedule(shuffle=True, ppo_epochs=3), torch.Generator().manual_seed(seed))
        return [sum((sum(micro, []) for micro, _ in seen[i:i + 2]), []) for i in range(0, len(seen), 2)]

    epochs = rows(0)
    assert all(sorted(e) == list(range(6)) for e in epochs)  # every row once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch
    assert rows(0) == epochs  # reproducible from the seed
    assert rows(1) != epochs


def test_skipped_steps_are_counted_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        _, metrics, skipped = _run(_schedule(), stepped=lambda i: i != 1)
    assert skipped == 1 and metrics["actor/skipped_steps"] == [1.0]
    assert len(metrics["actor/grad_norm"]) == 4
    assert any("actor: gradient norm is 2.0, skipping" in r.getMessage() for r in caplog.records)

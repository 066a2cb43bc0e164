"""Driver-side algorithm steps of the PPO trainer, without Ray: compute_advantage, apply_kl_penalty,
compute_response_mask, Role / ResourcePoolManager bookkeeping, and the reward helpers (load_reward_manager,
compute_reward)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from verl.protocol import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import (RayPPOTrainer, ResourcePoolManager, Role, apply_kl_penalty, compute_advantage,
                                          compute_response_mask)
from verl.trainer.ppo.reward import compute_reward, load_reward_manager


def _batch(scores, uids, response_mask, values=None, extra=None):
    """A DataProto whose reward sits at the last valid token of each response."""
    mask = torch.tensor(response_mask, dtype=torch.float32)
    bsz, resp_len = mask.shape
    token_rewards = torch.zeros(bsz, resp_len)
    for i, s in enumerate(scores):
        last = int(mask[i].nonzero().max())
        token_rewards[i, last] = s
    tensors = {
        "responses": torch.ones(bsz, resp_len, dtype=torch.long),
        "attention_mask": torch.cat(
            [torch.ones(bsz, 3, dtype=torch.long), mask.long()], dim=1),
        "response_mask": mask,
        "token_level_rewards": token_rewards,
    }
    if values is not None:
        tensors["values"] = torch.tensor(values, dtype=torch.float32)
    tensors.update(extra or {})
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": np.array(uids, dtype=object)})


def test_compute_response_mask_is_tail_of_attention_mask():
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    data = DataProto.from_dict(tensors={"responses": torch.zeros(2, 3, dtype=torch.long), "attention_mask": attn})
    assert torch.equal(compute_response_mask(data), attn[:, -3:])


def test_grpo_advantage_normalises_within_uid_groups():
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5]
    uids = ["a", "a", "b", "b", "b", "c"]
    mask = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    data = compute_advantage(_batch(scores, uids, mask), "grpo", num_repeat=2, norm_adv_by_std_in_grpo=True)
    adv = data.batch["advantages"]
    # loop reference: (s - mean) / (std + eps) per group, singleton -> (s - 0) / (1 + eps)
    expected = []
    for i, s in enumerate(scores):
        group = [scores[j] for j in range(len(scores)) if uids[j] == uids[i]]
        if len(group) == 1:
            expected.append(s / (1 + 1e-6))
        else:
            expected.append((s - np.mean(group)) / (np.std(group, ddof=1) + 1e-6))
    m = torch.tensor(mask, dtype=torch.float32)
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float32)[:, None] * m, atol=1e-5)
    assert torch.equal(data.batch["returns"], adv)
    # padding positions carry no advantage
    assert torch.all(adv[m == 0] == 0)


def test_grpo_without_std_normalisation_is_mean_centred():
    data = compute_advantage(_batch([3.0, 1.0], ["u", "u"], [[1, 1], [1, 1]]),
                             core_algos.AdvantageEstimator.GRPO,
                             norm_adv_by_std_in_grpo=False)
    assert torch.allclose(data.batch["advantages"], torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))


def test_gae_advantage_matches_loop_reference_and_fills_response_mask():
    torch.manual_seed(0)
    mask = [[1, 1, 1, 0], [1, 1, 1, 1]]
    values = torch.randn(2, 4).tolist()
    data = _batch([1.0, -0.5], ["a", "b"], mask, values=values)
    del data.batch["response_mask"]  # compute_advantage derives it from the attention mask
    gamma, lam = 0.9, 0.8
    data = compute_advantage(data, "gae", gamma=gamma, lam=lam)
    rewards = data.batch["token_level_rewards"]
    raw = torch.zeros(2, 4)
    for b in range(2):
        running, next_value = 0.0, 0.0
        for t in reversed(range(4)):
            if mask[b][t] == 0:
                continue
            delta = rewards[b, t].item() + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            next_value = values[b][t]
            raw[b, t] = running
    m = torch.tensor(mask, dtype=torch.float32)
    assert torch.allclose(data.batch["returns"] * m, (raw + torch.tensor(values)) * m, atol=1e-5)
    valid = raw[m.bool()]
    whitened = (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8)
    assert torch.allclose(data.batch["advantages"][m.bool()], whitened, atol=1e-4)


def test_gae_without_values_names_the_critic():
    with pytest.raises(KeyError, match="critic"):
        compute_advantage(_batch([1.0], ["a"], [[1, 1]]), "gae")


def test_rloo_and_remax_dispatch_through_the_registry():
    data = compute_advantage(_batch([1.0, 0.0, 2.0], ["a", "a", "a"], [[1], [1], [1]]), "rloo")
    # leave-one-out baseline: s_i - mean(others)
    assert torch.allclose(data.batch["advantages"][:, 0], torch.tensor([0.0, -1.5, 1.5]))
    baselines = {"reward_baselines": torch.tensor([0.5, 0.5])}
    data = compute_advantage(_batch([1.0, 0.0], ["a", "b"], [[1, 1], [1, 1]], extra=baselines), "remax")
    assert torch.allclose(data.batch["advantages"], torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))


def test_custom_estimator_without_kwargs_gets_only_what_it_declares():
    seen = {}

    @core_algos.register_adv_est("test_only_declared_args")
    def estimator(token_level_rewards, response_mask):
        seen["called"] = True
        return token_level_rewards * 2, token_level_rewards

    data = compute_advantage(_batch([1.0], ["a"], [[1, 1]]), "test_only_declared_args", gamma=0.5)
    assert seen["called"] and torch.equal(data.batch["advantages"], data.batch["token_level_rewards"] * 2)


def test_unknown_estimator_lists_registered_names():
    with pytest.raises(ValueError, match="grpo"):
        compute_advantage(_batch([1.0], ["a"], [[1]]), "no_such_estimator")


def test_apply_kl_penalty_fixed_controller():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -0.25]])
    data = DataProto.from_dict(
        tensors={
            "responses": torch.zeros(2, 3, dtype=torch.long),
            "attention_mask": torch.ones(2, 5, dtype=torch.long),
            "response_mask": mask,
            "token_level_scores": scores,
            "old_log_probs": old,
            "ref_log_prob": ref
        })
    ctrl = core_algos.FixedKLController(kl_coef=0.1)
    data, metrics = apply_kl_penalty(data, ctrl, kl_penalty="kl")
    kl = (old - ref) * mask
    assert torch.allclose(data.batch["token_level_rewards"], scores - 0.1 * kl)
    per_seq = [(kl[0, :2].sum() / 2).item(), (kl[1].sum() / 3).item()]
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(np.mean(per_seq))
    assert metrics["actor/reward_kl_penalty_coeff"] == pytest.approx(0.1)


def test_apply_kl_penalty_updates_adaptive_controller():
    data = DataProto.from_dict(
        tensors={
            "responses": torch.zeros(4, 2, dtype=torch.long),
            "attention_mask": torch.ones(4, 4, dtype=torch.long),
            "token_level_scores": torch.zeros(4, 2),
            "old_log_probs": torch.zeros(4, 2),
            "ref_log_prob": torch.full((4, 2), -1.0),  # KL = 1 per token, far above target
        })
    ctrl = core_algos.get_kl_controller(
        OmegaConf.create({
            "type": "adaptive",
            "kl_coef": 0.2,
            "target_kl": 0.1,
            "horizon": 100
        }))
    _, metrics = apply_kl_penalty(data, ctrl, kl_penalty="kl")
    assert metrics["actor/reward_kl_penalty_coeff"] == pytest.approx(0.2)  # beta used this step
    assert ctrl.value == pytest.approx(0.2 * (1 + 0.2 * 4 / 100))  # then raised (error clipped at +0.2)
    assert "response_mask" in data.batch.keys()


def test_apply_kl_penalty_needs_ref_log_prob():
    data = DataProto.from_dict(tensors={"token_level_scores": torch.zeros(1, 2), "old_log_probs": torch.zeros(1, 2)})
    with pytest.raises(KeyError, match="ref_log_prob"):
        apply_kl_penalty(data, core_algos.FixedKLController(0.1))


def test_role_strings_and_resource_pool_manager_counts():
    assert str(Role.ActorRollout) == "actor_rollout" and str(Role.RefPolicy) == "ref"
    assert str(Role.Critic) == "critic" and str(Role.RewardModel) == "rm"
    mgr = ResourcePoolManager(resource_pool_spec={
        "global_pool": [2, 2],
        "reward_pool": [1]
    },
                              mapping={Role.ActorRollout: "global_pool"})
    assert mgr.get_n_gpus() == 5
    with pytest.raises(KeyError, match="create_resource_pool"):
        mgr.get_resource_pool(Role.ActorRollout)
    with pytest.raises(KeyError, match="no resource pool"):
        mgr.get_resource_pool(Role.Critic)


class _Tok:
    """Decodes token ids as characters 'a' + id (enough for the naive reward manager)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + int(i)) for i in ids)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def _scored_batch():
    prompts = torch.tensor([[0, 1], [1, 1]])
    responses = torch.tensor([[2, 3, 0], [4, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "attention_mask": attention,
            "input_ids": torch.cat([prompts, responses], dim=1)
        },
        non_tensors={
            "data_source": np.array(["toy", "toy"], dtype=object),
            "reward_model": np.array([{
                "ground_truth": "cd"
            }, {
                "ground_truth": "cd"
            }], dtype=object),
        })


def test_load_reward_manager_with_custom_function_and_compute_reward(tmp_path):
    fn_file = tmp_path / "my_reward.py"
    fn_file.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
        "    return {'score': float(solution_str == ground_truth) + bonus, 'length': len(solution_str)}\n")
    config = OmegaConf.create({
        "data": {
            "reward_fn_key": "data_source"
        },
        "reward_model": {
            "reward_manager": "naive"
        },
        "custom_reward_function": {
            "path": str(fn_file),
            "name": "score",
            "reward_kwargs": {
                "bonus": 0.5
            }
        },
    })
    manager = load_reward_manager(config, _Tok(), num_examine=0)
    reward_tensor, extra = compute_reward(_scored_batch(), manager)
    # score at the last valid response token: row 0 has 2 valid tokens ("cd"), row 1 one ("e")
    assert reward_tensor.tolist() == [[0.0, 1.5, 0.0], [0.5, 0.0, 0.0]]
    assert extra["length"] == [2, 1]


def test_compute_reward_accepts_plain_callables_and_rejects_bad_results():
    data = _scored_batch()
    tensor, extra = compute_reward(data, lambda d: torch.ones(2, 3))
    assert tensor.shape == (2, 3) and extra == {}
    with pytest.raises(TypeError, match="Tensor"):
        compute_reward(data, lambda d: [1.0, 2.0])
    with pytest.raises(ValueError, match="load_reward_manager"):
        compute_reward(data, None)


def test_load_reward_manager_unknown_name_is_clear():
    config = OmegaConf.create({"reward_model": {"reward_manager": "nope"}, "data": {}})
    with pytest.raises(ValueError, match="nope"):
        load_reward_manager(config, _Tok(), num_examine=0)


@pytest.mark.parametrize(
    "mini_batch, epochs, kl_in_reward, skip, needed",
    [
        (4, 1, False, True, False),  # one mini-batch, one epoch: on-policy, the pass is skipped
        (2, 1, False, True, True),  # two optimizer steps: the second needs the old policy's log-probs
        (4, 2, False, True, True),  # two epochs
        (4, 1, True, True, True),  # the KL penalty in the reward reads old_log_probs
        (4, 1, False, False, True),  # switched off
    ])
def test_old_log_prob_pass_runs_only_when_something_reads_it(mini_batch, epochs, kl_in_reward, skip, needed):
    config = OmegaConf.create({
        "actor_rollout_ref": {
            "actor": {
                "ppo_mini_batch_size": mini_batch,
                "ppo_epochs": epochs,
                "skip_on_policy_old_log_prob": skip
            },
            "rollout": {
                "n": 2
            }
        }
    })
    trainer = RayPPOTrainer.__new__(RayPPOTrainer)  # only the config is read
    trainer.config, trainer.use_kl_in_reward = config, kl_in_reward
    batch = DataProto.from_dict(tensors={"responses": torch.ones(8, 3, dtype=torch.long)})  # 4 prompts x n=2
    assert trainer._old_log_prob_needed(batch) is needed

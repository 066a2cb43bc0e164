"""The config arithmetic every worker role shares: batch-size normalisation (verl's rules and its error messages),
learning-rate schedules, optimizer construction and config detaching."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from verl.workers.config_helpers import (build_lr_scheduler, build_optimizer, detach_config, get_num_warmup_steps,
                                         normalize_micro_batch, normalize_ppo_mini_batch, update_model_config)


def _lrs(optim_cfg, steps, lr=1.0):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OmegaConf.create({"lr": lr, **optim_cfg}))
    sched = build_lr_scheduler(opt, OmegaConf.create({"lr": lr, **optim_cfg}))
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_mini_batch_is_prompts_times_n_over_dp_and_global_micro_becomes_per_gpu():
    node = OmegaConf.create({"ppo_mini_batch_size": 4, "ppo_micro_batch_size": 4, "ppo_micro_batch_size_per_gpu": None})
    normalize_ppo_mini_batch(node, rollout_n=3, dp_size=2, label="actor_rollout_ref.actor")
    assert node.ppo_mini_batch_size == 6  # 4 prompts x 3 samples / 2 ranks
    assert node.ppo_micro_batch_size_per_gpu == 2 and node.ppo_micro_batch_size == 2

    node = OmegaConf.create({"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_gpu": 2})
    normalize_ppo_mini_batch(node, rollout_n=1, dp_size=4, label="critic")
    assert (node.ppo_mini_batch_size, node.ppo_micro_batch_size_per_gpu) == (2, 2)


@pytest.mark.parametrize("node,n,dp,match", [
    ({
        "ppo_mini_batch_size": 3
    }, 1, 2, "do not split evenly over 2"),
    ({
        "ppo_mini_batch_size": 0
    }, 1, 1, "must be a positive"),
    ({
        "ppo_mini_batch_size": 2,
        "ppo_micro_batch_size_per_gpu": 3
    }, 2, 1, "must divide the 4 rows"),
    ({
        "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size": 1
    }, 1, 2, "smaller than the 2"),
    ({
        "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size": 4,
        "ppo_micro_batch_size_per_gpu": 1
    }, 1, 2, "both set"),
])
def test_bad_batch_sizes_name_the_key(node, n, dp, match):
    with pytest.raises(ValueError, match=match) as info:
        normalize_ppo_mini_batch(OmegaConf.create(node), rollout_n=n, dp_size=dp, label="actor_rollout_ref.actor")
    assert "actor_rollout_ref.actor." in str(info.value)


def test_dynamic_bsz_skips_the_micro_divisibility_check():
    node = OmegaConf.create({"ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_gpu": 3, "use_dynamic_bsz": True})
    normalize_ppo_mini_batch(node, rollout_n=1, dp_size=1, label="critic")
    assert node.ppo_mini_batch_size == 2


def test_log_prob_micro_batch_global_to_per_gpu():
    node = OmegaConf.create({"log_prob_micro_batch_size": 8, "log_prob_micro_batch_size_per_gpu": None})
    normalize_micro_batch(node, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu", 4, "x.rollout")
    assert node.log_prob_micro_batch_size_per_gpu == 2
    node = OmegaConf.create({"log_prob_micro_batch_size_per_gpu": 5})
    normalize_micro_batch(node, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu", 4, "x.rollout")
    assert node.log_prob_micro_batch_size_per_gpu == 5


def test_detach_config_resolves_against_the_whole_tree_and_is_independent():
    root = OmegaConf.create({
        "actor": {
            "ppo_mini_batch_size": 8
        },
        "critic": {
            "ppo_mini_batch_size": "${oc.select:actor.ppo_mini_batch_size,1}",
            "checkpoint": {
                "save_contents": ["model"],
                "load_contents": "${.save_contents}"
            }
        },
    })
    critic = detach_config(root.critic)
    actor = detach_config(root.actor)
    actor.ppo_mini_batch_size = 1
    assert critic.ppo_mini_batch_size == 8 and root.actor.ppo_mini_batch_size == 8
    assert list(critic.checkpoint.load_contents) == ["model"]
    assert detach_config({"a": 1}).a == 1


def test_constant_schedule_with_warmup_steps_and_ratio():
    assert _lrs({"lr_warmup_steps": 2}, 4) == [0.0, 0.5, 1.0, 1.0]
    cfg = {"lr_warmup_steps": -1, "lr_warmup_steps_ratio": 0.5, "total_training_steps": 4}
    assert get_num_warmup_steps(OmegaConf.create(cfg)) == 2
    assert _lrs(cfg, 3) == [0.0, 0.5, 1.0]
    assert _lrs({}, 2) == [1.0, 1.0]


def test_cosine_schedule_decays_to_min_lr_ratio():
    lrs = _lrs({"lr_scheduler_type": "cosine", "total_training_steps": 5, "lr_warmup_steps": 1, "min_lr_ratio": 0.1}, 6)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[5] == pytest.approx(0.1)
    assert lrs[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # deprecated alias
    assert _lrs({"warmup_style": "cosine", "total_training_steps": 2}, 3)[2] == pytest.approx(0.0)


@pytest.mark.parametrize("cfg,match", [
    ({
        "lr_scheduler_type": "cosine"
    }, "total_training_steps"),
    ({
        "lr_scheduler_type": "linear"
    }, "constant or cosine"),
    ({
        "lr_warmup_steps_ratio": 0.1
    }, "lr_warmup_steps_ratio"),
])
def test_bad_schedules_are_reported(cfg, match):
    with pytest.raises(ValueError, match=match):
        _lrs(cfg, 1)


def test_optimizer_from_config():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], OmegaConf.create({"lr": 0.1, "weight_decay": 0.05, "betas": [0.8, 0.9]}))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (0.1, 0.05, (0.8, 0.9))
    assert isinstance(build_optimizer([p], {"lr": 0.1, "optimizer": "SGD", "betas": [0.9, 0.99]}), torch.optim.SGD)
    with pytest.raises(ValueError, match="not an optimizer"):
        build_optimizer([p], {"lr": 0.1, "optimizer": "Nope"})
    with pytest.raises(ValueError, match="optim.lr"):
        build_optimizer([p], {})


def test_update_model_config_nested():

    class Sub:
        x = 1

    class Cfg:
        sub = Sub()
        a = 0

    cfg = update_model_config(Cfg(), OmegaConf.create({"a": 2, "sub": {"x": 3}, "new": "v"}))
    assert (cfg.a, cfg.sub.x, cfg.new) == (2, 3, "v")

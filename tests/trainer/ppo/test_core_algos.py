"""verl.trainer.ppo.core_algos: every vectorised function against a plain Python loop written here, on random
inputs, plus hand-made PPO clipping cases, gradients of the straight-through KL, registries and error messages."""
import math
import statistics

import numpy as np
import pytest
import torch

from verl.trainer.ppo import core_algos as ca

B, R = 12, 7


def _inputs(seed: int, groups: int = 4):
    """Random token rewards, values, a right-padded response mask (one row length 1) and uids with one singleton
    group."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, R + 1, (B,), generator=gen)
    lengths[0] = 1
    mask = (torch.arange(R)[None, :] < lengths[:, None]).to(torch.float64)
    rewards = torch.randn(B, R, generator=gen, dtype=torch.float64) * mask
    values = torch.randn(B, R, generator=gen, dtype=torch.float64)
    uids = [f"p{i % groups}" for i in range(B - 1)] + ["lonely"]
    index = np.array(uids, dtype=object)
    return rewards, values, mask, index


def _ref_whiten(rows, mask):
    flat = [rows[i][j] for i in range(len(rows)) for j in range(len(rows[0])) if mask[i][j]]
    mean = sum(flat) / len(flat)
    var = sum((x - mean)**2 for x in flat) / (len(flat) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in rows]


def _groups(index, scores):
    out = {}
    for uid, s in zip(index, scores):
        out.setdefault(uid, []).append(s)
    return out


def _tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ estimators


def _ref_gae(rewards, values, mask, gamma, lam):
    adv = [[0.0] * R for _ in range(B)]
    for i in range(B):
        next_value, running = 0.0, 0.0
        for t in reversed(range(R)):
            if mask[i][t]:
                delta = rewards[i][t] + gamma * next_value - values[i][t]
                running = delta + gamma * lam * running
                next_value = values[i][t]
            adv[i][t] = running
    returns = [[adv[i][t] + values[i][t] for t in range(R)] for i in range(B)]
    return _ref_whiten(adv, mask), returns


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_loop(holes):
    rewards, values, mask, _ = _inputs(0)
    if holes:  # multi-turn: observation tokens inside the response are masked out
        mask[:, 2] = 0
        mask[0, 0] = 1
    adv, ret = ca.compute_gae_advantage_return(token_level_rewards=rewards,
                                               values=values,
                                               response_mask=mask,
                                               gamma=0.9,
                                               lam=0.8)
    want_adv, want_ret = _ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8)
    torch.testing.assert_close(adv, _tensor(want_adv))
    torch.testing.assert_close(ret, _tensor(want_ret))


def test_gae_without_values_is_a_clear_error():
    rewards, _, mask, _ = _inputs(0)
    with pytest.raises(ValueError, match="critic"):
        ca.compute_gae_advantage_return(token_level_rewards=rewards,
                                        values=None,
                                        response_mask=mask,
                                        gamma=1.0,
                                        lam=1.0)


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_loop(norm):
    rewards, _, mask, index = _inputs(1)
    adv, ret = ca.compute_grpo_outcome_advantage(token_level_rewards=rewards,
                                                 response_mask=mask,
                                                 index=index,
                                                 norm_adv_by_std_in_grpo=norm)
    scores = rewards.sum(-1).tolist()
    groups = _groups(index, scores)
    want = []
    for uid, s, m in zip(index, scores, mask.tolist()):
        g = groups[uid]
        mean, std = (0.0, 1.0) if len(g) == 1 else (statistics.mean(g), statistics.stdev(g))
        a = (s - mean) / (std + 1e-6) if norm else s - mean
        want.append([a * x for x in m])
    torch.testing.assert_close(adv, _tensor(want))
    torch.testing.assert_close(ret, adv)
    # the singleton group: mean 0, std 1
    assert adv[-1, 0].item() == pytest.approx(scores[-1] / (1 + 1e-6) if norm else scores[-1])


def test_grpo_reads_norm_flag_from_config_and_accepts_tensor_index():
    rewards, _, mask, index = _inputs(2)
    codes = torch.tensor([hash(u) % 1000 for u in index])
    plain, _ = ca.compute_grpo_outcome_advantage(token_level_rewards=rewards,
                                                 response_mask=mask,
                                                 index=index,
                                                 norm_adv_by_std_in_grpo=False)
    via_cfg, _ = ca.compute_grpo_outcome_advantage(token_level_rewards=rewards,
                                                   response_mask=mask,
                                                   index=codes,
                                                   config={"norm_adv_by_std_in_grpo": False})
    torch.testing.assert_close(plain, via_cfg)


def test_group_estimators_need_a_matching_index():
    rewards, _, mask, index = _inputs(0)
    with pytest.raises(ValueError, match="uid"):
        ca.compute_grpo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=None)
    with pytest.raises(ValueError, match="entries"):
        ca.compute_rloo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index[:3])


def test_rloo_matches_loop():
    rewards, _, mask, index = _inputs(3)
    adv, _ = ca.compute_rloo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index)
    scores = rewards.sum(-1).tolist()
    groups = _groups(index, scores)
    want = []
    for uid, s, m in zip(index, scores, mask.tolist()):
        g = groups[uid]
        a = s if len(g) == 1 else s - (sum(g) - s) / (len(g) - 1)
        want.append([a * x for x in m])
    torch.testing.assert_close(adv, _tensor(want))


def test_reinforce_plus_plus_matches_loop_and_resets_after_eos():
    rewards, _, mask, _ = _inputs(4)
    rewards = rewards + 5.0 * (1 - mask)  # junk rewards after EOS must not leak into the response
    adv, ret = ca.compute_reinforce_plus_plus_outcome_advantage(token_level_rewards=rewards,
                                                                response_mask=mask,
                                                                config={"gamma": 0.95})
    r, m = rewards.tolist(), mask.tolist()
    want_ret = [[0.0] * R for _ in range(B)]
    for i in range(B):
        for t in range(R):
            total = r[i][t]
            for k in range(t + 1, R):  # return-to-go that stops before the next masked (post-EOS) position
                if not m[i][k]:
                    break
                total += 0.95**(k - t) * r[i][k]
            want_ret[i][t] = total
    want_adv = [[a * x for a, x in zip(row, mrow)] for row, mrow in zip(_ref_whiten(want_ret, m), m)]
    torch.testing.assert_close(ret, _tensor(want_ret))
    torch.testing.assert_close(adv, _tensor(want_adv))
    # the response part does not depend on what comes after EOS
    clean_adv, clean_ret = ca.compute_reinforce_plus_plus_outcome_advantage(token_level_rewards=rewards * mask,
                                                                            response_mask=mask,
                                                                            gamma=0.95)
    torch.testing.assert_close(clean_ret * mask, ret * mask)
    torch.testing.assert_close(clean_adv, adv)


def test_reinforce_plus_plus_baseline_matches_loop():
    rewards, _, mask, index = _inputs(5)
    adv, ret = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards=rewards,
                                                                         response_mask=mask,
                                                                         index=index)
    scores = rewards.sum(-1).tolist()
    groups = _groups(index, scores)
    m = mask.tolist()
    centred = []
    for uid, s, mrow in zip(index, scores, m):
        g = groups[uid]
        base = 0.0 if len(g) == 1 else statistics.mean(g)
        centred.append([(s - base) * x for x in mrow])
    want = [[a * x for a, x in zip(row, mrow)] for row, mrow in zip(_ref_whiten(centred, m), m)]
    torch.testing.assert_close(adv, _tensor(want))
    torch.testing.assert_close(ret, adv)


def test_remax_matches_loop_and_needs_baselines():
    rewards, _, mask, _ = _inputs(6)
    baselines = torch.randn(B, dtype=torch.float64)
    adv, ret = ca.compute_remax_outcome_advantage(token_level_rewards=rewards,
                                                  reward_baselines=baselines,
                                                  response_mask=mask)
    r, m = rewards.tolist(), mask.tolist()
    want_ret = [[sum(r[i][k] * m[i][k] for k in range(t, R)) for t in range(R)] for i in range(B)]
    want_adv = [[want_ret[i][t] - baselines[i].item() * m[i][t] for t in range(R)] for i in range(B)]
    torch.testing.assert_close(ret, _tensor(want_ret))
    torch.testing.assert_close(adv, _tensor(want_adv))
    with pytest.raises(ValueError, match="reward_baselines"):
        ca.compute_remax_outcome_advantage(token_level_rewards=rewards, reward_baselines=None, response_mask=mask)


def test_opo_matches_loop():
    rewards, _, mask, index = _inputs(7)
    adv, _ = ca.compute_opo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index)
    scores = rewards.sum(-1).tolist()
    lengths = mask.sum(-1).tolist()
    members = {}
    for uid, s, n in zip(index, scores, lengths):
        members.setdefault(uid, []).append((s, n))
    want = []
    for uid, s, mrow in zip(index, scores, mask.tolist()):
        g = members[uid]
        base = 0.0 if len(g) == 1 else sum(x * n for x, n in g) / sum(n for _, n in g)
        want.append([(s - base) * x for x in mrow])
    torch.testing.assert_close(adv, _tensor(want))


def test_gpg_matches_loop():
    rewards, _, mask, index = _inputs(8)
    rewards[3] = 0.0  # some rows without reward change alpha
    rewards[5] = 0.0
    adv, _ = ca.compute_gpg_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index, f_norm=2.0)
    scores = rewards.sum(-1).tolist()
    groups = _groups(index, scores)
    alpha = B / sum(1 for s in scores if s != 0)
    want = []
    for uid, s, mrow in zip(index, scores, mask.tolist()):
        g = groups[uid]
        base = 0.0 if len(g) == 1 else statistics.mean(g)
        want.append([alpha * (s - base) / 2.0 * x for x in mrow])
    torch.testing.assert_close(adv, _tensor(want))


def test_every_estimator_accepts_the_trainers_uniform_call():
    rewards, values, mask, index = _inputs(9)
    kwargs = dict(token_level_rewards=rewards,
                  response_mask=mask,
                  index=index,
                  values=values,
                  gamma=1.0,
                  lam=0.95,
                  config={
                      "gamma": 1.0,
                      "norm_adv_by_std_in_grpo": True
                  },
                  reward_baselines=torch.zeros(B, dtype=torch.float64))
    for name in ca.AdvantageEstimator:
        adv, ret = ca.get_adv_estimator_fn(name)(**kwargs)
        assert adv.shape == (B, R) and ret.shape == (B, R), name
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name


def test_adv_estimator_registry():
    assert ca.get_adv_estimator_fn("grpo") is ca.compute_grpo_outcome_advantage
    assert ca.get_adv_estimator_fn(ca.AdvantageEstimator.GAE) is ca.compute_gae_advantage_return
    with pytest.raises(ValueError, match="registered: .*'grpo'"):
        ca.get_adv_estimator_fn("no_such_estimator")

    @ca.register_adv_est("test_constant_one")
    def constant(token_level_rewards, response_mask, **kwargs):
        return response_mask, response_mask

    try:
        assert ca.get_adv_estimator_fn("test_constant_one") is constant
        with pytest.raises(ValueError, match="already registered"):
            ca.register_adv_est("grpo")(constant)
    finally:
        ca._ADV_ESTIMATOR_REGISTRY.pop("test_constant_one")


# ------------------------------------------------------------------------------------------------ KL


def _kl_inputs():
    gen = torch.Generator().manual_seed(10)
    lp = torch.randn(4, 5, generator=gen, dtype=torch.float64) - 2
    ref = torch.randn(4, 5, generator=gen, dtype=torch.float64) - 2
    ref[0, 0] = lp[0, 0] + 30.0  # k3 would be huge: must be clamped to 10
    return lp, ref


@pytest.mark.parametrize(
    "name,formula",
    [
        ("kl", lambda lp, ref: lp - ref),
        ("k1", lambda lp, ref: lp - ref),
        ("abs", lambda lp, ref: abs(lp - ref)),
        ("mse", lambda lp, ref: 0.5 * (lp - ref)**2),
        ("k2", lambda lp, ref: 0.5 * (lp - ref)**2),
        ("low_var_kl", lambda lp, ref: min(max(math.exp(ref - lp) - (ref - lp) - 1, -10), 10)),
        ("k3", lambda lp, ref: min(max(math.exp(ref - lp) - (ref - lp) - 1, -10), 10)),
    ],
)
def test_kl_penalty_values(name, formula):
    lp, ref = _kl_inputs()
    got = ca.kl_penalty(lp, ref, name)
    want = [[formula(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(lp.tolist(), ref.tolist())]
    torch.testing.assert_close(got, _tensor(want))
    if name in ("low_var_kl", "k3"):
        assert got[0, 0].item() == 10.0


@pytest.mark.parametrize("name", ["k1+", "k3+", "low_var_kl+", "abs+"])
def test_kl_penalty_straight_through_value_and_gradient(name):
    lp, ref = _kl_inputs()
    lp = lp.clone().requires_grad_(True)
    got = ca.kl_penalty(lp, ref, name)
    torch.testing.assert_close(got.detach(), ca.kl_penalty(lp.detach(), ref, name[:-1]))
    (grad,) = torch.autograd.grad(got.sum(), lp)
    torch.testing.assert_close(grad, (lp - ref).detach())  # gradient of k2


def test_kl_penalty_full_over_vocabulary():
    gen = torch.Generator().manual_seed(11)
    lp = torch.log_softmax(torch.randn(2, 3, 6, generator=gen, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(2, 3, 6, generator=gen, dtype=torch.float64), -1)
    got = ca.kl_penalty(lp, ref, "full")
    want = [[sum(math.exp(a) * (a - b)
                 for a, b in zip(va, vb))
             for va, vb in zip(ra, rb)]
            for ra, rb in zip(lp.tolist(), ref.tolist())]
    torch.testing.assert_close(got, _tensor(want))
    assert (got >= 0).all()
    with pytest.raises(ValueError, match=r"\[B, R, V\]"):
        ca.kl_penalty(lp[..., 0], ref[..., 0], "full")


def test_kl_penalty_unknown_name():
    lp, ref = _kl_inputs()
    with pytest.raises(ValueError, match="low_var_kl"):
        ca.kl_penalty(lp, ref, "k9")


def test_kl_controllers():
    fixed = ca.get_kl_controller({"type": "fixed", "kl_coef": 0.05})
    fixed.update(current_kl=1.0, n_steps=100)
    assert isinstance(fixed, ca.FixedKLController) and fixed.value == 0.05

    ctrl = ca.get_kl_controller({"type": "adaptive", "kl_coef": 0.1, "target_kl": 0.5, "horizon": 100})
    coef = 0.1
    for kl, steps in [(0.6, 8), (5.0, 8), (0.0, 16), (0.45, 4)]:
        ctrl.update(current_kl=kl, n_steps=steps)
        err = min(max(kl / 0.5 - 1, -0.2), 0.2)
        coef *= 1 + err * steps / 100
        assert ctrl.value == pytest.approx(coef)
    with pytest.raises(ValueError, match="horizon"):
        ca.get_kl_controller({"type": "adaptive", "kl_coef": 0.1, "target_kl": 0.5, "horizon": 0})
    with pytest.raises(ValueError, match="kl_ctrl.type"):
        ca.get_kl_controller({"type": "pid"})


def test_compute_rewards():
    scores = torch.tensor([[0.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(ca.compute_rewards(scores, old, ref, 0.1), torch.tensor([[-0.05, 1.1]]))


# ------------------------------------------------------------------------------------------------ agg_loss


def _ref_agg(loss, mask, mode, factor=None):
    rows = [[(x, m) for x, m in zip(lr, mr)] for lr, mr in zip(loss, mask)]
    if mode == "token-mean":
        return sum(x for row in rows for x, m in row if m) / sum(1 for row in rows for _, m in row if m)
    seq = []
    for row in rows:
        s = sum(x for x, m in row if m)
        n = sum(1 for _, m in row if m)
        if mode == "seq-mean-token-mean":
            s = s / n
        elif mode == "seq-mean-token-sum-norm":
            s = s / (factor if factor is not None else len(row))
        seq.append(s)
    return sum(seq) / len(seq)


@pytest.mark.parametrize("mode", list(ca.LOSS_AGG_MODES))
def test_agg_loss_matches_loop(mode):
    rewards, values, mask, _ = _inputs(12)
    got = ca.agg_loss(values, mask, mode)
    assert got.item() == pytest.approx(_ref_agg(values.tolist(), mask.tolist(), mode))


def test_agg_loss_scale_factor_and_global_normalisation():
    _, values, mask, _ = _inputs(13)
    got = ca.agg_loss(values, mask, "seq-mean-token-sum-norm", loss_scale_factor=100)
    assert got.item() == pytest.approx(_ref_agg(values.tolist(), mask.tolist(), "seq-mean-token-sum-norm", 100))
    # global counts: two halves, each normalised by the whole, sum to the whole-batch value on one rank
    for mode, kw in [("token-mean", "batch_num_tokens"), ("seq-mean-token-mean", "global_batch_size")]:
        total = mask.sum().item() if mode == "token-mean" else B
        halves = sum(
            ca.agg_loss(values[s], mask[s], mode, dp_size=1, **{kw: total}) for s in (slice(0, 5), slice(5, None)))
        assert halves.item() == pytest.approx(ca.agg_loss(values, mask, mode).item())


def test_agg_loss_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        ca.agg_loss(torch.ones(2, 2), torch.ones(2, 2), "token-sum")


# ------------------------------------------------------------------------------------------------ policy losses


def _ref_vanilla(old, new, adv, mask, low, high, c, mode):
    losses, clipped, lower = [], 0, 0
    n = 0
    for i in range(len(old)):
        row = []
        for t in range(len(old[0])):
            ratio = math.exp(min(max(new[i][t] - old[i][t], -20), 20))
            a = adv[i][t]
            l1 = -a * ratio
            l2 = -a * min(max(ratio, 1 - low), 1 + high)
            loss = max(l1, l2)
            if mask[i][t]:
                n += 1
                clipped += l2 > l1
            if a < 0:
                if mask[i][t]:
                    lower += loss > -a * c
                loss = min(loss, -a * c)
            row.append(loss)
        losses.append(row)
    return _ref_agg(losses, mask, mode), clipped / n, lower / n


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_vanilla_loss_matches_loop(mode):
    gen = torch.Generator().manual_seed(14)
    _, _, mask, _ = _inputs(14)
    old = torch.randn(B, R, generator=gen, dtype=torch.float64) - 1
    new = old + 0.5 * torch.randn(B, R, generator=gen, dtype=torch.float64)
    new[1, 0] = old[1, 0] + 3  # ratio ~ 20: dual clip territory for a negative advantage
    adv = torch.randn(B, R, generator=gen, dtype=torch.float64)
    adv[1, 0] = -1.0
    cfg = {"clip_ratio": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    loss, metrics = ca.get_policy_loss_fn("vanilla")(old_log_prob=old,
                                                     log_prob=new,
                                                     advantages=adv,
                                                     response_mask=mask,
                                                     loss_agg_mode=mode,
                                                     config=cfg)
    want, clipfrac, lower = _ref_vanilla(old.tolist(), new.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0, mode)
    assert loss.item() == pytest.approx(want)
    assert float(metrics["actor/pg_clipfrac"]) == pytest.approx(clipfrac)
    assert float(metrics["actor/pg_clipfrac_lower"]) == pytest.approx(lower) and lower > 0
    ppo_kl = (((old - new) * mask).sum() / mask.sum()).item()
    assert float(metrics["actor/ppo_kl"]) == pytest.approx(ppo_kl)


@pytest.mark.parametrize(
    "adv,ratio,expected,clipped,lower",
    [
        (1.0, 1.5, -1.28, 1.0, 0.0),  # positive advantage, ratio above 1 + clip_high: capped at 1.28
        (1.0, 1.2, -1.2, 0.0, 0.0),  # within clip-higher range (0.28): not clipped
        (1.0, 0.5, -0.5, 0.0, 0.0),  # positive advantage, ratio low: unclipped (pessimistic) term
        (-1.0, 0.5, 0.8, 1.0, 0.0),  # negative advantage, ratio below 1 - clip_low: floored at 0.8
        (-1.0, 1.1, 1.1, 0.0, 0.0),  # negative advantage, ratio above 1: unclipped
        (-1.0, 5.0, 3.0, 0.0, 1.0),  # negative advantage, huge ratio: dual clip at clip_ratio_c
    ],
)
def test_vanilla_loss_hand_made_cases(adv, ratio, expected, clipped, lower):
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(ratio), requires_grad=True)
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    loss, metrics = ca.compute_policy_loss_vanilla(old, new, torch.full((1, 1), adv), torch.ones(1, 1), config=cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert float(metrics["actor/pg_clipfrac"]) == clipped
    assert float(metrics["actor/pg_clipfrac_lower"]) == lower
    (grad,) = torch.autograd.grad(loss, new)
    gradient_flows = not clipped and not lower
    assert (grad.abs().item() > 0) == gradient_flows


def test_vanilla_loss_is_weights_and_config_errors():
    old = torch.zeros(2, 3)
    new = torch.full((2, 3), 0.1)
    adv = torch.ones(2, 3)
    mask = torch.ones(2, 3)
    weights = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]])
    plain, _ = ca.compute_policy_loss_vanilla(old, new, adv, mask, config={})
    weighted, _ = ca.compute_policy_loss_vanilla(old, new, adv, mask, config={}, rollout_is_weights=weights)
    assert weighted.item() == pytest.approx(plain.item() * weights.mean().item())
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1.0"):
        ca.compute_policy_loss_vanilla(old, new, adv, mask, config={"clip_ratio_c": 1.0})
    # the positional form gives the same numbers
    pg, clipfrac, ppo_kl, lower = ca.compute_policy_loss(old, new, adv, mask, cliprange=0.2)
    assert pg.item() == pytest.approx(plain.item())


def test_gspo_uses_the_sequence_ratio_and_its_gradient():
    gen = torch.Generator().manual_seed(15)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    old = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    new = (old + 0.01 * torch.randn(2, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[1.0] * 4, [-2.0] * 4], dtype=torch.float64) * mask
    cfg = {"clip_ratio_low": 0.5, "clip_ratio_high": 0.5}  # wide: nothing clipped
    loss, metrics = ca.get_policy_loss_fn("gspo")(old, new, adv, mask, "seq-mean-token-mean", cfg)
    seq_ratio = []
    for i in range(2):
        n = int(mask[i].sum())
        seq_ratio.append(math.exp(sum((new[i, t] - old[i, t]).item() for t in range(n)) / n))
    want = sum(-adv[i, 0].item() * seq_ratio[i] for i in range(2)) / 2
    assert loss.item() == pytest.approx(want)
    (grad,) = torch.autograd.grad(loss, new)
    for i in range(2):
        n = int(mask[i].sum())
        for t in range(4):
            expected = -adv[i, 0].item() * seq_ratio[i] / n / 2 if t < n else 0.0
            assert grad[i, t].item() == pytest.approx(expected)
    assert float(metrics["actor/pg_clipfrac"]) == 0.0


def test_clip_cov_detaches_high_covariance_tokens_only():
    gen = torch.Generator().manual_seed(16)
    mask = torch.ones(4, 6)
    old = torch.randn(4, 6, generator=gen)
    new = (old + 0.01 * torch.randn(4, 6, generator=gen)).requires_grad_(True)
    adv = torch.randn(4, 6, generator=gen)
    base = {"clip_ratio": 0.2}
    # empty covariance window: identical to the clipped PPO surrogate
    loss, metrics = ca.compute_policy_loss_clip_cov(old,
                                                    new,
                                                    adv,
                                                    mask,
                                                    config={
                                                        **base, "policy_loss": {
                                                            "clip_cov_lb": 1e9,
                                                            "clip_cov_ub": 2e9
                                                        }
                                                    })
    ratio = torch.exp(new - old)
    ppo = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    assert loss.item() == pytest.approx(ppo.item(), rel=1e-6)
    assert float(metrics["actor/pg_clipfrac"]) == 0.0
    # wide window and ratio 0.25: a quarter of the candidate tokens lose their gradient, value unchanged
    cfg = {**base, "policy_loss": {"clip_cov_ratio": 0.25, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9}}
    loss, metrics = ca.compute_policy_loss_clip_cov(old, new, adv, mask, config=cfg)
    assert loss.item() == pytest.approx(ppo.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, new)
    assert int((grad == 0).sum()) == 6
    assert float(metrics["actor/pg_clipfrac"]) == pytest.approx(6 / 24)


def test_gpg_policy_loss():
    gen = torch.Generator().manual_seed(17)
    _, _, mask, _ = _inputs(17)
    old = torch.randn(B, R, generator=gen, dtype=torch.float64)
    new = torch.randn(B, R, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, R, generator=gen, dtype=torch.float64)
    loss, _ = ca.get_policy_loss_fn("gpg")(old, new, adv, mask)
    want = _ref_agg((-adv * new).tolist(), mask.tolist(), "token-mean")
    assert loss.item() == pytest.approx(want)


def test_policy_loss_registry():
    for name in ("vanilla", "gspo", "clip_cov", "gpg"):
        assert callable(ca.get_policy_loss_fn(name))
    with pytest.raises(ValueError, match="registered: .*'vanilla'"):
        ca.get_policy_loss_fn("nope")


# ------------------------------------------------------------------------------------------------ value / entropy


def test_value_loss_matches_loop():
    gen = torch.Generator().manual_seed(18)
    _, _, mask, _ = _inputs(18)
    vpreds = torch.randn(B, R, generator=gen, dtype=torch.float64)
    values = torch.randn(B, R, generator=gen, dtype=torch.float64)
    returns = torch.randn(B, R, generator=gen, dtype=torch.float64)
    loss, clipfrac = ca.compute_value_loss(vpreds, returns, values, mask, cliprange_value=0.3)
    per_token, clipped, n = [], 0, 0
    for i in range(B):
        row = []
        for t in range(R):
            v, old, ret = vpreds[i, t].item(), values[i, t].item(), returns[i, t].item()
            vc = min(max(v, old - 0.3), old + 0.3)
            a, b = (v - ret)**2, (vc - ret)**2
            row.append(max(a, b))
            if mask[i, t]:
                n += 1
                clipped += b > a
        per_token.append(row)
    assert loss.item() == pytest.approx(0.5 * _ref_agg(per_token, mask.tolist(), "token-mean"))
    assert clipfrac.item() == pytest.approx(clipped / n)


def test_entropy_loss():
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum(-1)
    got = ca.compute_entropy_loss(logits, mask, "seq-mean-token-mean")
    assert got.item() == pytest.approx(_ref_agg(entropy.tolist(), mask.tolist(), "seq-mean-token-mean"))

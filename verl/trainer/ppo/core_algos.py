"""The algorithmic core of PPO-style training: advantage estimators, KL penalties and controllers, loss aggregation,
policy / value / entropy losses.

Everything operates on ``(batch, response_length)`` tensors (``[B, R]``) with a ``response_mask`` marking the real
response tokens, is vectorised over the batch and runs on any device. Two registries let recipes add their own
pieces by name, selected from the config:

* advantage estimators (``algorithm.adv_estimator``): :func:`register_adv_est` / :func:`get_adv_estimator_fn`.
  Every estimator is called with keyword arguments only and ignores the ones it does not need, so the trainer can
  call any of them as ``fn(token_level_rewards=..., response_mask=..., index=..., values=..., gamma=..., lam=...,
  config=..., reward_baselines=...)``; each returns ``(advantages, returns)``, both ``[B, R]``.
* policy losses (``actor.policy_loss.loss_mode``): :func:`register_policy_loss` / :func:`get_policy_loss_fn`, each
  ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
  rollout_is_weights=None) -> (pg_loss, metrics)``. ``config`` is the actor config (DictConfig, dict or dataclass):
  ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` and the ``policy_loss`` sub-tree for
  loss-specific parameters.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np
import torch

from verl.utils.dp_update import cfg_get
from verl.utils.torch_functional import clip_by_value, entropy_from_logits, masked_mean, masked_sum, masked_whiten

__all__ = [
    # advantage estimators
    "AdvantageEstimator",
    "register_adv_est",
    "get_adv_estimator_fn",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    # KL
    "kl_penalty",
    "kl_penalty_forward",
    "FixedKLController",
    "AdaptiveKLController",
    "get_kl_controller",
    # losses
    "agg_loss",
    "register_policy_loss",
    "get_policy_loss_fn",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_gspo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_gpg",
    "compute_policy_loss",
    "compute_entropy_loss",
    "compute_value_loss",
    "compute_rewards",
]

# ===============================================================================================================
# advantage estimators
# ===============================================================================================================


class AdvantageEstimator(str, Enum):
    """Names of the built-in advantage estimators (the values of ``algorithm.adv_estimator``)."""

    GAE = "gae"
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE_PLUS_PLUS = "reinforce_plus_plus"
    REINFORCE_PLUS_PLUS_BASELINE = "reinforce_plus_plus_baseline"
    REMAX = "remax"
    OPO = "opo"
    GPG = "gpg"


_ADV_ESTIMATOR_REGISTRY: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def _registry_key(name: str | Enum) -> str:
    return name.value if isinstance(name, Enum) else str(name)


def _same_function(a: Callable, b: Callable) -> bool:
    # a module reload re-creates the function object; treat that as the same registration
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (getattr(
        b, "__module__", None), getattr(b, "__qualname__", None))


def register_adv_est(name: str | AdvantageEstimator) -> Callable[[Callable], Callable]:
    """Decorator registering an advantage estimator under ``name`` (a string or :class:`AdvantageEstimator`), so
    that ``algorithm.adv_estimator=name`` selects it."""
    key = _registry_key(name)

    def decorator(fn: Callable) -> Callable:
        existing = _ADV_ESTIMATOR_REGISTRY.get(key)
        if existing is not None and not _same_function(existing, fn):
            raise ValueError(f"advantage estimator {key!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}; pick another name")
        _ADV_ESTIMATOR_REGISTRY[key] = fn
        return fn

    return decorator


def get_adv_estimator_fn(name: str | AdvantageEstimator) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The estimator registered under ``name``; a clear error listing the registered names otherwise."""
    key = _registry_key(name)
    if key not in _ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"unknown advantage estimator {key!r} (algorithm.adv_estimator); registered: "
                         f"{sorted(_ADV_ESTIMATOR_REGISTRY)}. Register your own with @register_adv_est({key!r})")
    return _ADV_ESTIMATOR_REGISTRY[key]


def _group_ids(index: Any, batch_size: int, device: torch.device, who: str) -> tuple[torch.Tensor, int]:
    """Map each row's group key (the prompt ``uid``) to a dense group number. Returns ``(ids [B] long, #groups)``."""
    if index is None:
        raise ValueError(f"{who} groups responses by prompt and needs `index` (the uid of each row, "
                         "non_tensor_batch['uid']); pass index=...")
    keys = index.tolist() if isinstance(index, (torch.Tensor, np.ndarray)) else list(index)
    if len(keys) != batch_size:
        raise ValueError(f"{who}: `index` has {len(keys)} entries but the batch has {batch_size} rows")
    numbering: dict[Any, int] = {}
    ids = [numbering.setdefault(k, len(numbering)) for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device), len(numbering)


def _group_sum(x: torch.Tensor, ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, ids, x)


def _group_mean_std(scores: torch.Tensor, ids: torch.Tensor,
                    num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group mean, unbiased group std and group size; a singleton group has mean 0 and std 1."""
    counts = _group_sum(torch.ones_like(scores), ids, num_groups)
    means = _group_sum(scores, ids, num_groups) / counts
    squares = _group_sum((scores - means[ids])**2, ids, num_groups)
    stds = torch.sqrt(squares / (counts - 1).clamp(min=1))
    singleton = counts < 2
    means = torch.where(singleton, torch.zeros_like(means), means)
    stds = torch.where(singleton, torch.ones_like(stds), stds)
    return means[ids], stds[ids], counts[ids]


def _outcome_scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    # the sequence's outcome score: the sum of its token rewards (the reward sits at the last valid token)
    return token_level_rewards.sum(dim=-1)


@register_adv_est(AdvantageEstimator.GAE)
def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                                 gamma: float | torch.Tensor, lam: float | torch.Tensor,
                                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, TD(lambda) run backwards in time over the critic's ``values``.

    Masked positions (padding, or tool/observation tokens inside a multi-turn response) are skipped: the running
    advantage and the next value carry through them unchanged, so a turn boundary does not cut the bootstrap.
    ``returns = advantages + values``; the advantages are then whitened over the valid tokens.
    """
    if values is None:
        raise ValueError("gae needs the critic's `values` [B, R]: enable the critic (critic.enable) or choose a "
                         "critic-free estimator such as algorithm.adv_estimator=grpo")
    with torch.no_grad():
        valid = response_mask.bool()
        rewards = token_level_rewards.to(values.dtype)
        batch_size, length = rewards.shape
        next_value = torch.zeros(batch_size, dtype=values.dtype, device=values.device)
        running = torch.zeros_like(next_value)
        advantages = torch.zeros_like(rewards)
        for t in range(length - 1, -1, -1):
            step_valid = valid[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            running = torch.where(step_valid, delta + gamma * lam * running, running)
            next_value = torch.where(step_valid, values[:, t], next_value)
            advantages[:, t] = running
        returns = advantages + values
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns


@register_adv_est(AdvantageEstimator.GRPO)
def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor,
                                   index: Sequence[Any] | np.ndarray | torch.Tensor,
                                   epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool | None = None,
                                   config: Any = None,
                                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each response's outcome score relative to the other responses of the same prompt (same ``index``):
    ``(s - mean) / (std + epsilon)``, or ``s - mean`` without std normalisation (Dr. GRPO). A prompt with a single
    response uses mean 0 and std 1. The advantage is broadcast over the valid tokens; returns equal advantages.

    ``norm_adv_by_std_in_grpo`` defaults to ``config.norm_adv_by_std_in_grpo`` (the algorithm config), else True.
    """
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(cfg_get(config, "norm_adv_by_std_in_grpo", True))
    with torch.no_grad():
        scores = _outcome_scores(token_level_rewards)
        ids, num_groups = _group_ids(index, scores.shape[0], scores.device, "grpo")
        mean, std, _ = _group_mean_std(scores, ids, num_groups)
        scores = scores - mean
        if norm_adv_by_std_in_grpo:
            scores = scores / (std + epsilon)
        advantages = scores.unsqueeze(-1) * response_mask.to(scores.dtype)
    return advantages, advantages


@register_adv_est(AdvantageEstimator.RLOO)
def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor,
                                   index: Sequence[Any] | np.ndarray | torch.Tensor,
                                   epsilon: float = 1e-6,
                                   config: Any = None,
                                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: baseline of each response is the mean score of the *other* responses of its prompt,
    ``s*n/(n-1) - mean*n/(n-1)``; a prompt with a single response keeps its raw score."""
    with torch.no_grad():
        scores = _outcome_scores(token_level_rewards)
        ids, num_groups = _group_ids(index, scores.shape[0], scores.device, "rloo")
        counts = _group_sum(torch.ones_like(scores), ids, num_groups)[ids]
        totals = _group_sum(scores, ids, num_groups)[ids]
        leave_one_out = (counts * scores - totals) / (counts - 1).clamp(min=1)
        scores = torch.where(counts > 1, leave_one_out, scores)
        advantages = scores.unsqueeze(-1) * response_mask.to(scores.dtype)
    return advantages, advantages


@register_adv_est(AdvantageEstimator.REINFORCE_PLUS_PLUS)
def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: torch.Tensor,
                                                  response_mask: torch.Tensor,
                                                  config: Any = None,
                                                  gamma: float | None = None,
                                                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted return-to-go of the token rewards, ``G_t = r_t + gamma * G_{t+1}``, where the sum
    restarts at every masked position (nothing after an EOS leaks into the response), then whitened over the batch.

    ``gamma`` defaults to ``config.gamma``, else 1.0. Returns ``(whitened returns * mask, returns)``.
    """
    if gamma is None:
        gamma = float(cfg_get(config, "gamma", 1.0))
    with torch.no_grad():
        keep = response_mask.to(token_level_rewards.dtype)
        returns = torch.zeros_like(token_level_rewards)
        running = torch.zeros_like(token_level_rewards[:, 0])
        for t in range(token_level_rewards.shape[1] - 1, -1, -1):
            running = token_level_rewards[:, t] + gamma * running
            returns[:, t] = running
            running = running * keep[:, t]  # restart the sum before a masked (post-EOS) position
        advantages = masked_whiten(returns, response_mask) * keep
    return advantages, returns


@register_adv_est(AdvantageEstimator.REINFORCE_PLUS_PLUS_BASELINE)
def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: torch.Tensor,
                                                           response_mask: torch.Tensor,
                                                           index: Sequence[Any] | np.ndarray | torch.Tensor,
                                                           epsilon: float = 1e-6,
                                                           config: Any = None,
                                                           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group baseline: subtract the prompt's mean score (0 for a single response), broadcast over
    the valid tokens, then whiten over the whole batch."""
    with torch.no_grad():
        scores = _outcome_scores(token_level_rewards)
        ids, num_groups = _group_ids(index, scores.shape[0], scores.device, "reinforce_plus_plus_baseline")
        mean, _, _ = _group_mean_std(scores, ids, num_groups)
        keep = response_mask.to(scores.dtype)
        centred = (scores - mean).unsqueeze(-1) * keep
        advantages = masked_whiten(centred, response_mask) * keep
    return advantages, advantages


@register_adv_est(AdvantageEstimator.REMAX)
def compute_remax_outcome_advantage(token_level_rewards: torch.Tensor,
                                    reward_baselines: torch.Tensor,
                                    response_mask: torch.Tensor,
                                    config: Any = None,
                                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax: return-to-go (undiscounted) minus the reward of the greedy response to the same prompt
    (``reward_baselines`` ``[B]``). Returns ``(advantages, returns)``."""
    if reward_baselines is None:
        raise ValueError("remax needs `reward_baselines` [B] (the reward of a greedy rollout per prompt), which the "
                         "trainer computes when algorithm.adv_estimator=remax")
    with torch.no_grad():
        keep = response_mask.to(token_level_rewards.dtype)
        returns = torch.flip(torch.cumsum(torch.flip(token_level_rewards * keep, dims=[-1]), dim=-1), dims=[-1])
        baselines = reward_baselines.to(returns.dtype).reshape(-1, 1)
        advantages = returns - baselines * keep
    return advantages, returns


@register_adv_est(AdvantageEstimator.OPO)
def compute_opo_outcome_advantage(token_level_rewards: torch.Tensor,
                                  response_mask: torch.Tensor,
                                  index: Sequence[Any] | np.ndarray | torch.Tensor,
                                  epsilon: float = 1e-6,
                                  config: Any = None,
                                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """OPO: the group baseline is the length-weighted mean score ``sum(len * s) / sum(len)`` of the prompt's
    responses (0 for a single response), which is the optimal baseline for on-policy sequence-level rewards."""
    with torch.no_grad():
        scores = _outcome_scores(token_level_rewards)
        lengths = response_mask.to(scores.dtype).sum(dim=-1)
        ids, num_groups = _group_ids(index, scores.shape[0], scores.device, "opo")
        counts = _group_sum(torch.ones_like(scores), ids, num_groups)
        weighted = _group_sum(lengths * scores, ids, num_groups)
        total_len = _group_sum(lengths, ids, num_groups)
        baseline = torch.where(counts > 1, weighted / total_len.clamp(min=epsilon), torch.zeros_like(weighted))
        advantages = (scores - baseline[ids]).unsqueeze(-1) * response_mask.to(scores.dtype)
    return advantages, advantages


@register_adv_est(AdvantageEstimator.GPG)
def compute_gpg_outcome_advantage(token_level_rewards: torch.Tensor,
                                  response_mask: torch.Tensor,
                                  index: Sequence[Any] | np.ndarray | torch.Tensor,
                                  epsilon: float = 1e-6,
                                  f_norm: float = 1.0,
                                  config: Any = None,
                                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """GPG: ``alpha * (s - group mean) / f_norm`` with ``alpha = B / #(rows with a non-zero score)``, which
    re-weights the batch when most responses get no reward. Single-response prompts use mean 0."""
    with torch.no_grad():
        scores = _outcome_scores(token_level_rewards)
        ids, num_groups = _group_ids(index, scores.shape[0], scores.device, "gpg")
        mean, _, _ = _group_mean_std(scores, ids, num_groups)
        nonzero = torch.count_nonzero(scores).clamp(min=1).to(scores.dtype)
        alpha = scores.shape[0] / nonzero
        advantages = (alpha * (scores - mean) / f_norm).unsqueeze(-1) * response_mask.to(scores.dtype)
    return advantages, advantages


# ===============================================================================================================
# KL penalty and controllers
# ===============================================================================================================

_KL_ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_KL_NAMES = sorted(_KL_ALIASES) + ["full"]


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (no straight-through).

    ``kl``/``k1``: ``lp - ref``; ``abs``: ``|lp - ref|``; ``mse``/``k2``: ``0.5 (lp - ref)^2``;
    ``low_var_kl``/``k3``: ``exp(ref - lp) - (ref - lp) - 1``, clamped to [-10, 10];
    ``full``: exact KL over the vocabulary, for full log-prob tensors ``[..., V]``, giving ``[...]``.
    """
    if kl_penalty == "full":
        if logprob.dim() < 3 or logprob.shape != ref_logprob.shape:
            raise ValueError("kl_penalty='full' needs full-vocabulary log-probs of shape [B, R, V] for both the "
                             f"policy and the reference (got {tuple(logprob.shape)} and {tuple(ref_logprob.shape)}); "
                             "with per-token log-probs use 'kl', 'mse' or 'low_var_kl'")
        return (logprob.exp() * (logprob - ref_logprob)).sum(dim=-1)
    kind = _KL_ALIASES.get(kl_penalty)
    if kind is None:
        raise ValueError(f"unknown kl_penalty {kl_penalty!r} (algorithm.kl_penalty / actor.kl_loss_type); use one of "
                         f"{_KL_NAMES}, optionally with a '+' suffix for the straight-through k2 gradient")
    diff = logprob - ref_logprob
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    log_ratio = torch.clamp(-diff, min=-20.0, max=20.0)  # log(ref / pi); bounded so exp cannot overflow
    return torch.clamp(log_ratio.exp() - log_ratio - 1.0, min=-10.0, max=10.0)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str = "kl") -> torch.Tensor:
    """Per-token KL penalty ``[B, R]`` (see :func:`kl_penalty_forward` for the estimators). A trailing ``+``
    (``k3+``, ``low_var_kl+``) is straight-through: the forward value of the named estimator with the gradient of
    ``k2`` (``lp - ref``), which is unbiased for the gradient of the KL."""
    if kl_penalty.endswith("+"):
        base = kl_penalty[:-1]
        if base == "full":
            raise ValueError("kl_penalty='full+' is not supported: 'full' already gives the exact KL and its gradient")
        forward = kl_penalty_forward(logprob, ref_logprob, base)
        surrogate = kl_penalty_forward(logprob, ref_logprob, "k2")
        return surrogate - surrogate.detach() + forward.detach()
    return kl_penalty_forward(logprob, ref_logprob, kl_penalty)


class FixedKLController:
    """Constant KL coefficient (``algorithm.kl_ctrl.type=fixed``)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """KL coefficient steered towards ``target_kl`` (Ziegler et al.): after each step it is multiplied by
    ``1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl is None or float(target_kl) <= 0:
            raise ValueError(f"algorithm.kl_ctrl.target_kl must be > 0 for the adaptive controller, got {target_kl}")
        if horizon is None or float(horizon) <= 0:
            raise ValueError(f"algorithm.kl_ctrl.horizon must be > 0 for the adaptive controller, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient up when the measured KL is above target, down when below."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * float(n_steps) / self.horizon


def get_kl_controller(kl_ctrl: Any) -> FixedKLController | AdaptiveKLController:
    """Controller for ``algorithm.kl_ctrl`` (``type: fixed|adaptive``, ``kl_coef``, ``target_kl``, ``horizon``)."""
    kind = cfg_get(kl_ctrl, "type", "fixed")
    kl_coef = float(cfg_get(kl_ctrl, "kl_coef", 0.001))
    if kind == "fixed":
        return FixedKLController(kl_coef=kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(init_kl_coef=kl_coef,
                                    target_kl=cfg_get(kl_ctrl, "target_kl"),
                                    horizon=cfg_get(kl_ctrl, "horizon"))
    raise ValueError(f"unknown algorithm.kl_ctrl.type {kind!r}; use 'fixed' or 'adaptive'")


# ===============================================================================================================
# loss aggregation
# ===============================================================================================================

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(loss_mat: torch.Tensor,
             loss_mask: torch.Tensor,
             loss_agg_mode: str,
             dp_size: int = 1,
             batch_num_tokens: int | float | torch.Tensor | None = None,
             global_batch_size: int | float | torch.Tensor | None = None,
             loss_scale_factor: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss ``[B, R]`` to a scalar.

    * ``token-mean``: sum over valid tokens / number of valid tokens (every token weighs the same);
    * ``seq-mean-token-sum``: mean over sequences of each sequence's token sum;
    * ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (every sequence weighs the same);
    * ``seq-mean-token-sum-norm``: mean over sequences of the token sum divided by a constant ``loss_scale_factor``
      (default: the padded response length), as in Dr. GRPO, so that the loss does not depend on response length.

    Normalisation is local to this batch. To normalise by global counts instead (all micro-batches and ranks), pass
    ``batch_num_tokens`` (token-mean) or ``global_batch_size`` (seq modes) and ``dp_size``: the result is then
    ``local sum / global count * dp_size``, which sums correctly under gradient averaging over ranks.
    """
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            return masked_mean(loss_mat, mask)
        return masked_sum(loss_mat, mask) / batch_num_tokens * dp_size
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r} (actor/critic loss_agg_mode); use one of "
                         f"{list(LOSS_AGG_MODES)}")
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = masked_mean(loss_mat, mask, axis=-1)
    else:
        seq_losses = masked_sum(loss_mat, mask, axis=-1)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
            if float(factor) <= 0:
                raise ValueError(f"loss_scale_factor must be > 0, got {factor}")
            seq_losses = seq_losses / factor
    if global_batch_size is None:
        return seq_losses.sum() / max(seq_losses.numel(), 1)
    return seq_losses.sum() / global_batch_size * dp_size


# ===============================================================================================================
# policy losses
# ===============================================================================================================

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]
_POLICY_LOSS_REGISTRY: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under ``name`` (``actor.policy_loss.loss_mode=name`` selects it)."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        existing = _POLICY_LOSS_REGISTRY.get(name)
        if existing is not None and not _same_function(existing, fn):
            raise ValueError(f"policy loss {name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}; pick another name")
        _POLICY_LOSS_REGISTRY[name] = fn
        return fn

    return decorator


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The policy loss registered under ``name``; a clear error listing the registered names otherwise."""
    if name not in _POLICY_LOSS_REGISTRY:
        raise ValueError(f"unknown policy loss {name!r} (actor_rollout_ref.actor.policy_loss.loss_mode); registered: "
                         f"{sorted(_POLICY_LOSS_REGISTRY)}. Register your own with @register_policy_loss({name!r})")
    return _POLICY_LOSS_REGISTRY[name]


def _clip_range(config: Any) -> tuple[float, float, float]:
    """``(clip_ratio_low, clip_ratio_high, clip_ratio_c)`` from the actor config, with verl's defaults."""
    clip_ratio = float(cfg_get(config, "clip_ratio", 0.2))
    low = float(cfg_get(config, "clip_ratio_low", clip_ratio))
    high = float(cfg_get(config, "clip_ratio_high", clip_ratio))
    clip_ratio_c = float(cfg_get(config, "clip_ratio_c", 3.0))
    if low < 0 or high < 0:
        raise ValueError(f"actor clip_ratio_low / clip_ratio_high must be >= 0, got {low} / {high}")
    if clip_ratio_c <= 1.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0 (the dual-clip bound for negative "
                         f"advantages), got {clip_ratio_c}")
    return low, high, clip_ratio_c


def _apply_is_weights(losses: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> torch.Tensor:
    # importance weights correcting for the rollout engine's sampling distribution; they carry no gradient
    return losses if rollout_is_weights is None else losses * rollout_is_weights.detach().to(losses.dtype)


def _log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    # bounded so that exp never overflows on a stale or corrupted old log-prob
    return torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)


def _clipped_surrogate(advantages: torch.Tensor, ratio: torch.Tensor, low: float,
                       high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate ``max(-A r, -A clip(r, 1-low, 1+high))`` and where the clipped term is active."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _finish_policy_loss(pg_losses: torch.Tensor,
                        response_mask: torch.Tensor,
                        loss_agg_mode: str,
                        rollout_is_weights: torch.Tensor | None,
                        clipfrac: torch.Tensor | None,
                        ppo_kl: torch.Tensor,
                        clipfrac_lower: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Every policy loss ends alike: rollout importance weights, aggregation, and the three ``actor/*`` metrics
    the trainer logs for any loss mode (zero where a loss has no such clipping)."""
    pg_loss = agg_loss(_apply_is_weights(pg_losses, rollout_is_weights), response_mask, loss_agg_mode)
    zero = torch.zeros((), device=pg_loss.device)
    metrics = {
        "actor/pg_clipfrac": zero if clipfrac is None else clipfrac.detach(),
        "actor/ppo_kl": ppo_kl.detach(),
        "actor/pg_clipfrac_lower": zero if clipfrac_lower is None else clipfrac_lower.detach(),
    }
    return pg_loss, metrics


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(old_log_prob: torch.Tensor,
                                log_prob: torch.Tensor,
                                advantages: torch.Tensor,
                                response_mask: torch.Tensor,
                                loss_agg_mode: str = "token-mean",
                                config: Any = None,
                                rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO clipped surrogate with asymmetric clipping (``clip_ratio_low`` / ``clip_ratio_high``, "clip-higher") and
    dual clip: for negative advantages the loss is also bounded by ``-A * clip_ratio_c``, so a very large ratio on
    a bad token cannot blow up the update.

    Metrics: ``actor/pg_clipfrac`` (share of tokens where the clipped term is active), ``actor/ppo_kl`` (mean of
    ``old - new`` log-prob), ``actor/pg_clipfrac_lower`` (share where the dual clip is active).
    """
    low, high, clip_ratio_c = _clip_range(config)
    log_ratio = _log_ratio(old_log_prob, log_prob)
    ratio = torch.exp(log_ratio)
    ppo_kl = masked_mean(-log_ratio, response_mask)

    ppo_losses, is_clipped = _clipped_surrogate(advantages, ratio, low, high)
    clipfrac = masked_mean(is_clipped.float(), response_mask)

    dual_bound = -advantages * clip_ratio_c
    negative = advantages < 0
    dual_losses = torch.minimum(ppo_losses, dual_bound)
    clipfrac_lower = masked_mean(((ppo_losses > dual_bound) & negative).float(), response_mask)
    pg_losses = torch.where(negative, dual_losses, ppo_losses)
    return _finish_policy_loss(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, clipfrac, ppo_kl,
                               clipfrac_lower)


@register_policy_loss("gspo")
def compute_policy_loss_gspo(old_log_prob: torch.Tensor,
                             log_prob: torch.Tensor,
                             advantages: torch.Tensor,
                             response_mask: torch.Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean",
                             config: Any = None,
                             rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios
    ``s = exp(mean_t(lp - old))``, clipped with ``clip_ratio_low`` / ``clip_ratio_high`` (GSPO uses small values
    such as 3e-4 / 4e-4). Each token carries ``s`` in the forward pass and its own log-prob's gradient, scaled by
    ``s``. GSPO recipes set ``loss_agg_mode=seq-mean-token-mean``."""
    low, high, _ = _clip_range(config)
    token_log_ratio = log_prob - old_log_prob
    seq_log_ratio = masked_mean(token_log_ratio, response_mask, axis=-1)
    # forward: the sequence ratio; backward: d/d(lp_t) of each token goes through its own log-prob
    combined = seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach()
    ratio = torch.exp(torch.clamp(combined, max=10.0))

    pg_losses, is_clipped = _clipped_surrogate(advantages, ratio, low, high)
    return _finish_policy_loss(pg_losses, response_mask, loss_agg_mode, rollout_is_weights,
                               masked_mean(is_clipped.float(), response_mask),
                               masked_mean(-token_log_ratio, response_mask))


@register_policy_loss("clip_cov")
def compute_policy_loss_clip_cov(old_log_prob: torch.Tensor,
                                 log_prob: torch.Tensor,
                                 advantages: torch.Tensor,
                                 response_mask: torch.Tensor,
                                 loss_agg_mode: str = "token-mean",
                                 config: Any = None,
                                 rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clip-Cov (entropy-mechanism recipe): PPO clipping, plus stop-gradient on a small random set of tokens whose
    covariance between advantage and log-prob is high, the tokens that drive entropy collapse.

    Parameters from ``config.policy_loss``: ``clip_cov_ratio`` (share of valid tokens to detach, default 2e-4),
    ``clip_cov_lb`` / ``clip_cov_ub`` (covariance window of candidate tokens, default 1.0 / 5.0). Tokens already
    clipped by the ratio are not candidates. ``actor/pg_clipfrac`` reports the share of detached tokens.
    """
    low, high, _ = _clip_range(config)
    cov_ratio = float(cfg_get(config, "policy_loss.clip_cov_ratio", 0.0002))
    cov_lb = float(cfg_get(config, "policy_loss.clip_cov_lb", 1.0))
    cov_ub = float(cfg_get(config, "policy_loss.clip_cov_ub", 5.0))

    log_ratio = _log_ratio(old_log_prob, log_prob)
    ratio = torch.exp(log_ratio)
    pg_losses, is_clipped = _clipped_surrogate(advantages, ratio, low, high)

    with torch.no_grad():
        valid = response_mask.bool()
        lp = log_prob.detach()
        cov = (advantages - masked_mean(advantages, valid)) * (lp - masked_mean(lp, valid))
        candidates = valid & ~is_clipped & (cov > cov_lb) & (cov < cov_ub)
        positions = candidates.flatten().nonzero().squeeze(-1)
        budget = max(int(cov_ratio * float(valid.sum().item())), 1)
        chosen = positions[torch.randperm(positions.numel(), device=positions.device)[:budget]]
        detach = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
        detach[chosen] = True
        detach = detach.view_as(candidates)

    pg_losses = torch.where(detach, pg_losses.detach(), pg_losses)
    return _finish_policy_loss(pg_losses, response_mask, loss_agg_mode, rollout_is_weights,
                               masked_mean(detach.float(), response_mask), masked_mean(-log_ratio, response_mask))


@register_policy_loss("gpg")
def compute_policy_loss_gpg(old_log_prob: torch.Tensor,
                            log_prob: torch.Tensor,
                            advantages: torch.Tensor,
                            response_mask: torch.Tensor,
                            loss_agg_mode: str = "token-mean",
                            config: Any = None,
                            rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """GPG: plain policy gradient ``-A * log pi`` without ratio or clipping (pair with the ``gpg`` estimator)."""
    return _finish_policy_loss(-advantages * log_prob, response_mask, loss_agg_mode, rollout_is_weights, None,
                               masked_mean(old_log_prob - log_prob, response_mask))


def compute_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        cliprange: float | None = None,
        cliprange_low: float | None = None,
        cliprange_high: float | None = None,
        clip_ratio_c: float = 3.0,
        loss_agg_mode: str = "token-mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Older positional form of the ``vanilla`` loss, kept for recipes that call it directly. Returns
    ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``."""
    config = {
        "clip_ratio": 0.2 if cliprange is None else cliprange,
        "clip_ratio_low": cliprange_low,
        "clip_ratio_high": cliprange_high,
        "clip_ratio_c": clip_ratio_c,
    }
    pg_loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                                   config)
    return pg_loss, metrics["actor/pg_clipfrac"], metrics["actor/ppo_kl"], metrics["actor/pg_clipfrac_lower"]


# ===============================================================================================================
# entropy, value and reward helpers
# ===============================================================================================================


def compute_entropy_loss(logits: torch.Tensor,
                         response_mask: torch.Tensor,
                         loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """Aggregated entropy of the policy over the response tokens (``logits`` ``[B, R, V]``)."""
    return agg_loss(entropy_from_logits(logits), response_mask, loss_agg_mode)


def compute_value_loss(vpreds: torch.Tensor,
                       returns: torch.Tensor,
                       values: torch.Tensor,
                       response_mask: torch.Tensor,
                       cliprange_value: float,
                       loss_agg_mode: str = "token-mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * agg(max((v - R)^2, (clip(v, old +- c) - R)^2))``: the new value prediction may
    move at most ``cliprange_value`` from the rollout-time value before the loss stops rewarding it. Returns
    ``(vf_loss, vf_clipfrac)``, the latter the share of tokens where the clipped term is the larger one."""
    vpred_clipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    losses_unclipped = (vpreds - returns).square()
    losses_clipped = (vpred_clipped - returns).square()
    vf_loss = 0.5 * agg_loss(torch.maximum(losses_unclipped, losses_clipped), response_mask, loss_agg_mode)
    vf_clipfrac = masked_mean((losses_clipped > losses_unclipped).float(), response_mask)
    return vf_loss, vf_clipfrac


def compute_rewards(token_level_scores: torch.Tensor, old_log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
                    kl_ratio: float | torch.Tensor) -> torch.Tensor:
    """Token rewards with the in-reward KL penalty: ``scores - kl_ratio * (old_log_prob - ref_log_prob)``."""
    return token_level_scores - (old_log_prob - ref_log_prob) * kl_ratio

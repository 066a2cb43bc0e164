"""The FSDP worker roles on a real local Ray cluster, 2 ranks with gloo, the tiny Qwen2 model.

One actor/rollout/reference group is reused by the whole module and walked through a GRPO step: generate (n=2 via
the driver's interleaved repeat) -> the rollout schema; compute_log_prob == the plain HF model; ref == old before the
update; update_actor -> metrics and a better GRPO objective; the rollout then generates (greedily) with the new
weights, which the merged checkpoint reproduces; a fresh group loaded from the checkpoint continues exactly like the
original. A second group hosts the critic and the reward model fused in one process per rank (as the trainer
colocates them): values, a critic that learns a constant return, and reward-model scores at the last valid token.

Everything runs in fp32 (also on CUDA), so results are compared with the plain HF model at tight tolerances.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from omegaconf import OmegaConf

import verl
from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.single_controller.ray import (RayClassWithInitArgs, RayResourcePool, RayWorkerGroup,
                                        create_colocated_worker_cls, init_ray)
from verl.trainer.ppo.core_algos import agg_loss, compute_grpo_outcome_advantage
from verl.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker, RewardModelWorker

WORLD = 2
PROMPTS, N = 4, 2  # prompts per batch, samples per prompt
PROMPT_LEN, RESPONSE_LEN = 28, 8
LR = 5e-3
TOL = 1e-4


def _eos_ids(model_path):
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _valid_tokens(responses, eos_ids):
    """Each row's tokens up to and including the first EOS."""
    out = []
    for row in responses.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        out.append(row[:cut])
    return out


def _hf_log_probs(model, data, temperature=1.0):
    b = data.batch
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
    logits = logits[:, -RESPONSE_LEN - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def pool(ray_cluster):
    """One set of worker slots shared by every group (as the trainer colocates roles): on CUDA each slot is a whole
    GPU, so a second pool would wait forever for GPUs the first one holds."""
    return RayResourcePool([WORLD], num_cpus_per_bundle=0.5)


def _grpo_batch(gen, old_log_probs, seed=0):
    """The rollout batch with old log-probs and GRPO advantages from fixed random outcome scores."""
    data = gen.select().union(old_log_probs)  # select: a new container, union works in place
    mask = data.batch["response_mask"]
    scores = torch.randn(len(data), generator=torch.Generator().manual_seed(seed))
    rewards = torch.zeros(mask.shape)
    rewards[torch.arange(len(data)), (mask.sum(-1) - 1).clamp(min=0)] = scores
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, index=data.non_tensor_batch["uid"])
    data.batch["advantages"] = adv
    data.meta_info["global_token_num"] = data.batch["attention_mask"].sum(-1).tolist()
    return data


def _pg_objective(data, log_probs):
    """The vanilla PPO loss at ratio exp(log_probs - old) (before clipping acts: the first update's objective)."""
    ratio = torch.exp(log_probs - data.batch["old_log_probs"])
    return float(agg_loss(-data.batch["advantages"] * ratio, data.batch["response_mask"].float(), "token-mean"))


# ----------------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from verl.utils.dataset.tasks import write_arithmetic_task

    data_dir = tmp_path_factory.mktemp("data")
    return SimpleNamespace(lm=get_tiny_model_path("causal_lm"),
                           rm=get_tiny_model_path("reward"),
                           train=write_arithmetic_task(str(data_dir), train_size=PROMPTS, test_size=2)["train"],
                           ckpt=str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def config(paths):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer", "config", "ppo_trainer.yaml"))
    overrides = [
        f"data.max_prompt_length={PROMPT_LEN}",
        f"data.max_response_length={RESPONSE_LEN}",
        f"data.train_batch_size={PROMPTS}",
        f"actor_rollout_ref.model.path={paths.lm}",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",  # 2 prompts x n=2 / 2 ranks = 2 rows per rank
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        f"actor_rollout_ref.actor.optim.lr={LR}",
        "actor_rollout_ref.actor.optim.total_training_steps=4",
        "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        f"actor_rollout_ref.rollout.n={N}",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32",
        "critic.ppo_micro_batch_size_per_gpu=2",
        "critic.optim.lr=1e-4",
        "critic.model.fsdp_config.mixed_precision.param_dtype=fp32",
        f"reward_model.model.path={paths.rm}",
        "reward_model.micro_batch_size_per_gpu=3",
        "reward_model.model.fsdp_config.mixed_precision.param_dtype=fp32",
    ]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


@pytest.fixture(scope="module")
def prompts(config, paths):
    """A batch of the dataset, repeated n times interleaved with a shared uid per prompt, as the trainer does."""
    from transformers import AutoTokenizer

    from verl.utils.dataset import RLHFDataset, collate_fn

    dataset = RLHFDataset(paths.train, AutoTokenizer.from_pretrained(paths.lm), config.data)
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(PROMPTS)]))
    batch.non_tensor_batch["uid"] = np.array([f"p{i}" for i in range(PROMPTS)], dtype=object)
    return batch.repeat(repeat_times=N, interleave=True)


@pytest.fixture(scope="module")
def hf_model(paths):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(paths.lm, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def actor_wg(pool, config):
    wg = RayWorkerGroup(pool, RayClassWithInitArgs(ActorRolloutRefWorker, config.actor_rollout_ref,
                                                   "actor_rollout_ref"))
    wg.init_model()
    return wg


@pytest.fixture(scope="module")
def before_update(actor_wg, prompts):
    gen = actor_wg.generate_sequences(prompts)
    old = actor_wg.compute_log_prob(gen)
    ref = actor_wg.compute_ref_log_prob(gen)
    return SimpleNamespace(gen=gen, old=old, ref=ref)


@pytest.fixture(scope="module")
def after_update(actor_wg, prompts, before_update, paths):
    data = _grpo_batch(before_update.gen, before_update.old)
    metrics = actor_wg.update_actor(data).meta_info["metrics"]
    new = actor_wg.compute_log_prob(before_update.gen)
    greedy_prompts = prompts.select(deepcopy=True)
    greedy_prompts.meta_info["do_sample"] = False
    greedy = actor_wg.generate_sequences(greedy_prompts)
    ckpt = os.path.join(paths.ckpt, "global_step_1", "actor")
    actor_wg.save_checkpoint(ckpt, global_step=1)
    return SimpleNamespace(data=data, metrics=metrics, new=new, greedy=greedy, ckpt=ckpt)


@pytest.fixture(scope="module")
def critic_rm(pool, config):
    """Critic and reward model fused in one process per rank; returns the per-role groups."""
    fused = create_colocated_worker_cls({
        "critic": RayClassWithInitArgs(CriticWorker, config=config.critic),
        "rm": RayClassWithInitArgs(RewardModelWorker, config=config.reward_model),
    })
    groups = RayWorkerGroup(pool, fused).spawn(prefix_set={"critic", "rm"})
    groups["critic"].init_model()
    groups["rm"].init_model()
    return groups


# ----------------------------------------------------------------------------------------------------------------------
# actor / rollout / reference
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_sequences_returns_the_rollout_schema(before_update, prompts):
    gen = before_update.gen
    rows = PROMPTS * N
    assert len(gen) == rows
    for key in ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask"):
        assert key in gen.batch.keys(), key
    assert gen.batch["prompts"].shape == (rows, PROMPT_LEN)
    assert gen.batch["responses"].shape == (rows, RESPONSE_LEN)
    assert gen.batch["input_ids"].shape == (rows, PROMPT_LEN + RESPONSE_LEN)
    torch.testing.assert_close(gen.batch["prompts"], prompts.batch["input_ids"])
    torch.testing.assert_close(gen.batch["input_ids"][:, PROMPT_LEN:], gen.batch["responses"])
    torch.testing.assert_close(gen.batch["attention_mask"][:, PROMPT_LEN:], gen.batch["response_mask"])
    assert gen.batch["response_mask"][:, 0].all()
    assert list(gen.non_tensor_batch["uid"]) == [f"p{i // N}" for i in range(rows)]
    assert list(gen.non_tensor_batch["data_source"]) == list(prompts.non_tensor_batch["data_source"])
    # sampling (rollout.do_sample=True) gives the two samples of at least one prompt different responses
    responses = gen.batch["responses"]
    assert any(not torch.equal(responses[2 * i], responses[2 * i + 1]) for i in range(PROMPTS))
    metrics = gen.meta_info["metrics"]
    for key in ("timing_s/generate_sequences", "timing_s/weight_sync", "perf/weight_sync_s",
                "perf/weight_sync_peak_memory_gb"):
        assert key in metrics and len(metrics[key]) == WORLD, key
    assert gen.meta_info["timing"]["generate_sequences"] >= gen.meta_info["timing"]["weight_sync"] > 0


def test_compute_log_prob_equals_the_hf_model(before_update, hf_model):
    gen, old = before_update.gen, before_update.old
    mask = gen.batch["response_mask"].bool()
    assert old.batch["old_log_probs"].shape == old.batch["entropys"].shape == (PROMPTS * N, RESPONSE_LEN)
    expected = _hf_log_probs(hf_model, gen)
    torch.testing.assert_close(old.batch["old_log_probs"][mask], expected[mask], atol=TOL, rtol=0)
    assert (old.batch["old_log_probs"][~mask] == 0).all()
    assert (old.batch["entropys"][mask] > 0).all()


def test_ref_log_prob_equals_old_log_prob_before_any_update(before_update):
    mask = before_update.gen.batch["response_mask"].bool()
    torch.testing.assert_close(before_update.ref.batch["ref_log_prob"][mask],
                               before_update.old.batch["old_log_probs"][mask],
                               atol=1e-5,
                               rtol=0)


def test_update_actor_reports_metrics_and_improves_the_grpo_objective(after_update, before_update):
    m = after_update.metrics
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/pg_clipfrac", "actor/ppo_kl", "actor/lr",
                "perf/mfu/actor", "perf/max_memory_allocated_gb"):
        assert key in m and len(m[key]) == WORLD, key
    assert m["actor/lr"] == [pytest.approx(LR)] * WORLD
    assert np.isfinite(np.asarray(m["actor/grad_norm"], dtype=float)).all()
    assert all(v > 0 for v in m["perf/mfu/actor"]) and all(v > 0 for v in m["perf/max_memory_allocated_gb"])
    mask = before_update.gen.batch["response_mask"].bool()
    old, new = after_update.data.batch["old_log_probs"], after_update.new.batch["old_log_probs"]
    assert (new[mask] - old[mask]).abs().max() > 1e-3
    assert _pg_objective(after_update.data, new) < _pg_objective(after_update.data, old)


def test_rollout_generates_with_the_updated_weights(after_update, prompts, paths, hf_model, tmp_path):
    """Greedy rollout after the update == greedy HF generate of the merged checkpoint (!= the initial model's)."""
    from transformers import AutoModelForCausalLM

    from verl.model_merger import merge_fsdp_checkpoint

    merged = AutoModelForCausalLM.from_pretrained(merge_fsdp_checkpoint(after_update.ckpt, str(tmp_path / "hf")),
                                                  dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
    eos = _eos_ids(paths.lm)
    pad = hf_model.generation_config.pad_token_id

    def greedy(model):
        with torch.no_grad():
            out = model.generate(input_ids=prompts.batch["input_ids"],
                                 attention_mask=prompts.batch["attention_mask"],
                                 max_new_tokens=RESPONSE_LEN,
                                 do_sample=False,
                                 eos_token_id=sorted(eos),
                                 pad_token_id=pad)
        return _valid_tokens(out[:, PROMPT_LEN:], eos)

    rollout = _valid_tokens(after_update.greedy.batch["responses"], eos)
    assert rollout == greedy(merged)
    assert rollout != greedy(hf_model)  # the update changed the greedy output: the check above can fail
    assert rollout[0::2] == rollout[1::2]  # greedy: both samples of a prompt agree


def test_checkpoint_resume_continues_like_the_original(pool, actor_wg, after_update, before_update, config):
    fresh = RayWorkerGroup(pool, RayClassWithInitArgs(ActorRolloutRefWorker, config.actor_rollout_ref, "actor"))
    fresh.init_model()
    fresh.load_checkpoint(after_update.ckpt)
    gen = before_update.gen
    mask = gen.batch["response_mask"].bool()
    resumed = fresh.compute_log_prob(gen)
    torch.testing.assert_close(resumed.batch["old_log_probs"],
                               after_update.new.batch["old_log_probs"],
                               atol=1e-6,
                               rtol=0)
    # the next step (optimizer moments and lr schedule restored) matches the run that did not stop
    data = _grpo_batch(gen, after_update.new, seed=1)
    m_orig = actor_wg.update_actor(data).meta_info["metrics"]
    m_resumed = fresh.update_actor(data).meta_info["metrics"]
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lr"):
        np.testing.assert_allclose(np.asarray(m_resumed[key], dtype=float),
                                   np.asarray(m_orig[key], dtype=float),
                                   rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(fresh.compute_log_prob(gen).batch["old_log_probs"][mask],
                               actor_wg.compute_log_prob(gen).batch["old_log_probs"][mask],
                               atol=1e-5,
                               rtol=0)
    fresh.shutdown()


# ----------------------------------------------------------------------------------------------------------------------
# critic and reward model
# ----------------------------------------------------------------------------------------------------------------------


def test_critic_values_and_learning_a_constant_return(critic_rm, before_update):
    critic = critic_rm["critic"]
    gen = before_update.gen
    mask = gen.batch["response_mask"].float()
    target = 0.5 * mask
    errors, vf_losses = [], []
    for _ in range(4):
        values = critic.compute_values(gen).batch["values"]
        assert values.shape == (PROMPTS * N, RESPONSE_LEN)
        assert (values[mask == 0] == 0).all()
        errors.append(float(((values - target).abs() * mask).sum() / mask.sum()))
        data = gen.select().union(DataProto.from_dict(tensors={"values": values, "returns": target}))
        metrics = critic.update_critic(data).meta_info["metrics"]
        vf_losses.append(float(np.mean(metrics["critic/vf_loss"])))
        assert metrics["critic/lr"] == [pytest.approx(1e-4)] * WORLD and "perf/mfu/critic" in metrics
    assert errors[-1] < 0.5 * errors[0], errors
    assert vf_losses[-1] < vf_losses[0], vf_losses


def test_critic_checkpoint_round_trip(critic_rm, before_update, tmp_path):
    critic = critic_rm["critic"]
    gen = before_update.gen
    saved = critic.compute_values(gen).batch["values"]
    critic.save_checkpoint(str(tmp_path / "global_step_3" / "critic"), global_step=3)
    data = gen.select().union(DataProto.from_dict(tensors={"values": saved, "returns": torch.ones_like(saved)}))
    critic.update_critic(data)
    assert not torch.allclose(critic.compute_values(gen).batch["values"], saved)
    critic.load_checkpoint(str(tmp_path / "global_step_3" / "critic"))
    torch.testing.assert_close(critic.compute_values(gen).batch["values"], saved, atol=1e-6, rtol=0)


def test_reward_model_scores_the_last_valid_response_token(critic_rm, before_update, paths):
    from transformers import AutoModelForSequenceClassification

    gen = before_update.gen
    scores = critic_rm["rm"].compute_rm_score(gen).batch["rm_scores"]
    assert scores.shape == (PROMPTS * N, RESPONSE_LEN)
    last = gen.batch["response_mask"].sum(-1) - 1
    rows = torch.arange(len(gen))
    off_last = scores.clone()
    off_last[rows, last] = 0
    assert (off_last == 0).all()

    model = AutoModelForSequenceClassification.from_pretrained(paths.rm,
                                                               dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    b = gen.batch
    with torch.no_grad():
        hidden = model.model(input_ids=b["input_ids"],
                             attention_mask=b["attention_mask"],
                             position_ids=b["position_ids"]).last_hidden_state
        per_token = model.score(hidden)[..., 0]
    expected = per_token[rows, PROMPT_LEN + last]
    torch.testing.assert_close(scores[rows, last], expected, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Ulysses sequence parallelism: sp=2 over the 2 ranks
# ----------------------------------------------------------------------------------------------------------------------


def _hf_value_model(path):
    """The critic's initial model as CriticWorker builds it (1-label head initialised under seed 0)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    cfg = AutoConfig.from_pretrained(path)
    cfg.num_labels, cfg.classifier_dropout = 1, 0.0
    torch.manual_seed(0)
    return AutoModelForTokenClassification.from_pretrained(path,
                                                           config=cfg,
                                                           dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()


def test_ulysses_sequence_parallel_workers(pool, config, prompts, before_update, after_update, hf_model, paths):
    """Actor/rollout/ref and critic fused per rank, both with sp=2 (dp=1): the two ranks get the same rows and only
    sp rank 0 is collected; log-probs, ref log-probs and values equal the HF models', and the same GRPO update as
    the sp=1 group (same mini-batches) lands on the same log-probs."""
    from verl.workers.critic import DataParallelPPOCritic

    sp_config = OmegaConf.merge(
        config, {
            "actor_rollout_ref": {
                "actor": {
                    "ulysses_sequence_parallel_size": WORLD
                }
            },
            "critic": {
                "ulysses_sequence_parallel_size": WORLD,
                "model": {
                    "use_remove_padding": True
                }
            },
        })
    fused = create_colocated_worker_cls({
        "actor": RayClassWithInitArgs(ActorRolloutRefWorker, sp_config.actor_rollout_ref, "actor_rollout_ref"),
        "critic": RayClassWithInitArgs(CriticWorker, config=sp_config.critic),
    })
    group = RayWorkerGroup(pool, fused)
    try:
        groups = group.spawn(prefix_set={"actor", "critic"})
        actor, critic = groups["actor"], groups["critic"]
        actor.init_model()
        critic.init_model()
        gen = before_update.gen
        mask = gen.batch["response_mask"].bool()

        old = actor.compute_log_prob(gen)
        assert old.batch["old_log_probs"].shape == (PROMPTS * N, RESPONSE_LEN)  # one copy of the rows
        torch.testing.assert_close(old.batch["old_log_probs"][mask],
                                   _hf_log_probs(hf_model, gen)[mask],
                                   atol=TOL,
                                   rtol=0)
        torch.testing.assert_close(actor.compute_ref_log_prob(gen).batch["ref_log_prob"][mask],
                                   old.batch["old_log_probs"][mask],
                                   atol=1e-5,
                                   rtol=0)

        # the sp=1 group split each mini-batch over 2 ranks: rows {0,1,4,5}, then {2,3,6,7}; give dp=1 the same
        order = [0, 1, 4, 5, 2, 3, 6, 7]
        metrics = actor.update_actor(after_update.data.select_idxs(order)).meta_info["metrics"]
        assert np.isfinite(np.asarray(metrics["actor/grad_norm"], dtype=float)).all()
        new = actor.compute_log_prob(gen).batch["old_log_probs"]
        torch.testing.assert_close(new[mask], after_update.new.batch["old_log_probs"][mask], atol=TOL, rtol=0)

        # the rollout keeps one data-parallel rank per rank
        assert len(actor.generate_sequences(prompts.select(deepcopy=True))) == PROMPTS * N

        values = critic.compute_values(gen).batch["values"]
        local = DataParallelPPOCritic(OmegaConf.create({"use_remove_padding": True}), _hf_value_model(paths.lm))
        expected = local.compute_values(DataProto(batch=gen.batch, meta_info={"micro_batch_size": 8}))
        torch.testing.assert_close(values, expected, atol=TOL, rtol=0)
        data = gen.select().union(DataProto.from_dict(tensors={"values": values, "returns": 0.5 * mask.float()}))
        assert np.isfinite(critic.update_critic(data).meta_info["metrics"]["critic/vf_loss"]).all()
    finally:
        group.shutdown()


# ----------------------------------------------------------------------------------------------------------------------
# without Ray: checks that run before any process group or model exists
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_role_strategy_and_unsupported_options_are_rejected_up_front(config):
    with pytest.raises(ValueError, match="unknown role 'critic'"):
        ActorRolloutRefWorker(config.actor_rollout_ref, "critic")
    bad = OmegaConf.merge(config.actor_rollout_ref, {"actor": {"strategy": "megatron"}})
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.strategy='megatron'"):
        ActorRolloutRefWorker(bad, "actor")
    bad = OmegaConf.merge(config.actor_rollout_ref, {"model": {"lora_rank": 8}})
    with pytest.raises(NotImplementedError, match="lora_rank"):
        ActorRolloutRefWorker(bad, "actor_rollout")
    # Ulysses sequence parallelism splits the packed (remove-padding) sequence
    with pytest.raises(ValueError, match="critic.ulysses_sequence_parallel_size=2 .*critic.model.use_remove_padding"):
        CriticWorker(OmegaConf.merge(config.critic, {"ulysses_sequence_parallel_size": 2}))
    bad = OmegaConf.merge(config.actor_rollout_ref, {
        "model": {
            "use_remove_padding": False
        },
        "actor": {
            "ulysses_sequence_parallel_size": 2
        }
    })
    with pytest.raises(ValueError, match="actor.ulysses_sequence_parallel_size=2 .*model.use_remove_padding"):
        ActorRolloutRefWorker(bad, "actor")
    bad = OmegaConf.merge(config.actor_rollout_ref, {
        "actor": {
            "ulysses_sequence_parallel_size": 2
        },
        "ref": {
            "ulysses_sequence_parallel_size": 1
        }
    })
    with pytest.raises(ValueError, match="ref.ulysses_sequence_parallel_size=1 differ"):
        ActorRolloutRefWorker(bad, "actor_rollout_ref")
    with pytest.raises(NotImplementedError, match="reward_model.ulysses_sequence_parallel_size=2"):
        RewardModelWorker(OmegaConf.merge(config.reward_model, {"ulysses_sequence_parallel_size": 2}))


def test_reward_model_rerenders_the_conversation_for_its_own_tokenizer(paths):
    """When the policy's tokenizer differs, the RM sees (prompt messages + decoded response) in its own chat
    template, right-padded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.lm)
    worker = RewardModelWorker.__new__(RewardModelWorker)  # only the tokenizers and the config are needed
    worker.config = OmegaConf.create({"max_length": 40, "model": {"input_tokenizer": paths.lm}})
    worker.tokenizer = worker.input_tokenizer = tok
    chats = [[{"role": "user", "content": "What is 1 + 2?"}], [{"role": "user", "content": "Hi"}]]
    answers = ["#### 3", "Hello there"]
    prompt_ids = [
        tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        for c in chats
    ]
    response_ids = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for a in answers]
    p, r = max(map(len, prompt_ids)), max(map(len, response_ids)) + 2
    prompts = torch.tensor([[tok.pad_token_id] * (p - len(x)) + x for x in prompt_ids])
    responses = torch.tensor([x + [tok.pad_token_id] * (r - len(x)) for x in response_ids])
    attention_mask = torch.cat([prompts != tok.pad_token_id, responses != tok.pad_token_id], dim=1).long()
    data = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
        })
    with pytest.raises(KeyError, match="data.return_raw_chat=True"):
        worker._switch_chat_template(data)
    raw = np.empty(len(chats), dtype=object)
    raw[:] = chats
    data.non_tensor_batch["raw_prompt"] = raw
    out = worker._switch_chat_template(data)
    assert out.batch["input_ids"].shape == (2, 40)
    for i, (chat, answer) in enumerate(zip(chats, answers)):
        mask = out.batch["attention_mask"][i].bool()
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right-padded
        expected = tok.apply_chat_template(chat + [{"role": "assistant", "content": answer}], tokenize=False)
        assert tok.decode(out.batch["input_ids"][i, :n]) == expected
        assert out.batch["position_ids"][i, :n].tolist() == list(range(n))

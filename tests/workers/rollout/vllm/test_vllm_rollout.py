"""vLLMRollout + FSDPVLLMShardingManager with the real vLLM CPU engine on the tiny Qwen2 model (float32), one engine
for the module, in this process:

* the engine starts from dummy weights; after a sync its greedy output equals the HF rollout's token for token, and
  the whole output (every schema tensor, the non-tensor columns) is identical;
* after the actor's weights change (optimizer steps), the synced engine's greedy output equals the updated model's;
* ``n > 1`` (``meta_info["n"]`` and the trainer's repeated prompts) gives distinct samples grouped by ``uid``;
* ``rollout_log_probs`` agree with the actor's recomputed log-probs (``DataParallelPPOActor.compute_log_prob``)
  within 1e-3 (float32), sampled at temperature 0.7 and greedy;
* custom EOS ids stop generation; the caller's random state is untouched; the engine sleeps outside the manager;
  sampling parameters map onto ``vllm.SamplingParams``; a tensor-parallel size that does not fit is refused.

Needs vLLM (``bash scripts/ci/setup_vllm_env.sh .venv-vllm``); skipped without it.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed; run tests/workers/rollout/vllm in the vLLM venv "
        "(bash scripts/ci/setup_vllm_env.sh .venv-vllm)",
        allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from verl.models.tiny import get_tiny_model_path  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.torch_functional import compute_position_id_with_mask, get_response_mask  # noqa: E402
from verl.workers.actor import DataParallelPPOActor  # noqa: E402
from verl.workers.rollout import ROLLOUT_OUTPUT_KEYS  # noqa: E402
from verl.workers.rollout.hf import HFRollout  # noqa: E402
from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import vLLMRollout  # noqa: E402
from verl.workers.sharding_manager.fsdp_vllm import FSDPVLLMShardingManager  # noqa: E402

P, R = 32, 24
LOG_PROB_ATOL = 1e-3  # float32 engine vs float32 HF forward: observed differences are ~1e-6
BUCKET = 200_000  # bytes: several buckets for the ~4.3 MB tiny model
TEXTS = [
    "What is 12 + 7?", "Natalia sold clips to 48 of her friends in April.", "hello", "Compute 7 * 8, then add 1.",
    "A train travels 60 miles per hour for 3 hours. How far does it travel?", "x + 3 = 10", "Let's think step by step.",
    "The store sells pencils in packs of 12."
]


def _config(**overrides) -> dict:
    config = {
        "name": "vllm",
        "prompt_length": P,
        "response_length": R,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "seed": 0,
        "max_num_seqs": 64,
        "enable_prefix_caching": True,
        "load_format": "dummy",
        "free_cache_engine": True,
        "val_kwargs": {
            "temperature": 0,
            "top_p": 1.0,
            "top_k": -1,
            "n": 1,
            "do_sample": False
        },
        "engine_kwargs": {
            "vllm": {
                "swap_space": None
            }
        },
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def tiny():
    path = get_tiny_model_path()
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(tiny):
    """One in-process vLLM engine for the module (a DictConfig node, as the worker passes it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the CI box has 2 loaded cores
    path, tokenizer = tiny
    rollout = vLLMRollout(path, OmegaConf.create(_config()), tokenizer=tokenizer)
    yield rollout
    del rollout.inference_engine
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def actor(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32, attn_implementation="sdpa")
    model.train()  # the manager must leave the actor's mode as it found it
    return model


def _prompts(tokenizer, **meta) -> DataProto:
    """Left-padded prompts of varied lengths plus RLHFDataset's unpadded ``raw_prompt_ids``; eos/pad as the worker
    sets them (from the model's generation config: two EOS ids)."""
    encoded = [tokenizer(text)["input_ids"][:P] for text in TEXTS]
    pad = tokenizer.pad_token_id
    ids = torch.full((len(encoded), P), pad, dtype=torch.long)
    mask = torch.zeros(len(encoded), P, dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, P - len(row):] = torch.tensor(row)
        mask[i, P - len(row):] = 1
    raw = np.empty(len(encoded), dtype=object)
    raw[:] = encoded
    meta = {"eos_token_id": [2, 0], "pad_token_id": pad, **meta}
    return DataProto.from_dict(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": compute_position_id_with_mask(mask)
        },
        non_tensors={
            "uid": np.array([f"u{i}" for i in range(len(encoded))], dtype=object),
            "raw_prompt_ids": raw,
            "data_source": np.array(["test"] * len(encoded), dtype=object),
        },
        meta_info=meta)


def _generate(engine, module, prompts, bucket=BUCKET):
    manager = FSDPVLLMShardingManager(module, engine, bucket_bytes=bucket)
    with manager:
        data = manager.preprocess_data(prompts)
        out = manager.postprocess_data(engine.generate_sequences(data))
    return out, manager


def _hf(module, prompts, tokenizer, **config):
    return HFRollout(module, OmegaConf.create(_config(**config)), tokenizer=tokenizer).generate_sequences(prompts)


def _check_schema(out, prompts, n):
    b, p = out.batch, prompts.batch
    assert set(ROLLOUT_OUTPUT_KEYS) <= set(b.keys())
    assert len(out) == len(prompts) * n
    assert b["responses"].shape == (len(out), R) and b["input_ids"].shape == (len(out), P + R)
    assert torch.equal(b["prompts"], p["input_ids"].repeat_interleave(n, 0))
    assert torch.equal(b["input_ids"], torch.cat([b["prompts"], b["responses"]], -1))
    assert torch.equal(b["attention_mask"][:, P:], b["response_mask"])
    assert torch.equal(b["response_mask"], get_response_mask(b["responses"], prompts.meta_info["eos_token_id"]))
    assert b["responses"].masked_select(b["response_mask"] == 0).eq(prompts.meta_info["pad_token_id"]).all()
    last = p["position_ids"][:, -1:].repeat_interleave(n, 0)
    assert torch.equal(b["position_ids"][:, P:], last + torch.arange(1, R + 1))
    for key, column in prompts.non_tensor_batch.items():
        assert list(out.non_tensor_batch[key]) == [v for v in column for _ in range(n)], key


# ----------------------------------------------------------------------------------------------------------------------


def test_greedy_equals_hf_rollout_token_for_token(engine, actor, tiny):
    tokenizer = tiny[1]
    prompts = _prompts(tokenizer, validate=True)  # greedy through val_kwargs, as validation runs
    engine.wake_up()  # the dummy-initialised engine, before any sync
    dummy = engine.generate_sequences(prompts)
    engine.sleep()

    out, manager = _generate(engine, actor, prompts)
    hf = _hf(actor, prompts, tokenizer)
    _check_schema(out, prompts, n=1)
    assert set(out.batch.keys()) == set(hf.batch.keys())
    for key in hf.batch.keys():
        assert out.batch[key].dtype == hf.batch[key].dtype, key
        assert torch.equal(out.batch[key], hf.batch[key]), f"{key} differs from the HF rollout"
    assert set(out.non_tensor_batch) == set(hf.non_tensor_batch)
    assert not torch.equal(dummy.batch["responses"], out.batch["responses"])  # the sync replaced dummy weights
    assert out.batch["response_mask"].sum(-1).min() > 0
    assert actor.training  # mode restored
    assert engine.is_sleeping  # free_cache_engine: asleep again after the manager

    metrics = manager.metrics
    for key in ("perf/weight_sync_s", "perf/weight_sync_gb", "perf/weight_sync_buckets",
                "perf/weight_sync_max_bucket_mb", "perf/weight_sync_peak_memory_gb",
                "perf/weight_sync_peak_memory_delta_gb"):
        assert key in metrics, key
    state_bytes = sum(v.numel() * v.element_size() for v in actor.state_dict().values())
    assert metrics["perf/weight_sync_gb"] == pytest.approx(state_bytes / 2**30)
    assert metrics["perf/weight_sync_buckets"] == len(manager.last_buckets) > 2
    largest_tensor = max(v.numel() * v.element_size() for v in actor.state_dict().values())
    assert all(size <= max(BUCKET, largest_tensor) for _, size in manager.last_buckets)


def test_synced_engine_follows_actor_updates(engine, actor, tiny):
    tokenizer = tiny[1]
    prompts = _prompts(tokenizer, do_sample=False)
    before, _ = _generate(engine, actor, prompts)

    updated = copy.deepcopy(actor)
    optimizer = torch.optim.AdamW(updated.parameters(), lr=1e-2)
    target = torch.cat([prompts.batch["input_ids"], before.batch["responses"]], -1)
    for _ in range(3):  # push the model away from its own greedy continuation
        loss = -updated(input_ids=target, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after, _ = _generate(engine, updated, prompts, bucket=64 << 20)  # one bucket this time
    expected = _hf(updated, prompts, tokenizer)
    assert torch.equal(after.batch["responses"], expected.batch["responses"])
    assert torch.equal(after.batch["response_mask"], expected.batch["response_mask"])
    assert not torch.equal(after.batch["responses"], before.batch["responses"])

    # and back: syncing the original actor restores its output (no state left over from the update)
    again, _ = _generate(engine, actor, prompts)
    assert torch.equal(again.batch["responses"], before.batch["responses"])


def test_n_samples_are_distinct_and_grouped_by_uid(engine, actor, tiny):
    tokenizer = tiny[1]
    n = 4
    out, _ = _generate(engine, actor, _prompts(tokenizer, n=n))
    _check_schema(out, _prompts(tokenizer), n=n)

    # the trainer's way: prompts repeated n times (interleaved), one sample each
    repeated = _prompts(tokenizer).repeat(repeat_times=n, interleave=True)
    out_repeated, _ = _generate(engine, actor, repeated)
    _check_schema(out_repeated, repeated, n=1)

    for result in (out, out_repeated):
        responses = result.batch["responses"]
        uids = result.non_tensor_batch["uid"]
        for g in range(len(TEXTS)):
            rows = range(g * n, (g + 1) * n)
            assert len({uids[i] for i in rows}) == 1
            samples = {tuple(responses[i].tolist()) for i in rows}
            assert len(samples) == n, f"group {g}: only {len(samples)} distinct samples out of {n}"


@pytest.mark.parametrize("mode", ["sampled_t0.7", "greedy"])
def test_rollout_log_probs_match_actor_recomputation(engine, actor, tiny, mode):
    tokenizer = tiny[1]
    temperature = 0.7 if mode.startswith("sampled") else 1.0  # greedy log-probs are taken at temperature 1
    meta = {"calculate_log_probs": True}
    meta.update({"temperature": 0.7} if mode.startswith("sampled") else {"do_sample": False})
    out, _ = _generate(engine, actor, _prompts(tokenizer, **meta))
    assert "rollout_log_probs" in out.batch.keys()

    actor_config = OmegaConf.create({
        "ppo_mini_batch_size": 8,
        "ppo_micro_batch_size_per_gpu": 8,
        "use_dynamic_bsz": False
    })
    out.meta_info.update(temperature=temperature, micro_batch_size=8)
    recomputed, _ = DataParallelPPOActor(actor_config, actor).compute_log_prob(out)
    mask = out.batch["response_mask"].bool()
    rollout_lp = out.batch["rollout_log_probs"]
    diff = (rollout_lp - recomputed).abs()[mask]
    assert diff.max().item() < LOG_PROB_ATOL, f"max |rollout - actor| log-prob = {diff.max().item():.2e}"
    assert rollout_lp[~mask].eq(0).all()
    assert rollout_lp[mask].lt(0).all()
    if mode == "greedy":  # the greedy token is the most likely one: its log-prob is the row's maximum
        assert (rollout_lp[mask] > -np.log(640)).all()


def test_custom_eos_stops_generation(engine, actor, tiny):
    tokenizer = tiny[1]
    greedy, _ = _generate(engine, actor, _prompts(tokenizer, do_sample=False))
    token = int(greedy.batch["responses"][0, 3])  # a token row 0 generates at position 3
    out, _ = _generate(engine, actor, _prompts(tokenizer, do_sample=False, eos_token_id=token))
    responses, mask = out.batch["responses"], out.batch["response_mask"]
    first = int((greedy.batch["responses"][0] == token).nonzero()[0])
    assert int(mask[0].sum()) == first + 1 and int(responses[0, first]) == token  # EOS included, then padding
    for i in range(len(TEXTS)):
        valid = responses[i][mask[i].bool()].tolist()
        assert token not in valid[:-1]  # generation stopped at the first EOS of every row
        if len(valid) < R:
            assert valid[-1] == token


def test_generation_leaves_the_callers_random_state_alone(engine, actor, tiny):
    prompts = _prompts(tiny[1])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, _ = _generate(engine, actor, prompts)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = _generate(engine, actor, prompts)
    assert not torch.equal(first.batch["responses"], second.batch["responses"])  # the rollout's own stream moves on


def test_engine_sleeps_outside_the_sharding_manager(engine, actor, tiny):
    FSDPVLLMShardingManager(actor, engine)
    assert engine.is_sleeping
    with pytest.raises(RuntimeError, match="sharding manager"):
        engine.generate_sequences(_prompts(tiny[1]))


def test_tensor_parallel_size_must_divide_the_world_before_the_engine_starts(tiny):
    path, tokenizer = tiny
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2 must divide the number of worker processes"):
        vLLMRollout(path, _config(tensor_model_parallel_size=2), tokenizer=tokenizer)


def test_sampling_parameters_map_to_vllm(engine, monkeypatch):
    from vllm import SamplingParams

    monkeypatch.setattr(engine, "config", OmegaConf.create(_config(top_k=5, top_p=0.9, repetition_penalty=1.2)))
    sampled = engine.sampling_params(engine.sampling_settings({"eos_token_id": [2, 0], "n": 3}))
    assert isinstance(sampled, SamplingParams)
    assert (sampled.n, sampled.temperature, sampled.top_p, sampled.top_k) == (3, 1.0, 0.9, 5)
    assert sampled.max_tokens == R and sampled.logprobs is None and sampled.detokenize is False
    assert sampled.ignore_eos and sorted(sampled.stop_token_ids) == [0, 2]  # only the given EOS ids stop
    assert sampled.repetition_penalty == 1.2  # other SamplingParams-named config keys pass through
    greedy = engine.sampling_params(engine.sampling_settings({"validate": True, "calculate_log_probs": True}))
    assert greedy.temperature == 0.0 and greedy.logprobs == 0 and greedy.n == 1

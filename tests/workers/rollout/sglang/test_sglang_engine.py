"""SGLangRollout on SGLang's offline ``Engine`` (real SGLang, CPU, float32) with the tiny Qwen2 model; one engine
for the module, started from dummy weights as in the hybrid engine:

* after a sync through ``FSDPSGLangShardingManager`` (``update_weights_from_tensor`` in several buckets), greedy
  generation equals the HF rollout's, tensor for tensor (and ``val_kwargs`` validation is greedy too);
* after the actor's weights change, the synced engine generates what the updated HF model generates, via the
  ``tensor``, ``disk`` and ``distributed`` (gloo) weight-update paths;
* sampled ``rollout_log_probs`` equal the HF model's ``log_softmax(logits / T)`` of the sampled tokens; ``n`` samples
  per row keep the non-tensor columns and ``uid`` groups;
* ``max_new_tokens`` is clamped per request to the context; unsupported sampling parameters are config errors.

``release_memory_occupation`` is not exercised: SGLang calls ``torch.cuda.synchronize()`` there, which fails on a
CPU-only machine, so the adapters call it on GPU only (the sharding manager still goes through its enter/exit path).
"""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "SGLang is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

import torch  # noqa: E402

from verl.utils.config import ConfigError  # noqa: E402
from verl.workers.rollout import ROLLOUT_OUTPUT_KEYS  # noqa: E402
from verl.workers.rollout.sglang_rollout import SGLangRollout  # noqa: E402
from verl.workers.rollout.sglang_rollout.sampling import SGLANG_SAMPLING_PARAMS  # noqa: E402
from verl.workers.sharding_manager.fsdp_sglang import FSDPSGLangShardingManager  # noqa: E402

BUCKET = 1 << 20  # bytes: several buckets for the ~4.3 MB tiny model


@pytest.fixture(scope="module")
def actor(load_hf):
    return load_hf()


@pytest.fixture(scope="module")
def rollout(tiny_path, rollout_config, tokenizer):
    r = SGLangRollout(tiny_path, rollout_config(), tokenizer=tokenizer, load_format="dummy")
    yield r
    r.shutdown()


def _manager(actor, rollout, **kw):
    return FSDPSGLangShardingManager(actor, rollout.engine, bucket_bytes=BUCKET, **kw)


def _assert_same_output(out, ref, keys=ROLLOUT_OUTPUT_KEYS):
    for key in keys:
        assert torch.equal(out.batch[key], ref.batch[key]), f"{key} differs:\n{out.batch[key]}\n{ref.batch[key]}"
    for key, value in ref.non_tensor_batch.items():
        assert list(out.non_tensor_batch[key]) == list(value)


def test_greedy_after_sync_equals_hf_rollout(actor, rollout, make_prompts, hf_generate):
    prompts = make_prompts(do_sample=False)
    manager = _manager(actor, rollout)
    with manager:
        out = rollout.generate_sequences(prompts)
    metrics = manager.metrics
    assert metrics["perf/weight_sync_buckets"] > 1 and manager.timing["weight_sync"] > 0
    assert metrics["perf/weight_sync_max_bucket_mb"] <= 1.0 + 1e-6 or len(manager.last_buckets[0]) == 1
    assert abs(metrics["perf/weight_sync_gb"] * (1 << 30) - sum(b for _, b in manager.last_buckets)) < 1
    assert metrics["perf/weight_sync_peak_memory_gb"] > 0
    ref = hf_generate(actor, prompts)
    _assert_same_output(out, ref)
    assert out.batch["response_mask"].sum() > len(prompts)  # real responses, not just EOS
    val = rollout.generate_sequences(make_prompts(validate=True))  # val_kwargs: greedy
    assert torch.equal(val.batch["responses"], ref.batch["responses"])


@pytest.mark.parametrize("mode,seed", [("tensor", 1), ("disk", 2), ("distributed", 3)])
def test_engine_follows_actor_updates(actor, rollout, make_prompts, hf_generate, perturb, tmp_path, mode, seed):
    prompts = make_prompts(do_sample=False)
    before = hf_generate(actor, prompts)
    perturb(actor, seed)
    ref = hf_generate(actor, prompts)
    assert not torch.equal(ref.batch["responses"], before.batch["responses"])  # the update matters
    with _manager(actor, rollout, weight_sync=mode, sync_dir=str(tmp_path / "weights"), model_path=rollout.model_path):
        after = rollout.generate_sequences(prompts)
    _assert_same_output(after, ref)


def test_sampled_log_probs_and_n(actor, rollout, make_prompts):
    prompts = make_prompts(calculate_log_probs=True, temperature=0.7, n=2)
    with _manager(actor, rollout):
        out = rollout.generate_sequences(prompts)
    b = len(prompts)
    assert len(out) == 2 * b
    assert list(out.non_tensor_batch["uid"]) == [f"u{i}" for i in range(b) for _ in range(2)]
    assert torch.equal(out.batch["prompts"][::2], prompts.batch["input_ids"])
    mask = out.batch["response_mask"].bool()
    assert not torch.equal(out.batch["responses"][0::2], out.batch["responses"][1::2])  # samples differ
    lp = out.batch["rollout_log_probs"]
    assert torch.all(lp[~mask] == 0)
    with torch.no_grad():  # teacher-forced HF forward at the sampling temperature
        logits = actor(input_ids=out.batch["input_ids"],
                       attention_mask=out.batch["attention_mask"],
                       position_ids=out.batch["position_ids"]).logits
    p = out.batch["prompts"].shape[1]
    logp = torch.log_softmax(logits[:, p - 1:-1].float() / 0.7, dim=-1)
    expected = logp.gather(-1, out.batch["responses"].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp[mask], expected[mask], atol=1e-3), (lp[mask] - expected[mask]).abs().max()


def test_max_new_tokens_is_clamped_per_request(rollout, make_prompts, tokenizer):
    # the engine's context is rollout.max_model_len = 64 tokens: a 56-token prompt leaves room for 8 (SGLang would
    # refuse the request with max_new_tokens=16); SGLang accepts prompts of up to 57 tokens
    long_text = " ".join(["7"] * 200)
    assert rollout.context_length == 64 and rollout.max_input_length == 57
    prompts = make_prompts([long_text, "hello"], prompt_length=56, do_sample=False, response_length=16)
    assert int(prompts.batch["attention_mask"][0].sum()) == 56
    out = rollout.generate_sequences(prompts)
    lengths = (out.batch["responses"] != tokenizer.pad_token_id).sum(-1)
    assert 1 <= int(lengths[0]) <= 8 and int(out.batch["response_mask"][0].sum()) <= 8
    assert out.batch["responses"].shape == (2, 16)
    with pytest.raises(ConfigError, match=r"prompt of 60 tokens .*57 tokens.*Fix: lower data\.max_prompt_length"):
        rollout.generate_sequences(make_prompts([long_text], prompt_length=60, do_sample=False))


def test_unsupported_sampling_parameter_is_a_config_error(tiny_path, rollout, rollout_config, make_prompts):
    bad = SGLangRollout(tiny_path, rollout_config(include_stop_str_in_output=True), engine=rollout.engine)
    with pytest.raises(ConfigError, match=r"rollout\.include_stop_str_in_output: not supported by the SGLang rollout"):
        bad.generate_sequences(make_prompts())


def test_static_parameter_list_matches_installed_sglang():
    import msgspec
    from sglang.srt.sampling.sampling_params import SamplingParams

    fields = {f.name for f in msgspec.structs.fields(SamplingParams)}
    assert SGLANG_SAMPLING_PARAMS <= fields, sorted(SGLANG_SAMPLING_PARAMS - fields)

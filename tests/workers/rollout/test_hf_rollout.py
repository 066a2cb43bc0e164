"""HFRollout on small Qwen2 models (CPU): the output schema for n=1 and n=3, EOS handling, greedy validation equal to
a plain ``generate``, seeded sampling, ``rollout_log_probs`` equal to a teacher-forced forward pass, micro-batching,
and the tiny model fed by RLHFDataset."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config

from verl.protocol import DataProto
from verl.utils.torch_functional import compute_position_id_with_mask, get_response_mask, logprobs_from_logits
from verl.workers.rollout import ROLLOUT_OUTPUT_KEYS
from verl.workers.rollout.hf import HFRollout

VOCAB, PAD, R = 200, 0, 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are fastest on one thread (and spinning OpenMP threads crawl on a loaded CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB,
                         hidden_size=64,
                         intermediate_size=128,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _prompts(batch=4, length=7, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, :i % 4] = 0  # left padding of 0..3 tokens
    ids = ids.masked_fill(mask == 0, PAD)
    meta = {"eos_token_id": 1, "pad_token_id": PAD, **meta}
    return DataProto.from_dict(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": compute_position_id_with_mask(mask)
        },
        non_tensors={
            "uid": np.array([f"u{i}" for i in range(batch)], dtype=object),
            "reward_model": np.array([{
                "ground_truth": str(i)
            } for i in range(batch)], dtype=object)
        },
        meta_info=meta)


def _config(**kw):
    cfg = {
        "response_length": R,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "seed": 0,
        "val_kwargs": {
            "temperature": 0,
            "top_p": 1.0,
            "top_k": -1,
            "n": 1,
            "do_sample": False
        }
    }
    cfg.update(kw)
    return cfg


def _plain_greedy(model, prompts, eos):
    b = prompts.batch
    out = model.generate(input_ids=b["input_ids"],
                         attention_mask=b["attention_mask"],
                         do_sample=False,
                         max_new_tokens=R,
                         eos_token_id=eos,
                         pad_token_id=PAD)
    return out[:, b["input_ids"].shape[1]:]


def _check_schema(out, prompts, n):
    b, p = out.batch, prompts.batch
    P = p["input_ids"].shape[1]
    assert set(ROLLOUT_OUTPUT_KEYS) <= set(b.keys())
    assert len(out) == len(prompts) * n
    assert b["responses"].shape == (len(out), R) and b["input_ids"].shape == (len(out), P + R)
    for key in ROLLOUT_OUTPUT_KEYS:
        assert b[key].dtype == torch.long, key
    assert torch.equal(b["prompts"], p["input_ids"].repeat_interleave(n, 0))
    assert torch.equal(b["input_ids"], torch.cat([b["prompts"], b["responses"]], -1))
    assert torch.equal(b["attention_mask"][:, :P], p["attention_mask"].repeat_interleave(n, 0))
    assert torch.equal(b["attention_mask"][:, P:], b["response_mask"])
    last = p["position_ids"][:, -1:].repeat_interleave(n, 0)
    assert torch.equal(b["position_ids"][:, P:], last + torch.arange(1, R + 1))
    expected_mask = get_response_mask(b["responses"], prompts.meta_info["eos_token_id"])
    assert torch.equal(b["response_mask"], expected_mask)
    assert b["responses"].masked_select(b["response_mask"] == 0).eq(PAD).all()  # right-padded after EOS
    assert out.non_tensor_batch["uid"].tolist() == [u for u in prompts.non_tensor_batch["uid"] for _ in range(n)]


@torch.no_grad()
def test_greedy_validation_is_deterministic_and_equals_plain_generate(model):
    prompts = _prompts(validate=True)
    rollout = HFRollout(model, OmegaConf.create(_config()))  # the worker passes the rollout DictConfig node
    first = rollout.generate_sequences(prompts)
    second = rollout.generate_sequences(prompts)
    _check_schema(first, prompts, n=1)
    assert torch.equal(first.batch["responses"], second.batch["responses"])
    assert torch.equal(first.batch["responses"], _plain_greedy(model, prompts, eos=1))
    # the training path samples (temperature 1) instead
    sampled = rollout.generate_sequences(_prompts())
    assert not torch.equal(sampled.batch["responses"], first.batch["responses"])


@torch.no_grad()
def test_eos_stops_and_masks_each_row(model):
    greedy = _plain_greedy(model, _prompts(), eos=None)  # no EOS: the full greedy continuation
    eos = int(greedy[0, 2])
    prompts = _prompts(do_sample=False, eos_token_id=eos)
    out = HFRollout(model, _config()).generate_sequences(prompts)
    _check_schema(out, prompts, n=1)
    mask = get_response_mask(greedy, eos)
    assert out.batch["response_mask"][0, :3].eq(1).all() and out.batch["response_mask"][0].sum() <= 3
    assert torch.equal(out.batch["response_mask"], mask)
    assert torch.equal(out.batch["responses"], greedy.masked_fill(mask == 0, PAD))


@torch.no_grad()
def test_n3_samples_are_grouped_and_non_tensors_interleaved(model):
    prompts = _prompts(batch=3, n=3)
    out = HFRollout(model, _config(temperature=1.2)).generate_sequences(prompts)
    _check_schema(out, prompts, n=3)
    assert [d["ground_truth"] for d in out.non_tensor_batch["reward_model"]] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    groups = out.batch["responses"].view(3, 3, R)
    assert all(len({tuple(r.tolist()) for r in g}) > 1 for g in groups)  # samples of one prompt differ


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model):
    prompts = _prompts(temperature=0.9)
    a = HFRollout(model, _config(seed=3))
    b = HFRollout(model, _config(seed=3))
    state = torch.get_rng_state()
    a1 = a.generate_sequences(prompts).batch["responses"]
    assert torch.equal(torch.get_rng_state(), state)
    a2 = a.generate_sequences(prompts).batch["responses"]
    b1 = b.generate_sequences(prompts).batch["responses"]
    b2 = b.generate_sequences(prompts).batch["responses"]
    c1 = HFRollout(model, _config(seed=4)).generate_sequences(prompts).batch["responses"]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # the stream advances between calls
    assert not torch.equal(a1, c1)


@pytest.mark.parametrize("do_sample", [True, False])
def test_rollout_log_probs_equal_teacher_forced_forward(model, do_sample):
    temperature = 0.7
    prompts = _prompts(batch=5, do_sample=do_sample, temperature=temperature)
    rollout = HFRollout(model, _config(calculate_log_probs=True, top_k=20, top_p=0.9, micro_batch_size=2))
    out = rollout.generate_sequences(prompts)
    b = out.batch
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
    P = prompts.batch["input_ids"].shape[1]
    t = temperature if do_sample else 1.0
    expected = logprobs_from_logits(logits[:, P - 1:-1] / t, b["responses"]) * b["response_mask"]
    assert b["rollout_log_probs"].dtype == torch.float32
    assert b["rollout_log_probs"].masked_select(b["response_mask"] == 0).eq(0).all()
    torch.testing.assert_close(b["rollout_log_probs"], expected, atol=2e-4, rtol=1e-4)
    assert (b["rollout_log_probs"] < 0).any()


@torch.no_grad()
def test_micro_batching_gives_the_same_greedy_output(model):
    prompts = _prompts(batch=5, do_sample=False)
    whole = HFRollout(model, _config()).generate_sequences(prompts)
    micro = HFRollout(model, _config(micro_batch_size=2)).generate_sequences(prompts)
    assert torch.equal(whole.batch["responses"], micro.batch["responses"])
    assert torch.equal(whole.batch["attention_mask"], micro.batch["attention_mask"])


def _left_pad(prompts, extra):
    """The same prompts with ``extra`` more columns of left padding (a larger data.max_prompt_length)."""
    b = prompts.batch
    wide = {
        key: torch.nn.functional.pad(b[key], (extra, 0), value=PAD if key == "input_ids" else 0)
        for key in ("input_ids", "attention_mask", "position_ids")
    }
    return DataProto.from_dict(wide, non_tensors=dict(prompts.non_tensor_batch), meta_info=dict(prompts.meta_info))


@pytest.mark.parametrize("do_sample", [True, False])
def test_padding_columns_of_every_row_are_not_generated_over(model, do_sample, monkeypatch):
    """Left padding shared by all rows is dropped before ``generate`` (it only costs KV-cache and attention work):
    the samples, log-probs and the returned prompt columns are those of the padded input."""
    prompts = _prompts(batch=4, do_sample=do_sample, temperature=0.8)
    padded = _left_pad(prompts, 20)
    widths = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    cfg = _config(calculate_log_probs=True, seed=3)
    narrow_out = HFRollout(model, cfg).generate_sequences(prompts)
    wide_out = HFRollout(model, cfg).generate_sequences(padded)
    assert widths == [7, 7]  # the 20 shared padding columns never reach generate
    assert torch.equal(narrow_out.batch["responses"], wide_out.batch["responses"])
    torch.testing.assert_close(narrow_out.batch["rollout_log_probs"], wide_out.batch["rollout_log_probs"])
    assert torch.equal(wide_out.batch["prompts"], padded.batch["input_ids"])
    assert wide_out.batch["input_ids"].shape[1] == 27 + R


def test_train_mode_restored_and_no_gradients(model):
    model.train()
    try:
        HFRollout(model, _config()).generate_sequences(_prompts(batch=2))
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_bad_inputs_are_reported(model):
    with pytest.raises(ValueError, match="lacks \\['input_ids'\\]"):
        HFRollout(model, _config()).generate_sequences(
            DataProto.from_dict({"attention_mask": torch.ones(2, 3, dtype=torch.long)}))
    with pytest.raises(ValueError, match="response_length"):
        HFRollout(model, {"do_sample": False}).generate_sequences(_prompts(batch=2))
    with pytest.raises(TypeError, match="AutoModelForCausalLM"):
        HFRollout(torch.nn.Linear(2, 2), _config())


def test_tiny_model_with_rlhf_dataset(tmp_path):
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from verl.models.tiny import get_tiny_model_path
    from verl.utils.dataset import RLHFDataset, collate_fn
    from verl.utils.dataset.tasks import write_arithmetic_task

    path = get_tiny_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    module = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    files = write_arithmetic_task(str(tmp_path / "arith"), train_size=4, test_size=2)
    dataset = RLHFDataset(files["train"], tokenizer, {"max_prompt_length": 64})
    batch = DataProto.from_single_dict(next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_fn))))
    batch.meta_info.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, n=2)
    out = HFRollout(module, _config(response_length=R), tokenizer=tokenizer).generate_sequences(batch)
    assert len(out) == 8 and out.batch["responses"].shape == (8, R)
    assert out.batch["responses"].lt(module.config.vocab_size).all()
    assert out.non_tensor_batch["raw_prompt_ids"][0] == out.non_tensor_batch["raw_prompt_ids"][1]
    texts = tokenizer.batch_decode(out.batch["responses"], skip_special_tokens=True)
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)

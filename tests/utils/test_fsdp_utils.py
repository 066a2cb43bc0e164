"""FSDP2 helpers on 2 CPU ranks (gloo): meta-init + broadcast load equals the plain model, full parameters come back
in bounded buckets, gradient clipping sees the global norm (full shard and HSDP), non-finite norms are reported,
mixed precision computes in bf16 over fp32 shards, and dynamic micro-batching agrees on a count across ranks."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import AutoModelForCausalLM, Qwen2Config

from verl.utils.fsdp_utils import (apply_fsdp2, apply_liger_kernel, clip_grad_norm_, create_device_mesh,
                                   fsdp2_load_full_state_dict, fsdp_version, get_full_state_dict,
                                   get_init_weight_context_manager, get_mixed_precision_policy,
                                   iter_full_params_in_buckets, load_fsdp_model_to_gpu, load_fsdp_optimizer,
                                   offload_fsdp_model_to_cpu, offload_fsdp_optimizer, to_torch_dtype,
                                   uses_cpu_offload_policy)
from verl.utils.seqlen_balancing import rearrange_micro_batches

WORLD = 2


def _config():
    return Qwen2Config(vocab_size=200,
                       hidden_size=64,
                       intermediate_size=128,
                       num_hidden_layers=2,
                       num_attention_heads=4,
                       num_key_value_heads=2,
                       max_position_embeddings=128)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["VERL_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _sharded_copy(reference, rank, mesh, **kwargs):
    """The reference model rebuilt the way a worker does: meta tensors off rank 0, FSDP2, broadcast load."""
    with get_init_weight_context_manager(use_meta_tensor=True, rank=rank):
        model = AutoModelForCausalLM.from_config(reference.config, attn_implementation="sdpa")
    if rank != 0:
        assert all(p.is_meta for p in model.parameters())
    apply_fsdp2(model, mesh, **kwargs)
    fsdp2_load_full_state_dict(model, reference.state_dict() if rank == 0 else None)
    return model


def _fsdp_worker(rank, port):
    _init(rank, port)
    try:
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa")
        full_sd = {k: v.clone() for k, v in reference.state_dict().items()}
        mesh = create_device_mesh(WORLD, -1)
        assert mesh.mesh_dim_names == ("fsdp",) and mesh.size() == WORLD
        model = _sharded_copy(reference, rank, mesh)
        assert fsdp_version(model) == 2 and fsdp_version(reference) == 0

        ids = torch.randint(0, 200, (3, 10), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

        # tied embeddings: a state dict without the tied copy loads; one that does not fit is refused on every rank
        tied_cfg = _config()
        tied_cfg.tie_word_embeddings = True
        torch.manual_seed(2)
        tied_ref = AutoModelForCausalLM.from_config(tied_cfg, attn_implementation="sdpa")
        with get_init_weight_context_manager(use_meta_tensor=True, rank=rank):
            tied = AutoModelForCausalLM.from_config(tied_cfg, attn_implementation="sdpa")
        apply_fsdp2(tied, mesh)
        partial = {k: v for k, v in tied_ref.state_dict().items() if k != "lm_head.weight"}
        fsdp2_load_full_state_dict(tied, partial if rank == 0 else None)
        torch.testing.assert_close(tied(ids).logits, tied_ref(ids).logits, atol=1e-5, rtol=1e-5)
        # the rollout sync sends the tied embedding once (engines tie lm_head themselves)
        tied_sent = dict(
            b for bucket in iter_full_params_in_buckets(tied, bucket_bytes=20_000, skip_tied=True) for b in bucket)
        assert set(tied_sent) == set(partial), sorted(set(tied_sent) ^ set(partial))
        for name, tensor in tied_sent.items():
            assert torch.equal(tensor, partial[name]), name
        assert "lm_head.weight" in [n for bucket in iter_full_params_in_buckets(tied) for n, _ in bucket]
        bad = dict(full_sd, **{"model.norm.weight": torch.ones(3)})
        with pytest.raises(ValueError, match="does not fit"):
            fsdp2_load_full_state_dict(apply_fsdp2(AutoModelForCausalLM.from_config(_config()), mesh),
                                       bad if rank == 0 else None)

        # full parameters in bounded buckets, in state-dict order, bit-exact
        budget = 20_000
        buckets = list(iter_full_params_in_buckets(model, bucket_bytes=budget))
        names = [name for bucket in buckets for name, _ in bucket]
        assert names == list(full_sd)
        for bucket in buckets:
            nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
            assert len(bucket) == 1 or nbytes <= budget
        for bucket in buckets:
            for name, tensor in bucket:
                assert torch.equal(tensor, full_sd[name]), name
        bf16 = get_full_state_dict(model, dtype=torch.bfloat16, rank0_only=True)
        assert (len(bf16) == len(full_sd)) if rank == 0 else bf16 == {}
        if rank == 0:
            assert all(v.dtype == torch.bfloat16 for v in bf16.values())

        # gradient norm over shards equals the unsharded norm (same data on both ranks -> averaged grads equal)
        model(ids).logits.pow(2).mean().backward()
        reference(ids).logits.pow(2).mean().backward()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        norm = clip_grad_norm_(model.parameters(), max_norm=None)
        torch.testing.assert_close(norm, ref_norm, atol=1e-6, rtol=1e-5)
        inf_norm = clip_grad_norm_(model.parameters(), max_norm=None, norm_type=math.inf)
        ref_inf = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()], norm_type=math.inf)
        torch.testing.assert_close(inf_norm, ref_inf)
        clip_grad_norm_(model.parameters(), max_norm=float(ref_norm) / 2)
        torch.testing.assert_close(clip_grad_norm_(model.parameters(), max_norm=None), ref_norm / 2, rtol=1e-4, atol=0)

        # a non-finite gradient on one rank gives a non-finite norm on every rank, and nothing is scaled
        before = [p.grad.to_local().clone() for p in model.parameters()]
        if rank == 1:
            next(model.parameters()).grad.to_local()[0] = float("inf")
        bad = clip_grad_norm_(model.parameters(), max_norm=1e-3)
        assert not torch.isfinite(bad)
        for b, p in zip(before[1:], list(model.parameters())[1:]):
            assert torch.equal(b, p.grad.to_local())

        # HSDP: replicate over 2 groups of 1 shard; same norm and forward
        hsdp_mesh = create_device_mesh(WORLD, 1)
        assert hsdp_mesh.mesh_dim_names == ("ddp", "fsdp") and tuple(hsdp_mesh.shape) == (2, 1)
        hsdp = _sharded_copy(reference, rank, hsdp_mesh)
        hsdp(ids).logits.pow(2).mean().backward()
        torch.testing.assert_close(clip_grad_norm_(hsdp.parameters(), max_norm=None), ref_norm, atol=1e-6, rtol=1e-5)

        # mixed precision: bf16 compute over fp32 shards
        assert to_torch_dtype("bf16") is torch.bfloat16 and get_mixed_precision_policy().param_dtype is torch.float32
        mixed = _sharded_copy(reference, rank, mesh, mp_policy=get_mixed_precision_policy(param_dtype="bf16"))
        assert all(p.dtype == torch.float32 for p in mixed.parameters())
        out = mixed(ids).logits
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(ids).logits, atol=0.05, rtol=0.05)

        # CPUOffloadPolicy (host-resident shards) is detected, and meta-init + load works under it
        assert not uses_cpu_offload_policy(model)
        offloaded = _sharded_copy(reference, rank, mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
        assert uses_cpu_offload_policy(offloaded)
        torch.testing.assert_close(offloaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

        # offload helpers are no-ops on CPU and keep state intact
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.zero_grad()
        model(ids).logits.mean().backward()
        optim.step()
        offload_fsdp_model_to_cpu(model)
        offload_fsdp_optimizer(optim)
        load_fsdp_model_to_gpu(model)
        load_fsdp_optimizer(optim)
        assert all(p.device.type == "cpu" for p in model.parameters())

        # dynamic micro-batches: the rank with longer sequences decides the count for both
        lengths = [30, 30, 30, 30] if rank == 0 else [2, 2, 2, 2]
        mask = torch.zeros(4, 32, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        micro, _ = rearrange_micro_batches(TensorDict({"attention_mask": mask}, batch_size=[4]), max_token_len=64)
        assert len(micro) == 2, len(micro)
    finally:
        dist.destroy_process_group()


def test_fsdp2_utils_two_ranks():
    mp.spawn(_fsdp_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_mesh_and_dtype_errors():
    with pytest.raises(ValueError, match="fsdp_size=3 must divide"):
        create_device_mesh(4, 3)
    with pytest.raises(ValueError, match="mixed_precision"):
        to_torch_dtype("int8")
    assert to_torch_dtype(None, torch.float16) is torch.float16


def test_liger_errors_are_clear():
    """use_liger on CPU says that it needs CUDA (liger-kernel installs on CPU, but its Triton kernels fail at the first
    forward with "0 active drivers"); on CUDA without the package, that it must be installed."""
    from verl.utils.device import is_cuda_available

    if not is_cuda_available():
        with pytest.raises(RuntimeError, match="use_liger=True needs a CUDA GPU"):
            apply_liger_kernel(torch.nn.Linear(2, 2))
        return
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="use_liger"):
            apply_liger_kernel(torch.nn.Linear(2, 2))
        return
    pytest.skip("liger-kernel is installed on CUDA: test_liger_log_probs_equal_plain_on_cuda covers it")


def _liger_available() -> bool:
    from verl.utils.device import is_cuda_available

    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return is_cuda_available()


@pytest.mark.skipif(not _liger_available(), reason="needs CUDA and liger-kernel")
def test_liger_log_probs_equal_plain_on_cuda():
    """The actor's log-probs and entropies with liger's kernels equal the plain model's (fp32, atol 1e-4)."""
    from omegaconf import OmegaConf

    from verl.protocol import DataProto
    from verl.workers.actor import DataParallelPPOActor

    def model():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa").cuda()

    plain, liger = model(), model()
    apply_liger_kernel(liger)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 200, (4, 12), generator=g)
    attention_mask = torch.ones(4, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    attention_mask[1, -2:] = 0
    data = DataProto.from_dict(tensors={
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
        "responses": input_ids[:, -5:],
    },
                               meta_info={"micro_batch_size": 2})
    for rmpad in (False, True):
        config = OmegaConf.create({"use_remove_padding": rmpad})
        expected = DataParallelPPOActor(config, plain).compute_log_prob(data, calculate_entropy=True)
        got = DataParallelPPOActor(config, liger).compute_log_prob(data, calculate_entropy=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

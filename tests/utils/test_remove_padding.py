"""Remove-padding helpers: unpad/pad round trip, and the packed forward gives the padded forward's outputs (and
gradients) for causal-LM and value models, with every way of separating packed rows."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, Qwen2Config

from verl.utils.fsdp_utils import enable_gradient_checkpointing
from verl.utils.remove_padding import (has_varlen_attention, build_packed_causal_mask, forward_response_positions,
                                       get_unpad_data, index_first_axis, pad_input, packed_mask_mode,
                                       scatter_to_response, unpad_input)

PROMPT, RESPONSE = 7, 6


def _config(**kw):
    return Qwen2Config(vocab_size=200,
                       hidden_size=64,
                       intermediate_size=128,
                       num_hidden_layers=2,
                       num_attention_heads=4,
                       num_key_value_heads=2,
                       max_position_embeddings=128,
                       **kw)


def _batch(seed=0, batch=5):
    """Left-padded prompts + right-padded responses of varied lengths, like a rollout produces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (batch, PROMPT + RESPONSE), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad_left = int(torch.randint(0, PROMPT - 1, (1,), generator=g))
        resp_len = int(torch.randint(1, RESPONSE + 1, (1,), generator=g))
        mask[i, :pad_left] = 0
        mask[i, PROMPT + resp_len:] = 0
    ids = ids * mask  # pad id 0
    pos = torch.clamp(mask.cumsum(-1) - 1, min=0)
    return ids, mask, pos


def test_unpad_pad_roundtrip_and_cu_seqlens():
    _, mask, _ = _batch()
    x = torch.randn(*mask.shape, 3, requires_grad=True)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    assert x_unpad.shape == (int(mask.sum()), 3)
    assert cu_seqlens.tolist() == [0] + mask.sum(-1).cumsum(0).tolist()
    assert max_seqlen == int(mask.sum(-1).max())
    assert seqused.tolist() == mask.sum(-1).tolist()
    back = pad_input(x_unpad, indices, *mask.shape)
    assert torch.equal(back, x * mask[..., None])
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None].float().expand_as(x))
    assert torch.equal(index_first_axis(x.detach().reshape(-1, 3), indices), x_unpad.detach())
    assert get_unpad_data(mask)[0].equal(indices)


def test_packed_mask_is_block_diagonal_causal():
    mask = build_packed_causal_mask(torch.tensor([0, 2, 5]), torch.float32, torch.device("cpu"))[0, 0]
    allowed = (mask == 0).int()
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_padded_causal_lm(attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation=attn)
    ids, mask, pos = _batch()
    assert packed_mask_mode(model) in ("position_ids", "explicit")
    padded, sel_padded = forward_response_positions(model, ids, mask, pos, RESPONSE)
    padded = scatter_to_response(padded, sel_padded)
    for packed_mask in (None, "explicit"):
        logits, sel = forward_response_positions(model,
                                                 ids,
                                                 mask,
                                                 pos,
                                                 RESPONSE,
                                                 use_remove_padding=True,
                                                 packed_mask=packed_mask)
        assert logits.shape == (int(sel.sum()), 200)
        # a position is computed iff it is a real token (it then predicts response token j)
        assert torch.equal(sel, mask[:, PROMPT - 1:-1].bool())
        torch.testing.assert_close(scatter_to_response(logits, sel)[sel], padded[sel], atol=1e-5, rtol=1e-5)


def test_packed_forward_gradients_equal_padded():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa")
    ids, mask, pos = _batch(seed=1)
    labels = torch.roll(ids, -1, dims=1)[:, PROMPT - 1:-1]  # any fixed targets
    grads = []
    for rmpad in (False, True):
        model.zero_grad()
        logits, sel = forward_response_positions(model, ids, mask, pos, RESPONSE, use_remove_padding=rmpad)
        logp = torch.log_softmax(logits, -1).gather(-1, labels[sel].unsqueeze(-1)).squeeze(-1)
        valid = mask[:, PROMPT - 1:-1].bool()  # positions that are real tokens in both paths
        scatter_to_response(logp, sel)[valid].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_forward_value_model_and_gradient_checkpointing():
    torch.manual_seed(0)
    # classifier_dropout=0: the default 0.1 dropout of the value head would make two forwards differ
    model = AutoModelForTokenClassification.from_config(_config(num_labels=1, classifier_dropout=0.0),
                                                        attn_implementation="sdpa")
    ids, mask, pos = _batch(seed=2)
    v_pad, sel_pad = forward_response_positions(model, ids, mask, pos, RESPONSE)
    v_pack, sel = forward_response_positions(model, ids, mask, pos, RESPONSE, use_remove_padding=True)
    assert v_pack.shape[-1] == 1
    torch.testing.assert_close(scatter_to_response(v_pack, sel)[sel],
                               scatter_to_response(v_pad, sel_pad)[sel],
                               atol=1e-5,
                               rtol=1e-5)
    # gradient checkpointing recomputes activations but must not change gradients
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model.zero_grad()
        out, _ = forward_response_positions(model, ids, mask, pos, RESPONSE, use_remove_padding=True)
        out.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.model.gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_packed_forward_rejects_positions_not_starting_at_zero():
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa")
    ids, mask, pos = _batch()
    with pytest.raises(ValueError, match="position_ids"):
        forward_response_positions(model, ids, mask, pos + 1, RESPONSE, use_remove_padding=True)


def test_packing_only_with_a_varlen_kernel():
    """SDPA/eager have no varlen kernel: packing would attend through a (total x total) mask, so use_remove_padding
    computes on the padded batch there (same logits, checked above with packed_mask=None); flash-attention packs."""
    sdpa = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa")
    assert not has_varlen_attention(sdpa)
    sdpa.config._attn_implementation = "flash_attention_2"
    assert has_varlen_attention(sdpa)

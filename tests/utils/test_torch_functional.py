"""verl.utils.torch_functional against plain-loop / textbook references on random inputs."""
import math

import pytest
import torch

from verl.utils import torch_functional as F


def _random_mask(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(rows, cols, generator=gen) > 0.3).long()
    mask[:, 0] = 1  # every row has at least one valid position
    return mask


def test_masked_sum_and_mean_match_loops():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = _random_mask(5, 7, gen)
    total, count = 0.0, 0
    row_means = []
    for i in range(5):
        row_total, row_count = 0.0, 0
        for j in range(7):
            if mask[i, j]:
                row_total += values[i, j].item()
                row_count += 1
        total += row_total
        count += row_count
        row_means.append(row_total / row_count)
    assert F.masked_sum(values, mask).item() == pytest.approx(total)
    assert F.masked_mean(values, mask).item() == pytest.approx(total / count)
    torch.testing.assert_close(F.masked_mean(values, mask, axis=-1), torch.tensor(row_means, dtype=torch.float64))


def test_masked_stats_ignore_nan_in_masked_positions_and_empty_mask_gives_zero():
    values = torch.tensor([[1.0, 3.0, float("nan")], [float("inf"), 2.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert F.masked_mean(values, mask).item() == pytest.approx(2.5)
    assert F.masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    torch.testing.assert_close(F.masked_mean(values, mask, axis=-1), torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_var_of_selected(unbiased):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mask = _random_mask(4, 9, gen)
    selected = [values[i, j].item() for i in range(4) for j in range(9) if mask[i, j]]
    mean = sum(selected) / len(selected)
    var = sum((x - mean)**2 for x in selected) / (len(selected) - (1 if unbiased else 0))
    assert F.masked_var(values, mask, unbiased=unbiased).item() == pytest.approx(var)


def test_masked_var_single_element_is_zero_not_nan():
    values = torch.tensor([[5.0, 1.0]])
    mask = torch.tensor([[1, 0]])
    assert F.masked_var(values, mask).item() == 0.0
    assert torch.isfinite(F.masked_whiten(values, mask)).all()


def test_masked_whiten():
    gen = torch.Generator().manual_seed(2)
    values = 3.0 + 2.0 * torch.randn(6, 10, generator=gen, dtype=torch.float64)
    mask = _random_mask(6, 10, gen)
    white = F.masked_whiten(values, mask)
    selected = white[mask.bool()]
    assert selected.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert selected.std().item() == pytest.approx(1.0, abs=1e-6)
    kept = F.masked_whiten(values, mask, shift_mean=False)
    assert kept[mask.bool()].mean().item() == pytest.approx(values[mask.bool()].mean().item())
    assert kept[mask.bool()].std().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_logprobs_from_logits_equals_log_softmax_gather(chunk_size):
    gen = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    got = F.logprobs_from_logits(logits, labels, chunk_size=chunk_size)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    want = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)


def test_logprobs_from_logits_half_precision_computed_in_float32():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 50, generator=gen)
    labels = torch.randint(0, 50, (8,), generator=gen)
    got = F.logprobs_from_logits(logits.bfloat16(), labels, chunk_size=3)
    assert got.dtype == torch.float32
    want = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want)


def test_logprobs_from_logits_chunked_backward_and_entropy_in_one_pass():
    """The chunked autograd function: bf16 logits get a bf16 gradient equal to log_softmax's (computed in float32),
    with weighted upstream gradients and chunks that do not divide the rows; ``return_entropy`` gives the entropy of
    the same pass without a graph; float64 passes gradcheck; an empty batch gives empty results."""
    gen = torch.Generator().manual_seed(6)
    base = 4 * torch.randn(11, 37, generator=gen)
    labels = torch.randint(0, 37, (11,), generator=gen)
    weights = torch.randn(11, generator=gen)
    logits = base.bfloat16().requires_grad_(True)
    got, entropy = F.logprobs_from_logits(logits, labels, chunk_size=4, return_entropy=True)
    assert got.dtype == entropy.dtype == torch.float32 and got.requires_grad and not entropy.requires_grad
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    assert grad_got.dtype == torch.bfloat16
    ref_logits = base.bfloat16().float().requires_grad_(True)
    want = torch.log_softmax(ref_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), ref_logits)
    torch.testing.assert_close(got.detach(), want.detach())
    torch.testing.assert_close(grad_got, grad_want.bfloat16())
    p = torch.softmax(ref_logits.detach(), -1)
    torch.testing.assert_close(entropy, -(p * torch.log(p)).sum(-1))
    small = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    small_labels = torch.randint(0, 7, (5,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: F.logprobs_from_logits(x, small_labels, chunk_size=2), (small,))
    empty, empty_entropy = F.logprobs_from_logits(torch.zeros(0, 7),
                                                  torch.zeros(0, dtype=torch.long),
                                                  return_entropy=True)
    assert empty.shape == empty_entropy.shape == (0,)


def test_logprobs_from_logits_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="trailing vocabulary"):
        F.logprobs_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_entropy_from_logits_equals_minus_p_log_p(chunk_size):
    gen = torch.Generator().manual_seed(5)
    logits = (4 * torch.randn(2, 3, 13, generator=gen, dtype=torch.float64)).requires_grad_(True)
    got = F.entropy_from_logits(logits, chunk_size=chunk_size)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    p = torch.softmax(logits, -1)
    want = -(p * torch.log(p)).sum(-1)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)
    # uniform logits: entropy log(V)
    assert F.entropy_from_logits(torch.zeros(1, 13)).item() == pytest.approx(math.log(13), rel=1e-6)


def test_clip_by_value_with_tensor_bounds():
    x = torch.tensor([-5.0, 0.5, 9.0])
    low = torch.tensor([-1.0, 0.0, 0.0])
    high = torch.tensor([1.0, 1.0, 2.0])
    torch.testing.assert_close(F.clip_by_value(x, low, high), torch.tensor([-1.0, 0.5, 2.0]))
    torch.testing.assert_close(F.clip_by_value(x, -2.0, 3.0), torch.tensor([-2.0, 0.5, 3.0]))


def _ref_response_mask(ids, eos_set):
    out = []
    for row in ids:
        ended, mask_row = False, []
        for tok in row:
            mask_row.append(0 if ended else 1)
            if tok in eos_set:
                ended = True
        out.append(mask_row)
    return out


@pytest.mark.parametrize("eos", [2, [2, 7]])
def test_get_response_mask_matches_loop(eos):
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 10, (20, 9), generator=gen)
    ids[0] = 3  # one row without any EOS
    got = F.get_response_mask(ids, eos_token=eos, dtype=torch.float32)
    assert got.dtype == torch.float32
    eos_set = set(eos) if isinstance(eos, list) else {eos}
    assert got.long().tolist() == _ref_response_mask(ids.tolist(), eos_set)
    assert got[0].eq(1).all()


def test_compute_position_id_with_mask_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    expected = []
    for row in mask.tolist():
        seen, ids = 0, []
        for m in row:
            seen += m
            ids.append(max(seen - 1, 0))
        expected.append(ids)
    assert F.compute_position_id_with_mask(mask).tolist() == expected


def test_padding_helpers():
    padded = F.pad_2d_list_to_length([[1, 2, 3], [4], []], pad_token_id=0)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert F.pad_2d_list_to_length([[1]], pad_token_id=9, max_length=3).tolist() == [[1, 9, 9]]
    x = torch.tensor([[1, 2], [3, 4]])
    assert F.pad_sequence_to_length(x, 4, pad_token_id=0).tolist() == [[1, 2, 0, 0], [3, 4, 0, 0]]
    assert F.pad_sequence_to_length(x, 3, pad_token_id=-1, left_pad=True).tolist() == [[-1, 1, 2], [-1, 3, 4]]
    assert F.pad_sequence_to_length(x, 2, pad_token_id=0) is x

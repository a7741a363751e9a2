"""Dynamic CFG kernel: candidate grid, z-scores, constrained choice, the cond that carries the chosen scale."""
import pytest
import torch

from kernels.dynamic_cfg import as_cond, candidate_scales, choose, clipping_penalty, progress_weights, zscore


def test_grid_zscore_and_weights():
    assert candidate_scales(4.0, [1, 0.5, 1.5, 1]).tolist() == [2.0, 4.0, 6.0]
    z = zscore(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert torch.allclose(z[0], torch.tensor([-1.2247449, 0.0, 1.2247449])) and z[1].eq(0).all()
    assert progress_weights(0.0) == (1.0, pytest.approx(0.3)) and progress_weights(1.0) == (pytest.approx(0.3), 1.0)


def test_choice_is_per_sample_and_respects_the_change_limit():
    scales = torch.tensor([2.0, 4.0, 6.0, 8.0])
    total = torch.tensor([[0.0, 1.0, 0.0, 3.0], [5.0, 0.0, 0.0, 0.0]])
    assert choose(total, scales).tolist() == [8.0, 2.0]
    assert choose(total, scales, torch.tensor([4.0, 6.0]), max_change=2.0).tolist() == [4.0, 4.0]
    # nothing within reach: the candidate nearest to the previous choice
    assert choose(total, scales, torch.tensor([20.0, 20.0]), max_change=1.0).tolist() == [8.0, 8.0]


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 4, 3, 4, 4)])
def test_as_cond_makes_the_standard_combine_use_the_chosen_scale(shape):
    g = torch.Generator().manual_seed(0)
    d_c, d_u = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    chosen, cfg = torch.tensor([3.0, 9.0]), 6.0
    c2 = as_cond(d_c, d_u, chosen, cfg)
    combined = d_u + cfg * (c2 - d_u)
    for b in range(2):
        torch.testing.assert_close(combined[b], d_u[b] + chosen[b] * (d_c[b] - d_u[b]))


def test_clipping_penalty():
    img = torch.zeros(2, 3, 2, 2)
    img[1, 0, 0, 0] = 1.5
    img[1, 1, 0, 0] = -0.5
    assert clipping_penalty(img).tolist() == [0.0, pytest.approx(1.0 / 12)]

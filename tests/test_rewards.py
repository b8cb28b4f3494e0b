import math

import pytest
import torch

from tiltflow.rewards import (
    REWARDS,
    GaussianBump,
    Linear,
    NegSquaredDistance,
    Quadratic,
    check_reward,
    get_reward,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


A = torch.tensor([[2.0, 0.5], [-0.3, 1.0]], dtype=torch.float64)  # not symmetric on purpose
B = torch.tensor([0.4, -1.0], dtype=torch.float64)
P = torch.tensor([1.0, -2.0], dtype=torch.float64)

# (reward, closed-form value, closed-form gradient ∇_x r) for x: (batch, 2) in float64
CASES = {
    "linear": (Linear([1.0, 0.5]), lambda x: x @ torch.tensor([1.0, 0.5], dtype=x.dtype),
               lambda x: torch.tensor([1.0, 0.5], dtype=x.dtype).expand_as(x)),
    # ∇(−½xᵀAx + b·x) = −½(A + Aᵀ)x + b
    "quadratic": (Quadratic(A, B), lambda x: -0.5 * torch.einsum("ni,ij,nj->n", x, A, x) + x @ B,
                  lambda x: -0.5 * x @ (A + A.T).T + B),
    # ∇(−|x − p|²/s) = −2(x − p)/s
    "distance": (NegSquaredDistance(P, scale=2.0), lambda x: -((x - P) ** 2).sum(1) / 2.0,
                 lambda x: -(x - P)),
    # ∇ h exp(−|x − c|²/2w²) = −h exp(·)(x − c)/w²
    "bump": (GaussianBump(P, width=0.7, height=3.0),
             lambda x: 3.0 * torch.exp(-((x - P) ** 2).sum(1) / (2 * 0.49)),
             lambda x: -3.0 * torch.exp(-((x - P) ** 2).sum(1, keepdim=True) / 0.98) * (x - P) / 0.49),
}


@pytest.mark.parametrize("case", CASES)
def test_values_match_closed_form(case):
    reward, value, _ = CASES[case]
    x = torch.randn(64, 2, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(reward(x), value(x))
    out32 = reward(x.float())
    assert out32.shape == (64,) and out32.dtype == torch.float32
    assert reward(x, cond=torch.zeros(64)).shape == (64,)  # cond is accepted and ignored


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_closed_form(case):
    reward, _, grad = CASES[case]
    x = torch.randn(32, 2, generator=gen(2), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(reward(x).sum(), x)
    torch.testing.assert_close(g, grad(x.detach()))
    assert torch.autograd.gradcheck(reward, (x[:4].detach().requires_grad_(),))


def test_trailing_dims_are_flattened():
    r = Linear(torch.arange(6.0))
    x = torch.randn(5, 2, 3, generator=gen(3))
    torch.testing.assert_close(r(x), x.flatten(1) @ torch.arange(6.0))


def test_repr_and_name():
    rewards = (Linear([1.0, 0.5]), Quadratic(torch.eye(2)), NegSquaredDistance([0.0, 1.0]),
               GaussianBump([1.5, 1.5]))
    for reward in rewards:
        text = repr(reward)
        assert text.startswith(type(reward).__name__ + "(") and "tensor" not in text
        assert isinstance(reward.name, str) and reward.name
    assert repr(Linear([1.0, 0.5])) == "Linear(a=[1.0, 0.5])"


def test_registry():
    assert set(REWARDS) == {"linear", "quadratic", "bump", "right"}
    x = torch.tensor([[1.5, 1.5], [2.0, -1.0]])
    torch.testing.assert_close(get_reward("right")(x), x[:, 0])
    torch.testing.assert_close(get_reward("linear")(x), x[:, 0] + 0.5 * x[:, 1])
    torch.testing.assert_close(get_reward("quadratic")(x), -0.5 * (x**2).sum(1))
    assert float(get_reward("bump")(x)[0]) == pytest.approx(1.0)  # the bump's peak is at (1.5, 1.5)
    with pytest.raises(ValueError, match="bump, linear, quadratic, right"):
        get_reward("nope")


def test_constructor_errors():
    with pytest.raises(ValueError, match="a must have shape"):
        Linear([[1.0, 2.0]])
    with pytest.raises(ValueError, match="A must be square"):
        Quadratic(torch.ones(2, 3))
    with pytest.raises(ValueError, match="b must have shape"):
        Quadratic(torch.eye(2), b=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="scale"):
        NegSquaredDistance([0.0, 0.0], scale=0.0)
    with pytest.raises(ValueError, match="width"):
        GaussianBump([0.0, 0.0], width=-1.0)
    with pytest.raises(ValueError, match="center contains NaN"):
        GaussianBump([0.0, math.nan])
    with pytest.raises(ValueError, match="x must have shape"):
        Linear([1.0, 0.5])(torch.zeros(4, 3))


# ---------------------------------------------------------------- check_reward


def test_check_reward_returns_values_and_keeps_x():
    x = torch.randn(8, 2, generator=gen(4))
    values = check_reward(get_reward("linear"), x, need_grad=True)
    torch.testing.assert_close(values.detach(), x[:, 0] + 0.5 * x[:, 1])
    assert values.requires_grad and not x.requires_grad
    # a plain function of x alone is a reward too
    torch.testing.assert_close(check_reward(lambda x: x.sum(1), x), x.sum(1))


def test_check_reward_passes_cond():
    x = torch.randn(8, 2, generator=gen(5))
    cond = torch.ones(8)
    values = check_reward(lambda x, cond=None: x[:, 0] + cond, x, cond=cond)
    torch.testing.assert_close(values, x[:, 0] + 1)


def test_check_reward_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(8,\).*got \(8, 1\)"):
        check_reward(lambda x: x[:, :1], torch.randn(8, 2))
    with pytest.raises(ValueError, match="torch.Tensor"):
        check_reward(lambda x: 1.0, torch.randn(8, 2))


def test_check_reward_non_finite_counts():
    def bad(x):
        out = x[:, 0].clone()
        out[1], out[5] = math.nan, math.inf
        return out

    with pytest.raises(ValueError, match="2 NaN or inf values out of 8"):
        check_reward(bad, torch.randn(8, 2))


def test_check_reward_no_gradient():
    detached = lambda x: x.detach().sum(1)
    check_reward(detached, torch.randn(8, 2))  # fine when no gradient is needed
    with pytest.raises(ValueError, match="no gradient with respect to x"):
        check_reward(detached, torch.randn(8, 2), need_grad=True)


def test_check_reward_bad_arguments():
    with pytest.raises(ValueError, match="reward must be callable"):
        check_reward("linear", torch.randn(8, 2))
    with pytest.raises(ValueError, match="x contains NaN"):
        check_reward(get_reward("linear"), torch.tensor([[0.0, math.nan]]))
    with pytest.raises(ValueError, match="batch >= 1"):
        check_reward(get_reward("linear"), torch.zeros(0, 2))

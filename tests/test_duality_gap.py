"""The duality-gap evaluator against closed forms, its properties, and its promise to work on copies only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.duality_gap import (
    GanGame,
    GapConfig,
    QuadraticGame,
    Scalar,
    duality_gaps,
    input_grad_distance,
    labelled_game_value,
    param_penalty,
)

SPEC_GAME = QuadraticGame(alpha=6.0, b=4.0, beta=2.0)  # 3x^2 - y^2 + 4xy


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_config(lam: float, game: QuadraticGame) -> GapConfig:
    """Plain gradient steps sized so that every inner problem converges to machine precision."""
    curvature_d = game.beta + 2 * lam
    if game.alpha > 0:
        lr_g, g_steps = 0.05, 60
    else:  # bilinear: G's proximal objective has curvature b^2 / (2 lambda)
        lr_g, g_steps = lam / game.b**2, 60
    return GapConfig(lam=lam, k=30, d_epochs=600 if game.beta > 0 else 5, g_epochs=g_steps, optimizer="sgd",
                     lr_d=0.5 / max(curvature_d, 1e-9), lr_g=lr_g, perturb_std=0.0, penalty="params")


def test_closed_form_of_the_spec_game() -> None:
    # DG(u, v) = 7u^2 + 7v^2/3 for 3x^2 - y^2 + 4xy; DG^lambda grows to it and DG^0 = 7u^2.
    prox, plain = SPEC_GAME.closed_form(1.0, 1.0, 0.0)
    assert (prox, plain) == pytest.approx((7.0, 7 + 7 / 3))
    values = [SPEC_GAME.closed_form(1.0, 1.0, lam)[0] for lam in (0.01, 0.1, 1.0, 10.0, 1e3, 1e6)]
    assert values == sorted(values) and values[-1] == pytest.approx(plain, rel=1e-5)
    assert QuadraticGame(0.0, 1.0, 0.0).closed_form(0.0, 2.0, 0.5) == (pytest.approx(2.0), math.inf)


@pytest.mark.parametrize("u,v", [(1.0, 1.0), (0.5, -2.0)])
def test_evaluator_matches_the_closed_form_on_the_quadratic_game(u: float, v: float) -> None:
    gaps = []
    for lam in (0.1, 1.0, 10.0):
        res = duality_gaps(Scalar(u), Scalar(v), SPEC_GAME, exact_config(lam, SPEC_GAME))
        prox, plain = SPEC_GAME.closed_form(u, v, lam)
        assert res.proximal_signed == pytest.approx(prox, rel=1e-6)
        assert res.plain_signed == pytest.approx(plain, rel=1e-6)
        assert res.m1 == pytest.approx(7 * u * u, rel=1e-6)
        # DG^0 = M1 - V* (V* = 0 at the saddle) = 7u^2 bounds DG^lambda from below.
        assert res.value_gap == pytest.approx(SPEC_GAME.closed_form(u, v, 0.0)[0], rel=1e-6)
        assert res.proximal_lb == pytest.approx(res.proximal_signed) and res.value_gap <= res.proximal + 1e-9
        gaps.append(res.proximal)
    plain = 7 * u * u + 7 * v * v / 3
    assert gaps == sorted(gaps) and all(g <= plain + 1e-9 for g in gaps)
    assert plain - gaps[-1] < 0.2 * (plain - gaps[0])  # DG^lambda -> DG as lambda grows


def test_bilinear_game_proximal_gap_is_lambda_v_squared_while_the_plain_gap_is_unbounded() -> None:
    game = QuadraticGame(alpha=0.0, b=1.0, beta=0.0)  # M(x, y) = x y at (0, v)
    for lam in (0.1, 4.0):
        res = duality_gaps(Scalar(0.0), Scalar(1.5), game, exact_config(lam, game))
        assert res.proximal_signed == pytest.approx(lam * 1.5**2, rel=1e-6)
    # min_x x v = -inf: the plain estimate only grows with G's budget, far beyond the proximal gap.
    cfg = exact_config(0.1, game)
    longer = duality_gaps(Scalar(0.0), Scalar(1.5), game, GapConfig(**{**cfg.__dict__, "g_epochs": 120, "k": 1}))
    shorter = duality_gaps(Scalar(0.0), Scalar(1.5), game, GapConfig(**{**cfg.__dict__, "k": 1}))
    assert shorter.plain > 10 * 0.1 * 1.5**2 and longer.plain > 1.9 * shorter.plain


class TinyG(nn.Module):
    def __init__(self, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, math.prod(out_shape)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.out_shape)


class TinyD(nn.Module):
    def __init__(self, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
@pytest.mark.parametrize("loss", ["hinge", "bce"])
def test_gan_game_works_on_any_input_shape_and_leaves_the_modules_untouched(shape, loss) -> None:
    torch.manual_seed(0)
    G, D = TinyG(shape), TinyD(shape)
    frozen_param = next(D.parameters())
    frozen_param.requires_grad_(False)
    before = {k: v.clone() for k, v in [*G.state_dict().items(), *D.state_dict().items()]}
    real = torch.randn(64, *shape) * 0.5 + 1.0
    game = GanGame(real, (), lambda n, g: ((torch.randn(n, 4, generator=g),), ()), loss=loss)
    rng = torch.get_rng_state()
    res = duality_gaps(G, D, game, GapConfig(k=3, d_epochs=2, g_epochs=2, batch_size=16))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(math.isfinite(v) for v in res.to_dict().values())
    assert res.proximal == abs(res.m1 - res.m2) and res.d_steps == 4 and res.g_steps == 4
    assert game.game_value == (-2.0 if loss == "hinge" else -2 * math.log(2))
    assert res.value_gap == pytest.approx(res.m1 - game.game_value)
    assert res.proximal_lb == max(res.m1 - res.m2, res.value_gap)
    after = {k: v for k, v in [*G.state_dict().items(), *D.state_dict().items()]}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in [*G.parameters(), *D.parameters()])
    assert not frozen_param.requires_grad and all(p.requires_grad for p in G.parameters())
    again = duality_gaps(G, D, game, GapConfig(k=3, d_epochs=2, g_epochs=2, batch_size=16))
    assert again.to_dict() | {"seconds": 0} == res.to_dict() | {"seconds": 0}  # seeded: reproducible


def test_penalties_vanish_at_the_anchor_and_grow_away_from_it() -> None:
    torch.manual_seed(1)
    D, x = TinyD((3,)), torch.randn(32, 3)
    same = TinyD((3,))
    same.load_state_dict(D.state_dict())
    score = lambda m, inp: m(inp)  # noqa: E731
    assert float(input_grad_distance(score, same, D, x).detach()) == 0.0 and float(param_penalty(same, D).detach()) == 0.0
    with torch.no_grad():
        for p in same.parameters():
            p.add_(0.1)
    assert float(input_grad_distance(score, same, D, x).detach()) > 0 and float(param_penalty(same, D).detach()) > 0
    # The penalty is differentiable in the adapted D (its gradient drives the proximal inner loop).
    pen = input_grad_distance(score, same, D, x)
    pen.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in same.parameters())


@pytest.mark.parametrize("field,value", [("lam", -1.0), ("k", 0), ("optimizer", "rmsprop"), ("penalty", "l1"),
                                         ("d_epochs", 0.0), ("lr_d", 0.0), ("lr_g", float("nan")), ("beta1", 1.0),
                                         ("perturb_std", -1e-3), ("lam", float("nan")), ("lam", float("inf")),
                                         ("g_epochs", float("inf")), ("d_epochs", float("nan"))])
def test_bad_gap_settings_are_refused(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        GapConfig(**{field: value})


def test_games_without_inputs_refuse_the_input_gradient_penalty() -> None:
    with pytest.raises(NotImplementedError, match="penalty=params"):
        duality_gaps(Scalar(1.0), Scalar(1.0), SPEC_GAME, GapConfig(penalty="input_grad", d_epochs=1, g_epochs=1))


def test_the_labelled_games_value_is_what_a_label_only_discriminator_wins() -> None:
    """When the fakes' label frequencies (fixed by the noise) differ from the real ones, even a G that matches each
    label's real samples leaves D the labels: V* is what the best label-only D scores, not -2 / -2 log 2."""
    real = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    fake = torch.tensor([0] * 20 + [1] * 40 + [2] * 40)
    a, b = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.4, 0.4])
    d = torch.where(a > b, 1.0, -1.0)  # hinge: the best label-only D
    hinge = torch.clamp(d[real] - 1, max=0).mean() + torch.clamp(-1 - d[fake], max=0).mean()
    assert labelled_game_value("hinge", real, fake) == pytest.approx(float(hinge)) == pytest.approx(-2 + 2 * 0.4)
    p = a / (a + b)  # BCE: the best label-only D's probability of "real"
    bce = torch.log(p[real]).mean() + torch.log(1 - p[fake]).mean()
    assert labelled_game_value("bce", real, fake) == pytest.approx(float(bce))
    assert labelled_game_value("hinge", real, real[torch.randperm(100)]) == pytest.approx(-2.0)
    assert labelled_game_value("bce", real, real) == pytest.approx(-2 * math.log(2))

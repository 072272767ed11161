"""The duality gap and the proximal duality gap of a GAN (or any two-player zero-sum game), estimated on copies.

For a value V(D, G) that D maximises and G minimises:

    DG(G, D)          = max_D' V(D', G) - min_G' V(D, G')
    DG^lambda(G, D)   = max_D' V(D', G) - min_G' V^lambda(D, G')
    V^lambda(D, G')   = max_D~ [ V(D~, G') - lambda * d(D~, D) ]

``d`` is the proximal penalty: ``||theta_D~ - theta_D||^2`` ("params") or, as in the paper's code, the mean over real
x of ``||grad_x D~(x) - grad_x D(x)||^2`` ("input_grad"; works for inputs of any shape). V^lambda >= V (take
D~ = D), so DG^lambda <= DG, and DG^lambda -> DG as lambda grows.

Estimation (Sidheekh et al., ICML 2021, and their code, with its defects fixed):
- G and D are deep-copied and the copies perturbed by N(0, perturb_std^2); the caller's modules are never written.
- M1: the D copy alone is trained (G fixed) on the game's "fit" split; M1 = V(D', G) on the "eval" split.
- M2: the G copy is trained; before each G step the adversary D~ restarts from the anchor D and takes ``k`` steps
  on -V + lambda * d, then G steps against D~. M2 = V^lambda at the final G': D~ is adapted once more (``final_k``
  steps) and M2 = V(D~, G') - lambda * d(D~, D) on the eval split. (The paper's text says "-D loss on the
  evaluation split"; evaluating the proximal objective itself is what makes the exact values of closed-form
  games come out, and it is the same number when lambda -> infinity.)
  ``warm_start`` (not in the paper) lets D~ continue from its last adapted state instead of restarting from the
  anchor before every G step: the same V^lambda, a better inner maximisation when G' moves far from G (from the
  anchor, ``k`` small steps cannot catch up with a G' that runs to where D extrapolates to huge values).
- The plain gap's min_G' V(D, G') trains a second G copy against the fixed anchor D.
Reported gaps are M1 - M2 (``*_signed``) and their absolute values (the paper reports |M1 - M2|).

A bound the paper does not use: V^lambda <= V^0 and min_G' V^0(D, G') = min_G' max_D~ V = V*, the value of the game
(for a GAN whose G can match the data: -2 for the hinge loss, -2 log 2 for the BCE loss). So for every lambda

    DG^lambda >= DG^0 = max_D' V(D', G) - V*    (``value_gap`` = M1 - V*)

and M1 estimates the first term from below, so ``value_gap`` is a lower-bound estimate that needs no search over G'.
The search over G' is local (gradient steps from G): at a stable mode collapse no nearby G' does better, the
local M2 stays at M1 and |M1 - M2| reads ~0 although the global gap is large; ``value_gap`` still sees it.
``proximal_lb`` = max(M1 - M2, M1 - V*) combines both (equal to M1 - M2 when V* is unknown).

Everything a game needs (data splits, noise, the value, G's own loss) comes through ``Game``; ``GanGame`` is the
game of a GAN whose modules are called ``G(*g_inputs)`` and ``D(x, *d_cond)``.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.gan.nets import frozen


@dataclass
class GapConfig:
    """How the gaps are estimated. Defaults follow the paper's code where it fixes them (lambda 0.01, k 15, Adam
    5e-4 with beta1 0.5, perturbation std 1e-3); epochs count passes over the game's fit split."""

    lam: float = 0.01
    k: int = 15
    final_k: int = 0
    d_epochs: float = 2.0
    g_epochs: float = 2.0
    batch_size: int = 128
    optimizer: str = "adam"
    lr_d: float = 5e-4
    lr_g: float = 5e-4
    beta1: float = 0.5
    beta2: float = 0.999
    perturb_std: float = 1e-3
    penalty: str = "input_grad"
    warm_start: bool = False
    plain: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):  # nan would drop the penalty without a word
            raise ValueError(f"gap.lam must be a finite number >= 0, got {self.lam}")
        if not (math.isfinite(self.d_epochs) and math.isfinite(self.g_epochs)):
            raise ValueError(f"gap.d_epochs and gap.g_epochs must be finite, got {self.d_epochs}, {self.g_epochs}")
        if self.k < 1 or self.final_k < 0:
            raise ValueError(f"gap.k must be >= 1 and gap.final_k >= 0, got {self.k}, {self.final_k}")
        if self.d_epochs <= 0 or self.g_epochs <= 0 or self.batch_size < 1:
            raise ValueError("gap.d_epochs, gap.g_epochs and gap.batch_size must be > 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"gap.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.penalty not in ("input_grad", "params"):
            raise ValueError(f"gap.penalty must be 'input_grad' or 'params', got {self.penalty!r}")
        for name in ("lr_d", "lr_g"):  # 0 would report a gap of exactly 0: "converged", measured by nothing
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"gap.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"gap.beta1 and gap.beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not (math.isfinite(self.perturb_std) and self.perturb_std >= 0):
            raise ValueError(f"gap.perturb_std must be a finite number >= 0, got {self.perturb_std}")


@dataclass
class GapResult:
    m1: float
    m2: float
    m2_plain: float
    proximal: float
    plain: float
    proximal_signed: float
    plain_signed: float
    value_gap: float
    proximal_lb: float
    lam: float
    d_steps: int
    g_steps: int
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Game(ABC):
    """A zero-sum game between a minimiser G and a maximiser D, with its data split in two."""

    n_fit: int = 1
    n_eval: int = 1
    game_value: float | None = None  # V* = min_G max_D V, when known (see value_gap)

    @abstractmethod
    def real(self, split: str, index: torch.Tensor) -> Any:
        """Real samples ``index`` of split "fit" or "eval" (anything; passed back to ``value``)."""

    @abstractmethod
    def noise(self, n: int, generator: torch.Generator) -> Any:
        """``n`` draws of G's input."""

    @abstractmethod
    def value(self, G: nn.Module, D: nn.Module, real: Any, noise: Any) -> torch.Tensor:
        """The batch estimate of V(D, G): D ascends it, G descends it."""

    def generator_loss(self, G: nn.Module, D: nn.Module, real: Any, noise: Any) -> torch.Tensor:
        """What G minimises when trained (a GAN's non-saturating or hinge G loss); default V itself."""
        return self.value(G, D, real, noise)

    def input_grad_penalty(self, D: nn.Module, anchor: nn.Module, real: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no inputs to take gradients of; use penalty=params")


def param_penalty(D: nn.Module, anchor: nn.Module) -> torch.Tensor:
    """||theta_D - theta_anchor||^2 over all parameters."""
    anchor_params = dict(anchor.named_parameters())
    return sum(((p - anchor_params[n].detach()) ** 2).sum() for n, p in D.named_parameters())


def input_grad_distance(score: Callable[[nn.Module, torch.Tensor], torch.Tensor], D: nn.Module, anchor: nn.Module,
                        x: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||grad_x score(D, x) - grad_x score(anchor, x)||^2, for inputs of any shape."""
    x = x.detach().requires_grad_(True)
    (g_new,) = torch.autograd.grad(score(D, x).sum(), x, create_graph=True)
    (g_old,) = torch.autograd.grad(score(anchor, x).sum(), x)
    return ((g_new - g_old.detach()) ** 2).flatten(1).sum(1).mean()


def labelled_game_value(loss: str, real_labels: torch.Tensor, fake_labels: torch.Tensor) -> float:
    """V* = min_G max_D V of a GAN whose fakes' labels come from the noise, with label frequencies that may differ
    from the real ones. The best G matches each label's real samples, which leaves D only the labels: per label y,
    with real and fake frequencies a and b, hinge D's best is -2 min(a, b) and BCE's a log(a/(a+b)) + b log(b/(a+b)).
    So V* = -2 + 2 TV (hinge) or -2 log 2 + 2 JSD (BCE) of the two label distributions, not the textbook value
    that a label-blind comparison (or matching frequencies) gives."""
    labels = torch.cat([real_labels, fake_labels]).unique()
    a = (real_labels[:, None] == labels).double().mean(0)
    b = (fake_labels[:, None] == labels).double().mean(0)
    if loss == "hinge":
        return float(-2.0 * torch.minimum(a, b).sum())
    both = a + b
    terms = torch.special.xlogy(a, a / both) + torch.special.xlogy(b, b / both)
    return float(terms.sum())


class GanGame(Game):
    """A GAN's game: V(D, G) = -(D's loss), with real data held out in two splits.

    ``real_x``/``real_cond`` are split in half (first half "fit", second "eval"). ``noise_fn(n, gen)`` returns
    (G's inputs, D's conditioning of the fakes), both tuples of tensors. ``loss``: "hinge" (D: relu(1 - D(x)) +
    relu(1 + D(G(z))); G: -D(G(z))) or "bce" (D: softplus(-D(x)) + softplus(D(G(z))); G non-saturating).
    ``game_value_known``: whether a generator can match the real (x, conditioning) pairs, which makes the game's
    value V* the textbook -2 (hinge) / -2 log 2 (BCE); otherwise V* is None and value_gap is not reported.
    ``fake_labels``: for a game whose first conditioning tensor is a class label, a large draw of the labels the
    noise gives the fakes; V* then counts what D wins from the labels alone (``labelled_game_value``).
    """

    def __init__(self, real_x: torch.Tensor, real_cond: tuple[torch.Tensor, ...],
                 noise_fn: Callable[[int, torch.Generator], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]],
                 loss: str = "hinge", game_value_known: bool = True,
                 fake_labels: torch.Tensor | None = None) -> None:
        if len(real_x) < 2:
            raise ValueError("a GAN game needs at least 2 held-out real samples (one per split)")
        if loss not in ("hinge", "bce"):
            raise ValueError(f"loss must be 'hinge' or 'bce', got {loss!r}")
        half = len(real_x) // 2
        self.splits = {"fit": (real_x[:half], tuple(c[:half] for c in real_cond)),
                       "eval": (real_x[half:], tuple(c[half:] for c in real_cond))}
        self.n_fit, self.n_eval = half, len(real_x) - half
        self.noise_fn, self.loss = noise_fn, loss
        self.game_value = (-2.0 if loss == "hinge" else -2.0 * math.log(2.0)) if game_value_known else None
        if game_value_known and fake_labels is not None:
            self.game_value = labelled_game_value(loss, self.splits["eval"][1][0], fake_labels)

    def real(self, split: str, index: torch.Tensor) -> Any:
        x, cond = self.splits[split]
        return x[index], tuple(c[index] for c in cond)

    def noise(self, n: int, generator: torch.Generator) -> Any:
        return self.noise_fn(n, generator)

    def _terms(self, G: nn.Module, D: nn.Module, real: Any, noise: Any) -> tuple[torch.Tensor, torch.Tensor]:
        (x, cond), (g_in, fake_cond) = real, noise
        return D(x, *cond), D(G(*g_in), *fake_cond)

    def value(self, G: nn.Module, D: nn.Module, real: Any, noise: Any) -> torch.Tensor:
        d_real, d_fake = self._terms(G, D, real, noise)
        if self.loss == "hinge":
            return -(F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
        return -(F.softplus(-d_real).mean() + F.softplus(d_fake).mean())

    def generator_loss(self, G: nn.Module, D: nn.Module, real: Any, noise: Any) -> torch.Tensor:
        g_in, fake_cond = noise
        d_fake = D(G(*g_in), *fake_cond)
        return -d_fake.mean() if self.loss == "hinge" else F.softplus(-d_fake).mean()

    def input_grad_penalty(self, D: nn.Module, anchor: nn.Module, real: Any) -> torch.Tensor:
        x, cond = real
        return input_grad_distance(lambda m, inp: m(inp, *cond), D, anchor, x)



def _size(real: Any) -> int:
    """Samples in a real batch (tensor or tuple led by one); 1 for games without data."""
    first = real[0] if isinstance(real, tuple) and real else real
    return len(first) if torch.is_tensor(first) and first.dim() > 0 else 1


class _Batches:
    """Endless shuffled mini-batches of one split, reshuffled every pass, from the evaluator's own generator."""

    def __init__(self, game: Game, split: str, batch: int, generator: torch.Generator) -> None:
        self.game, self.split, self.gen = game, split, generator
        self.n = game.n_fit if split == "fit" else game.n_eval
        self.batch = min(batch, self.n)
        self.perm, self.pos = torch.randperm(self.n, generator=generator), 0

    def __next__(self) -> tuple[Any, Any]:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.game.real(self.split, idx), self.game.noise(self.batch, self.gen)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self


class DualityGapEvaluator:
    """Estimates DG^lambda and DG of (G, D) under a game; see the module docstring for the procedure."""

    def __init__(self, game: Game, config: GapConfig | None = None) -> None:
        self.game, self.cfg = game, config or GapConfig()

    def _optim(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr)
        return torch.optim.Adam(params, lr=lr, betas=(self.cfg.beta1, self.cfg.beta2))

    def _copy(self, module: nn.Module, gen: torch.Generator) -> nn.Module:
        twin = copy.deepcopy(module)
        twin.train()
        with torch.no_grad():
            for p in twin.parameters():
                p.requires_grad_(True)
                if self.cfg.perturb_std > 0:
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * self.cfg.perturb_std)
        return twin

    def _penalty(self, D: nn.Module, anchor: nn.Module, real: Any) -> torch.Tensor:
        if self.cfg.penalty == "params":
            return param_penalty(D, anchor)
        return self.game.input_grad_penalty(D, anchor, real)

    def _steps(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.game.n_fit / min(self.cfg.batch_size, self.game.n_fit)))

    def _eval_batches(self) -> list[tuple[Any, Any]]:
        """The eval split in order with fixed noise: every value below is measured on the same draws."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919)
        n, b = self.game.n_eval, min(self.cfg.batch_size, self.game.n_eval)
        return [(self.game.real("eval", torch.arange(i, min(i + b, n))), self.game.noise(min(b, n - i), gen))
                for i in range(0, n, b)]

    def _mean_value(self, G: nn.Module, D: nn.Module, batches: list[tuple[Any, Any]],
                    anchor: nn.Module | None = None) -> float:
        total, weight = 0.0, 0
        for real, noise in batches:
            v = self.game.value(G, D, real, noise)
            if anchor is not None and self.cfg.lam > 0:
                v = v - self.cfg.lam * self._penalty(D, anchor, real)
            n = _size(real)
            total, weight = total + float(v.detach()) * n, weight + n
        return total / max(weight, 1)

    def _train_d(self, G: nn.Module, D: nn.Module, steps: int, data: _Batches,
                 anchor: nn.Module | None = None, opt: torch.optim.Optimizer | None = None) -> None:
        """Ascend V (minus the proximal term when ``anchor`` is given) in D for ``steps`` steps, G fixed."""
        opt = opt or self._optim(D, self.cfg.lr_d)
        with frozen(G):
            for _ in range(steps):
                real, noise = next(data)
                loss = -self.game.value(G, D, real, noise)
                if anchor is not None and self.cfg.lam > 0:
                    loss = loss + self.cfg.lam * self._penalty(D, anchor, real)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def _g_step(self, G: nn.Module, D: nn.Module, opt: torch.optim.Optimizer, data: _Batches) -> None:
        with frozen(D):
            real, noise = next(data)
            loss = self.game.generator_loss(G, D, real, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def _adapt(self, G: nn.Module, D_tilde: nn.Module, anchor: nn.Module, steps: int, data: _Batches) -> None:
        """D~ <- anchor, then ``steps`` steps on -V + lambda * d(D~, anchor) with a fresh optimizer."""
        D_tilde.load_state_dict(anchor.state_dict())
        self._train_d(G, D_tilde, steps, data, anchor=anchor)

    def _estimate(self, G: nn.Module, D: nn.Module, gen: torch.Generator) -> tuple[float, float, float]:
        """M1, M2 (proximal) and M2 against the fixed D (nan unless ``plain``), each on copies of G and D."""
        cfg = self.cfg
        G0, anchor = self._copy(G, gen), self._copy(D, gen)
        for p in anchor.parameters():
            p.requires_grad_(False)
        anchor.eval()  # the fixed D: in train mode each forward would move a spectral norm's power iteration
        eval_batches = self._eval_batches()
        d_steps, g_steps = self._steps(cfg.d_epochs), self._steps(cfg.g_epochs)
        fit = _Batches(self.game, "fit", cfg.batch_size, gen)

        D1 = copy.deepcopy(anchor).train()
        for p in D1.parameters():
            p.requires_grad_(True)
        self._train_d(G0, D1, d_steps, fit)
        m1 = self._mean_value(G0, D1, eval_batches)

        G2, D_tilde = copy.deepcopy(G0), copy.deepcopy(D1)
        g_opt = self._optim(G2, cfg.lr_g)
        if cfg.warm_start:
            D_tilde.load_state_dict(anchor.state_dict())
            d_opt = self._optim(D_tilde, cfg.lr_d)
            for _ in range(g_steps):
                self._train_d(G2, D_tilde, cfg.k, fit, anchor=anchor, opt=d_opt)
                self._g_step(G2, D_tilde, g_opt, fit)
            self._train_d(G2, D_tilde, cfg.final_k or cfg.k, fit, anchor=anchor, opt=d_opt)
        else:
            for _ in range(g_steps):
                self._adapt(G2, D_tilde, anchor, cfg.k, fit)
                self._g_step(G2, D_tilde, g_opt, fit)
            self._adapt(G2, D_tilde, anchor, cfg.final_k or cfg.k, fit)
        m2 = self._mean_value(G2, D_tilde, eval_batches, anchor=anchor)

        m2_plain = float("nan")
        if cfg.plain:
            G3, D_fixed = copy.deepcopy(G0), copy.deepcopy(anchor)  # in eval mode, as the anchor: fixed
            g3_opt = self._optim(G3, cfg.lr_g)
            for _ in range(g_steps):
                self._g_step(G3, D_fixed, g3_opt, fit)
            m2_plain = self._mean_value(G3, D_fixed, eval_batches)
        return m1, m2, m2_plain

    def evaluate(self, G: nn.Module, D: nn.Module) -> GapResult:
        """Both gaps of (G, D). ``G`` and ``D`` are only read (deep-copied first), never trained or modified."""
        cfg, start = self.cfg, time.monotonic()
        gen = torch.Generator().manual_seed(cfg.seed)
        torch_state = torch.get_rng_state()
        try:  # dropout in the copies draws from torch's global generator: the caller's stream is left as it was
            m1, m2, m2_plain = self._estimate(G, D, gen)
        finally:
            torch.set_rng_state(torch_state)
        d_steps, g_steps = self._steps(cfg.d_epochs), self._steps(cfg.g_epochs)
        value_gap = m1 - self.game.game_value if self.game.game_value is not None else float("nan")
        return GapResult(m1=m1, m2=m2, m2_plain=m2_plain, proximal=abs(m1 - m2), plain=abs(m1 - m2_plain),
                         proximal_signed=m1 - m2, plain_signed=m1 - m2_plain, value_gap=value_gap,
                         proximal_lb=max(m1 - m2, value_gap) if math.isfinite(value_gap) else m1 - m2,
                         lam=cfg.lam, d_steps=d_steps, g_steps=g_steps, seconds=time.monotonic() - start)


def duality_gaps(G: nn.Module, D: nn.Module, game: Game, config: GapConfig | None = None) -> GapResult:
    """DG^lambda and DG of (G, D) under ``game``; the modules are copied, never modified."""
    return DualityGapEvaluator(game, config).evaluate(G, D)


class Scalar(nn.Module):
    """A player that is just a parameter vector (the players of the closed-form games)."""

    def __init__(self, value: float | list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(value, dtype=torch.float64).reshape(-1).clone())


class QuadraticGame(Game):
    """M(x, y) = alpha/2 |x|^2 + b x.y - beta/2 |y|^2 (x: G's parameter, y: D's): the games whose gaps are known
    in closed form (see ``closed_form``). alpha = beta = 0 is the bilinear game x.y; alpha 6, b 4, beta 2 is the
    spec's 3x^2 - y^2 + 4xy."""

    def __init__(self, alpha: float, b: float, beta: float) -> None:
        self.alpha, self.b, self.beta = alpha, b, beta
        self.game_value = 0.0  # the saddle point is the origin

    def real(self, split: str, index: torch.Tensor) -> Any:
        return None

    def noise(self, n: int, generator: torch.Generator) -> Any:
        return None

    def value(self, G: nn.Module, D: nn.Module, real: Any, noise: Any) -> torch.Tensor:
        x, y = G.theta, D.theta
        return self.alpha / 2 * (x * x).sum() + self.b * (x * y).sum() - self.beta / 2 * (y * y).sum()

    def closed_form(self, u: float, v: float, lam: float) -> tuple[float, float]:
        """(DG^lambda, DG) at x = u, y = v (scalars) with the parameter-distance penalty; inf where unbounded."""
        a, b, c = self.alpha, self.b, self.beta
        d_worst = a / 2 * u * u + (b * b * u * u / (2 * c) if c > 0 else (0.0 if u == 0 else math.inf))
        g_worst = -c / 2 * v * v - (b * b * v * v / (2 * a) if a > 0 else (0.0 if v == 0 else math.inf))
        if lam == 0:
            g_prox = 0.0  # min_x max_y M(x, y) of a convex-concave M with its saddle at the origin
        else:
            x = -4 * b * lam * v / (a * (2 * c + 4 * lam) + 2 * b * b)
            g_prox = a / 2 * x * x + (b * x + 2 * lam * v) ** 2 / (2 * c + 4 * lam) - lam * v * v
        return d_worst - g_prox, d_worst - g_worst

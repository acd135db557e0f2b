"""Inputs and target functions, with their exact moments under x ~ N(0, I_d).

Every target is built on a device from its config and its own seed (``target.seed``), so
models trained with different seeds face the same function.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from itertools import combinations_with_replacement

import torch
from omegaconf import DictConfig


def count_monomials(d: int, degree: int, include_lower: bool) -> int:
    """Distinct monomials in d variables of degree exactly ``degree`` (or 1..degree)."""
    degrees = range(1, degree + 1) if include_lower else [degree]
    return sum(math.comb(d + k - 1, k) for k in degrees)


def hermite_fourth_moment(k: int) -> int:
    """E h_k(z)^4, z ~ N(0, 1), exactly: sum_i C(k, i)^2 C(2i, i) (3, 15, 93, 639, ...), from
    He_k^2 = sum_j j! C(k, j)^2 He_{2k-2j}."""
    return sum(math.comb(k, i) ** 2 * math.comb(2 * i, i) for i in range(k + 1))


def lightest_monomial_fourth_moment(d: int, degree: int) -> int:
    """The least E m^4 over the Hermite monomials m of this degree in d variables: 3^degree for
    d >= degree, else with the powers spread as evenly as d allows (log E h_k^4 is convex in k);
    E h_k^4 itself grows like ~8^k."""
    spread = min(d, degree)
    q, r = divmod(degree, spread)
    return hermite_fourth_moment(q + 1) ** r * hermite_fourth_moment(q) ** (spread - r)


def make_generator(device: torch.device, seed: int, stream: int) -> torch.Generator:
    """A generator on ``device`` for one named random stream of one seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + stream) % 2**63)
    return gen


# Replica r of seed s is seeded s + r * 2^20. The CPU generator (mt19937) keeps only the low 32
# bits of its seed, so seeds must differ modulo 2^32: they do for s < 2^20 and r < 2^12.
REPLICA_SEED_STRIDE = 2**20


def replica_seed(seed: int, replica: int) -> int:
    """The seed of replica ``replica`` of a run with ``seed``: replica 0 is the run's own seed,
    and a sweep over seeds below 2^20 with fewer than 4096 replicas never gives two replicas
    one seed (seed + r would: replica 1 of seed 0 is replica 0 of seed 1). Replica r equals the
    single run with this seed (and ``data_seed=seed`` when the replicas share their data)."""
    return seed + replica * REPLICA_SEED_STRIDE


def sample_inputs(
    kind: str,
    n: int,
    d: int,
    gen: torch.Generator,
    device: torch.device,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (n, d) from N(0, I_d) (``gaussian``), the sphere of radius sqrt(d) (``sphere``) or
    {-1, +1}^d (``hypercube``), drawn on ``device``, in place into ``out`` when given."""
    x = torch.empty(n, d, device=device) if out is None else out
    if kind == "hypercube":
        return x.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
    x.normal_(generator=gen)
    if kind == "sphere":
        x.mul_(math.sqrt(d) / x.norm(dim=1, keepdim=True))
    return x


def random_direction(d: int, seed: int, device: torch.device) -> torch.Tensor:
    """A unit vector uniform on the sphere in R^d, drawn on the CPU from ``seed``: (d,)."""
    gen = make_generator(torch.device("cpu"), seed, stream=0)
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    return (direction / direction.norm()).to(device=device, dtype=torch.float32)


INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_pdf(x: torch.Tensor) -> torch.Tensor:
    """phi(x), the standard normal density."""
    return INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def relu_mean(norm: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """E relu(norm z + bias), z ~ N(0, 1): norm (t Phi(t) + phi(t)), t = bias / norm."""
    t = bias / norm
    return norm * (t * torch.special.ndtr(t) + normal_pdf(t))


def relu_square_mean(norm: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """E relu(norm z + bias)^2 = norm^2 ((t^2 + 1) Phi(t) + t phi(t)), t = bias / norm."""
    t = bias / norm
    return norm.square() * ((t * t + 1.0) * torch.special.ndtr(t) + t * normal_pdf(t))


class Target:
    """A function f*: R^d -> R. ``mean`` and ``variance`` are exact under the inputs named in
    ``exact_under`` (None where no closed form is known)."""

    name: str
    d: int
    mean: float | None
    variance: float | None
    exact_under: tuple[str, ...] = ("gaussian",)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) -> y: (n,)."""
        raise NotImplementedError


class ReluNeuron(Target):
    """f(x) = max(0, <w*, x> + bias), w* a uniformly random direction scaled to ``norm``."""

    name = "relu_neuron"

    def __init__(self, d: int, norm: float, bias: float, seed: int, device: torch.device) -> None:
        self.w = random_direction(d, seed, device) * norm
        self.d, self.norm, self.bias = d, float(norm), float(bias)
        s, b = (torch.tensor(v, dtype=torch.float64) for v in (self.norm, self.bias))
        self.mean = float(relu_mean(s, b))  # <w*, x> + b ~ N(b, s^2)
        self.variance = float(relu_square_mean(s, b)) - self.mean**2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.w
        return torch.relu(pre + self.bias if self.bias else pre)


def hermite_terms(x: torch.Tensor, weights: torch.Tensor, degree: int) -> Iterator[torch.Tensor]:
    """weights * h_k(x) for k = 0..degree, one at a time, in one of two buffers that the next
    step overwrites (clone what you keep).

    The orthonormal recurrence h_{k+1} = (x h_k - sqrt(k) h_{k-1}) / sqrt(k + 1), run on
    weights * h_k in place, never forms He_k or k!, so it neither overflows nor holds more
    than two copies of a long grid.
    """
    previous, current = torch.zeros_like(x), weights * torch.ones_like(x)
    yield current
    for k in range(degree):
        previous.mul_(-math.sqrt(k)).addcmul_(x, current).div_(math.sqrt(k + 1))
        previous, current = current, previous
        yield current


def hermite_orthonormal(x: torch.Tensor, degree: int) -> torch.Tensor:
    """h_k(x) = He_k(x) / sqrt(k!) for k = 0..degree, stacked: (degree + 1, *x.shape)."""
    return torch.stack([h.clone() for h in hermite_terms(x, torch.ones_like(x), degree)])


POLYNOMIAL_BLOCK = 2**24  # Hermite factors held at once while evaluating a polynomial
HOST_BYTES_PER_TERM = 64  # a monomial's tuple on the host, and 36 bytes per coordinate in it


def polynomial_block_terms(degree: int, rows: int) -> int:
    """Terms of a polynomial evaluated at once on ``rows`` inputs."""
    return max(1, POLYNOMIAL_BLOCK // (degree * rows))


class HermitePolynomial(Target):
    """sum_t c_t prod_i h_{alpha_t,i}(x_i): ``terms`` distinct random monomials of the
    orthonormal Hermite basis, coefficients scaled so that the variance is exactly 1.

    With ``include_lower`` the monomials have degrees 1..degree (at least one of ``degree``),
    otherwise all have degree exactly ``degree``. No constant term, so the mean is 0.
    """

    name = "polynomial"

    def __init__(
        self,
        d: int,
        degree: int,
        terms: int,
        include_lower: bool,
        seed: int,
        device: torch.device,
    ) -> None:
        available = count_monomials(d, degree, include_lower)
        if terms > available:
            raise ValueError(f"{terms} terms asked, only {available} distinct monomials exist")
        gen = make_generator(torch.device("cpu"), seed, stream=0)
        chosen = self._draw_monomials(d, degree, terms, include_lower, available, gen)
        # Each monomial as `degree` (coordinate, power) pairs, padded with power 0 (h_0 = 1).
        pairs = [sorted(Counter(monomial).items()) for monomial in chosen]
        pad = [(0, 0)] * degree
        table = torch.tensor([p + pad[len(p) :] for p in pairs], dtype=torch.long)
        coef = torch.randn(terms, generator=gen, dtype=torch.float64)
        coef = coef / coef.norm()
        self.d, self.degree = d, degree
        self.monomials = chosen
        self.coef = coef.to(device=device, dtype=torch.float32)
        # The coordinates that occur, and each pair's column among them: the Hermite values of
        # the others are never formed.
        used, columns = torch.unique(table[..., 0], return_inverse=True)
        self.used, self.columns, self.powers = (
            t.to(device) for t in (used, columns, table[..., 1])
        )
        self.mean = 0.0
        self.variance = float((coef**2).sum())

    @staticmethod
    def _draw_monomials(
        d: int,
        degree: int,
        terms: int,
        include_lower: bool,
        available: int,
        gen: torch.Generator,
    ) -> list[tuple[int, ...]]:
        """Distinct multisets of coordinates, as sorted tuples; the first has full degree."""
        if available <= 4 * terms:  # small spaces: enumerate and pick without replacement
            degrees = range(1, degree + 1) if include_lower else [degree]
            every = [m for k in degrees for m in combinations_with_replacement(range(d), k)]
            top = [i for i, m in enumerate(every) if len(m) == degree]
            first = top[int(torch.randint(len(top), (1,), generator=gen))]
            rest = [i for i in torch.randperm(len(every), generator=gen).tolist() if i != first]
            return [every[i] for i in [first, *rest[: terms - 1]]]
        chosen: dict[tuple[int, ...], None] = {}
        while len(chosen) < terms:
            k = degree
            if include_lower and chosen:
                k = int(torch.randint(1, degree + 1, (1,), generator=gen))
            monomial = tuple(sorted(torch.randint(d, (k,), generator=gen).tolist()))
            chosen.setdefault(monomial)
        return list(chosen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) -> (n,), the terms in blocks of at most POLYNOMIAL_BLOCK factors."""
        h = hermite_orthonormal(x[:, self.used], self.degree)  # (degree + 1, n, used)
        step = polynomial_block_terms(self.degree, x.shape[0])
        y = None
        for start in range(0, len(self.coef), step):
            block = slice(start, start + step)
            factors = h[self.powers[block], :, self.columns[block]]  # (step, degree, n)
            part = self.coef[block] @ factors.prod(dim=1)
            y = part if y is None else y.add_(part)
        return y


def _float_at_least(a: int) -> float:
    """The smallest float64 >= a (inf past the largest float): for float64 z, z >= a exactly
    when z >= this."""
    try:
        edge = float(a)
    except OverflowError:
        return math.inf
    return math.nextafter(edge, math.inf) if edge < a else edge


def zigzag(z: torch.Tensor, a: int) -> torch.Tensor:
    """psi_a(z) = -1 + [z+a]_+ + sum_{i=1}^{a-1} 2 (-1)^i [z+a-2i]_+ - [z-a]_+ for odd a,
    in closed form: a triangle wave of period 4 between -1 and 1 on [-a, a], flat outside.

    Inside, psi_a(z) = s tri(z): tri the odd triangle wave (tri(t) = t on [-1, 1]) and
    s = (-1)^((a-1)/2), so nothing of the size of a is ever added to z (z + a in float32 lost
    the wave: an error of 0.25 at a = 6 * 1024^2 + 1, a constant from a ~ 2^24). Every step is
    exact in z's own precision: fmod(z, 4) is exact, and so are 2 - t on [1, 3] and t - 4 on
    [3, 4] (Sterbenz), while the edge |z| >= a is decided in float64 against a rounded up. So
    this is psi_a at the given z, exactly, for every odd a (a Python int of any size).
    """
    t = torch.fmod(z, 4)  # (-4, 4), the sign of z
    r = t.abs()
    wave = torch.where(r <= 1, r, torch.where(r <= 3, 2 - r, r - 4))  # tri(|t|)
    wave.mul_(t.sign() if a % 4 == 1 else t.sign().neg_())  # tri is odd
    flat = z.abs().double() >= _float_at_least(a)
    return torch.where(flat, torch.sign(z), wave)


ZIGZAG_BLOCK = 2**22  # float64 input elements at once in the zigzag's inner product


class Zigzag(Target):
    """f(x) = psi_a(<w*, x>), w* a uniformly random direction scaled to ``norm``."""

    name = "zigzag"

    def __init__(self, d: int, norm: float, a: int, seed: int, device: torch.device) -> None:
        self.w = random_direction(d, seed, device) * norm
        self.w64 = self.w.double()
        self.d, self.norm, self.a = d, float(norm), int(a)
        self.mean = self.variance = None  # exact, in the theory module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """psi_a(<w*, x>), rounded once to x's dtype: the inner product is taken in float64, in
        blocks of rows. In float32 its rounding (|w*| = d: up to 1e-2 at d = 4000, 0.6 at
        d = 65536) would move z along a wave of period 4; in float64 the labels stay within
        6e-8 |y| of psi_a at the exact <w*, x> to d = 16384 (2e-7 at d = 262144)."""
        rows = max(1, min(x.shape[0], ZIGZAG_BLOCK // self.d))
        z = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        block = torch.empty(rows, self.d, dtype=torch.float64, device=x.device)  # one, reused
        for start in range(0, x.shape[0], rows):
            part = x[start : start + rows]
            torch.mv(block[: len(part)].copy_(part), self.w64, out=z[start : start + len(part)])
        return zigzag(z, self.a).to(x.dtype)

    def relu_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """psi_a(z) + 1 as sum_l coef_l relu(z + shift_l), a + 1 terms (see :func:`zigzag`):
        (coef, shift), float64."""
        i = torch.arange(self.a + 1, dtype=torch.float64)
        coef = 2.0 * (-1.0) ** i
        coef[0], coef[-1] = 1.0, -1.0
        return coef, self.a - 2.0 * i


class Parity(Target):
    """f(x) = prod_{i in S} x_i for a random set S of k coordinates; mean 0 and variance 1
    under uniform {-1, +1}^d inputs and under N(0, I_d)."""

    name = "parity"
    exact_under = ("hypercube", "gaussian")

    def __init__(self, d: int, k: int, seed: int, device: torch.device) -> None:
        gen = make_generator(torch.device("cpu"), seed, stream=0)
        self.subset = sorted(torch.randperm(d, generator=gen)[:k].tolist())
        self.index = torch.tensor(self.subset, device=device)
        self.d, self.k = d, k
        self.mean, self.variance = 0.0, 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index].prod(dim=1)


def target_memory_bytes(cfg: DictConfig, rows: int, d: int, terms: int | None = None) -> int:
    """About the bytes that the target of ``cfg`` holds, and allocates to label ``rows`` inputs
    at once, beyond the inputs and labels (``d`` and ``terms`` in place of cfg's)."""
    if cfg.name == "polynomial":
        terms, degree = cfg.terms if terms is None else terms, cfg.degree
        tables = terms * (HOST_BYTES_PER_TERM + 36 * degree + 2 * 8 * degree + 4)
        hermite = 4 * (degree + 4) * rows * min(d, terms * degree)  # x[:, used], h, 2 buffers
        step = min(terms, polynomial_block_terms(degree, rows))
        factors = 4 * rows * (2 * step * degree + 2)  # a block of factors, products, the sum
        return tables + hermite + factors
    if cfg.name == "zigzag":  # float64 blocks of x, then ~6 float64 temporaries of z
        return 8 * (min(rows * d, max(ZIGZAG_BLOCK, d)) + 7 * rows)
    if cfg.name == "parity":
        return 4 * rows * (cfg.k + 1)
    return 4 * 2 * rows


def build_target(cfg: DictConfig, device: torch.device) -> Target:
    """The target named by ``cfg.name``, on ``device`` (``cfg`` already validated)."""
    if cfg.name == "relu_neuron":
        return ReluNeuron(cfg.d, cfg.norm, cfg.bias, cfg.seed, device)
    if cfg.name == "polynomial":
        return HermitePolynomial(cfg.d, cfg.degree, cfg.terms, cfg.include_lower, cfg.seed, device)
    if cfg.name == "zigzag":
        return Zigzag(cfg.d, cfg.norm, cfg.a, cfg.seed, device)
    return Parity(cfg.d, cfg.k, cfg.seed, device)

"""DreamRec (Yang et al., NeurIPS 2023, "Generate What You Prefer: Reshaping Sequential Recommendation via Guided
Diffusion"): the next item is *generated*. A causal Transformer (SASRec's encoder) turns the history into a
guidance vector h; a DDPM over the target item's embedding x0 learns to denoise x_t given (h, t), trained by
predicting x0 (squared error; no negative sampling). With probability `uncond_prob` h is replaced by a learnt
"no guidance" vector, so one network is both conditional and unconditional (classifier-free guidance).

Generation runs the reverse chain from x_T ~ N(0, I) through every one of the `timesteps` steps with the
guided prediction x0_hat = (1 + w) f(x_t, h, t) - w f(x_t, none, t), w = `guidance`; the scores are the
dot products of the generated vector with the item embeddings. The chain's noise is one fixed draw
(seed `sample_seed`) shared by every query, so a history gets the same scores whatever batch it is in
(up to float rounding).

Noise schedules (`schedule`): linear (beta_start .. beta_end), cosine (Nichol & Dhariwal) and exp (the
reference's default: the variance-preserving SDE discretised, beta_min 0.1, beta_max 10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recalign.cf.base import Query, dot_scores
from recalign.cf.sasrec import SASRec
from recalign.cf.sequential import SequentialModel
from recalign.errors import InputError

SCHEDULES = ("exp", "linear", "cosine")
DENOISERS = ("mlp1", "mlp2")


def beta_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """[T] float64 noise variances beta_1..beta_T."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        alphas_cumprod = torch.cos((x / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(1e-4, 0.9999)
    beta_min, beta_max = 0.1, 10.0
    x = torch.linspace(1, 2 * timesteps + 1, timesteps, dtype=torch.float64)
    return 1 - torch.exp(-beta_min / timesteps - x * 0.5 * (beta_max - beta_min) / timesteps ** 2)


class Diffusion(nn.Module):
    """The DDPM constants of a schedule (buffers, float32), the forward process and one reverse step."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        alphas = 1 - betas
        cumprod = torch.cumprod(alphas, 0)
        previous = F.pad(cumprod[:-1], (1, 0), value=1.0)
        constants = {
            "betas": betas, "alphas_cumprod": cumprod,
            "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
            # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)
            "posterior_coef1": betas * previous.sqrt() / (1 - cumprod),
            "posterior_coef2": (1 - previous) * alphas.sqrt() / (1 - cumprod),
            "posterior_variance": betas * (1 - previous) / (1 - cumprod),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (t is 0-based: t = 0 is the first noising step)."""
        return self.sqrt_alphas_cumprod[t, None] * x0 + self.sqrt_one_minus_alphas_cumprod[t, None] * noise

    def p_step(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} from the posterior mean given the predicted x0 (no noise at the last step, t = 0)."""
        mean = self.posterior_coef1[t] * x0_hat + self.posterior_coef2[t] * x_t
        return mean if t == 0 else mean + self.posterior_variance[t].sqrt() * noise


class Denoiser(nn.Module):
    """f(x_t, h, t) -> x0 prediction from [x_t, h, step embedding]: one linear layer (the reference's 'mlp1') or
    linear -> GELU -> linear ('mlp2')."""

    def __init__(self, d: int, kind: str = "mlp1"):
        super().__init__()
        self.d = d
        self.step = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        if kind == "mlp1":
            self.out = nn.Linear(3 * d, d)
        else:
            self.out = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def step_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.d // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000) / max(1, half - 1)))
        angles = t.float()[:, None] * freqs[None]
        return self.step(F.pad(torch.cat([angles.sin(), angles.cos()], -1), (0, self.d - 2 * half)))

    def forward(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([x, h, self.step_embedding(t)], -1))


class DreamRec(SequentialModel):
    name = "dreamrec"
    description = ("DreamRec: generates the next item's embedding by classifier-free guided diffusion conditioned "
                   "on a Transformer encoding of the history.")
    train_overrides = {"epochs": 200, "patience": 10, "lr": 0.005, "batch_size": 256}  # the reference's
    objectives = ("diffusion",)  # x0-prediction squared error; no CTR (bce) form
    defaults = {"embedding_size": 64, "n_layers": 1, "n_heads": 1, "inner_size": 256, "dropout": 0.1,
                "max_len": 50, "timesteps": 200, "schedule": "exp", "beta_start": 0.0001, "beta_end": 0.02,
                "guidance": 2.0, "uncond_prob": 0.1, "denoiser": "mlp1", "sample_seed": 0}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        p = self.params
        self._check(p)
        d = p["embedding_size"]
        self.encoder = SASRec(n_users, n_items, **{k: p[k] for k in SASRec.defaults})
        nn.init.normal_(self.encoder.item.weight, 0.0, 1.0)  # x0 lives on the scale of the N(0, I) noise
        with torch.no_grad():
            self.encoder.item.weight[n_items].zero_()
        self.none = nn.Parameter(torch.randn(d))  # the "no guidance" vector
        self.denoiser = Denoiser(d, p["denoiser"])
        self.diffusion = Diffusion(beta_schedule(p["schedule"], p["timesteps"], p["beta_start"], p["beta_end"]))

    @staticmethod
    def _check(p: dict) -> None:
        def number(key, low, low_ok, high=None):
            value = p[key]
            ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                  and (value >= low if low_ok else value > low) and (high is None or value < high))
            if not ok:
                bound = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high is not None else "")
                raise InputError(f"model.{key}: expected a finite number {bound}, got {value!r}")

        if isinstance(p["timesteps"], bool) or not isinstance(p["timesteps"], int) or p["timesteps"] < 1:
            raise InputError(f"model.timesteps: expected an integer >= 1, got {p['timesteps']!r}")
        if p["schedule"] not in SCHEDULES:
            raise InputError(f"model.schedule: expected one of {', '.join(SCHEDULES)}, got {p['schedule']!r}")
        if p["denoiser"] not in DENOISERS:
            raise InputError(f"model.denoiser: expected one of {', '.join(DENOISERS)}, got {p['denoiser']!r}")
        number("guidance", 0, True)
        number("uncond_prob", 0, True, 1)
        number("beta_start", 0, False, 1)
        number("beta_end", 0, False, 1)
        if p["beta_end"] < p["beta_start"]:
            raise InputError(f"model.beta_end: must be >= model.beta_start ({p['beta_start']}), got {p['beta_end']}")
        if p["embedding_size"] % p["n_heads"]:
            raise InputError(f"model.n_heads: must divide model.embedding_size ({p['embedding_size']}), "
                             f"got {p['n_heads']}")

    # ----- the encoder's side
    def item_table(self) -> torch.Tensor:
        return self.encoder.item_table()

    def hidden_states(self, query: Query) -> torch.Tensor:
        return self.encoder.hidden_states(query)

    # ----- generation
    def predict_x0(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor, guidance: float) -> torch.Tensor:
        """The guided x0 prediction (1 + w) f(x, h, t) - w f(x, none, t); w = 0 is the conditional model alone."""
        conditional = self.denoiser(x, h, t)
        if guidance == 0:
            return conditional
        unconditional = self.denoiser(x, self.none.expand_as(h), t)
        return (1 + guidance) * conditional - guidance * unconditional

    def generate(self, h: torch.Tensor, guidance: float | None = None) -> torch.Tensor:
        """[B, d] generated target embeddings for guidance vectors h [B, d] (the fixed noise draw)."""
        guidance = self.params["guidance"] if guidance is None else guidance
        steps = self.diffusion.timesteps
        generator = torch.Generator().manual_seed(self.params["sample_seed"])
        noise = torch.randn(steps + 1, h.shape[1], generator=generator)
        x = noise[steps].expand_as(h)
        for t in reversed(range(steps)):
            x0_hat = self.predict_x0(x, h, torch.full((len(h),), t), guidance)
            x = self.diffusion.p_step(x0_hat, x, t, noise[t])
        return x

    def query_embedding(self, query: Query) -> torch.Tensor:
        return self.generate(self.sequence_representation(query))

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return dot_scores(self.query_embedding(query), self.item_table(), items)

    # ----- training: x0-prediction loss at a random step, guidance dropped with probability uncond_prob
    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        h, targets, _ = self.encoder.target_states(batch)
        drop = torch.rand(len(h)) < self.params["uncond_prob"]
        h = torch.where(drop[:, None], self.none.expand_as(h), h)
        x0 = self.encoder.item(targets).detach()
        t = torch.randint(0, self.diffusion.timesteps, (len(h),))
        x_t = self.diffusion.q_sample(x0, t, torch.randn_like(x0))
        return F.mse_loss(self.denoiser(x_t, h, t), x0)

"""An analytic ComfyUI model: its denoiser is the exact posterior mean of an isotropic Gaussian mixture.

Data law: x0 ~ Σ_k π_k N(μ_k·1, s_k²·I) over every element of a latent (μ_k, s_k scalars per component, or μ_k per
channel). The conditioning tensor (1, 1, K) is a component mask: a one-hot row selects one component, an all-ones
row is the whole mixture (the unconditional). The model goes through the host's real path (BaseModel,
calculate_input / calculate_denoised, CFGGuider, samplers); only the network is replaced by the closed form, so
sampled statistics can be compared to exact targets. EPS, V-prediction and flow (CONST) parameterisations.
"""
from __future__ import annotations

import types

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models


class GMMNet(torch.nn.Module):
    """Returns the raw output (ε, v or velocity) whose `calculate_denoised` is the exact posterior mean."""

    def __init__(self, means, stds, weights, kind, **_unused):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))      # [K] or [K, C]
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float64))        # [K]
        self.register_buffer("log_w", torch.as_tensor(weights, dtype=torch.float64).log())
        self.kind = kind
        self.anchor = torch.nn.Parameter(torch.zeros(1))                               # gives the model a dtype
        self.calls = 0
        self.rows = 0

    @property
    def dtype(self):
        return torch.float32

    def posterior_mean(self, x, sigma, mask):
        """E[x0 | x] for x = α·x0 + σ·n, mixture restricted to mask [B, K] (float64)."""
        alpha = (1 - sigma) if self.kind == "flow" else torch.ones_like(sigma)
        a, s = alpha.view(-1, 1), sigma.view(-1, 1)                                     # [B, 1]
        B, d = x.shape[0], x[0].numel()
        mu = self.means.view(self.means.shape[0], -1, *([1] * (x.ndim - 2)))             # [K, C|1, 1, ...]
        mu_full = mu.expand(-1, *x.shape[1:]).reshape(mu.shape[0], -1)                   # [K, d]
        var = a ** 2 * self.stds.view(1, -1) ** 2 + s ** 2                               # [B, K]
        xf = x.reshape(B, 1, -1)
        diff = xf - a.view(B, 1, 1) * mu_full.unsqueeze(0)                               # [B, K, d]
        loglik = -0.5 * (diff ** 2).sum(-1) / var - 0.5 * d * var.log()
        logits = torch.where(mask > 0, self.log_w + mask.clamp_min(1e-30).log() + loglik, torch.tensor(-torch.inf))
        resp = torch.softmax(logits, dim=1)                                              # [B, K]
        gain = (a * self.stds.view(1, -1) ** 2 / var).unsqueeze(-1)                      # [B, K, 1]
        comp = mu_full.unsqueeze(0) + gain * diff                                        # E[x0 | x, k]
        return (resp.unsqueeze(-1) * comp).sum(1).reshape(x.shape)

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        self.calls += 1
        self.rows += xc.shape[0]
        sigma = transformer_options["sigmas"].to(torch.float64).view(-1)
        if sigma.numel() != xc.shape[0]:       # the host passes the un-batched sigmas; chunks are concatenated
            sigma = sigma.repeat(xc.shape[0] // sigma.numel())
        xc = xc.to(torch.float64)
        sv = sigma.view(-1, *([1] * (xc.ndim - 1)))
        if self.kind == "flow":
            x = xc
        else:
            x = xc * (sv ** 2 + 1).sqrt()                                                # undo calculate_input
        mask = context[:, 0, :].to(torch.float64)
        d = self.posterior_mean(x, sigma, mask)
        if self.kind == "v":
            out = (x / (sv ** 2 + 1) - d) * (sv ** 2 + 1).sqrt() / sv
        else:
            out = (x - d) / sv                                                           # ε (EPS) or velocity
        return out.float()


def _nearest_timestep(self, sigma):
    """ModelSamplingDiscrete.timestep by binary search: the same index (nearest log σ, ties to the lower one).

    The host's version forms a [1000, rows] distance table per call, which dominates a model call of the analytic
    net once the batch holds tens of thousands of particles; this one is O(rows · log 1000). Same result, bit for
    bit (tests/guiders/test_analytic_model.py compares the two)."""
    log_sigma = sigma.log().to(self.log_sigmas.device)
    table = self.log_sigmas
    flat = log_sigma.reshape(-1).to(table.dtype)
    hi = torch.searchsorted(table, flat).clamp(1, table.numel() - 1)
    lo = hi - 1
    take_hi = (flat - table[hi]).abs() < (flat - table[lo]).abs()
    return torch.where(take_hi, hi, lo).view(sigma.shape).to(sigma.device)


def build_gmm_model(means, stds, weights, *, kind: str = "eps"):
    """ModelPatcher of the analytic model; kind in eps / v / flow. Returns (patcher, net)."""
    if kind == "flow":
        config = comfy.supported_models.SD3({"in_channels": 4})
        mtype = comfy.model_base.ModelType.FLOW
    else:
        config = comfy.supported_models.SD15({"in_channels": 4, "context_dim": len(weights)})
        mtype = comfy.model_base.ModelType.V_PREDICTION if kind == "v" else comfy.model_base.ModelType.EPS

    def net_factory(**_cfg):
        return GMMNet(means, stds, weights, kind)

    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(config, model_type=mtype, unet_model=net_factory)
    model.latent_format = comfy.latent_formats.LatentFormat()            # identity: the mixture is the latent law
    if kind != "flow":                                                  # discrete schedule: cheap timestep lookup
        model.model_sampling.timestep = types.MethodType(_nearest_timestep, model.model_sampling)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, model.diffusion_model


def component_cond(k: int | None, n_components: int) -> list:
    """Conditioning selecting component k (None: the whole mixture, i.e. the unconditional)."""
    mask = torch.ones(1, 1, n_components) if k is None else torch.nn.functional.one_hot(
        torch.tensor([[k]]), n_components).float()
    return [[mask, {}]]

"""Feynman–Kac correctors in ComfyUI: a particle SAMPLER and a GUIDER that serves the experts of a target.

`FKCSampler` (node GL_SamplerFKC) is a `comfy.samplers.Sampler`, so SamplerCustom / SamplerCustomAdvanced run it
with any of these guiders:

* a CFG guider (CFGGuider node, the guider SamplerCustom builds from positive/negative/cfg): target
  q(x|c)^β·q(x)^(1−β) with β = the guider's cfg. The host's own CFG path runs (one batched call for cond and
  uncond over all particles); a post-CFG hook appended for this run reads D_c and D_u. No negative, or cfg 1: the
  target is q(x|c) itself and all weights are 1 (the run is K independent SDE samples, logged).
* `FKCGuider` (node GL_FKCGuider): product q₁·q₂, composition q₁·q₂/q_u, annealing q^β, or cfg, with its own
  conditionings; one `calc_cond_batch` call evaluates every expert. Used with any other sampler it returns the
  effective denoiser D_eff (the unweighted guided sampler of the same target).

Particles live in the batch dimension: K per requested image. The kernels (kernels/smc.py) use the image-major
layout (row = image·K + particle); the model is called in the particle-major layout (row = particle·B + image),
because the host repeats a conditioning batch of B rows by tiling it, so per-image conditionings, ControlNet hints
and inpainting latents stay with their image. Particle 0 of each image starts from the run's own noise (K = 1 is
the plain guided SDE from the same seed); the other particles and all later randomness (SDE noise, resampling)
come from a CPU generator seeded with the run's seed, so the same seed gives the same result.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.samplers

from ..kernels import smc
from ..kernels.coords import FLOW
from .family import coords_for, window_bounds

LOG = logging.getLogger("guidance_lab")
NODE = "GL_SamplerFKC (Feynman–Kac corrector sampler)"
GUIDER_NODE = "GL_FKCGuider (Feynman–Kac target guider)"
FLOW_START_SIGMA = 0.995  # DESIGN: first σ of a flow schedule when Σβ ≠ 1 (the target score is singular at σ = 1)

# the nodes' option lists (nodes/ never imports kernels/)
MODES, PROPAGATIONS, STOCHASTIC_PROPAGATIONS = smc.MODES, smc.PROPAGATIONS, smc.STOCHASTIC_PROPAGATIONS
RESAMPLE_RULES, OUTPUTS = smc.RESAMPLE_RULES, smc.OUTPUTS

# expert conditionings of each GL_FKCGuider mode, in the order of kernels.smc.mode_betas
MODE_EXPERTS = {"cfg": ("positive", "negative"), "product": ("positive", "positive_2"),
                "composition": ("positive", "positive_2", "negative"), "annealing": ("positive",)}


class FKCError(ValueError):
    """Bad input for the FKC nodes (the message names the node, the value and the fix)."""


def _describe_mode(mode: str, betas) -> str:
    return {"cfg": f"CFG target q(x|c)^{betas[0]:g}·q(x)^{betas[-1]:g}", "product": "product q₁·q₂",
            "composition": "composition q₁·q₂/q_u", "annealing": f"annealed q^{betas[0]:g}"}[mode]


def _sigma_value(timestep) -> float:
    t = timestep.reshape(-1) if torch.is_tensor(timestep) else torch.tensor([float(timestep)])
    return float(t[0])


# ------------------------------------------------------------------------------------------------- the guider

class FKCGuider(comfy.samplers.CFGGuider):
    """A guider whose target is Π q_i^{β_i} (mode: cfg, product, composition, annealing).

    `fkc_experts` returns every expert's denoised prediction from one batched host call; `predict_noise` returns
    the x0 prediction D_eff = x̃ + Σβ_i(D_i − x̃), so the guider also works with every core sampler (unweighted)."""

    def __init__(self, model_patcher, mode: str, beta: float = 1.0):
        super().__init__(model_patcher)
        if mode not in MODE_EXPERTS:
            raise FKCError(f"{GUIDER_NODE}: unknown mode {mode!r}; choose one of {', '.join(MODE_EXPERTS)}")
        self.mode = mode
        try:
            self.betas = smc.mode_betas(mode, beta if mode in ("cfg", "annealing") else None)
        except ValueError as e:
            raise FKCError(f"{GUIDER_NODE}: {e}. Set beta > 0 (annealing) or a finite cfg.") from None
        self.cfg = float(beta) if mode == "cfg" else 1.0
        self.coords = coords_for(model_patcher.get_model_object("model_sampling"), node=GUIDER_NODE)

    def set_expert_conds(self, **conds) -> None:
        missing = [k for k in MODE_EXPERTS[self.mode] if conds.get(k) is None]
        if missing:
            need = {"positive_2": "a second prompt (positive_2)", "negative": "a negative prompt (negative)",
                    "positive": "a prompt (positive)"}
            raise FKCError(f"{GUIDER_NODE}: mode {self.mode!r} needs " + " and ".join(need[m] for m in missing)
                           + "; connect it or choose another mode")
        self.inner_set_conds({k: conds[k] for k in MODE_EXPERTS[self.mode]})

    def describe(self) -> str:
        return _describe_mode(self.mode, self.betas)

    def fkc_experts(self, x, timestep, model_options=None, seed=None) -> list:
        """D_i of every expert for the states x (one batched call; other nodes' model patches and APPLY_MODEL /
        DIFFUSION_MODEL wrappers apply, pre/post-CFG functions do not — they are written for a cond/uncond pair)."""
        conds = [self.conds.get(k) for k in MODE_EXPERTS[self.mode]]
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options or {})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (host signature)
        experts = self.fkc_experts(x, timestep, model_options, seed)
        sigma = _sigma_value(timestep)
        if abs(sum(self.betas) - 1.0) > 1e-9 and self.coords.alpha(sigma) <= 0:
            raise FKCError(f"{GUIDER_NODE}: mode {self.mode!r} has no finite target at σ = {sigma:g} on this flow "
                           f"model (the exponents sum to {sum(self.betas):g}, not 1). Use GL_SamplerFKC (it starts "
                           f"at σ = {FLOW_START_SIGMA}) or a schedule that starts below σ = 1 (denoise < 1).")
        d = smc.effective_denoised(x, experts, self.betas, sigma, coords=self.coords)
        return d.to(x.dtype)


# ------------------------------------------------------------------------------------------------ the sampler

class _CFGExperts:
    """D_c, D_u of a CFG guider through the host's own CFG path (post-CFG hook appended for this run only)."""

    def __init__(self, guider, model_options: dict, seed):
        self.guider, self.seed = guider, seed
        self.captured: dict = {}
        self.options = comfy.model_patcher.set_model_options_post_cfg_function(dict(model_options), self._grab)
        self.beta = float(getattr(guider, "cfg", 1.0))
        others = len(model_options.get("sampler_post_cfg_function", []))
        self.bypassed = ["sampler_cfg_function"] if "sampler_cfg_function" in model_options else []
        if others:
            self.bypassed.append(f"{others} post-CFG function(s)")

    def _grab(self, args):
        self.captured["cond"] = args["cond_denoised"]
        self.captured["uncond"] = args.get("uncond_denoised") if args.get("uncond") is not None else None
        return args["denoised"]

    def __call__(self, x, timestep):
        self.captured.clear()
        self.guider(x, timestep, model_options=self.options, seed=self.seed)
        if "cond" not in self.captured:
            raise FKCError(f"{NODE}: the guider did not run the host's CFG path (another node's PREDICT_NOISE "
                           "wrapper replaced it); FKC cannot read the conditional prediction")
        if self.captured["uncond"] is None:
            return [self.captured["cond"]], (1.0,)
        return [self.captured["cond"], self.captured["uncond"]], smc.mode_betas("cfg", self.beta)


class FKCSampler(comfy.samplers.Sampler):
    """K particles per image, weighted by the Feynman–Kac correction of the guider's target and resampled."""

    def __init__(self, *, particles: int = 8, propagation: str = "ddpm", resample: str = "every_step",
                 kappa: float = 0.5, temperature: float = 1.0, clamp: float = 2.0, start_percent: float = 0.0,
                 end_percent: float = 1.0, output: str = "best"):
        self.k = int(particles)
        if self.k < 1:
            raise FKCError(f"{NODE}: particles = {particles}; use at least 1 (2 or more for any correction)")
        try:
            smc.check_propagation(propagation, weighted=self.k > 1)
        except ValueError as e:
            raise FKCError(f"{NODE}: {e}. Choose ddpm or euler_maruyama (or particles = 1 for an unweighted "
                           "comparison run)") from None
        for name, v, lo, hi in (("kappa", kappa, 0.0, 1.0), ("start_percent", start_percent, 0.0, 1.0),
                                ("end_percent", end_percent, 0.0, 1.0)):
            if not lo <= float(v) <= hi:
                raise FKCError(f"{NODE}: {name} = {v} is outside [{lo}, {hi}]")
        if float(start_percent) > float(end_percent):
            raise FKCError(f"{NODE}: start_percent ({start_percent}) is after end_percent ({end_percent}); the "
                           "weighting window would be empty")
        if temperature < 0 or clamp < 0:
            raise FKCError(f"{NODE}: temperature ({temperature}) and clamp ({clamp}) must be >= 0")
        if resample not in smc.RESAMPLE_RULES:
            raise FKCError(f"{NODE}: unknown resampling rule {resample!r}; choose one of {smc.RESAMPLE_RULES}")
        if output not in smc.OUTPUTS:
            raise FKCError(f"{NODE}: unknown output {output!r}; choose one of {smc.OUTPUTS}")
        self.propagation, self.resample, self.kappa = propagation, resample, float(kappa)
        self.temperature, self.clamp, self.output = float(temperature), float(clamp), output
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.last_result: smc.FKCResult | None = None

    # -- the experts of the guider's target
    def _experts(self, guider, model_options: dict, seed):
        """(experts(x, t) → (denoised list, betas), betas, description) for this run's guider."""
        if isinstance(guider, FKCGuider):
            def fkc(x, t):
                return guider.fkc_experts(x, t, model_options, seed), guider.betas
            return fkc, guider.betas, guider.describe()
        if type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
            raise FKCError(f"{NODE}: the guider {type(guider).__name__} combines its predictions in its own way "
                           "(e.g. DualCFGGuider, PerpNeg); FKC needs the experts of its target. Use a CFGGuider "
                           "(positive, negative, cfg = β), BasicGuider, or GL_FKCGuider for products, "
                           "compositions and annealing")
        cfg = _CFGExperts(guider, model_options, seed)
        if cfg.bypassed:
            LOG.warning("%s: %s of other nodes are not applied to the particles' moves: FKC moves with the exact "
                        "mixture D_u + β(D_c − D_u) its weights are derived for", NODE, " and ".join(cfg.bypassed))
        has_negative = guider.conds.get("negative") is not None
        if has_negative and not math.isclose(cfg.beta, 1.0):
            betas = smc.mode_betas("cfg", cfg.beta)
            return cfg, betas, _describe_mode("cfg", betas)
        return cfg, (1.0,), "conditional model q(x|c) (no negative or cfg 1: every weight is 1)"

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider = model_wrap
        base = guider.inner_model
        ms = base.model_sampling
        coords = coords_for(ms, node=NODE)
        extra_args = dict(extra_args)
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed")
        seed = 0 if seed is None else int(seed)
        experts, betas0, target = self._experts(guider, model_options, seed)
        k, b = self.k, noise.shape[0]
        s_sum = float(sum(betas0))
        if coords.kind == FLOW and abs(s_sum - 1.0) > 1e-9 and float(sigmas[0]) >= FLOW_START_SIGMA:
            LOG.info("%s: %s on a flow model starts at σ = %g instead of %g (its score is singular at σ = 1)",
                     NODE, target, FLOW_START_SIGMA, float(sigmas[0]))
            sigmas = torch.cat([sigmas.new_tensor([FLOW_START_SIGMA]), sigmas[sigmas < FLOW_START_SIGMA]])
        if len(sigmas) < 2:
            return latent_image if latent_image is not None else noise
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if k > 1:
            extra = torch.randn((b, k - 1) + tuple(noise.shape[1:]), generator=gen, dtype=torch.float32)
            noise_p = torch.cat([noise.unsqueeze(1), extra.to(noise.device, noise.dtype)], dim=1).flatten(0, 1)
        else:
            noise_p = noise
            LOG.warning("%s: particles = 1 — no weights or resampling are possible; this run is the plain guided "
                        "SDE of the %s (no correction)", NODE, target)
        latent_p = _per_particle(latent_image, b, k) if latent_image is not None else torch.zeros_like(noise_p)
        mask_p = _per_particle(denoise_mask, b, k) if denoise_mask is not None else None
        scale = smc.initial_noise_scale(betas0)
        x = ms.noise_scaling(sigmas[0], noise_p * scale, latent_p, self.max_denoise(model_wrap, sigmas))

        def to_pm(t):   # image-major [B·K] → particle-major
            return t.unflatten(0, (b, k)).transpose(0, 1).flatten(0, 1)

        def to_im(t):
            return t.unflatten(0, (k, b)).transpose(0, 1).flatten(0, 1)

        if mask_p is not None:   # inpainting: what KSamplerX0Inpaint blends in, per particle
            mask_pm, noise_pm, latent_pm = to_pm(mask_p), to_pm(noise_p * scale), to_pm(latent_p)
        else:
            mask_pm = None

        def denoise_experts(x_im, sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            xx = to_pm(x_im)
            t = torch.full((xx.shape[0],), float(sigma), device=xx.device, dtype=sigmas.dtype)
            m = None
            if mask_pm is not None:
                m = mask_pm
                if "denoise_mask_function" in model_options:
                    m = model_options["denoise_mask_function"](t, m, extra_options={"model": guider,
                                                                                       "sigmas": sigmas})
                xx = xx * m + base.scale_latent_inpaint(x=xx, sigma=t, noise=noise_pm, latent_image=latent_pm) * (1 - m)
            ds, betas = experts(xx, t)
            if tuple(betas) != tuple(betas0):
                raise FKCError(f"{NODE}: the guider's target changed during the run ({betas0} → {betas}); "
                               "another node (e.g. Adaptive Guidance) skips the unconditional branch — remove it")
            if m is not None:
                ds = [d * m + latent_pm * (1 - m) for d in ds]
            return [to_im(d) for d in ds]

        window = None
        if self.start_percent > 0 or self.end_percent < 1:
            lo, hi = window_bounds(ms, self.start_percent, self.end_percent)
            window = (hi, lo)
        total = len(sigmas) - 1

        def on_step(info):
            if callback is None:
                return
            rows = slice(None) if self.output == "all" else slice(None, None, k)   # particle 0 of each image
            x_rows = info["x"][rows]
            d = smc.effective_denoised(x_rows, [e[rows] for e in info["denoised"]], betas0, info["sigma"],
                                       coords=coords)
            callback(info["i"], d.to(noise.dtype), x_rows, total)

        result = smc.sample_fkc(denoise_experts, x, sigmas.tolist(), k=k, betas=betas0, coords=coords,
                                propagation=self.propagation, resample=self.resample, kappa=self.kappa,
                                temperature=self.temperature, clamp=self.clamp, sigma_window=window, generator=gen,
                                callback=on_step)
        self.last_result = result
        _log_run(result, k, target, self)
        out = smc.select_output(result.x, result.log_w, k, self.output, generator=gen)
        return ms.inverse_noise_scaling(sigmas[-1], out)


def _per_particle(t: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """[B or 1, ...] → [B·K, ...] image-major (a single row is shared by every image)."""
    if t.shape[0] == 1 and b != 1:
        t = t.expand((b,) + tuple(t.shape[1:]))
    if t.shape[0] != b:
        raise FKCError(f"{NODE}: a latent/mask batch of {t.shape[0]} does not match the noise batch of {b}")
    return t.repeat_interleave(k, dim=0)


def _log_run(result: smc.FKCResult, k: int, target: str, sampler: FKCSampler) -> None:
    if k == 1 or not result.ess:
        return
    ess_min = torch.stack(result.ess).min().item()
    res = result.resamplings.float().mean().item() if result.resamplings is not None else 0.0
    LOG.info("%s: %s, K = %d, %d weighted steps, lowest ESS %.2f of %d, %.1f resamplings per image (%s, clamp "
             "%g, temperature %g)", NODE, target, k, result.weighted_steps, ess_min, k, res, sampler.resample,
             sampler.clamp, sampler.temperature)

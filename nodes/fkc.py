"""GL_SamplerFKC (→ SAMPLER) and GL_FKCGuider (→ GUIDER): Feynman–Kac corrector particle sampling."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import fkc as options
from ..guiders.fkc import FKCGuider, FKCSampler
from ._registry import register
from ._validate import percent_range_error

SAMPLER_ID = "GL_SamplerFKC"
GUIDER_ID = "GL_FKCGuider"


@register
class SamplerFKC(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_SamplerFKC",
            display_name="FKC Particle Sampler (Feynman–Kac correctors)",
            category="Guidance Lab/samplers",
            description=(
                "Feynman–Kac correctors (Skreta et al., ICML 2025, arXiv:2503.02819). CFG does not sample the "
                "distribution it aims at, q(x|c)^β·q(x)^(1−β); this sampler runs K particles per image with the "
                "stochastic reverse SDE of that target, weights them by the exact correction and resamples, so the "
                "particles follow the target as K grows. Use with SamplerCustom / SamplerCustomAdvanced and a CFG "
                "guider (β = cfg) or GL_FKCGuider (product of two prompts, composition, temperature annealing). "
                "Cost: K × the guider's model calls per step, batched over particles. Works on EPS, V-prediction "
                "and flow models. The increment clamp (default 2, as in the authors' image code), temperature and "
                "σ-window are stabilisers outside the theory: clamp 0, temperature 1, full window = exact weights. "
                "The DDPM step is paired with an exact-over-the-step weight factor (a Guidance Lab derivation, "
                "not the paper's left-point rule)."),
            inputs=[
                io.Int.Input("particles", default=8, min=1, max=64, tooltip=(
                    "K particles per requested image, run as one batch (memory and time grow linearly with K). "
                    "1 = no correction (plain guided SDE, logged).")),
                io.Combo.Input("propagation", options=list(options.PROPAGATIONS), default="ddpm", tooltip=(
                    "Particle move: ddpm (ancestral, η = 1) or euler_maruyama; both are the stochastic reverse SDE "
                    "the weights are derived for. euler (deterministic) only with particles = 1.")),
                io.Combo.Input("resample", options=list(options.RESAMPLE_RULES), default="every_step", tooltip=(
                    "When to resample (systematic, within each image's particles, never on the last step): "
                    "every_step (authors' code), ess (when the effective sample size drops below kappa·K), never "
                    "(weights only decide the output).")),
                io.Float.Input("kappa", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=(
                    "ess rule only: resample when ESS < kappa·K.")),
                io.Float.Input("temperature", default=1.0, min=0.0, max=10.0, step=0.05, tooltip=(
                    "Multiplies every log-weight increment: 1 = exact, < 1 softer weights (less collapse, less "
                    "correction), 0 = no weighting.")),
                io.Float.Input("clamp", default=2.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Clip of each step's increments after centring over the particles (authors' image code: 2). "
                    "0 = off (exact). High-dimensional latents collapse onto one particle without it.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Weighting window start (fraction of the schedule, 0 = first step). Outside the window the "
                    "particles still move with the guided SDE but are not reweighted.")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Weighting window end (1 = to the end). The last step is never weighted.")),
                io.Combo.Input("output", options=list(options.OUTPUTS), default="best", tooltip=(
                    "best: per image the particle with the highest final weight (after resampling: the first); "
                    "sample: one drawn by weight; all: every particle (the latent batch becomes K × larger, "
                    "image-major).")),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip=(
                "Use with SamplerCustom / SamplerCustomAdvanced and a CFG guider or GL_FKCGuider."))],
        )

    @classmethod
    def validate_inputs(cls, particles=None, propagation=None, start_percent=None, end_percent=None):
        error = percent_range_error(SAMPLER_ID, start_percent=start_percent, end_percent=end_percent)
        if error:
            return error
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return (f"{SAMPLER_ID}: start_percent ({start_percent}) is after end_percent ({end_percent}); set e.g. "
                    "0 and 1")
        if (particles is not None and propagation is not None and particles > 1
                and propagation not in options.STOCHASTIC_PROPAGATIONS):
            return (f"{SAMPLER_ID}: propagation '{propagation}' is deterministic and the FKC weights need the "
                    "stochastic SDE; choose ddpm or euler_maruyama (or particles = 1)")
        return True

    @classmethod
    def execute(cls, particles, propagation, resample, kappa, temperature, clamp, start_percent, end_percent,
                output) -> io.NodeOutput:
        return io.NodeOutput(FKCSampler(particles=particles, propagation=propagation, resample=resample, kappa=kappa,
                                        temperature=temperature, clamp=clamp, start_percent=start_percent,
                                        end_percent=end_percent, output=output))


@register
class FKCGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_FKCGuider",
            display_name="FKC Target Guider (product / composition / annealing)",
            category="Guidance Lab/guiders",
            description=(
                "The target of a Feynman–Kac corrector run, with its experts: product q₁·q₂ of two prompts, "
                "composition q₁·q₂/q_u (the product without counting the unconditional prior twice), annealing "
                "q^β (β > 1 sharper, < 1 more diverse), or cfg q(x|c)^β·q(x)^(1−β). With GL_SamplerFKC the "
                "particles are weighted towards the exact target; with any other sampler the guider returns the "
                "effective denoiser x̃ + Σβ_i(D_i − x̃) (the unweighted guided sampler). All experts run in one "
                "batched call per step (product 2, composition 3, annealing 1 model evaluation per particle). "
                "Other nodes' pre/post-CFG functions are not applied (they are written for a cond/uncond pair); "
                "model patches and wrappers are. Products and annealing on flow models start at σ = 0.995 (the "
                "target is singular at σ = 1; a Guidance Lab choice)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (EPS, V-prediction or flow)."),
                io.Combo.Input("mode", options=list(options.MODES), default="product", tooltip=(
                    "product: both prompts at once; composition: product divided by the unconditional model "
                    "(needs negative = empty prompt); annealing: one prompt at temperature 1/β; cfg: CFG's target "
                    "with β = beta.")),
                io.Conditioning.Input("positive", tooltip="First expert's prompt (the only one for annealing)."),
                io.Conditioning.Input("positive_2", optional=True, tooltip=(
                    "Second expert's prompt (product and composition).")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "Unconditional / negative prompt (cfg and composition; usually the empty prompt).")),
                io.Float.Input("beta", default=3.0, min=0.0, max=100.0, step=0.05, tooltip=(
                    "cfg: guidance strength β (like cfg); annealing: exponent β of q^β (> 0). Ignored by product "
                    "and composition.")),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip=(
                "Connect to SamplerCustomAdvanced with GL_SamplerFKC (or any sampler for the unweighted run)."))],
        )

    @classmethod
    def validate_inputs(cls, mode=None, beta=None):
        if mode == "annealing" and beta is not None and beta <= 0:
            return f"{GUIDER_ID}: annealing needs beta > 0 (target q^beta), got {beta}; try 2 (sharper) or 0.5"
        return True

    @classmethod
    def execute(cls, model, mode, positive, beta, positive_2=None, negative=None) -> io.NodeOutput:
        guider = FKCGuider(model, mode, beta)
        guider.set_expert_conds(positive=positive, positive_2=positive_2, negative=negative)
        return io.NodeOutput(guider)

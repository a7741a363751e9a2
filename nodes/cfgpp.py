"""GL_SamplerCFGPP — CFG++ samplers (→ SAMPLER)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders.cfgpp import make_cfgpp_sampler
from ._registry import register

SAMPLER_NAMES = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"]


@register
class SamplerCFGPP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_SamplerCFGPP",
            display_name="CFG++ Sampler (flow-correct)",
            category="Guidance Lab/samplers",
            description=(
                "CFG++ (Chung et al., ICLR 2025, arXiv:2406.08070): denoise with the guided prediction, re-noise "
                "with the unconditional one. The guider's cfg is λ ∈ [0, 1] (0 = unconditional, default 0.6). "
                "Updates are written with α(σ), so they are correct on EPS, V-prediction and flow models (SD3, "
                "Flux), unlike core's 2M/2S-a CFG++ samplers. 2 NFE per step like CFG (2S-a: 4). The same λ "
                "guides more weakly at fewer steps: λ ≈ CFG ω = λ·σ̃/(σ̃−σ̃') per step (logged at run start)."),
            inputs=[
                io.Combo.Input("sampler_name", options=SAMPLER_NAMES, default="euler", tooltip=(
                    "Solver: euler (= DDIM CFG++), euler_ancestral, dpmpp_2m (second order, flow-correct form), "
                    "dpmpp_2s_ancestral (the official algorithm, 2 model calls per step).")),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Ancestral samplers only: fraction of fresh noise per step (1 = standard ancestral, 0 = "
                    "deterministic). Ignored by euler and dpmpp_2m.")),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=2.0, step=0.01, tooltip=(
                    "Ancestral samplers only: scale of the injected noise (1 = standard).")),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip=(
                "Use with SamplerCustom / SamplerCustomAdvanced; set cfg (= λ) to about 0.6."))],
        )

    @classmethod
    def execute(cls, sampler_name, eta=1.0, s_noise=1.0) -> io.NodeOutput:
        return io.NodeOutput(make_cfgpp_sampler(sampler_name, eta=eta, s_noise=s_noise))

"""GL_AdaptiveGuidance — CFG that stops evaluating the unconditional branch once it agrees (MODEL → MODEL)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders.adaptive import BATCH_POLICIES, DEFAULT_THRESHOLD, SPACES, check_settings, patch_adaptive_guidance
from ._registry import register
from ._validate import percent_range_error


@register
class AdaptiveGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_AdaptiveGuidance",
            display_name="Adaptive Guidance (skip uncond)",
            category="Guidance Lab/speed",
            description=(
                "Adaptive Guidance (Castillo et al., AAAI 2025, arXiv:2312.12487): runs normal CFG until the "
                "conditional and unconditional predictions agree, then evaluates only the conditional branch — one "
                "model call per step instead of two for the rest of the run (the paper reports about 25% less "
                "compute at CFG quality). Works with KSampler, KSamplerAdvanced and SamplerCustomAdvanced; other "
                "nodes' pre/post-CFG patches keep running after the switch. Agreement = cosine similarity of the "
                "conditional and unconditional denoised predictions, per image over all latent dimensions "
                "(Guidance Lab's design: the paper's exact space and threshold are not confirmed). Falls back "
                "to plain CFG, with a log line, when there is nothing to skip (cfg 1, no negative) or another "
                "node needs the unconditional prediction. "
                "Counts model calls: wire the model into GL_NFEReport to see them."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (EPS, V-prediction or flow models: SD1.5, "
                               "SDXL, SD3, Flux...). Use it with cfg > 1 and a negative prompt."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=-1.0, max=1.5, step=0.0005, tooltip=(
                    "γ̄: switch to conditional-only once the cosine similarity of the conditional and "
                    "unconditional predictions (in `space`) exceeds this. Higher = later switch, closer to CFG, "
                    f"fewer savings; {DEFAULT_THRESHOLD:g} default (measured on the demo model: 25–27 % fewer model "
                    "calls within 1 point of CFG's accuracy), 0.98–0.999 sensible; raise it if images lose prompt "
                    "adherence. Above 1 never switches (exactly plain CFG); −1 switches after the first step.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Earliest switch, as a fraction of the model's noise schedule (0 = noisiest): the "
                    "unconditional branch is always evaluated before this point.")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Latest switch (Guidance Lab option, not in the paper): from this fraction of the schedule on "
                    "the unconditional branch is dropped even if the threshold was not reached, which guarantees "
                    "a minimum saving. 1 = never forced.")),
                io.Combo.Input("batch_policy", options=list(BATCH_POLICIES), default="all", tooltip=(
                    "How a batch decides (one model call serves the whole batch, so it switches as one): 'all' "
                    "switches when every image's similarity passed the threshold (safe, default); 'mean' when the "
                    "batch average did (earlier, but images that had not converged lose their guidance).")),
                io.Combo.Input("space", options=list(SPACES), default="denoised", tooltip=(
                    "Where the similarity is measured. 'denoised' (default): the two denoised predictions, which "
                    "align more and more as sampling proceeds. 'noise': the two noise predictions — near 1 from "
                    "the first step (both are mostly the input noise), so it needs thresholds like 0.9999; for "
                    "experiments.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with Adaptive Guidance.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None):
        error = percent_range_error("GL_AdaptiveGuidance", start_percent=start_percent, end_percent=end_percent)
        if error:
            return error
        if start_percent is None or end_percent is None:
            return True
        if end_percent < start_percent:
            return (f"GL_AdaptiveGuidance: end_percent ({end_percent}) is the latest switch and must not be below "
                    f"start_percent ({start_percent}); use end_percent = 1 for no forced switch")
        return True

    @classmethod
    def execute(cls, model, threshold, start_percent, end_percent, batch_policy="all",
                space="denoised") -> io.NodeOutput:
        check_settings(threshold=threshold, start_percent=start_percent, end_percent=end_percent,
                       batch_policy=batch_policy, space=space)
        return io.NodeOutput(patch_adaptive_guidance(model, threshold=threshold, start_percent=start_percent,
                                                     end_percent=end_percent, batch_policy=batch_policy,
                                                     space=space))

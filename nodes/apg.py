"""GL_APG — Adaptive Projected Guidance (MODEL → MODEL)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders.apg import check_settings, patch_apg
from ._registry import register
from ._validate import percent_range_error


@register
class APG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_APG",
            display_name="Adaptive Projected Guidance (APG)",
            category="Guidance Lab/guidance",
            description=(
                "Replaces CFG's update D_u + w·Δ by D_c + (w−1)·(Δ⊥ + η·Δ∥): the part of the guidance parallel to "
                "the conditional prediction (which causes oversaturation) is down-weighted, the guidance norm is "
                "clamped and reverse momentum smooths it, so high cfg stays clean. Sadat et al., ICLR 2025, "
                "arXiv:2410.02416 (as in the reference ports). 0 extra NFE; pre-CFG hook, chains with other "
                "guidance nodes. Use a high cfg (e.g. 10–15). Unlike core's APG node, η=1, threshold 0, "
                "momentum 0 equals plain CFG, and cfg 1 is a no-op."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (any EPS, V-prediction or flow model)."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "η, weight of the guidance component parallel to the conditional prediction. 0 (paper "
                    "recommendation) removes it; 1 keeps it (then threshold 0 and momentum 0 give plain CFG).")),
                io.Float.Input("norm_threshold", default=15.0, min=0.0, max=200.0, step=0.1, tooltip=(
                    "r, per-sample L2 bound on the guidance Δ = D_c − D_u (0 = no clamp). Paper: 15 for SDXL "
                    "at 1024²; community presets 2.5 for SD1.5, 7.5 for SD2.1. Absolute norm: it grows with "
                    "latent size — see scale_threshold_by_size.")),
                io.Float.Input("momentum", default=-0.5, min=-0.99, max=0.99, step=0.01, tooltip=(
                    "β, reverse momentum m ← Δ + β·m (0 = off). Paper: −0.5 for SDXL; community −0.45 SD1.5, "
                    "−0.75 SD2.1. Fresh for every sampling run, advanced once per step.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Start of the window where APG replaces CFG, as a fraction of the model's noise schedule "
                    "(0 = noisiest). Outside the window plain CFG applies.")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "End of the APG window (1 = last step); must be larger than start_percent.")),
                io.Boolean.Input("scale_threshold_by_size", default=False, tooltip=(
                    "Guidance Lab option (not in the paper): use r·√(d/65536), d = elements per latent, so a "
                    "threshold tuned at SDXL 1024² (4×128×128) transfers to other sizes and channel counts.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with APG guidance.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None):
        error = percent_range_error("GL_APG", start_percent=start_percent, end_percent=end_percent)
        if error:
            return error
        if start_percent is None or end_percent is None:
            return True
        if not start_percent < end_percent:
            return (f"GL_APG: start_percent ({start_percent}) must be smaller than end_percent ({end_percent}); "
                    "set e.g. 0 and 1")
        return True

    @classmethod
    def execute(cls, model, eta, norm_threshold, momentum, start_percent, end_percent,
                scale_threshold_by_size=False) -> io.NodeOutput:
        check_settings(eta=eta, norm_threshold=norm_threshold, momentum=momentum, start_percent=start_percent,
                       end_percent=end_percent)
        return io.NodeOutput(patch_apg(model, eta=eta, norm_threshold=norm_threshold, momentum=momentum,
                                       start_percent=start_percent, end_percent=end_percent,
                                       scale_threshold_by_size=scale_threshold_by_size))

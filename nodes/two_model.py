"""GL_MultiModelGuider — autoguidance, CFG + autoguidance, NPO, SINE and hybrid-model CFG in one GUIDER."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import two_model as tm
from ._registry import register
from ._validate import percent_range_error

MODE_HELP = (
    "autoguidance: D_weak + cfg·(D_main − D_weak), both on positive (Karras et al., arXiv 2406.02507; paper: "
    "cfg ≈ 2–2.5). cfg+autoguidance: CFG at cfg plus autoguidance at scale_2 (design; 3 rows per step). "
    "npo: CFG whose negative branch runs on model_2, the negative-preference model (Diffusion-NPO). sine: CFG at "
    "cfg on positive with a share scale_2 = v of the positive term taken by model_2 on positive_2 inside the "
    "window (SINE, Zhang et al., CVPR 2023: v 0.3–0.6, window = the noisiest 60 %). hybrid: CFG at cfg on the "
    "base model plus scale_2·(D_personal − D_base) (hybrid-model CFG; the paper's exact formula is not confirmed, "
    "this is the Guidance Lab design). cfg: plain CFG (for comparison).")


@register
class MultiModelGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_MultiModelGuider",
            display_name="Multi-Model Guider (autoguidance, NPO, SINE, hybrid CFG)",
            category="Guidance Lab/guiders",
            description=(
                "Guidance that mixes the predictions of two models (or of one model with a LoRA hook on one "
                "conditioning): D = D_main(positive) + Σ c_k·(D_k − D_main(positive)), weights summing to 1. "
                + MODE_HELP + " Without model_2 the second model's term runs on the main model with positive_2 "
                "(or, for npo, negative) — attach a LoRA or a checkpoint to that conditioning with CreateHookLora / "
                "CreateHookModelAsLora + ConditioningSetProperties, so no second copy of the weights is loaded. "
                "Cost: one model row per image per distinct active (model, conditioning): 2 for autoguidance and "
                "npo, 3 for the others (2 outside the window). Other nodes' pre/post-CFG functions run on the "
                "main pair. Use with SamplerCustomAdvanced."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The main model (for sine: the pretrained model; for hybrid: the base model).")),
                io.Conditioning.Input("positive", tooltip="The prompt, evaluated on the main model."),
                io.Combo.Input("mode", options=list(tm.MODES), default="autoguidance", tooltip=MODE_HELP),
                io.Float.Input("cfg", default=2.0, min=0.0, max=100.0, step=0.05, round=0.01, tooltip=(
                    "w: the guidance scale (autoguidance: main vs weak model, paper 2–2.5; other modes: the CFG "
                    "scale of positive vs negative, e.g. 7.5 on SD1.5). 1 = no guidance.")),
                io.Float.Input("scale_2", default=1.0, min=-10.0, max=100.0, step=0.05, round=0.01, tooltip=(
                    "cfg+autoguidance: w_a, the autoguidance scale (1 = off). sine: v in [0, 1], the fine-tuned "
                    "model's share (0.3–0.6). hybrid: w_p, the personal model's weight (1–3; 0 = off). Unused by "
                    "autoguidance, npo and cfg.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Start of the window of model_2's term (fraction of the noise schedule, 0 = noisiest). "
                    "Outside it the term is dropped and costs nothing. hybrid: about 0.3 (the base model alone "
                    "while the composition forms, the subject after; measured on the demo: more of the prompt "
                    "kept for the same subject similarity).")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "End of model_2's window; must be larger than start_percent. sine: about 0.6 (the paper "
                    "uses the fine-tuned model while t > 400 of 1000).")),
                io.Float.Input("max_ratio", default=0.0, min=0.0, max=10.0, step=0.01, tooltip=(
                    "Optional cap per image: ‖D_k − D_main‖ ≤ max_ratio·‖D_main‖ for every term (0 = off).")),
                io.Model.Input("model_2", optional=True, tooltip=(
                    "The second model: the weak/early checkpoint (autoguidance), the negative-preference model "
                    "(npo), the fine-tuned model (sine) or the personalised model (hybrid). Same family and "
                    "latent format as model. Leave unconnected to use a hook on positive_2/negative instead.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "The negative/unconditional prompt (needed by every mode except autoguidance).")),
                io.Conditioning.Input("positive_2", optional=True, tooltip=(
                    "The conditioning of model_2's term (sine: the source prompt with its identifier). Default: "
                    "positive. Without model_2: positive with the second model attached as a hook.")),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, scale_2=None, start_percent=None, end_percent=None):
        err = percent_range_error("GL_MultiModelGuider", start_percent=start_percent, end_percent=end_percent)
        if err:
            return err
        if start_percent is not None and end_percent is not None and start_percent >= end_percent:
            return (f"GL_MultiModelGuider: start_percent ({start_percent}) must be smaller than end_percent "
                    f"({end_percent})")
        if mode == "sine" and scale_2 is not None and not 0.0 <= scale_2 <= 1.0:
            return f"GL_MultiModelGuider: in mode 'sine' scale_2 is v, the fine-tuned share, in [0, 1]; got {scale_2}"
        return True

    @classmethod
    def execute(cls, model, positive, mode, cfg, scale_2, start_percent, end_percent, max_ratio, model_2=None,
                negative=None, positive_2=None) -> io.NodeOutput:
        guider = tm.MultiModelGuider(model, mode, cfg=cfg, scale_2=scale_2, model_2=model_2,
                                     start_percent=start_percent, end_percent=end_percent, max_ratio=max_ratio)
        guider.set_conds(positive, negative, positive_2)
        return io.NodeOutput(guider)

"""GL_LinearAG (MODEL → MODEL), GL_LinearAGCalibrate (→ LINEAR_AG, file) and GL_LinearAGLoad (file → LINEAR_AG)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ..guiders import linear_ag_calibration as cal
from ..guiders.linear_ag import check_settings, patch_linear_ag
from ._registry import register
from ._validate import filename_prefix_error

LinearAGType = io.Custom("GL_LINEAR_AG")
DESIGN = ("The predictor's regressors (D_c,k, D_u,k−1, D_c,k−1) are Guidance Lab's labelled DESIGN: the paper's "
          "exact regressors are not confirmed.")


def prompt_lines(prompts: str | None) -> list[str]:
    return [line.strip() for line in (prompts or "").splitlines() if line.strip()]


def _too_few(prompts: str | None) -> str | None:
    n = len(prompt_lines(prompts))
    if n >= 2:
        return None
    return (f"GL_LinearAGCalibrate: prompts has {n} non-empty line(s); write at least 2 prompts, one per line "
            "(prompts like the ones you will sample; 8–16 give a steadier fit)")


@register
class LinearAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_LinearAG",
            display_name="LinearAG (predict uncond)",
            category="Guidance Lab/speed",
            description=(
                "LinearAG (Castillo et al., AAAI 2025, arXiv:2312.12487): on odd steps early in the run the "
                "unconditional model call is skipped and its prediction estimated as D̂_u,k = a·D_c,k + b·D_u,k−1 "
                "+ c·D_c,k−1 from values already computed; even steps run normal CFG and refresh the history. "
                "Cost: 1 NFE instead of 2 on predicted steps (20 steps with first_fraction 0.5: 35 NFEs instead of "
                "40). Unlike Adaptive Guidance it changes the image a little. " + DESIGN + " Without coefficients "
                "it uses (a, b, c) = (1, 1, −1): the previous step's guidance vector reused; with coefficients "
                "from GL_LinearAGCalibrate / GL_LinearAGLoad it uses the fitted per-step values and predicts only "
                "steps whose fit residual is below tau. A PREDICT_NOISE wrapper: works with KSampler and "
                "SamplerCustomAdvanced, other nodes' pre/post-CFG patches see the predicted uncond and run at the "
                "real cfg. Plain CFG with a log line when there is nothing to skip (cfg 1, no negative) or another "
                "node needs the true uncond. Wire the model into GL_NFEReport to see the calls saved."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (EPS, V-prediction or flow models). Use it "
                               "with cfg > 1 and a negative prompt."),
                io.Float.Input("first_fraction", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Share of the run in which odd steps k (1, 3, 5, …) skip the unconditional call; even steps "
                    "and the rest of the run use normal CFG. 0.5 = first half (default); 0 = plain CFG.")),
                io.Float.Input("tau", default=0.05, min=0.001, max=10.0, step=0.001, tooltip=(
                    "τ, calibrated coefficients only: a step is predicted only if the calibration's relative "
                    "residual ‖D_u − D̂_u‖/‖D_u‖ there is below this. Lower = fewer, safer predictions. Ignored "
                    "without coefficients.")),
                LinearAGType.Input("coefficients", optional=True, tooltip=(
                    "Optional per-step coefficients from GL_LinearAGCalibrate or GL_LinearAGLoad, calibrated with "
                    "the same steps, sampler and scheduler as the sampler here (a different step count is an "
                    "error). Unconnected: the default (1, 1, −1).")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with LinearAG.")],
        )

    @classmethod
    def execute(cls, model, first_fraction, tau, coefficients=None) -> io.NodeOutput:
        check_settings(first_fraction=first_fraction, tau=tau)
        if coefficients is None:
            return io.NodeOutput(patch_linear_ag(model, first_fraction=first_fraction, tau=tau))
        if not isinstance(coefficients, cal.LinearAGCoefficients):
            raise ValueError(f"GL_LinearAG: the coefficients input got a {type(coefficients).__name__}; connect "
                             "GL_LinearAGCalibrate or GL_LinearAGLoad")
        return io.NodeOutput(patch_linear_ag(model, coefficients=coefficients.coefficients,
                                             residuals=coefficients.residuals, calibration_meta=coefficients.metadata,
                                             first_fraction=first_fraction, tau=tau))


@register
class LinearAGCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_LinearAGCalibrate",
            display_name="LinearAG Calibrate",
            category="Guidance Lab/speed",
            description=(
                "Fits GL_LinearAG's per-step coefficients (a_k, b_k, c_k) by least squares on full-CFG runs of "
                "your model: one run per prompt (one per line) with the sampler, scheduler, steps and cfg you will "
                "use, on a latent of your size. " + DESIGN + " Saves a .safetensors file under "
                "output/linear_ag/ (with the model fingerprint and settings) that GL_LinearAGLoad reads back, and "
                "outputs the coefficients and a summary (fit residual per step). Cost: prompts × steps × 2 NFEs "
                "per latent image, once."),
            inputs=[
                io.Model.Input("model", tooltip="The model you will sample with (with its LoRAs and patches, but "
                               "without GL_LinearAG or GL_AdaptiveGuidance, which are removed for calibration)."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts."),
                io.String.Input("prompts", multiline=True, default="", tooltip=(
                    "Calibration prompts, one per line, at least 2 (like the prompts you will sample; 8–16 give a "
                    "steadier fit). Empty lines are ignored.")),
                io.Conditioning.Input("negative", tooltip="The negative prompt you will sample with."),
                io.Latent.Input("latent", tooltip=(
                    "Its shape (size and batch) is used; each prompt is sampled on a latent of this shape. A small "
                    "batch (1–2) is enough.")),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed; prompt i uses seed + i."),
                io.Int.Input("steps", default=20, min=2, max=10000, tooltip=(
                    "Sampler steps; must equal the steps of the sampler that uses the coefficients.")),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=(
                    "The cfg you will sample with (not 1: there is no unconditional branch at cfg 1).")),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip=(
                    "The sampler you will use (coefficients depend on where it evaluates the model).")),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip=(
                    "The scheduler you will use.")),
                io.String.Input("filename_prefix", default="linear_ag", tooltip=(
                    "File name prefix; saved as output/linear_ag/<prefix>_00001_.safetensors (numbered).")),
            ],
            outputs=[LinearAGType.Output(display_name="coefficients", tooltip="Per-step coefficients for "
                                         "GL_LinearAG."),
                     io.String.Output(display_name="summary", tooltip="Settings, file and fit residual per step.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, prompts=None, filename_prefix=None):
        return _too_few(prompts) or filename_prefix_error("GL_LinearAGCalibrate", filename_prefix) or True

    @classmethod
    def execute(cls, model, clip, prompts, negative, latent, seed, steps, cfg, sampler_name, scheduler,
                filename_prefix) -> io.NodeOutput:
        problem = _too_few(prompts)
        if problem:
            raise ValueError(problem)
        cal.check_calibration(n_prompts=2, negative=negative, steps=steps, cfg=cfg, sampler_name=sampler_name,
                              scheduler=scheduler)
        if clip is None:
            raise ValueError("GL_LinearAGCalibrate: clip is None (the checkpoint has no text encoder); connect a "
                             "CLIP from a loader that provides one")
        positives = [clip.encode_from_tokens_scheduled(clip.tokenize(line)) for line in prompt_lines(prompts)]
        coefficients, residuals, metadata = cal.calibrate_linear_ag(
            model, positives, negative, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
            seed=seed, latent=latent)
        value = cal.save_calibration(cal.LinearAGCoefficients(coefficients, residuals, metadata),
                                     filename_prefix or "linear_ag")
        text = value.summary()
        return io.NodeOutput(value, text, ui=ui.PreviewText(text))


@register
class LinearAGLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = cal.coefficient_files()
        return io.Schema(
            node_id="GL_LinearAGLoad",
            display_name="LinearAG Load Coefficients",
            category="Guidance Lab/speed",
            description=(
                "Loads GL_LinearAG coefficients saved by GL_LinearAGCalibrate (.safetensors in output/linear_ag/ "
                "or input/linear_ag/), so calibration runs once per model, sampler, scheduler and step count. "
                + DESIGN + " Outputs the coefficients and a summary of the file (settings, fit residual per step)."),
            inputs=[io.Combo.Input("file", options=files, default=files[0] if files else None, tooltip=(
                "A coefficient file from output/linear_ag/ or input/linear_ag/ (refresh the page after a new "
                "calibration to list it)."))],
            outputs=[LinearAGType.Output(display_name="coefficients", tooltip="Per-step coefficients for "
                                         "GL_LinearAG."),
                     io.String.Output(display_name="summary", tooltip="Settings and fit residual per step.")],
        )

    @classmethod
    def validate_inputs(cls, file):
        if cal.resolve(file) is None:
            return (f"GL_LinearAGLoad: coefficient file {file!r} not found in output/linear_ag or input/linear_ag; "
                    "run GL_LinearAGCalibrate first (or copy the file there) and pick it from the list")
        return True

    @classmethod
    def fingerprint_inputs(cls, file):
        path = cal.resolve(file)
        return None if path is None else (str(path), path.stat().st_mtime_ns)   # a rewritten file reloads

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        value = cal.load_calibration(file)
        return io.NodeOutput(value, value.summary())

"""GL_SamplerDiffIER — iterative error reduction per step (→ SAMPLER)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import diffier as gd
from ._registry import register
from ._validate import percent_range_error


@register
class SamplerDiffIER(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_SamplerDiffIER",
            display_name="DiffIER Sampler (iterative error reduction)",
            category="Guidance Lab/samplers",
            description=(
                "Inspired by DiffIER (Chen, Ding, Xue, arXiv:2508.13628): reduce a per-step training–inference gap "
                "by iterations at every step before the sampler moves on. The paper's objective is not public, so "
                "what is minimised here is Guidance Lab's design: the gap e = (‖ε̂‖² − ‖ε_c‖²)/d between the "
                "energy of the noise implied by the guided prediction (ε̂ = (x − α·D̂)/σ) and by the conditional "
                "one — the noise statistics the model was trained on. Each iteration moves the state along ε̂ "
                "(x ← x + η·σ·(‖ε_c‖/‖ε̂‖ − 1)·ε̂, same x0 estimate), evaluates the guider again (+2 NFEs at cfg "
                "> 1) and keeps the move per image only if |e| dropped (else halves the step). Then the base "
                "sampler (core's own) takes its step. Cost: 2·(1 + iterations) NFEs on steps in the window, 2 "
                "elsewhere; the extra calls and the gap before/after appear in the log and in GL_NFEReport. The "
                "default window is the less noisy half (0.5–1), where the corrections measured best on the demo "
                "model (Guidance Lab's choice; the design first put it in the noisy half). Use "
                "with SamplerCustom / SamplerCustomAdvanced and a CFG guider. EPS, V-prediction and flow models."),
            inputs=[
                io.Combo.Input("sampler_name", options=list(gd.BASE), default="euler", tooltip=(
                    "The base sampler that takes each step (core's own implementation). Multistep samplers are "
                    "not offered: their history would not match a corrected state.")),
                io.Int.Input("iterations", default=1, min=0, max=8, tooltip=(
                    "K, corrections per step in the window (each +2 NFEs at cfg > 1). 0 = the base sampler "
                    "exactly.")),
                io.Float.Input("step_size", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=(
                    "η, the fraction of the energy mismatch corrected per iteration (0 = the base sampler; 1 = the "
                    "whole mismatch at once, which can overshoot at high cfg; halved automatically when a move "
                    "does not lower the gap).")),
                io.Float.Input("tolerance", default=1e-3, min=0.0, max=10.0, step=1e-4, tooltip=(
                    "Stop correcting an image once |e| is below this.")),
                io.Float.Input("start_percent", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Window start as a fraction of the schedule (0 = the noisiest step). Default 0.5: with end 1, "
                    "the less noisy half, which measured better than the noisy half on the demo model at high cfg "
                    "(BENCHMARKS.md, DiffIER sections).")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Window end as a fraction of the schedule (1 = the last step).")),
                io.Combo.Input("objective", options=list(gd.OBJECTIVES), default=gd.OBJECTIVES[0], tooltip=(
                    "What the iterations minimise. One choice today (the design above); a faithful version of the "
                    "paper's objective can be added here later without breaking saved workflows.")),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip=(
                "Use with SamplerCustom / SamplerCustomAdvanced and a CFG guider (cfg > 1: at cfg 1 there is no "
                "gap to reduce)."))],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        bad = percent_range_error("GL_SamplerDiffIER", start_percent=start_percent, end_percent=end_percent)
        if bad:
            return bad
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return (f"GL_SamplerDiffIER: start_percent ({start_percent}) is after end_percent ({end_percent}); the "
                    "window runs from the noisier start to the later end — swap them")
        return True

    @classmethod
    def execute(cls, sampler_name, iterations, step_size, tolerance, start_percent, end_percent,
                objective=gd.OBJECTIVES[0]) -> io.NodeOutput:
        return io.NodeOutput(gd.make_sampler(sampler_name, iterations=iterations, eta=step_size, tol=tolerance,
                                             start_percent=start_percent, end_percent=end_percent,
                                             objective=objective))

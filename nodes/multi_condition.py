"""GL_MultiConditionGuider — CFG with one scale per condition (SpaText-style, nested or composable)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import multi_condition as mc
from ._registry import register
from ._validate import choice_error, percent_range_error

FORM_OPTIONS = ["nested", "nested (combine inputs)", "composable"]


def _scale(i: int, default: float, optional: bool = False) -> io.Float.Input:
    return io.Float.Input(f"scale_{i}", default=default, min=-10.0, max=100.0, step=0.05, round=0.01,
                          optional=optional, tooltip=(
        f"s_{i}: the guidance scale of condition {i} (nested: of what condition {i} adds to conditions 1…{i - 1}; "
        "composable: of condition " + str(i) + " against the negative). 0 = no guidance from it."))


@register
class MultiConditionGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        windows = []
        for i in range(1, mc.MAX_CONDITIONS + 1):
            windows += [
                io.Float.Input(f"start_{i}", default=0.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip=(
                    f"Start of condition {i}'s window (fraction of the noise schedule, 0 = noisiest); outside it "
                    "its scale is 0.")),
                io.Float.Input(f"end_{i}", default=1.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip=(
                    f"End of condition {i}'s window; must be larger than start_{i}."))]
        return io.Schema(
            node_id="GL_MultiConditionGuider",
            display_name="Multi-Condition CFG Guider (per-condition scales, SpaText-style)",
            category="Guidance Lab/guiders",
            description=(
                "CFG with its own scale per condition, after SpaText's multi-conditional CFG (Avrahami et al., "
                "CVPR 2023, arXiv 2211.14305; the paper's exact formula is not confirmed — these forms are the "
                "Guidance Lab design). nested: D(∅) + Σ s_i·(D(c_≤i) − D(c_<i)), where condition i is everything "
                "up to i (e.g. 1 = global prompt, 2 = global + regional prompts); equal scales are CFG on the last "
                "condition. composable: D(∅) + Σ s_i·(D(c_i) − D(∅)). All conditions of a step go through one "
                "batched model call: N + 1 rows per image (fewer when a window or equal scales make a condition "
                "unnecessary; a combined conditioning costs a row per entry, and ComfyUI evaluates every condition "
                "on each area of an area conditioning); refresh_every = m > 1 (nested) evaluates the middle "
                "conditions only every m steps. "
                "Other nodes' pre/post-CFG functions run on the last condition and the negative. Use with "
                "SamplerCustomAdvanced."),
            inputs=[
                io.Model.Input("model", tooltip="The model (EPS, V-prediction or flow)."),
                io.Conditioning.Input("negative", tooltip="The negative/unconditional prompt, D(∅)."),
                io.Conditioning.Input("condition_1", tooltip=(
                    "Condition 1, e.g. the global prompt.")),
                io.Conditioning.Input("condition_2", tooltip=(
                    "Condition 2. nested: conditions 1 and 2 together, e.g. ConditioningCombine(global, "
                    "ConditioningSetMask(regional prompt)) — or pick 'nested (combine inputs)' to connect only the "
                    "regional prompt.")),
                io.Combo.Input("form", options=FORM_OPTIONS, default="nested", tooltip=(
                    "nested: each condition input is everything up to it (c_≤i). nested (combine inputs): the "
                    "guider builds c_≤i by combining inputs 1…i (as ConditioningCombine). composable: independent "
                    "conditions, each against the negative (each should cover the whole image).")),
                _scale(1, 7.5), _scale(2, 3.0),
                io.Int.Input("refresh_every", default=1, min=1, max=10, tooltip=(
                    "Accelerated nested variant: evaluate every condition only every m steps and reuse the middle "
                    "conditions' differences in between (2 rows per image on those steps). 1 = exact.")),
                io.Conditioning.Input("condition_3", optional=True, tooltip="Optional condition 3 (same rules)."),
                io.Conditioning.Input("condition_4", optional=True, tooltip="Optional condition 4 (same rules)."),
                _scale(3, 3.0, optional=True), _scale(4, 3.0, optional=True),
                *windows,
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, form=None, refresh_every=None, start_1=None, end_1=None, start_2=None, end_2=None,
                        start_3=None, end_3=None, start_4=None, end_4=None):
        bad_form = choice_error("GL_MultiConditionGuider", "form", form, FORM_OPTIONS)
        if bad_form:
            return bad_form
        pairs = [(start_1, end_1), (start_2, end_2), (start_3, end_3), (start_4, end_4)]
        for i, (start, end) in enumerate(pairs, 1):
            err = percent_range_error("GL_MultiConditionGuider", **{f"start_{i}": start, f"end_{i}": end})
            if err:
                return err
            if start is not None and end is not None and start >= end:
                return f"GL_MultiConditionGuider: start_{i} ({start}) must be smaller than end_{i} ({end})"
        if form == "composable" and refresh_every is not None and refresh_every > 1:
            return "GL_MultiConditionGuider: refresh_every > 1 needs a nested form; set it to 1 for composable"
        return True

    @classmethod
    def execute(cls, model, negative, condition_1, condition_2, form, scale_1, scale_2, refresh_every,
                condition_3=None, condition_4=None, scale_3=3.0, scale_4=3.0, **windows) -> io.NodeOutput:
        if condition_4 is not None and condition_3 is None:
            raise ValueError("GL_MultiConditionGuider: condition_4 is connected but condition_3 is not; connect "
                             "the conditions in order")
        conditions = [c for c in (condition_1, condition_2, condition_3, condition_4) if c is not None]
        n = len(conditions)
        scales = [scale_1, scale_2, scale_3, scale_4][:n]
        spans = [(windows.get(f"start_{i}", 0.0), windows.get(f"end_{i}", 1.0)) for i in range(1, n + 1)]
        kind = mc.COMPOSABLE if form == "composable" else mc.NESTED
        guider = mc.MultiConditionGuider(model, scales=scales, form=kind, windows=spans, refresh_every=refresh_every)
        guider.set_conds(negative, conditions, combine_inputs=form == "nested (combine inputs)")
        return io.NodeOutput(guider)

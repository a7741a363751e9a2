"""Multi-condition CFG with one scale per condition (SpaText-style, DESIGN; kernels/multi_condition.py) as a GUIDER.

Conditions 1…N (N = 2…4) and a negative; all predictions a step needs come from one batched `calc_cond_batch`
call, the "top" condition at position 0 and the negative at position 1 so other nodes' pre-CFG functions see a
cond/uncond pair; the other conditions follow. Other nodes' CFG function and post-CFG functions run on that pair
as in core's PerpNeg guider; the other conditions' terms are added to the CFG result before the post-CFG list.

Cost: one model row per image for every condition whose effective coefficient is non-zero at this step, plus the
negative (N + 1 rows when every term is active). Outside its σ-window a term's scale is 0 (nested form: the
telescoping sum then needs D(c_≤i) only where a neighbour still uses it). The accelerated nested variant
(refresh_every = m > 1) evaluates only the negative and c_≤N between refresh steps.
"""
from __future__ import annotations

import math

import comfy.samplers

from ..kernels.multi_condition import (COMPOSABLE, FORMS, NESTED, PartialDifferences, effective_coefficients,
                                       refresh_due, term_sum)
from .combine import cfg_and_post, evaluate, pre_cfg
from .family import in_window
from .nfe import current_run, install_nfe_counter
from .run_state import step_index

NODE = "GL_MultiConditionGuider"
MAX_CONDITIONS = 4


def check_settings(*, n: int, scales, windows, form: str, refresh_every: int) -> None:
    if form not in FORMS:
        raise ValueError(f"{NODE}: unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if not 1 <= n <= MAX_CONDITIONS:
        raise ValueError(f"{NODE}: {n} conditions given; connect 1 to {MAX_CONDITIONS}")
    if len(scales) != n or len(windows) != n:
        raise ValueError(f"{NODE}: {n} conditions but {len(scales)} scales and {len(windows)} windows")
    for i, (start, end) in enumerate(windows, 1):
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"{NODE}: condition {i} window start ({start}) must be smaller than its end ({end}), "
                             "both in [0, 1]")
    if refresh_every < 1:
        raise ValueError(f"{NODE}: refresh_every ({refresh_every}) must be >= 1 (1 = every step exact)")
    if refresh_every > 1 and form != NESTED:
        raise ValueError(f"{NODE}: refresh_every > 1 (the accelerated variant) needs form 'nested', got {form!r}")


def cumulative(conditions: list) -> list:
    """c_≤i as ConditioningCombine would build it: the concatenation of conditionings 1…i."""
    out, acc = [], []
    for c in conditions:
        acc = acc + list(c)
        out.append(acc)
    return out


class MultiConditionGuider(comfy.samplers.CFGGuider):
    """`conditions`: the N conditionings in order (nested form: c_≤i each, or raw ones with combine_inputs)."""

    def __init__(self, model_patcher, *, scales, form: str = NESTED, windows=None, refresh_every: int = 1):
        n = len(scales)
        windows = list(windows) if windows is not None else [(0.0, 1.0)] * n
        check_settings(n=n, scales=scales, windows=windows, form=form, refresh_every=refresh_every)
        patched = model_patcher.clone()
        install_nfe_counter(patched)
        super().__init__(patched)
        self.scales, self.windows, self.form = [float(s) for s in scales], windows, form
        self.refresh_every = int(refresh_every)
        self.cfg = self.scales[-1] if form == NESTED else self.scales[0]
        self.partials = PartialDifferences()

    def set_conds(self, negative, conditions: list, *, combine_inputs: bool = False):
        if len(conditions) != len(self.scales):
            raise ValueError(f"{NODE}: {len(conditions)} conditionings for {len(self.scales)} scales")
        if combine_inputs and self.form == NESTED:
            conditions = cumulative(conditions)
        self.inner_set_conds({"negative": negative, **{self._name(i): c for i, c in enumerate(conditions)}})

    def _name(self, i: int) -> str:
        """Condition i is stored as "positive" when it is the default top (so tools reading the positive find it)."""
        top = len(self.scales) - 1 if self.form == NESTED else 0
        return "positive" if i == top else f"gl_condition_{i + 1}"

    def outer_sample(self, *args, **kwargs):
        self.partials = PartialDifferences()          # per sampling run
        return super().outer_sample(*args, **kwargs)

    def _top(self, coefficients: list[float]) -> int:
        """Condition placed at position 0: the outermost one still used (nested) / the first one used (composable)."""
        used = [i for i, e in enumerate(coefficients) if e != 0.0]
        if not used:
            return len(coefficients) - 1 if self.form == NESTED else 0
        return used[-1] if self.form == NESTED else used[0]

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (host signature)
        n, ms = len(self.scales), self.inner_model.model_sampling
        sigma = float(timestep.max())
        active = [s if in_window(ms, sigma, *w) else 0.0 for s, w in zip(self.scales, self.windows)]
        coeff = effective_coefficients(active, self.form)
        step = step_index(model_options, timestep)
        accelerated = self.refresh_every > 1 and n > 1
        refresh = not accelerated or refresh_due(step, self.refresh_every) or not self.partials.ready(n, x.shape[0])
        if accelerated:
            top = n - 1
            wanted = list(range(n)) if refresh else [top]
        else:
            top = self._top(coeff)
            wanted = [top] + [i for i, e in enumerate(coeff) if e != 0.0 and i != top]
        force_uncond = accelerated or model_options.get("disable_cfg1_optimization", False)
        skip_uncond = (not force_uncond and all(e == 0.0 for i, e in enumerate(coeff) if i != top)
                       and math.isclose(coeff[top], 1.0))
        negative = None if skip_uncond else self.conds.get("negative")
        others = [i for i in wanted if i != top]
        conds = [self.conds[self._name(top)], negative] + [self.conds[self._name(i)] for i in others]
        out = evaluate(self.inner_model, conds, x, timestep, model_options)
        out = pre_cfg(self.inner_model, conds, out, coeff[top], x, timestep, model_options)
        d_top, d_uncond = out[0], out[1]
        preds = {top: d_top, **dict(zip(others, out[2:]))}
        if accelerated:
            if refresh:
                self.partials.store(step, d_uncond, [preds[i] for i in range(n)])
            else:
                preds = dict(enumerate(self.partials.fill(d_uncond, d_top)))
        rest = [i for i, e in enumerate(coeff) if i != top and e != 0.0]
        extra = term_sum(d_uncond, [preds[i] for i in rest], [coeff[i] for i in rest]) if rest else None
        run = current_run(model_options)
        if run is not None and accelerated:
            run.notes["full_evaluations"] = run.notes.get("full_evaluations", 0) + int(refresh)
        return cfg_and_post(self.inner_model, d_top, d_uncond, coeff[top], x, timestep, model_options,
                            cond=conds[0], uncond=negative, extra=extra)


__all__ = ["MultiConditionGuider", "NODE", "MAX_CONDITIONS", "NESTED", "COMPOSABLE", "check_settings"]

"""Two-model guidance (autoguidance, CFG + autoguidance, NPO, SINE, hybrid-model CFG) as one GUIDER.

The terms and their coefficients are data (kernels/two_model.py `preset`): a reference term (main model, positive)
plus terms on the main model or on a second model, each with a σ-window; D̃ = D_ref + Σ c_k·(D_k − D_ref).

Evaluation: per step, the active (model, conditioning) pairs are grouped by model and evaluated with one
`calc_cond_batch` call per model (duplicates once). Positions 0/1 of the list other nodes' hooks see are the
reference and the term marked `pair` (the "uncond"): pre-CFG functions run on all predictions, the CFG slot and
post-CFG functions on that pair, the remaining terms are added before the post-CFG list (as core's PerpNeg guider).

Second model: registered as an additional model of the main patcher for the run, so ComfyUI loads both in one
`load_models_gpu` call and unloads them together; its conditionings are encoded by its own `extra_conds`. Two MODEL
inputs that share one network (e.g. a LoRA loaded on top of the same checkpoint) are refused: weight patches are
applied in place at load, so two of them cannot both be live; the same-checkpoint variant goes on a conditioning as
a hook (CreateHookLora + ConditioningSetProperties on positive_2 or negative) and runs on the main model, where
ComfyUI swaps the patched weights per conditioning group. A second model gets the run's model options (the main
model's sampling-time patches and wrappers), as core's dual-model guider does; its own weight patches apply.

Cost: one model row per image for every distinct active (model, conditioning) pair: 2 for autoguidance and NPO,
3 for CFG + autoguidance, SINE (in its window; 2 after) and hybrid-model CFG (in its window).
"""
from __future__ import annotations

import math

import comfy.samplers

from ..kernels.two_model import MAIN, MODES, NEGATIVE, POSITIVE, POSITIVE_2, SECOND, cap_ratio, preset, term_sum
from .combine import cfg_and_post, evaluate, pre_cfg
from .family import family_name, in_window
from .nfe import install_nfe_counter

NODE = "GL_MultiModelGuider"
ADDITIONAL_KEY = "guidance_lab.second_model"
NEEDS_SECOND = {"autoguidance": "the weak model", "cfg+autoguidance": "the weak model",
                "sine": "the fine-tuned model", "hybrid": "the personalised model", "npo": "the negative model"}


class TwoModelError(ValueError):
    """Bad models or conditionings for GL_MultiModelGuider."""


def check_settings(*, mode: str, cfg: float, scale_2: float, start_percent: float, end_percent: float,
                   max_ratio: float) -> None:
    if mode not in MODES:
        raise TwoModelError(f"{NODE}: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise TwoModelError(f"{NODE}: start_percent ({start_percent}) must be smaller than end_percent "
                            f"({end_percent}), both in [0, 1]")
    if max_ratio < 0:
        raise TwoModelError(f"{NODE}: max_ratio ({max_ratio}) must be >= 0 (0 = no cap)")
    if mode == "sine" and not 0.0 <= scale_2 <= 1.0:
        raise TwoModelError(f"{NODE}: in mode 'sine' scale_2 is v, the fine-tuned model's share, in [0, 1]; "
                            f"got {scale_2}")
    if not math.isfinite(cfg) or not math.isfinite(scale_2):
        raise TwoModelError(f"{NODE}: cfg ({cfg}) and scale_2 ({scale_2}) must be finite")


def _has_hooks(cond) -> bool:
    return cond is not None and any(c[1].get("hooks") is not None for c in cond)


def _same_weights(a, b) -> bool:
    return a is b or (a.is_clone(b) and a.clone_has_same_weights(b))


def _check_family(main, second) -> None:
    ms_a, ms_b = main.get_model_object("model_sampling"), second.get_model_object("model_sampling")
    if family_name(ms_a) != family_name(ms_b):
        raise TwoModelError(f"{NODE}: model is {family_name(ms_a)} but model_2 is {family_name(ms_b)}; both terms "
                            "must predict in the same parameterisation (e.g. two SD1.5 or two Flux models)")
    ch_a = main.get_model_object("latent_format").latent_channels
    ch_b = second.get_model_object("latent_format").latent_channels
    if ch_a != ch_b:
        raise TwoModelError(f"{NODE}: model works on {ch_a}-channel latents but model_2 on {ch_b}; use two models "
                            "of the same family")


def _check_shared(main, second) -> None:
    if main.is_clone(second):
        raise TwoModelError(
            f"{NODE}: model_2 shares its network with model (for example a LoRA loaded on top of the same "
            "checkpoint) but has different weight patches; both cannot be live at once. Leave model_2 unconnected "
            "and attach the LoRA to the term's conditioning instead: CreateHookLora (or CreateHookModelAsLora) + "
            "ConditioningSetProperties on positive_2 (negative for NPO).")


class MultiModelGuider(comfy.samplers.CFGGuider):
    """One member of the two-model family; see `kernels.two_model.preset` for the terms of each mode."""

    def __init__(self, model_patcher, mode: str, *, cfg: float, scale_2: float = 1.0, model_2=None,
                 start_percent: float = 0.0, end_percent: float = 1.0, max_ratio: float = 0.0):
        check_settings(mode=mode, cfg=cfg, scale_2=scale_2, start_percent=start_percent, end_percent=end_percent,
                       max_ratio=max_ratio)
        patched = model_patcher.clone()
        install_nfe_counter(patched)
        super().__init__(patched)
        self.mode, self.max_ratio = mode, float(max_ratio)
        self.recipe = preset(mode, cfg=cfg, scale_2=scale_2, start_percent=start_percent, end_percent=end_percent)
        pair = self.recipe.pair
        self.cfg = 1.0 - pair.coefficient                      # the pair's CFG scale, what other nodes read
        self.second, self.model_2_given, self.alias = None, model_2 is not None, {}
        # model_2 is loaded only when one of its terms has a non-zero coefficient (autoguidance at w = 1: never)
        needed = any(t.model == SECOND and t.coefficient != 0.0 for t in self.recipe.terms)
        if model_2 is not None:
            _check_family(model_patcher, model_2)
        if model_2 is not None and needed and not _same_weights(model_patcher, model_2):
            _check_shared(model_patcher, model_2)
            self.second = model_2
            patched.set_additional_models(ADDITIONAL_KEY, [model_2])

    # conditionings ---------------------------------------------------------------------------------------------
    def set_conds(self, positive, negative=None, positive_2=None):
        self.alias = {POSITIVE_2: POSITIVE} if positive_2 is None else {}
        names = {self.alias.get(t.cond, t.cond) for t in self.recipe.terms} | {self.recipe.ref_cond}
        if NEGATIVE in names and negative is None:
            raise TwoModelError(f"{NODE}: mode '{self.mode}' needs a negative conditioning; connect the negative "
                                "input (an empty prompt is the usual unconditional branch)")
        conds = {POSITIVE: positive, NEGATIVE: negative,
                 POSITIVE_2: positive_2 if positive_2 is not None else positive}
        if self.second is None and not self.model_2_given and self.mode in NEEDS_SECOND:
            self._check_single_model(conds, positive_2)
        if self.second is not None:
            for t in self.recipe.terms:
                if t.model == SECOND and _has_hooks(conds[t.cond]):
                    raise TwoModelError(f"{NODE}: the {t.cond} conditioning carries hooks but runs on model_2; "
                                        "hooks only apply to terms of the main model (leave model_2 unconnected "
                                        "to run this term on the main model with its hooks)")
        self.inner_set_conds({k: v for k, v in conds.items() if k in names and v is not None})

    def _check_single_model(self, conds: dict, positive_2) -> None:
        """Without model_2 the second model's term runs on the main model: only meaningful when its conditioning
        differs from the reference (usually by a LoRA hook)."""
        term = next(t for t in self.recipe.terms if t.model == SECOND)
        what = NEEDS_SECOND[self.mode]
        if term.cond == POSITIVE_2 and positive_2 is None:
            raise TwoModelError(
                f"{NODE}: mode '{self.mode}' needs {what}: connect model_2, or leave it unconnected and give "
                "positive_2 with the model attached as a hook (CreateHookLora / CreateHookModelAsLora + "
                "ConditioningSetProperties)")
        if term.cond == NEGATIVE and not _has_hooks(conds[NEGATIVE]):
            raise TwoModelError(
                f"{NODE}: mode 'npo' needs {what}: connect model_2, or attach the NPO LoRA to the negative "
                "conditioning as a hook (CreateHookLora + ConditioningSetProperties); without either it is plain CFG")

    # sampling run ----------------------------------------------------------------------------------------------
    def inner_sample(self, noise, latent_image, device, *args, **kwargs):
        self.second_conds, self.second_inner = {}, None
        if self.second is not None:
            self.second_inner = self.second.model                     # loaded with the main model
            names = {self.alias.get(t.cond, t.cond) for t in self.recipe.terms if t.model == SECOND}
            conds = {k: [c.copy() for c in self.conds[k]] for k in names}
            li = latent_image
            if li is not None and li.count_nonzero() > 0:
                li = self.second_inner.process_latent_in(li)
            denoise_mask, seed = args[2], args[5]
            extra = {"latent_shapes": kwargs["latent_shapes"]} if kwargs.get("latent_shapes") is not None else {}
            self.second_conds = comfy.samplers.process_conds(self.second_inner, noise, conds, device, li,
                                                             denoise_mask, seed, **extra)
            self.second.pre_run()
        return super().inner_sample(noise, latent_image, device, *args, **kwargs)

    def _model_for(self, which: str):
        return self.second_inner if which == SECOND and self.second_inner is not None else self.inner_model

    def _cond_for(self, which: str, name: str):
        return self.second_conds[name] if which == SECOND and self.second_inner is not None else self.conds[name]

    def _key(self, which: str, name: str) -> tuple:
        """(model, conditioning) of a term: positive_2 left unconnected is positive (evaluated once per model)."""
        return (SECOND if which == SECOND and self.second_inner is not None else MAIN, self.alias.get(name, name))

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (host signature)
        ms, sigma = self.inner_model.model_sampling, float(timestep.max())
        coeff = [t.coefficient if in_window(ms, sigma, t.start_percent, t.end_percent) else 0.0
                 for t in self.recipe.terms]
        pair_i = next(i for i, t in enumerate(self.recipe.terms) if t.pair)
        force = model_options.get("disable_cfg1_optimization", False)
        ref_key = (MAIN, self.recipe.ref_cond)
        keys = [ref_key] + [self._key(t.model, t.cond) if (c != 0.0 or (i == pair_i and force)) else None
                            for i, (t, c) in enumerate(zip(self.recipe.terms, coeff))]
        preds = self._evaluate([k for k in keys if k is not None], x, timestep, model_options)
        conds = [self._cond_for(*k) if k is not None else None for k in keys]
        out = [preds[k] if k is not None else None for k in keys]
        pair_pos = 1 + pair_i
        order = [0, pair_pos] + [j for j in range(1, len(keys)) if j != pair_pos]
        hook_conds = [conds[j] for j in order]
        hook_out = [out[j] if out[j] is not None else preds[ref_key] * 0 for j in order]
        hook_out = pre_cfg(self.inner_model, hook_conds, hook_out, 1.0 - coeff[pair_i], x, timestep, model_options)
        d_ref, d_pair = hook_out[0], hook_out[1]
        if self.max_ratio > 0 and out[pair_pos] is not None:
            d_pair = (d_ref.float() + cap_ratio(d_pair.float() - d_ref.float(), d_ref, self.max_ratio)
                      ).to(d_pair.dtype)
        extras = [(hook_out[n], coeff[j - 1]) for n, j in enumerate(order[2:], 2) if out[j] is not None]
        extra = term_sum(d_ref, [d for d, _ in extras], [c for _, c in extras], max_ratio=self.max_ratio) \
            if extras else None
        return cfg_and_post(self.inner_model, d_ref, d_pair, 1.0 - coeff[pair_i], x, timestep, model_options,
                            cond=conds[0], uncond=conds[pair_pos], extra=extra)

    def _evaluate(self, keys: list, x, timestep, model_options) -> dict:
        """One batched call per model for the distinct (model, conditioning) pairs."""
        preds = {}
        for which in (MAIN, SECOND):
            group = list(dict.fromkeys(k for k in keys if k[0] == which))
            if not group:
                continue
            model = self._model_for(which)
            conds = [self._cond_for(which, name) for _, name in group]
            out = evaluate(model, conds, x, timestep, model_options) if which == MAIN else \
                comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)
            preds.update(zip(group, out))
        return preds

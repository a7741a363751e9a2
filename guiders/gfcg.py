"""Gradient-free classifier guidance (GFCG, Shenoy et al., arXiv 2411.15393) as a GUIDER.

The classifier is used in inference mode only: after each model evaluation it reads the conditional prediction
D_c (decoded to pixels), picks per image the most probable class other than the target among the candidate
classes — the *reference* r — and a scale s = s_max·p_r/(p_y + p_r). At the next evaluation (lag 1; none at the
first) the guider also evaluates the model under the reference class's prompt and adds s·(D_c − D(x; r)) to the
guided prediction: it pushes away from the class the model is most confused with. The paper's exact rules are not
confirmed; this is the Guidance Lab design (methods.md §7).

Composition: positive/negative go through the host's `sampling_function`, so other nodes' pre-CFG, CFG and
post-CFG functions run as usual; the GFCG term is a post-CFG function appended for this guider's calls only. The
reference prompts cost one model row per image per step after the first: each distinct reference class in the
batch is evaluated on the rows of the images that need it (one `calc_cond_batch` call per distinct class).

Cost: +1 row per image-step after the first (3 instead of 2 with CFG); one classifier forward per evaluation.
"""
from __future__ import annotations

import torch

import comfy.samplers

from ..kernels.classifier_guidance import gfcg_reference, gfcg_term
from .classifier import ClassifierError
from .classifier_guidance import decode, pick_decoder
from .family import in_window
from .nfe import install_nfe_counter

NODE = "GL_GradientFreeGuidance"
PREFIX = "gfcg_class_"


def check_settings(*, s_max, start_percent, end_percent) -> None:
    if s_max < 0:
        raise ValueError(f"{NODE}: s_max ({s_max}) must be >= 0 (0 = plain CFG)")
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise ValueError(f"{NODE}: start_percent ({start_percent}) must be smaller than end_percent "
                         f"({end_percent}), both in [0, 1]")


def candidate_indices(classifier, classes: str) -> list[int]:
    """Classifier indices of a comma-separated class list (empty: every label, for up to 100 classes)."""
    if not str(classes).strip():
        if classifier.num_classes > 100:
            raise ClassifierError(f"{NODE}: classifier '{classifier.name}' has {classifier.num_classes} classes; "
                                  "list the confusable ones in 'classes' (each needs a prompt and a model call)")
        return list(range(classifier.num_classes))
    picked = classifier.target_indices(classes, len([c for c in str(classes).split(",") if c.strip()]), node=NODE)
    indices = sorted(set(picked.tolist()))
    if len(indices) < 2:
        raise ClassifierError(f"{NODE}: classes ({classes!r}) names {len(indices)} distinct class; list at least two "
                              "comma-separated labels the target can be confused with, or leave classes empty for "
                              "every label")
    return indices


def _rows(cond: list, idx: torch.Tensor, batch: int) -> list:
    """A processed cond list restricted to the images `idx` of a batch of `batch`: model conds holding one row per
    image (e.g. an inpainting model's concat latent) are sliced, the rest (a prompt's single row) kept."""
    out = []
    for c in cond:
        c = dict(c)
        model_conds = {}
        for key, value in c.get("model_conds", {}).items():
            t = getattr(value, "cond", None)
            if torch.is_tensor(t) and t.ndim and t.shape[0] == batch and batch > 1 and hasattr(value, "_copy_with"):
                value = value._copy_with(t[idx.to(t.device)])
            model_conds[key] = value
        c["model_conds"] = model_conds
        out.append(c)
    return out


class GFCGGuider(comfy.samplers.CFGGuider):
    """CFG plus the GFCG term. `class_conds`: classifier index → CONDITIONING of that class's prompt."""

    def __init__(self, model_patcher, classifier, target: str, class_conds: dict, *, s_max: float = 2.0,
                 start_percent: float = 0.0, end_percent: float = 1.0, decoder: str = "auto", vae=None):
        check_settings(s_max=s_max, start_percent=start_percent, end_percent=end_percent)
        if len(class_conds) < 2:
            raise ClassifierError(f"{NODE}: needs at least two candidate classes, got {len(class_conds)}")
        classifier.target_indices(target, 1, node=NODE)
        patched = model_patcher.clone()
        install_nfe_counter(patched)
        super().__init__(patched)
        self.classifier, self.target, self.class_conds = classifier, target, dict(class_conds)
        self.s_max, self.start_percent, self.end_percent = float(s_max), start_percent, end_percent
        self.decoder = pick_decoder(patched.get_model_object("latent_format"), decoder, node=NODE, vae=vae)
        self.vae = vae
        self.latent_format = patched.get_model_object("latent_format")
        self.candidates = torch.zeros(classifier.num_classes, dtype=torch.bool)
        self.candidates[list(self.class_conds)] = True
        self.state: dict = {}
        self.trace: list = []          # per evaluation: (sigma, reference classes, scales) of the last run

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        conds.update({f"{PREFIX}{i}": c for i, c in self.class_conds.items()})
        self.inner_set_conds(conds)

    def outer_sample(self, *args, **kwargs):
        self.state, self.trace = {}, []           # per sampling run
        return super().outer_sample(*args, **kwargs)

    def reference_prediction(self, x, timestep, ref: torch.Tensor, model_options) -> torch.Tensor:
        """D(x_b; r_b) for every image b: one model row per image — each distinct reference class is evaluated on
        the images that need it (their rows of x, σ and of any per-image tensor of the processed cond)."""
        out = torch.empty_like(x)
        refs = ref.tolist()
        for r in sorted(set(refs)):
            idx = [b for b, rb in enumerate(refs) if rb == r]
            cond = self.conds[f"{PREFIX}{r}"]
            if len(idx) < len(refs):
                cond = _rows(cond, torch.tensor(idx), len(refs))
                sub_t = timestep[idx] if timestep.ndim and timestep.shape[0] == len(refs) else timestep
                out[idx] = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x[idx], sub_t, model_options)[0]
            else:
                out[:] = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, timestep, model_options)[0]
        return out

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (host signature)
        batch = x.shape[0]
        targets = self.classifier.target_indices(self.target, batch, node=NODE)
        ref, frac = self.state.get("ref"), self.state.get("frac")
        d_ref = scale = None
        sigma = float(timestep.max())
        ms = self.inner_model.model_sampling
        if (self.s_max > 0 and ref is not None and len(ref) == batch
                and in_window(ms, sigma, self.start_percent, self.end_percent)):
            d_ref = self.reference_prediction(x, timestep, ref, model_options)
            scale = self.s_max * frac
            self.trace.append((sigma, ref.tolist(), [round(float(s), 4) for s in scale]))
        seen = {}

        def gfcg_post_cfg(args):
            seen["cond"] = args["cond_denoised"]
            if d_ref is None:
                return args["denoised"]
            return args["denoised"] + gfcg_term(args["cond_denoised"], d_ref, scale).to(args["denoised"].dtype)

        options = dict(model_options)
        options["sampler_post_cfg_function"] = list(model_options.get("sampler_post_cfg_function", [])) + [
            gfcg_post_cfg]
        out = comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                               self.conds.get("positive"), self.cfg, model_options=options,
                                               seed=seed)
        if self.s_max > 0 and "cond" in seen:
            with torch.no_grad():
                image = decode(seen["cond"].float(), self.latent_format, self.decoder, self.vae, node=NODE)
                probs = torch.softmax(self.classifier.logits(image, node=NODE), dim=1)
            ref, frac = gfcg_reference(probs.cpu(), targets, self.candidates)
            self.state = {"ref": ref, "frac": frac.to(x.device)}
        return out

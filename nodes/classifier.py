"""GL_ClassifierLoader and GL_CLIPZeroShotClassifier (→ GL_CLASSIFIER), GL_ClassifierGuidance (EluCD),
GL_GradientFreeGuidance and GL_DynamicCFG."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import classifier as cl
from ..guiders import clip_classifier as zs
from ..guiders import dynamic_cfg, gfcg
from ..guiders.classifier_guidance import DECODERS, SCHEDULES, check_settings, patch_classifier_guidance
from ._registry import register
from ._validate import percent_range_error

ClassifierType = io.Custom("GL_CLASSIFIER")
DEFAULT_FILE = "demo_classifier.safetensors"


def _target_window_error(node: str, target, start_percent, end_percent) -> str | None:
    """The message for an empty target or a bad σ-window; None when fine or not known yet (linked inputs)."""
    error = percent_range_error(node, start_percent=start_percent, end_percent=end_percent)
    if error:
        return error
    if target is not None and not str(target).strip():
        return f"{node}: target is empty; name a class of the classifier, e.g. 'red circle'"
    if start_percent is not None and end_percent is not None and not start_percent < end_percent:
        return f"{node}: start_percent ({start_percent}) must be smaller than end_percent ({end_percent})"
    return None


@register
class ClassifierLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = cl.classifier_files()
        return io.Schema(
            node_id="GL_ClassifierLoader",
            display_name="Classifier Loader (Guidance Lab)",
            category="Guidance Lab/classifier",
            description=(
                "Loads an image classifier for classifier guidance from a .safetensors file in models/classifiers/ "
                "(or a 'gl_classifiers' folder of extra_model_paths.yaml). Supported: torchvision ResNet-18/34/"
                "50/101/152 state dicts (torchvision's key layout; without metadata read as ImageNet classifiers: "
                "224x224, ImageNet mean/std, labels 'class 0'...) and the pack's small CNN. Metadata keys "
                "input_size, mean, std and labels (JSON) override the defaults. The pack ships "
                "demo_classifier.safetensors, the demo world's guidance classifier (36 classes such as 'red "
                "circle'; never the benchmark's evaluator)."),
            inputs=[io.Combo.Input("classifier", options=files or [DEFAULT_FILE],
                                   default=DEFAULT_FILE if DEFAULT_FILE in files or not files else files[0],
                                   tooltip="The classifier file (.safetensors only).")],
            outputs=[ClassifierType.Output(display_name="classifier", tooltip=(
                "The classifier with its input size, normalisation and label names."))],
        )

    @classmethod
    def validate_inputs(cls, classifier):
        try:
            cl.resolve_classifier(classifier)
        except cl.ClassifierError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, classifier):
        try:
            path = cl.resolve_classifier(classifier)
        except cl.ClassifierError:
            return None
        return str(path), path.stat().st_mtime_ns

    @classmethod
    def execute(cls, classifier) -> io.NodeOutput:
        return io.NodeOutput(cl.load_classifier(cl.resolve_classifier(classifier)))


@register
class CLIPZeroShotClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_CLIPZeroShotClassifier",
            display_name="CLIP Zero-Shot Classifier (Guidance Lab)",
            category="Guidance Lab/classifier",
            description=(
                "Builds a classifier for the classifier nodes from ComfyUI's CLIP vision model and a CLIP text "
                "encoder: logit_k = logit_scale·cos(image embedding, text embedding of template(label_k)), as in "
                "CLIP zero-shot classification. The two must be one CLIP model (only their widths can be "
                "checked): SDXL's CLIP with CLIP vision ViT-bigG (clip_vision_g), SD2.x's CLIP with CLIP vision "
                "ViT-H/14, or a CLIP-L text encoder file that keeps its text projection with CLIP vision "
                "ViT-L/14. SD1.x checkpoints and SDXL's CLIP-L do not store CLIP-L's text projection and cannot "
                "serve. Differentiable (EluCD works through it); with Dynamic CFG the alignment score is the "
                "target's CLIP similarity. Images are centre-cropped to the vision model's square input."),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="From CLIPVisionLoader: a CLIP ViT image encoder."),
                io.Clip.Input("clip", tooltip=(
                    "The text encoder of the same CLIP model (e.g. an SDXL checkpoint's CLIP for ViT-bigG).")),
                io.String.Input("labels", default="red circle, blue square, green star", multiline=True, tooltip=(
                    "Class names, comma-separated (or one per line); the classifier's labels, in this order. "
                    "One label gives a CLIP score.")),
                io.String.Input("prompt_template", default="a photo of a {label}", tooltip=(
                    "Text of each class; {label} is replaced by its name.")),
                io.Combo.Input("text_encoder", options=list(zs.TEXT_ENCODERS), default="auto", tooltip=(
                    "Which text tower of the CLIP to use; auto: the one whose embedding width matches the vision "
                    "model's (clip_g before clip_h before clip_l).")),
                io.Float.Input("logit_scale", default=100.0, min=0.01, max=1000.0, step=1.0, tooltip=(
                    "Multiplies the cosine similarities (CLIP's learned value: 100); lower = softer class "
                    "probabilities.")),
            ],
            outputs=[ClassifierType.Output(display_name="classifier", tooltip=(
                "A classifier over the labels, for GL_ClassifierGuidance, GL_GradientFreeGuidance and "
                "GL_DynamicCFG."))],
        )

    @classmethod
    def validate_inputs(cls, labels=None, prompt_template=None):
        if prompt_template is not None and "{label}" not in prompt_template:
            return (f"GL_CLIPZeroShotClassifier: prompt_template {prompt_template!r} has no {{label}}; write e.g. "
                    "'a photo of a {label}'")
        if labels is not None:
            try:
                zs.parse_labels(labels)
            except cl.ClassifierError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, clip_vision, clip, labels, prompt_template, text_encoder, logit_scale) -> io.NodeOutput:
        return io.NodeOutput(zs.build_zero_shot_classifier(clip_vision, clip, labels, prompt_template=prompt_template,
                                                           text_encoder=text_encoder, logit_scale=logit_scale))


@register
class ClassifierGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_ClassifierGuidance",
            display_name="Classifier Guidance (EluCD)",
            category="Guidance Lab/classifier",
            description=(
                "EluCD off-the-shelf classifier guidance (Ma et al., ICLR 2024, arXiv:2310.11311): after CFG, a "
                "classifier trained on clean images reads the predicted clean image and the gradient of "
                "T1·logit[target] − logsumexp(T2·logits) (T2 = discount·T1), taken through a Softplus-smoothed "
                "copy of the classifier only, is added in score form: D + scale·κ·(s²/a)·G, with the released "
                "code's sine time schedule κ. 0 extra model calls (one classifier forward+backward per step); "
                "works at any cfg, on EPS, V-prediction and flow models. Guidance Lab design beyond the paper: the "
                "x0/score form for ComfyUI samplers, the decoders for latent models (linear RGB factors, or a VAE / "
                "TAESD) and the coefficient held at σ̃ = 14.6 (flow models near σ = 1)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to guide (EPS, V-prediction or flow)."),
                ClassifierType.Input("classifier", tooltip="From GL_ClassifierLoader or GL_CLIPZeroShotClassifier."),
                io.String.Input("target", default="red circle", tooltip=(
                    "Class(es) to steer towards: a label name or index; several separated by commas give one "
                    "target per image of the batch (cycled).")),
                io.Float.Input("scale", default=1.0, min=0.0, max=100.0, step=0.05, tooltip=(
                    "Guidance strength s (paper: 1.0). 0 turns the guidance off.")),
                io.Float.Input("joint_temperature", default=1.0, min=0.01, max=10.0, step=0.05, tooltip=(
                    "T1, temperature of the target logit (paper: 1.0).")),
                io.Float.Input("marginal_discount", default=0.5, min=0.0, max=2.0, step=0.05, tooltip=(
                    "r: the marginal term uses T2 = r·T1 (paper: 0.5; 0 leaves the plain target logit).")),
                io.Float.Input("softplus_beta", default=3.0, min=0.0, max=50.0, step=0.5, tooltip=(
                    "β of the Softplus that replaces every ReLU of (a private copy of) the classifier, for smooth "
                    "gradients (paper: 3.0; 0 keeps the ReLUs).")),
                io.Float.Input("gamma", default=0.3, min=0.0, max=5.0, step=0.05, tooltip=(
                    "γ of the sine time schedule (paper: 0.3): extra guidance in the middle of the run.")),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="sine", tooltip=(
                    "sine: 1 + γ·(Σ_max/Σ_step)·sin(π·u), the released code's bump relative to the step variance; "
                    "sine_simple: 1 + γ·sin(π·u) (a simpler Guidance Lab option); constant: 1.")),
                io.Combo.Input("decoder", options=list(DECODERS), default="auto", tooltip=(
                    "How the classifier sees the prediction: identity for pixel-space models (the demo model); "
                    "for latent models linear (the family's latent→RGB preview factors: colours and layout only, "
                    "nearly free) or vae (the connected VAE or TAESD, decoded and differentiated every step: "
                    "real images, costlier). auto: identity in pixel space, else vae when a VAE is connected, "
                    "else linear.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Start of the guided window, as a fraction of the noise schedule (0 = noisiest).")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "End of the guided window (1 = last step); must be larger than start_percent.")),

                io.Vae.Input("vae", optional=True, tooltip=(
                    "Optional, for decoder 'vae' (and 'auto' on latent models): the model's VAE, or a TAESD from "
                    "VAELoader (taesd / taesdxl / taesd3 / taef1) for a much cheaper decode.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with classifier guidance.")],
        )

    @classmethod
    def validate_inputs(cls, target=None, start_percent=None, end_percent=None):
        return _target_window_error("GL_ClassifierGuidance", target, start_percent, end_percent) or True

    @classmethod
    def execute(cls, model, classifier, target, scale, joint_temperature, marginal_discount, softplus_beta, gamma,
                schedule, decoder, start_percent, end_percent, vae=None) -> io.NodeOutput:
        kwargs = dict(scale=scale, t1=joint_temperature, marginal_discount=marginal_discount,
                      softplus_beta=softplus_beta, gamma=gamma, schedule=schedule, decoder=decoder,
                      start_percent=start_percent, end_percent=end_percent)
        check_settings(**kwargs)
        return io.NodeOutput(patch_classifier_guidance(model, classifier, target, vae=vae, **kwargs))


@register
class GradientFreeGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_GradientFreeGuidance",
            display_name="Gradient-Free Classifier Guidance (GFCG)",
            category="Guidance Lab/classifier",
            description=(
                "CFG plus gradient-free classifier guidance, inspired by GFCG (Shenoy et al., arXiv:2411.15393): "
                "after each model call the classifier (inference only, no gradients) reads the conditional "
                "prediction and picks, per image, the class it is most confused with (the reference r among "
                "'classes', other than the target) and a scale s = s_max·p_r/(p_r + p_target); the next call "
                "also evaluates the prompt of class r and adds s·(D_cond − D_r), pushing away from that class. "
                "The paper's exact rules are not confirmed: this reference/scale rule with a one-step lag is "
                "the Guidance Lab design. Cost: one extra model row per image per step (from the second step) and "
                "a classifier forward. Use with SamplerCustomAdvanced."),
            inputs=[
                io.Model.Input("model", tooltip="The model (EPS, V-prediction or flow)."),
                io.Conditioning.Input("positive", tooltip="The prompt (it should describe the target class)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of CFG."),
                io.Clip.Input("clip", tooltip="Encodes one prompt per candidate class (prompt_template)."),
                ClassifierType.Input("classifier", tooltip="From GL_ClassifierLoader or GL_CLIPZeroShotClassifier."),
                io.String.Input("target", default="red circle", tooltip=(
                    "The class each image should be: a label name or index; several, comma-separated, give one "
                    "target per image of the batch (cycled).")),
                io.String.Input("classes", default="", tooltip=(
                    "Candidate reference classes, comma-separated labels (the confusable ones). Empty: every label "
                    "of the classifier (at most 100).")),
                io.String.Input("prompt_template", default="a {label}", tooltip=(
                    "Prompt of a class; {label} is replaced by its label, e.g. 'a photo of a {label}'.")),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=(
                    "The CFG scale of the positive against the negative prompt.")),
                io.Float.Input("s_max", default=2.0, min=0.0, max=20.0, step=0.05, tooltip=(
                    "Largest GFCG scale (reached when the classifier finds the reference as likely as the "
                    "target; near 0 when it is sure of the target). 0 = plain CFG.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Start of the window where the GFCG term is added (fraction of the noise schedule).")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "End of the GFCG window; must be larger than start_percent.")),
                io.Combo.Input("decoder", options=list(DECODERS), default="auto", tooltip=(
                    "How the classifier sees the prediction: identity (pixel-space models), linear (latent→RGB "
                    "preview factors), vae (the connected VAE or TAESD); auto: identity in pixel space, else vae "
                    "when a VAE is connected, else linear.")),
                io.Vae.Input("vae", optional=True, tooltip=(
                    "Optional, for decoder 'vae' (and 'auto' on latent models): the model's VAE, or a TAESD from "
                    "VAELoader (taesd / taesdxl / taesd3 / taef1) for a much cheaper decode.")),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, target=None, prompt_template=None, start_percent=None, end_percent=None):
        if prompt_template is not None and "{label}" not in prompt_template:
            return (f"GL_GradientFreeGuidance: prompt_template {prompt_template!r} has no {{label}}; write e.g. "
                    "'a photo of a {label}'")
        return _target_window_error("GL_GradientFreeGuidance", target, start_percent, end_percent) or True

    @classmethod
    def execute(cls, model, positive, negative, clip, classifier, target, classes, prompt_template, cfg, s_max,
                start_percent, end_percent, decoder, vae=None) -> io.NodeOutput:
        gfcg.check_settings(s_max=s_max, start_percent=start_percent, end_percent=end_percent)
        if "{label}" not in prompt_template:
            raise ValueError(f"GL_GradientFreeGuidance: prompt_template {prompt_template!r} has no {{label}}")
        indices = gfcg.candidate_indices(classifier, classes)
        class_conds = {i: clip.encode_from_tokens_scheduled(clip.tokenize(
            prompt_template.replace("{label}", classifier.labels[i]))) for i in indices}
        guider = gfcg.GFCGGuider(model, classifier, target, class_conds, s_max=s_max, start_percent=start_percent,
                                 end_percent=end_percent, decoder=decoder, vae=vae)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


@register
class DynamicCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_DynamicCFG",
            display_name="Dynamic CFG (online feedback)",
            category="Guidance Lab/classifier",
            description=(
                "Chooses the CFG scale per step and per image, inspired by dynamic CFG via online feedback "
                "(Papalampidi et al., arXiv:2509.16131): each candidate scale cfg·m of the grid gives a guided "
                "prediction without any model call; evaluators score it — the classifier's log-probability of "
                "the target or, with a CLIP zero-shot classifier, the target's CLIP similarity (optional) and a "
                "penalty for pixels outside the valid range — with weights that move "
                "from alignment early to fidelity late, and the best candidate within max_change of the last "
                "choice wins. Outside the window the last choice is kept. 0 extra model calls (the uncond is "
                "evaluated even at cfg 1). The paper's evaluators, grid and weights are not published: this is "
                "the Guidance Lab design. The chosen scales are logged after each run."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (EPS, V-prediction or flow)."),
                io.String.Input("multipliers", default="0.5, 0.75, 1, 1.25, 1.5", tooltip=(
                    "Candidate scales as multiples of the sampler's cfg, comma-separated.")),
                io.Float.Input("max_change", default=1.0, min=0.0, max=50.0, step=0.1, tooltip=(
                    "Largest change of an image's scale from one evaluated step to the next (0 = no limit).")),
                io.Float.Input("alignment_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip=(
                    "Weight of the classifier's target score (needs a classifier).")),
                io.Float.Input("fidelity_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip=(
                    "Weight of the clipping penalty (pixels of the decoded prediction outside [0, 1]).")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Start of the window where the scale is chosen (fraction of the noise schedule).")),
                io.Float.Input("end_percent", default=0.7, min=0.0, max=1.0, step=0.001, tooltip=(
                    "End of the window; later steps keep the last choice.")),
                io.Combo.Input("decoder", options=list(DECODERS), default="auto", tooltip=(
                    "How the evaluators see a prediction: identity (pixel-space models), linear (latent→RGB "
                    "preview factors), vae (the connected VAE or TAESD, one decode per candidate scale); auto: "
                    "identity in pixel space, else vae when a VAE is connected, else linear.")),
                ClassifierType.Input("classifier", optional=True, tooltip=(
                    "Optional: a classifier scores prompt alignment — GL_ClassifierLoader's (log-probability of "
                    "the target) or GL_CLIPZeroShotClassifier's (CLIP similarity to the target's text).")),
                io.String.Input("target", default="", optional=True, tooltip=(
                    "The classifier's class per image (comma-separated, cycled); needed with a classifier.")),
                io.Vae.Input("vae", optional=True, tooltip=(
                    "Optional, for decoder 'vae' (and 'auto' on latent models): the model's VAE, or a TAESD from "
                    "VAELoader (taesd / taesdxl / taesd3 / taef1) for a much cheaper decode.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with a per-step, per-image CFG scale.")],
        )

    @classmethod
    def validate_inputs(cls, multipliers=None, start_percent=None, end_percent=None):
        error = _target_window_error("GL_DynamicCFG", None, start_percent, end_percent)
        if error:
            return error
        if multipliers is not None:
            try:
                dynamic_cfg.parse_multipliers(multipliers)
            except ValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model, multipliers, max_change, alignment_weight, fidelity_weight, start_percent, end_percent,
                decoder, classifier=None, target="", vae=None) -> io.NodeOutput:
        if classifier is not None and not str(target).strip():
            raise ValueError("GL_DynamicCFG: a classifier is connected but target is empty; name its class, e.g. "
                             "'red circle'")
        return io.NodeOutput(dynamic_cfg.patch_dynamic_cfg(
            model, classifier=classifier, target=target, multipliers=multipliers, max_change=max_change,
            alignment_weight=alignment_weight, fidelity_weight=fidelity_weight, start_percent=start_percent,
            end_percent=end_percent, decoder=decoder, vae=vae))

"""GL_ClassifierLoader (→ GL_CLASSIFIER) and GL_ClassifierGuidance (MODEL + GL_CLASSIFIER → MODEL, EluCD)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import classifier as cl
from ..guiders.classifier_guidance import DECODERS, SCHEDULES, check_settings, patch_classifier_guidance
from ._registry import register
from ._validate import percent_range_error

ClassifierType = io.Custom("GL_CLASSIFIER")
DEFAULT_FILE = "demo_classifier.safetensors"


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
                "x0/score form for ComfyUI samplers, the decoders for latent models (linear RGB factors) and the "
                "coefficient held at σ̃ = 14.6 (flow models near σ = 1)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to guide (EPS, V-prediction or flow)."),
                ClassifierType.Input("classifier", tooltip="From GL_ClassifierLoader."),
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
                    "How the classifier sees the prediction: identity for pixel-space models (the demo model), "
                    "linear for latent models (the family's latent→RGB preview factors: colours and layout "
                    "only). auto picks.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "Start of the guided window, as a fraction of the noise schedule (0 = noisiest).")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=(
                    "End of the guided window (1 = last step); must be larger than start_percent.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with classifier guidance.")],
        )

    @classmethod
    def validate_inputs(cls, target=None, start_percent=None, end_percent=None):
        error = percent_range_error("GL_ClassifierGuidance", start_percent=start_percent, end_percent=end_percent)
        if error:
            return error
        if target is not None and not str(target).strip():
            return "GL_ClassifierGuidance: target is empty; name a class of the classifier, e.g. 'red circle'"
        if start_percent is not None and end_percent is not None and not start_percent < end_percent:
            return (f"GL_ClassifierGuidance: start_percent ({start_percent}) must be smaller than end_percent "
                    f"({end_percent})")
        return True

    @classmethod
    def execute(cls, model, classifier, target, scale, joint_temperature, marginal_discount, softplus_beta, gamma,
                schedule, decoder, start_percent, end_percent) -> io.NodeOutput:
        kwargs = dict(scale=scale, t1=joint_temperature, marginal_discount=marginal_discount,
                      softplus_beta=softplus_beta, gamma=gamma, schedule=schedule, decoder=decoder,
                      start_percent=start_percent, end_percent=end_percent)
        check_settings(**kwargs)
        return io.NodeOutput(patch_classifier_guidance(model, classifier, target, **kwargs))

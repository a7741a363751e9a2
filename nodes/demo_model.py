"""GL_DemoModelLoader — the pack's small trained text-to-image model (MODEL, CLIP, VAE) for the demo world."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders import demo_model as dm
from ._registry import register

WEAK_LABEL = "demo_model_weak (early checkpoint, for autoguidance)"
LABELS = {"demo_model": "demo_model", "demo_model_weak": WEAK_LABEL}
NAMES = {label: name for name, label in LABELS.items()}


def _missing_message(label: str) -> str:
    name = NAMES.get(label, label)
    folders = ", ".join(dm.weight_folders())
    return (f"GL_DemoModelLoader: the demo model weights '{dm.CHECKPOINTS.get(name, label)}' are not there yet "
            f"(looked in: {folders}). " + dm.TRAIN_HINT)


@register
class DemoModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        available = [LABELS[name] for name in dm.available_checkpoints()]
        return io.Schema(
            node_id="GL_DemoModelLoader",
            display_name="Demo Model Loader (Guidance Lab)",
            category="Guidance Lab/demo",
            description=(
                "Loads the pack's small text-to-image demo model, trained on the demo world (coloured shapes on "
                "plain backgrounds, 32x32 pixels): an SD1-style UNet (EPS) and CLIP text encoder built from "
                "ComfyUI's own classes, plus the pixel-space VAE. Use it like a checkpoint loader: CLIPTextEncode, "
                "KSampler and VAEDecode work as usual; sample 32x32 latents (EmptyChromaRadianceLatentImage "
                "32x32, or EmptyLatentImage 256x256, which ComfyUI divides by 8). Prompts like 'a red circle' or "
                "'a blue square left of a yellow star'. Weights come from demo/weights/ in the pack (or a "
                "'gl_demo_model' folder of extra_model_paths.yaml); `python demo/train.py` produces them."),
            inputs=[
                io.Combo.Input("checkpoint", options=available or [LABELS["demo_model"]],
                               default=(available or [LABELS["demo_model"]])[0], tooltip=(
                                   "demo_model: the trained model. demo_model_weak: an early checkpoint of the same "
                                   "training run (a weaker model, e.g. the guiding model of autoguidance). Only "
                                   "checkpoints whose files exist are listed.")),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip=(
                         "The diffusion model (SD1-style UNet, EPS, pixel space: 3-channel 32x32 latents).")),
                     io.Clip.Output(display_name="CLIP", tooltip=(
                         "The text encoder (small SD1-style CLIP with ComfyUI's CLIP tokenizer) for "
                         "CLIPTextEncode.")),
                     io.Vae.Output(display_name="VAE", tooltip=(
                         "The pixel-space VAE (identity: image [0, 1] <-> latent 2*image - 1), as VAELoader "
                         "'pixel_space'."))],
        )

    @classmethod
    def validate_inputs(cls, checkpoint):
        if checkpoint not in NAMES:
            return f"GL_DemoModelLoader: unknown checkpoint {checkpoint!r}; choose one of {list(NAMES)}"
        if dm.find_checkpoint(NAMES[checkpoint]) is None:
            return _missing_message(checkpoint)
        return True

    @classmethod
    def fingerprint_inputs(cls, checkpoint):
        path = dm.find_checkpoint(NAMES[checkpoint]) if checkpoint in NAMES else None
        return None if path is None else (str(path), path.stat().st_mtime_ns)  # a retrained file reloads

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        path = dm.find_checkpoint(NAMES[checkpoint]) if checkpoint in NAMES else None
        if path is None:
            raise FileNotFoundError(_missing_message(checkpoint))
        import folder_paths
        model, clip, vae = dm.load_demo_model(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)

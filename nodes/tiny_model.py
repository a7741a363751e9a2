"""GL_TinyTestModel and GL_TinyCLIPVision — tiny random-weight models of real architectures for smoke-testing
graphs."""
from __future__ import annotations

from comfy_api.latest import io

from ..guiders.tiny_models import ARCHS, build_clip_vision, build_conditioning, build_model
from ._registry import register
from ._validate import choice_error


@register
class TinyTestModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_TinyTestModel",
            display_name="Tiny Test Model (random weights)",
            category="Guidance Lab/utils",
            description=(
                "Builds a tiny random-weight model of a real architecture (SD1.5-like UNet with EPS or "
                "V-prediction, SD3 MMDiT, Flux) plus matching random positive/negative conditioning, so a graph "
                "can be smoke-tested without downloading weights. Images are noise-like: it proves mechanics, "
                "not quality. Latents have 3 channels; decode with VAELoader 'pixel_space'."),
            inputs=[
                io.Combo.Input("architecture", options=list(ARCHS), default="sd15_eps", tooltip=(
                    "sd15_eps / sd15_v: SD1.5-like UNet (EPS or V-prediction); sd3: MMDiT (flow); flux: Flux (flow).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip=(
                    "Seed of the random weights and conditioning (same seed, same model).")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The tiny model."),
                     io.Conditioning.Output(display_name="positive", tooltip="Random conditioning (prompt stand-in)."),
                     io.Conditioning.Output(display_name="negative", tooltip="Another random conditioning.")],
        )

    @classmethod
    def validate_inputs(cls, architecture=None):
        return choice_error("GL_TinyTestModel", "architecture", architecture, ARCHS) or True

    @classmethod
    def execute(cls, architecture, seed) -> io.NodeOutput:
        return io.NodeOutput(build_model(architecture, seed), build_conditioning(architecture, seed + 1),
                             build_conditioning(architecture, seed + 2))


@register
class TinyCLIPVision(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_TinyCLIPVision",
            display_name="Tiny CLIP Vision (random weights)",
            category="Guidance Lab/utils",
            description=(
                "Builds a tiny random-weight CLIP vision model with ComfyUI's own CLIP ViT classes (2 layers, "
                "32×32 input), as CLIPVisionLoader would return, so graphs with GL_CLIPZeroShotClassifier can be "
                "smoke-tested without downloading weights. Its embeddings mean nothing: for real use load a CLIP "
                "vision model with CLIPVisionLoader."),
            inputs=[
                io.Int.Input("projection_dim", default=96, min=8, max=4096, tooltip=(
                    "Width of the image embedding; must equal the text tower's (the demo model's CLIP: 96).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
            ],
            outputs=[io.ClipVision.Output(display_name="clip_vision", tooltip="The tiny CLIP vision model.")],
        )

    @classmethod
    def execute(cls, projection_dim, seed) -> io.NodeOutput:
        return io.NodeOutput(build_clip_vision(projection_dim, seed))

"""GL_NFECounter (MODEL → MODEL) and GL_NFEReport (shows the model calls of the last sampling run)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..guiders.nfe import counter_of, install_nfe_counter
from ._registry import register


@register
class NFECounter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_NFECounter",
            display_name="Count Model Calls (NFE)",
            category="Guidance Lab/utils",
            description=(
                "Counts the real diffusion-model evaluations (NFEs) of every sampling run of this model: model "
                "calls and batch rows, logged once per run. Use it on a plain model to compare with a Guidance Lab "
                "method (their nodes count by themselves). Changes nothing else."),
            inputs=[io.Model.Input("model", tooltip="Any model; the output counts its evaluations.")],
            outputs=[io.Model.Output(display_name="model", tooltip="The same model, counting its NFEs.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        m = model.clone()
        install_nfe_counter(m)
        return io.NodeOutput(m)


@register
class NFEReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_NFEReport",
            display_name="NFE Report",
            category="Guidance Lab/utils",
            description=(
                "Shows how many model evaluations the last sampling run of a model used (NFEs per image, calls, "
                "batch rows, steps, seconds, and what Guidance Lab nodes did, e.g. where Adaptive Guidance "
                "switched). Wire the model the sampler used and the sampler's LATENT output (so it runs after "
                "the sampler); connect the text to a Preview Any node to read it."),
            inputs=[
                io.Model.Input("model", tooltip="The model given to the sampler: a Guidance Lab node's output or "
                               "a model passed through GL_NFECounter."),
                io.Latent.Input("samples", tooltip="The sampler's output; only orders this node after the sampler."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="One line describing the last run.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        counter = counter_of(model)
        if counter is None:
            raise ValueError("GL_NFEReport: this model does not count its evaluations. Put GL_NFECounter (or a "
                             "Guidance Lab guidance node such as GL_AdaptiveGuidance) between the model loader and "
                             "the sampler, and wire the same model here.")
        run = counter.last
        if run is None:
            raise ValueError("GL_NFEReport: the model has not been sampled yet. Wire the sampler's LATENT output "
                             "into 'samples' so this node runs after it, with the model the sampler used.")
        text = run.line()
        return io.NodeOutput(text, ui=ui.PreviewText(text))

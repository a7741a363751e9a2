"""GL_AGDCollect (MODEL, CLIP, LATENT → GL_AGD_DATA), GL_AGDTrain (MODEL + data → GL_AGD_ADAPTER), GL_AGDLoader
(file → GL_AGD_ADAPTER) and GL_AGDApply (MODEL + adapter + ω → MODEL): adapter guidance distillation."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy_api.latest import io, ui

from ..guiders import agd as ag
from ..guiders import agd_collect as col
from ..guiders import agd_train as tr
from ..guiders.nfe import install_nfe_counter
from ._registry import register
from ._validate import choice_error, filename_prefix_error

AdapterType = io.Custom("GL_AGD_ADAPTER")
DataType = io.Custom("GL_AGD_DATA")
DEFAULT_FILE = "demo_agd.safetensors"
SAVE_TO = ("gl_agd", "output")
PAPER = "Adapter Guidance Distillation (Jensen & Sadat, TMLR 2025, arXiv:2503.07274)"
PLACEMENT = ("Adapters sit on every cross-attention of UNet models (the authors' attention adapter, conditioned on ω, "
             "an optional time token and the prompt tokens) and, as Guidance Lab's design for SD3/Flux, as additive "
             "offsets on every block's image-token output.")


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


@register
class AGDCollect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_AGDCollect",
            display_name="AGD Collect CFG Trajectories",
            category="Guidance Lab/distillation",
            description=(
                f"Step 1 of {PAPER}: samples each prompt with ordinary CFG at scales ω drawn uniformly from "
                "[omega_min, omega_max] (one ω per trajectory) and records every model evaluation — the state, σ, "
                "ω and the CFG prediction the sampler used — plus each prompt's conditioning, in safetensors shards "
                "under output/agd_data/<name>/. Cost: one normal CFG sampling run per trajectory (2 NFEs per step). "
                "Run it again with the same name and settings and the finished shards are read back instead of "
                "sampled (an interrupted collection resumes). Progress bar; interruptible."),
            inputs=[
                io.Model.Input("model", tooltip="The model to distil (its patches and LoRAs are part of the teacher)."),
                io.Clip.Input("clip", tooltip="Its text encoder (encodes the prompts and the negative prompt)."),
                io.Latent.Input("latent", tooltip=(
                    "The latent size to sample at (e.g. EmptyLatentImage); its batch = images per trajectory "
                    "(same prompt and ω, different noise).")),
                io.String.Input("prompts", multiline=True, default="a red circle\na blue square", tooltip=(
                    "One prompt per line: captions like the ones you will sample with (the paper: 500 COCO "
                    "captions).")),
                io.String.Input("negative", default="", tooltip="The negative prompt of the CFG teacher ('' = "
                                "unconditional)."),
                io.Int.Input("trajectories_per_prompt", default=1, min=1, max=10_000, tooltip=(
                    "Trajectories per prompt, each at its own ω and seed.")),
                io.Float.Input("omega_min", default=1.0, min=0.01, max=100.0, step=0.1, tooltip=(
                    "Lowest guidance scale ω (ComfyUI cfg) of the teacher; the paper: 1.")),
                io.Float.Input("omega_max", default=12.0, min=0.01, max=100.0, step=0.1, tooltip=(
                    "Highest guidance scale ω; the paper: 12 for text-to-image. Sample later within this range.")),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip=(
                    "Sampling steps per trajectory (use the sampler settings you will use with the adapter).")),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler of the teacher runs."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The scheduler of the teacher runs."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip=(
                    "Draws the ω values; trajectory j uses noise seed + j.")),
                io.Combo.Input("precision", options=list(col.PRECISIONS), default="fp16", tooltip=(
                    "Storage precision of states and targets (fp16 halves the disk and memory).")),
                io.String.Input("name", default="agd/data", tooltip=(
                    "Folder under output/agd_data/ for this collection.")),
            ],
            outputs=[DataType.Output(display_name="data", tooltip="The recorded trajectories (for GL_AGDTrain).")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, omega_min, omega_max):
        if omega_min is not None and omega_max is not None and omega_min > omega_max:
            return f"GL_AGDCollect: omega_min ({omega_min}) is above omega_max ({omega_max}); swap them"
        return True

    @classmethod
    def execute(cls, model, clip, latent, prompts, negative, trajectories_per_prompt, omega_min, omega_max, steps,
                sampler_name, scheduler, seed, precision, name) -> io.NodeOutput:
        data = col.collect(model, clip, _lines(prompts), latent, negative=negative,
                           trajectories_per_prompt=trajectories_per_prompt, omega_min=omega_min, omega_max=omega_max,
                           steps=steps, sampler_name=sampler_name, scheduler=scheduler, seed=seed,
                           precision=precision, name=name)
        return io.NodeOutput(data, ui=ui.PreviewText(data.summary()))


@register
class AGDTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_AGDTrain",
            display_name="AGD Train Adapters",
            category="Guidance Lab/distillation",
            description=(
                f"Step 2 of {PAPER}: trains small guidance-conditioned adapters, base model frozen, so that ONE "
                "conditional forward pass at scale ω reproduces the recorded CFG prediction (loss: the family's own "
                "output MSE — ε-MSE on EPS models as in the paper, velocity MSE on flow models; objective 'relative' "
                "is Guidance Lab's design: the error relative to the guidance to add; so is omega_gain, adapters whose "
                "output is multiplied by ω − 1). The adapters "
                "start at zero (= the base model). AdamW, 10 % warm-up then cosine decay (the authors' recipe: "
                "lr 1e-4, batch 64, 5000 steps). Every 20th trajectory is held out; the text output shows the "
                "held-out loss. " + PLACEMENT + " Progress bar; interruptible; checkpoints to the output folder; the "
                "result is saved under filename_prefix to models/gl_agd/ (or the output folder)."),
            inputs=[
                io.Model.Input("model", tooltip="The model the data was collected from (frozen)."),
                DataType.Input("data", tooltip="From GL_AGDCollect."),
                io.Int.Input("hidden", default=320, min=4, max=4096, tooltip=(
                    "d_h, the adapters' width (the authors: 320 on SD). Smaller = fewer parameters.")),
                io.Int.Input("fourier_features", default=256, min=2, max=4096, tooltip=(
                    "Random Fourier features of ω in ψ(ω) (the authors: 256).")),
                io.Boolean.Input("use_prompt", default=True, tooltip=(
                    "UNet adapters also attend to the prompt tokens (the CFG direction depends on the prompt).")),
                io.Boolean.Input("time_token", default=True, tooltip=(
                    "Condition on the noise level: a time token (UNet) or the block's conditioning vector "
                    "(SD3/Flux).")),
                io.Int.Input("steps", default=5000, min=1, max=1_000_000, tooltip="Optimizer steps (paper: 5000)."),
                io.Int.Input("batch_size", default=64, min=1, max=4096, tooltip="Recorded evaluations per step."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, tooltip=(
                    "Peak AdamW learning rate (paper: 1e-4).")),
                io.Float.Input("warmup", default=0.1, min=0.0, max=0.99, step=0.01, tooltip=(
                    "Fraction of steps of linear warm-up before the cosine decay.")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Initialisation and batch order."),
                io.Int.Input("checkpoint_every", default=500, min=0, max=1_000_000, tooltip=(
                    "Save a checkpoint to output/agd/ every N steps (0 = none).")),
                io.String.Input("filename_prefix", default="agd/adapter", tooltip=(
                    "File name prefix: <prefix>_NNNNN_.safetensors (empty = do not save).")),
                io.Combo.Input("save_to", options=list(SAVE_TO), default="gl_agd", tooltip=(
                    "gl_agd = models/gl_agd (GL_AGDLoader lists it after a refresh); output = the output folder.")),
                io.Combo.Input("objective", options=list(tr.OBJECTIVES), default="paper", tooltip=(
                    "paper = the family's output MSE (ε-MSE on EPS models, as in the paper). relative = Guidance "
                    "Lab design: each sample's error divided by the guidance it has to add (‖D_cfg − D_cond‖²; one "
                    "extra forward without gradients per recorded evaluation, the first time it is drawn), so small "
                    "ω and high noise levels are learnt too; the ε-MSE is ruled by large ω and the last steps.")),
                io.Boolean.Input("omega_gain", default=False, optional=True, tooltip=(
                    "Off = the paper's adapters. On = Guidance Lab design, not the paper's: each adapter's output is "
                    "multiplied by ω − 1. CFG is D_cond + (ω − 1)·(D_cond − D_uncond): the correction grows with "
                    "ω − 1 and is zero at ω = 1, so gained adapters are exactly the base model at ω = 1 and only "
                    "learn what multiplies ω − 1 (no extra parameters or cost). Ignored when resuming. Optional, so "
                    "graphs saved before it existed still run.")),
                io.Combo.Input("precision", options=list(tr.PRECISIONS), default="fp32", optional=True, tooltip=(
                    "fp32 = full precision. bf16 = the model's forward in bfloat16 autocast while the adapters, "
                    "optimizer and loss stay float32: faster on GPUs and on CPUs with bfloat16 matrix units (AMX), "
                    "slower on other CPUs. The loss history is measured in float32 either way. Optional, so graphs "
                    "saved before it existed still run.")),
                AdapterType.Input("resume", optional=True, tooltip=(
                    "Continue training these adapters (their architecture is kept; hidden etc. are ignored).")),
            ],
            outputs=[AdapterType.Output(display_name="adapter", tooltip="The trained adapters.")],
            is_experimental=True,
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, save_to=None, objective=None, precision=None):
        return (filename_prefix_error("GL_AGDTrain", filename_prefix)
                or choice_error("GL_AGDTrain", "save_to", save_to, SAVE_TO)
                or choice_error("GL_AGDTrain", "objective", objective, tr.OBJECTIVES)
                or choice_error("GL_AGDTrain", "precision", precision, tr.PRECISIONS) or True)

    @classmethod
    def execute(cls, model, data, hidden, fourier_features, use_prompt, time_token, steps, batch_size,
                learning_rate, warmup, seed, checkpoint_every, filename_prefix, save_to="gl_agd",
                objective="paper", omega_gain=False, precision="fp32", resume=None) -> io.NodeOutput:
        adapter = tr.train_agd(model, data, hidden=hidden, features=fourier_features, use_prompt=use_prompt,
                               time_token=time_token, omega_gain=omega_gain, steps=steps, batch_size=batch_size,
                               learning_rate=learning_rate, warmup=warmup, seed=seed, objective=objective,
                               precision=precision,
                               checkpoint_every=checkpoint_every, checkpoint_prefix="agd/checkpoint", resume=resume)
        history = adapter.info["loss_history"]
        relative = (f" (relative {history[0][2]:.3f} → {history[-1][2]:.3f})" if len(history[-1]) > 2 else "")
        text = (f"held-out loss {history[0][1]:.5f} (untrained = conditional model) → {history[-1][1]:.5f}{relative} "
                f"after {adapter.info['steps']} steps in {adapter.info['seconds']} s; {adapter.parameters():,} "
                "parameters")
        if filename_prefix.strip():
            path = tr.save_trained(adapter, filename_prefix, output=save_to == "output")
            text += f"; saved {path.name}"
        return io.NodeOutput(adapter, ui=ui.PreviewText(text))


@register
class AGDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = ag.files()
        return io.Schema(
            node_id="GL_AGDLoader",
            display_name="AGD Adapter Loader",
            category="Guidance Lab/distillation",
            description=(
                "Loads guidance-distillation adapters (.safetensors written by GL_AGDTrain, with the model family, "
                "sites and settings in the metadata) from models/gl_agd/ (or a 'gl_agd' entry of "
                "extra_model_paths.yaml). The pack ships demo_agd.safetensors for the demo model."),
            inputs=[io.Combo.Input("adapter", options=files or [DEFAULT_FILE],
                                   default=DEFAULT_FILE if DEFAULT_FILE in files or not files else files[0],
                                   tooltip="The adapter file (.safetensors only).")],
            outputs=[AdapterType.Output(display_name="adapter", tooltip="The adapters and what they were made for.")],
        )

    @classmethod
    def validate_inputs(cls, adapter):
        try:
            ag.resolve(adapter)
        except ag.AGDError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, adapter):
        try:
            path = ag.resolve(adapter)
        except ag.AGDError:
            return None
        return str(path), path.stat().st_mtime_ns

    @classmethod
    def execute(cls, adapter) -> io.NodeOutput:
        return io.NodeOutput(ag.load(ag.resolve(adapter)))


@register
class AGDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_AGDApply",
            display_name="AGD Apply (CFG in one model call)",
            category="Guidance Lab/distillation",
            description=(
                f"{PAPER}: the model with distilled adapters at guidance scale ω imitates CFG at ω with ONE model "
                "call per step — sample it with cfg 1 (any sampler; half the NFEs of CFG). Attention patches on a "
                "clone: the input model is untouched and LoRAs, other attention patches and hooks compose. "
                + PLACEMENT + " A clear error when the adapter was made for another model."),
            inputs=[
                io.Model.Input("model", tooltip="The base model the adapter was trained on (a LoRA on it is fine)."),
                AdapterType.Input("adapter", tooltip="From GL_AGDLoader or GL_AGDTrain."),
                io.Float.Input("guidance_scale", default=5.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "ω, the CFG scale to imitate; stay inside the range the adapter was trained on (shown in the "
                    "log). Then sample with cfg 1.")),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05, tooltip=(
                    "Multiplies the adapters' output: 1 = as trained, 0 = the base model (conditional only).")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=(
                "The distilled-guidance model (sample with cfg 1)."))],
        )

    @classmethod
    def execute(cls, model, adapter, guidance_scale, strength) -> io.NodeOutput:
        m = ag.apply_adapters(model, adapter, guidance_scale, strength=strength)
        lo, hi = adapter.info.get("omega_min"), adapter.info.get("omega_max")
        if lo is not None and hi is not None and not lo <= guidance_scale <= hi:
            logging.warning("GL_AGDApply: guidance_scale %g lies outside the range the adapter was trained on "
                            "[%g, %g]; expect an extrapolation", guidance_scale, lo, hi)
        install_nfe_counter(m)
        return io.NodeOutput(m)

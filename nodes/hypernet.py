"""GL_HypernetworkLoader (→ GL_HYPERNET), GL_Personalize (MODEL + IMAGE + GL_HYPERNET [+ CLIP_VISION] → MODEL,
HOOKS), GL_HypernetworkTrain (MODEL, CLIP, VAE [, CLIP_VISION] → GL_HYPERNET) and GL_HypernetworkBasis (MODEL, CLIP,
VAE, GL_HYPERNET [, CLIP_VISION] → GL_HYPERNET with the basis decoder)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..guiders import hypernet as hn
from ..guiders import hypernet_train as ht
from ._registry import register
from ._validate import choice_error, filename_prefix_error

HypernetType = io.Custom("GL_HYPERNET")
DEFAULT_FILE = "demo_hypernet.safetensors"
SAVE_TO = ("gl_hypernetworks", "output")
DESIGN_NOTE = (
    "Hypernetwork personalization after Shrestha et al. (arXiv 2511.03156): the paper predicts LoRA weights from "
    "subject images with a network trained end to end with an output regularisation; its encoder, decoder, layer "
    "set and rank are not confirmed, so this architecture is Guidance Lab's design (image encoder: a small trainable "
    "conv encoder, or a connected CLIP vision model's penultimate features through a trainable projection → one "
    "learned query per target weight and factor → shared linear heads; rank-r LoRA; B heads start at zero). The "
    "shipped demo_hypernet.safetensors uses the pack's basis decoder instead (after HyperLoRA): the subject "
    "embedding picks softmax weights over 32 learned up-projections (initialised from directly fitted prototype "
    "subjects), ΔW = (Σ c_k B_k)·A, then trained end to end; training continues either kind (resume).")


@register
class HypernetworkLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = hn.files()
        return io.Schema(
            node_id="GL_HypernetworkLoader",
            display_name="Hypernetwork Loader (personalization)",
            category="Guidance Lab/personalization",
            description=(
                "Loads a Guidance Lab personalization hypernetwork (.safetensors with its architecture in the "
                "metadata) from models/gl_hypernetworks/ (or a 'gl_hypernetworks' entry of extra_model_paths.yaml). "
                "The pack ships demo_hypernet.safetensors for the demo model. Not the old-style SD hypernetworks of "
                "core's HypernetworkLoader. " + DESIGN_NOTE),
            inputs=[io.Combo.Input("hypernetwork", options=files or [DEFAULT_FILE],
                                   default=DEFAULT_FILE if DEFAULT_FILE in files or not files else files[0],
                                   tooltip="The hypernetwork file (.safetensors only).")],
            outputs=[HypernetType.Output(display_name="hypernetwork", tooltip=(
                "The hypernetwork, with the model family and weights it was trained for."))],
        )

    @classmethod
    def validate_inputs(cls, hypernetwork):
        try:
            hn.resolve(hypernetwork)
        except hn.HypernetError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, hypernetwork):
        try:
            path = hn.resolve(hypernetwork)
        except hn.HypernetError:
            return None
        return str(path), path.stat().st_mtime_ns

    @classmethod
    def execute(cls, hypernetwork) -> io.NodeOutput:
        return io.NodeOutput(hn.load(hn.resolve(hypernetwork)))


@register
class Personalize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_Personalize",
            display_name="Personalize (hypernetwork → LoRA)",
            category="Guidance Lab/personalization",
            description=(
                "Turns images of a subject into a LoRA for the model in one forward pass of a hypernetwork — no "
                "per-subject training. Outputs the personalized model (the LoRA as weight patches on a clone; the "
                "input model is untouched) and the same LoRA as HOOKS for hybrid-model CFG on one model: "
                "GL_MultiModelGuider, mode hybrid, base model as model, and the prompt with these hooks "
                "(ConditioningSetProperties) as positive_2 — D_u + cfg·(D_b − D_u) + w_p·(D_personal − D_b); "
                "start_percent ≈ 0.3 there keeps more of the prompt (the base model alone while shape and colour "
                "form; measured on the demo, README). "
                "Several images are fused by attention over all of them. A hypernetwork trained with a CLIP vision "
                "model needs that same model on clip_vision (the demo hypernetwork has its own encoder and needs "
                "none). 0 extra NFEs (hybrid CFG: +1 per step). " + DESIGN_NOTE),
            inputs=[
                io.Model.Input("model", tooltip="The base model the hypernetwork was trained for (same family and "
                               "weights; otherwise a clear error)."),
                io.Image.Input("images", tooltip=(
                    "Subject images (a batch; 1 to 64). Any size ≥ 8 px: centre-cropped to a square and resized "
                    "to the hypernetwork's input size; alpha is dropped.")),
                HypernetType.Input("hypernetwork", tooltip="From GL_HypernetworkLoader or GL_HypernetworkTrain."),
                io.Float.Input("strength", default=1.0, min=-5.0, max=5.0, step=0.05, tooltip=(
                    "LoRA strength for the model and the hooks: 0 = the base model, 1 = the prediction.")),
                io.ClipVision.Input("clip_vision", optional=True, tooltip=(
                    "The CLIP vision model (CLIPVisionLoader) a clip_vision hypernetwork was trained with: it reads "
                    "the images' penultimate features (a clear error if missing or of another width/token count). "
                    "Unused by hypernetworks with their own conv encoder, such as the demo one.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The personalized model (a patched clone)."),
                     io.Hooks.Output(display_name="hooks", tooltip=(
                         "The same LoRA as a hook group, for a conditioning (hybrid-model CFG on one model)."))],
        )

    @classmethod
    def execute(cls, model, images, hypernetwork, strength, clip_vision=None) -> io.NodeOutput:
        m, hooks, _lora = hn.personalize(model, images, hypernetwork, strength=strength, clip_vision=clip_vision)
        return io.NodeOutput(m, hooks)


@register
class HypernetworkTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_HypernetworkTrain",
            display_name="Hypernetwork Train (personalization)",
            category="Guidance Lab/personalization",
            description=(
                "Trains a personalization hypernetwork end to end through the frozen model: for each drawn subject, "
                "reference images → predicted LoRA → the model with that LoRA denoises other images of the subject "
                "(the family's own loss: ε, v or velocity MSE) + output_reg·Σ‖B·A‖². Data: the demo world's "
                "textured subjects, or a folder with one sub-folder per subject (images; captions in a .txt beside "
                "each image or caption.txt). With a CLIP vision model connected, a new hypernetwork reads its frozen "
                "penultimate features (computed without gradients; folder images once up front) instead of training "
                "its own conv encoder. Progress bar; interruptible; checkpoints to the output folder; the "
                "result is saved under filename_prefix to models/gl_hypernetworks/ (or the output folder). "
                + DESIGN_NOTE),
            inputs=[
                io.Model.Input("model", tooltip="The base model (frozen; a clone is trained through)."),
                io.Clip.Input("clip", tooltip="Its text encoder (the captions)."),
                io.Vae.Input("vae", tooltip="Its VAE (encodes the subject images into the model's latents)."),
                io.Combo.Input("source", options=list(ht.SOURCES), default="demo subjects", tooltip=(
                    "demo subjects = textured shapes of the demo world (for the demo model); folder = your data.")),
                io.String.Input("folder", default="", tooltip=(
                    "source folder: a directory with one sub-folder of images per subject (≥ 2 images each).")),
                io.Int.Input("subjects", default=2000, min=1, max=1_000_000, tooltip=(
                    "source demo subjects: how many distinct training subjects to draw from.")),
                io.Combo.Input("layers", options=list(hn.LAYERS), default="attention + feed-forward", tooltip=(
                    "Which weights get a predicted LoRA: attention (q/k/v/out of every attention block; SD3/Flux: "
                    "qkv/proj), + feed-forward (also the MLPs), or cross-attention k/v only (UNets).")),
                io.Int.Input("rank", default=4, min=1, max=64, tooltip="LoRA rank r (1–4 in the method's design)."),
                io.Int.Input("width", default=128, min=32, max=1024, step=32, tooltip=(
                    "Width of the hypernetwork's tokens and queries.")),
                io.Int.Input("depth", default=2, min=1, max=8, tooltip="Decoder blocks of the hypernetwork."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-5, tooltip=(
                    "AdamW learning rate (after a 50-step linear warm-up).")),
                io.Int.Input("subjects_per_step", default=4, min=1, max=256, tooltip=(
                    "Subjects per optimizer step (gradients accumulated over them).")),
                io.Int.Input("ref_images", default=3, min=1, max=16, tooltip=(
                    "Reference images per subject given to the hypernetwork.")),
                io.Int.Input("target_images", default=4, min=1, max=64, tooltip=(
                    "Images per subject the personalized model denoises (the loss).")),
                io.Int.Input("resolution", default=32, min=8, max=2048, step=8, tooltip=(
                    "Pixel size of the images the model denoises (the demo model: 32).")),
                io.Float.Input("output_reg", default=1e-4, min=0.0, max=10.0, step=1e-5, tooltip=(
                    "λ_reg of the output regularisation Σ‖B·A‖²_F.")),
                io.Int.Input("encoder_pretrain_steps", default=0, min=0, max=1_000_000, tooltip=(
                    "Before training: pretrain the image encoder to tell subjects apart (contrastive, two image sets "
                    "per subject; no model calls, fast). 0 = off. The method's design uses a frozen pretrained "
                    "encoder; this is the pack's stand-in when none is available (must be 0 with clip_vision).")),
                io.Boolean.Input("freeze_encoder", default=False, tooltip=(
                    "Keep the image encoder fixed during the main training (use with encoder_pretrain_steps; with "
                    "clip_vision: the trainable feature projection).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Initialisation and data order."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1_000_000, tooltip=(
                    "Save a checkpoint to output/hypernet/ every N steps (0 = none).")),
                io.String.Input("filename_prefix", default="hypernet/trained", tooltip=(
                    "File name prefix: <prefix>_NNNNN_.safetensors (empty = do not save).")),
                io.Combo.Input("save_to", options=list(SAVE_TO), default="gl_hypernetworks",
                               tooltip=("gl_hypernetworks = the first models/gl_hypernetworks folder (the loader "
                                        "lists it after a refresh); output = ComfyUI's output folder.")),
                HypernetType.Input("resume", optional=True, tooltip=(
                    "Continue training this hypernetwork (its architecture and layers are kept).")),
                io.ClipVision.Input("clip_vision", optional=True, tooltip=(
                    "A frozen CLIP vision model (CLIPVisionLoader) as the image encoder: the new hypernetwork reads "
                    "its penultimate hidden states through a trainable projection (width and token count are stored "
                    "in the file; GL_Personalize then needs the same model). Required to resume such a "
                    "hypernetwork; unused when resuming a conv one. Not connected = the pack's own conv encoder.")),
            ],
            outputs=[HypernetType.Output(display_name="hypernetwork", tooltip="The trained hypernetwork.")],
            is_experimental=True,
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, save_to=None):
        return (filename_prefix_error("GL_HypernetworkTrain", filename_prefix)
                or choice_error("GL_HypernetworkTrain", "save_to", save_to, SAVE_TO) or True)

    @classmethod
    def execute(cls, model, clip, vae, source, folder, subjects, layers, rank, width, depth, steps, learning_rate,
                subjects_per_step, ref_images, target_images, resolution, output_reg, encoder_pretrain_steps,
                freeze_encoder, seed, checkpoint_every, filename_prefix, save_to="gl_hypernetworks",
                resume=None, clip_vision=None) -> io.NodeOutput:
        net = ht.train_hypernet(
            model, clip, vae, source=source, folder=folder, subjects=subjects, layers=layers, rank=rank,
            width=width, depth=depth, steps=steps, learning_rate=learning_rate,
            subjects_per_step=subjects_per_step, ref_images=ref_images, target_images=target_images,
            resolution=resolution, output_reg=output_reg, encoder_pretrain_steps=encoder_pretrain_steps,
            freeze_encoder=freeze_encoder, seed=seed, checkpoint_every=checkpoint_every, resume=resume,
            clip_vision=clip_vision)
        history = net.info["loss_history"]
        text = f"probe loss {history[0][1]:.5f} → {history[-1][1]:.5f} in {net.info['seconds']} s"
        if len(history[-1]) > 3:
            text += (f" (with another subject's references {history[-1][3]:.5f}: higher when the network reads its "
                     "references)")
        if filename_prefix.strip():
            path = ht.save_trained(net, filename_prefix, output=save_to == "output")
            text += f"; saved {path.name}"
        return io.NodeOutput(net, ui=ui.PreviewText(text))


@register
class HypernetworkBasis(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_HypernetworkBasis",
            display_name="Hypernetwork Basis (prototype fits)",
            category="Guidance Lab/personalization",
            description=(
                "Builds a basis-decoder hypernetwork (the kind the shipped demo_hypernet.safetensors is; DESIGN, "
                "after HyperLoRA's LoRA basis, not the hypernetwork paper's decoder) from a hypernetwork whose image "
                "encoder already tells subjects apart (e.g. Hypernetwork Train with encoder_pretrain_steps, or one "
                "reading a CLIP vision model). It picks `prototypes` subjects that cover the data (k-means on that "
                "encoder's subject embeddings), fits a LoRA to each directly (one shared down-projection; the "
                "fits are the slow part: fit_steps model forwards and backwards per group of fit_parallel "
                "subjects), and makes their up-projections the basis: a subject's ΔW = (Σ c_k B_k)·A, with mixing "
                "weights c starting as a softmax over its similarity to the prototypes. Feed the result to "
                "Hypernetwork Train (resume) to train it end to end, or straight to Personalize. Progress bar; "
                "interruptible; saved under filename_prefix (empty = not saved)."),
            inputs=[
                io.Model.Input("model", tooltip="The base model the fits adapt (frozen; never edited)."),
                io.Clip.Input("clip", tooltip="Its text encoder (the captions)."),
                io.Vae.Input("vae", tooltip="Its VAE (encodes the subject images into the model's latents)."),
                HypernetType.Input("hypernetwork", tooltip=(
                    "The source hypernetwork: its image encoder chooses and recognises the prototypes and is kept; "
                    "its layers are the ones the basis adapts. It must be for this model's family.")),
                io.Combo.Input("source", options=list(ht.SOURCES), default="demo subjects", tooltip=(
                    "demo subjects = the demo world's training subjects (conv-encoder hypernetworks); folder = your "
                    "data, one sub-folder of images per subject (captions as for Hypernetwork Train).")),
                io.String.Input("folder", default="", tooltip=(
                    "source folder: a directory with one sub-folder of images per subject (≥ 2 images each); every "
                    "image of a chosen subject goes into its fit.")),
                io.Int.Input("subjects", default=1000, min=1, max=1_000_000, tooltip=(
                    "source demo subjects: the prototypes are chosen among training subjects 0..subjects-1.")),
                io.Int.Input("prototypes", default=32, min=1, max=1024, tooltip=(
                    "K, the basis size: how many subjects are fitted. More covers the data better and costs one "
                    "fit each and K up-projections in the file.")),
                io.Int.Input("rank", default=4, min=1, max=64, tooltip="LoRA rank r of the fits and the basis."),
                io.Int.Input("fit_steps", default=300, min=1, max=1_000_000, tooltip=(
                    "Optimizer steps of each direct fit (4 images per subject and step).")),
                io.Float.Input("fit_learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, tooltip=(
                    "AdamW learning rate of the direct fits.")),
                io.Int.Input("fit_parallel", default=8, min=1, max=256, tooltip=(
                    "Subjects fitted together in one batched forward (same result per subject; faster on a GPU, "
                    "not on a CPU; memory grows with it).")),
                io.Int.Input("resolution", default=32, min=8, max=2048, step=8, tooltip=(
                    "source folder: pixel size the images are cropped and resized to for the fits.")),
                io.Float.Input("temperature", default=0.02, min=1e-4, max=10.0, step=1e-3, tooltip=(
                    "τ of the initial mixing weights softmax(cos(subject, prototype)/τ): small = nearly the nearest "
                    "prototype's LoRA, large = a broad average.")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="k-means start and fit data order."),
                io.String.Input("filename_prefix", default="hypernet/basis", tooltip=(
                    "File name prefix: <prefix>_NNNNN_.safetensors (empty = do not save).")),
                io.Combo.Input("save_to", options=list(SAVE_TO), default="gl_hypernetworks",
                               tooltip=("gl_hypernetworks = the first models/gl_hypernetworks folder (the loader "
                                        "lists it after a refresh); output = ComfyUI's output folder.")),
                io.ClipVision.Input("clip_vision", optional=True, tooltip=(
                    "The CLIP vision model a clip_vision source hypernetwork reads (required for one; unused "
                    "with a conv one).")),
            ],
            outputs=[HypernetType.Output(display_name="hypernetwork", tooltip=(
                "The basis-decoder hypernetwork (before end-to-end training)."))],
            is_experimental=True,
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, save_to=None, source=None):
        return (filename_prefix_error("GL_HypernetworkBasis", filename_prefix)
                or choice_error("GL_HypernetworkBasis", "save_to", save_to, SAVE_TO)
                or choice_error("GL_HypernetworkBasis", "source", source, ht.SOURCES) or True)

    @classmethod
    def execute(cls, model, clip, vae, hypernetwork, source, folder, subjects, prototypes, rank, fit_steps,
                fit_learning_rate, fit_parallel, resolution, temperature, seed, filename_prefix,
                save_to="gl_hypernetworks", clip_vision=None) -> io.NodeOutput:
        net = ht.build_basis(model, clip, vae, hypernetwork, source=source, folder=folder, subjects=subjects,
                             prototypes=prototypes, rank=rank, fit_steps=fit_steps,
                             fit_learning_rate=fit_learning_rate, fit_parallel=fit_parallel, resolution=resolution,
                             temperature=temperature, seed=seed, clip_vision=clip_vision)
        basis = net.info["basis"]
        text = (f"basis of {len(basis['prototypes'])} prototypes ({', '.join(map(str, basis['prototypes'][:8]))}"
                f"{', …' if len(basis['prototypes']) > 8 else ''}) in {basis['seconds']} s")
        if filename_prefix.strip():
            path = ht.save_trained(net, filename_prefix, output=save_to == "output", node="GL_HypernetworkBasis")
            text += f"; saved {path.name}"
        return io.NodeOutput(net, ui=ui.PreviewText(text))


@register
class DemoSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..demo import subjects
        return io.Schema(
            node_id="GL_DemoSubjectImages",
            display_name="Demo Subject Images",
            category="Guidance Lab/demo",
            description=(
                "Images of a personalization subject of the demo world: a coarse surface pattern (stripes, "
                "checkerboard, dots or rings, with its own angle, period and phase) painted on demo-world shapes, "
                "which the demo model never saw. Feed them to Personalize. split heldout = subjects the shipped "
                "demo hypernetwork was not trained on."),
            inputs=[
                io.Int.Input("subject", default=0, min=0, max=1_000_000, tooltip="Which subject of the split."),
                io.Combo.Input("split", options=list(subjects.SPLITS), default="heldout", tooltip=(
                    "train = the hypernetwork's training subjects; heldout = never seen in training.")),
                io.Int.Input("count", default=3, min=1, max=64, tooltip="How many images."),
                io.Int.Input("start", default=0, min=0, max=1_000_000, tooltip=(
                    "First scene index (other start = other shapes, colours and backgrounds, same subject).")),
                io.Int.Input("size", default=32, min=8, max=512, step=8, tooltip="Image side in pixels."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The subject images (IMAGE batch)."),
                     io.String.Output(display_name="description", tooltip="The subject's pattern and parameters.")],
        )

    @classmethod
    def validate_inputs(cls, split=None):
        from ..demo import subjects
        return choice_error("GL_DemoSubjectImages", "split", split, subjects.SPLITS) or True

    @classmethod
    def execute(cls, subject, split, count, start, size) -> io.NodeOutput:
        from ..demo import subjects
        subj = subjects.subject(subject, split=split)
        images, _captions, _labels = subjects.images(subj, start, count, size=size)
        text = (f"{subj['pattern']}, angle {subj['angle']:.0f}°, period {subj['period']:.2f}, "
                f"phase {subj['phase']:.2f}, duty {subj['duty']:.2f} ({split} subject {subject})")
        return io.NodeOutput(images.permute(0, 2, 3, 1).contiguous(), text)

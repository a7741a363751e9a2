"""GL_ConceptErase (MODEL, CLIP → MODEL, GL_ERASURE) and GL_SaveErasureLoRA (GL_ERASURE → LoRA file)."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..guiders import erasure as er
from ..guiders import erasure_train as ert
from ._registry import register
from ._validate import choice_error, filename_prefix_error

ErasureType = io.Custom("GL_ERASURE")
SAVE_TO = ("loras", "output")


@register
class ConceptErase(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_ConceptErase",
            display_name="Concept Erase (closed form, UCE)",
            category="Guidance Lab/weights",
            description=(
                "Erases concepts from a model in one closed-form solve per weight that reads the text (Unified "
                "Concept Editing, Gandikota et al., WACV 2024, arXiv:2308.14761): UNets (SD1.x, SD2.x, SDXL, the "
                "demo model): every cross-attention K/V projection; SD3 and Flux: the token input projection "
                "(context_embedder / txt_in) and the pooled input projection (y_embedder / vector_in), as the UCE "
                "authors' Flux script does. The erased concept's "
                "text states are mapped to what the projection gives an alternative concept (the user-chosen "
                "replacement of All-but-One, Hong et al., AAAI 2024), preserved concepts keep their outputs. The "
                "edit is added as weight patches on a clone (the input model is untouched; strength scales it; "
                "stacking two nodes composes; it saves as a LoRA with GL_SaveErasureLoRA). protect_uncond (a "
                "Guidance Lab design) removes from the update every direction of the unconditional prompts' token "
                "states (and pooled vectors), so the unconditional prediction stays the original's (to float "
                "rounding). 0 extra NFEs; seconds to compute. Other families get a clear error. The hooks output "
                "carries the same edit as a ComfyUI hook group: attach it to the positive prompt(s) with core Cond "
                "Set Props and sample with the original model, and only those prompts see the edit while the "
                "negative/unconditional branch runs the original weights bit for bit (the positive and negative "
                "then run as two model calls per step instead of one batched call)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to edit: SD1.x, SD2.x, SDXL, SD3 or Flux (it is cloned; "
                               "the original is unchanged)."),
                io.Clip.Input("clip", tooltip="The text encoder(s) of the same checkpoint (SD3: CLIP-L/G and/or T5; "
                              "Flux: CLIP-L + T5): the edit is solved on the text states they produce (CLIP-skip "
                              "respected: put CLIPSetLastLayer before this node)."),
                io.String.Input("erase", default="", multiline=True, tooltip=(
                    "Concepts to erase, separated by ';' or new lines (e.g. 'circle' or 'Van Gogh; Monet'). "
                    "Empty = no edit.")),
                io.String.Input("alternative", default="", multiline=False, tooltip=(
                    "What an erased concept should turn into (v* = W·c_alternative): one for all, or one per "
                    "erased concept in the same order, ';'-separated. Empty = the empty prompt (the concept is "
                    "dropped; UCE's default for objects; use 'art' for artists).")),
                io.String.Input("preserve", default="", multiline=True, tooltip=(
                    "Concepts whose outputs must stay as they are (';' or new lines), e.g. related concepts the "
                    "erasure could drag along. Empty = none.")),
                io.Float.Input("erase_scale", default=1.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "s_e: weight of the erase equations in the solve. Higher = the erased states land closer to "
                    "the alternative. 0 = no edit. Paper default 1.")),
                io.Float.Input("preserve_scale", default=1.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "s_p: weight of the preserve equations. Higher = preserved concepts move less. Default 1.")),
                io.Float.Input("lam", default=0.5, min=0.001, max=100.0, step=0.01, tooltip=(
                    "λ: weight of keeping the old projection in every direction (the regulariser). Lower = a "
                    "stronger, less local edit. Paper default 0.5.")),
                io.Combo.Input("token_mode", options=list(er.TOKEN_MODES), default="last_content", tooltip=(
                    "Which token states carry the concept: last_content = the last token of the concept (UCE; "
                    "causal text encoders gather the whole phrase there); all_content (design) = every token of "
                    "it, paired with the alternative's from the end; all (design) = all positions, end and "
                    "padding tokens included (strongest).")),
                io.Combo.Input("templates", options=[*er.TEMPLATES, "custom"], default="none", tooltip=(
                    "Prompt templates the concept is also edited in: none = the bare concept; object = 'image / "
                    "photo / portrait / picture / painting of X'; art = 'painting / art / artwork / picture by X', "
                    "'style of X'; custom = custom_templates. More templates = robust to phrasing.")),
                io.String.Input("custom_templates", default="a {}\na photo of a {}", multiline=True, tooltip=(
                    "templates = custom only: one template per line with '{}' where the concept goes.")),
                io.Combo.Input("targets", options=list(er.TARGETS), default="K+V", tooltip=(
                    "UNets: which cross-attention projections to edit: K+V (default; strongest), K only (where "
                    "attention looks), V only (what is written). SD3/Flux: K+V only (= the text input "
                    "projections: their K/V are computed inside the joint blocks).")),
                io.Boolean.Input("protect_uncond", default=True, tooltip=(
                    "Remove from the edit every direction spanned by the unconditional prompts' token states, so "
                    "the unconditional branch (and CFG's negative) gives the original prediction. Costs a little "
                    "erasure strength when the concept shares directions with them (the log says how much).")),
                io.String.Input("uncond_prompts", default="", multiline=True, tooltip=(
                    "protect_uncond only: the negative prompts you sample with, one per line. Empty = the empty "
                    "prompt ''. A zeroed negative (ConditioningZeroOut) is always kept.")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip=(
                    "Patch strength: 1 = the solved edit, 0 = the original model, between = partial.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone with the erasure as weight patches."),
                     ErasureType.Output(display_name="erasure", tooltip=(
                         "The edit itself (ΔW per projection and settings): connect GL_SaveErasureLoRA to save "
                         "it as a LoRA file.")),
                     io.Hooks.Output(display_name="hooks", tooltip=(
                         "The same edit as a hook group, for conditionings (core Cond Set Props → hooks): "
                         "sample with the original model; only the hooked prompts are edited and the "
                         "unconditional branch stays bit-identical. Empty when nothing is erased."))],
        )

    @classmethod
    def execute(cls, model, clip, erase, alternative, preserve, erase_scale, preserve_scale, lam, token_mode,
                templates, custom_templates, targets, protect_uncond, uncond_prompts, strength) -> io.NodeOutput:
        m, edit = er.concept_erase(
            model, clip, erase=erase, alternative=alternative, preserve=preserve, erase_scale=erase_scale,
            preserve_scale=preserve_scale, lam=lam, token_mode=token_mode, templates=templates,
            custom_templates=custom_templates, targets=targets, protect_uncond=protect_uncond,
            uncond_prompts=uncond_prompts, strength=strength)
        return io.NodeOutput(m, edit, er.erasure_hooks(edit, model))


@register
class SaveErasureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_SaveErasureLoRA",
            display_name="Save Erasure as LoRA",
            category="Guidance Lab/weights",
            description=(
                "Writes a GL_ConceptErase edit as a standard LoRA safetensors file (truncated SVD of each ΔW: "
                "lora_up / lora_down / alpha per module) that core LoraLoader / LoraLoaderModelOnly reload with "
                "the same effect at strength 1; the file's metadata holds the family, the concepts, the settings "
                "and the truncation error (also logged)."),
            inputs=[
                ErasureType.Input("erasure", tooltip="The erasure output of GL_ConceptErase."),
                io.String.Input("filename_prefix", default="erasure/concept_erase", tooltip=(
                    "File name prefix (subfolders allowed); a counter is appended.")),
                io.Int.Input("rank", default=0, min=0, max=4096, tooltip=(
                    "LoRA rank per module; 0 = the smallest rank that keeps `energy` of the update (the closed "
                    "form's update has rank ≤ the number of erased token states).")),
                io.Float.Input("energy", default=0.999, min=0.5, max=1.0, step=0.001, tooltip=(
                    "rank 0 only: share of the update's squared singular values to keep (1 = exact).")),
                io.Combo.Input("save_to", options=list(SAVE_TO), default="loras", tooltip=(
                    "loras = the first models/loras folder (LoraLoader lists it after a refresh); output = "
                    "ComfyUI's output folder.")),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The written file.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, save_to=None):
        return (filename_prefix_error("GL_SaveErasureLoRA", filename_prefix)
                or choice_error("GL_SaveErasureLoRA", "save_to", save_to, SAVE_TO) or True)

    @classmethod
    def execute(cls, erasure, filename_prefix, rank, energy, save_to) -> io.NodeOutput:
        if not isinstance(erasure, er.ErasureEdit):
            raise ValueError(f"GL_SaveErasureLoRA: the erasure input got a {type(erasure).__name__}; connect the "
                             "erasure output of GL_ConceptErase")
        folder = folder_paths.get_output_directory() if save_to == "output" else None
        path, err = er.save_lora(erasure, filename_prefix, rank=rank, energy=energy, folder=folder)
        text = f"{path.name}: {len(erasure.deltas)} modules, worst relative truncation error {err:.2e}"
        return io.NodeOutput(str(path), ui=ui.PreviewText(text))


@register
class ConceptEraseTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GL_ConceptEraseTrain",
            display_name="Concept Erase (fine-tune, All-but-One style)",
            category="Guidance Lab/weights",
            description=(
                "Erases concepts by training LoRA adapters on the cross-attention projections with a surgical "
                "objective after All-but-One (Hong et al., AAAI 2024, arXiv:2312.12807): the erased prompt's "
                "guidance term ε(x, c_e) − ε(x, ∅) is moved onto the alternative's, while the unconditional "
                "prediction and preserved concepts are held to the frozen model's. The paper's code is not public: "
                "this loss is Guidance Lab's reconstruction (a DESIGN). Training states come from the frozen "
                "model's own CFG trajectories of the erased prompt. Shows a progress bar and can be interrupted. "
                "Output: the model with the trained update as weight patches (the input model is untouched), "
                "the edit for GL_SaveErasureLoRA, and the same update as hooks for prompts (the unconditional "
                "branch then keeps the original weights). 0 extra NFEs at sampling. SD1.x, SD2.x, SDXL, the demo "
                "model, SD3 and Flux."),
            inputs=[
                io.Model.Input("model", tooltip="The model to fine-tune (a clone is trained; the input stays)."),
                io.Clip.Input("clip", tooltip="The text encoder(s) of the same checkpoint."),
                io.Latent.Input("latent", tooltip=(
                    "An empty latent of the size you will sample (e.g. EmptyLatentImage): sets the size of the "
                    "training trajectories; its batch size is ignored.")),
                io.String.Input("erase", default="", multiline=True, tooltip=(
                    "Concepts to erase, ';' or new lines (prompts work too: they are used as written).")),
                io.String.Input("alternative", default="", tooltip=(
                    "c_a: what the erased concept should become (one for all, or one per erased concept). Empty "
                    "= the empty prompt: the erased prompt then behaves like no prompt.")),
                io.String.Input("preserve", default="", multiline=True, tooltip=(
                    "c_p: concepts held to the frozen model (L_p). Empty = none.")),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps (default 500)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, tooltip=(
                    "AdamW learning rate of the LoRA (default 1e-4).")),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank per projection (default 8)."),
                io.Int.Input("batch", default=2, min=1, max=64, tooltip=(
                    "States per step (each costs 3 frozen and 3 trained rows).")),
                io.Float.Input("eta", default=1.0, min=0.0, max=10.0, step=0.1, tooltip=(
                    "η: the erased prompt's guidance term is trained towards η·(ε(c_a) − ε(∅)). Default 1.")),
                io.Float.Input("lambda_u", default=1.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "λ_u: weight of the unconditional-drift term (keeps ε'(∅) at the original). Default 1.")),
                io.Float.Input("lambda_p", default=0.5, min=0.0, max=100.0, step=0.1, tooltip=(
                    "λ_p: weight of the preserve term. Default 0.5.")),
                io.Int.Input("trajectories", default=16, min=1, max=1024, tooltip=(
                    "M: images the frozen model samples per erased concept to collect training states.")),
                io.Int.Input("trajectory_steps", default=30, min=2, max=200, tooltip=(
                    "Euler steps of each trajectory (every intermediate state is a training state).")),
                io.Float.Input("trajectory_cfg", default=5.0, min=1.0, max=30.0, step=0.5, tooltip=(
                    "CFG scale of the trajectories (default 5).")),
                io.Combo.Input("trainable", options=list(ert.TRAINABLE), default="auto", tooltip=(
                    "Which weights get LoRA adapters. auto = attn2 q/k/v/out on UNets, text stream qkv on "
                    "SD3/Flux. UNets: attn2 q/k/v/out or attn2 k/v (cross-attention). SD3/Flux: text input (the "
                    "token and pooled input projections) or text stream qkv (the text stream's fused q/k/v in "
                    "every joint block).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip=(
                    "Seed of the adapters' initialisation, the trajectories and the batches.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone with the trained erasure as weight "
                                     "patches."),
                     ErasureType.Output(display_name="erasure", tooltip=(
                         "The trained update (ΔW per projection, settings, loss history): connect "
                         "GL_SaveErasureLoRA to save it as a LoRA.")),
                     io.Hooks.Output(display_name="hooks", tooltip=(
                         "The trained update as a hook group, for conditionings (core Cond Set Props → hooks): "
                         "sample with the original model; only the hooked prompts are edited and the "
                         "unconditional branch runs the original weights bit for bit, so the training's "
                         "unconditional drift does not reach it."))],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, clip, latent, erase, alternative, preserve, steps, learning_rate, rank, batch, eta,
                lambda_u, lambda_p, trajectories, trajectory_steps, trajectory_cfg, trainable,
                seed) -> io.NodeOutput:
        m, edit = ert.train_erasure(
            model, clip, latent, erase=erase, alternative=alternative, preserve=preserve, steps=steps,
            learning_rate=learning_rate, rank=rank, batch=batch, eta=eta, lambda_u=lambda_u, lambda_p=lambda_p,
            trajectories=trajectories, trajectory_steps=trajectory_steps, trajectory_cfg=trajectory_cfg,
            trainable=trainable, seed=seed)
        return io.NodeOutput(m, edit, er.erasure_hooks(edit, model))

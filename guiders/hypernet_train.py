"""GL_HypernetworkTrain: end-to-end training of a personalization hypernetwork (kernels/hypernet.py) through the
frozen diffusion model (methods.md §13, objective DESIGN):

    L(φ) = E_subject E_{x0 ∈ targets} w(σ)·‖D_{θ ⊕ ΔW}(x_σ, σ, c) − x0‖² + λ_reg·Σ_l ‖B_l A_l‖²_F,
    ΔW = h_φ(reference images of the same subject)

w(σ)·‖D − x0‖² is the family's own training loss (ε-MSE for EPS, velocity MSE for flow, v-MSE for V models:
kernels.hypernet.denoising_weight), by default with Min-SNR-γ weighting (γ = 5; a design choice of the pack: the
nearly clean steps, whose loss is mostly noise, would otherwise dominate the gradient), AdamW with a linear warm-up.
Each step draws `subjects_per_step` subjects; for each, `ref_images` images go
to the hypernetwork and `target_images` other images of the subject (with their captions) are denoised by the
model with that subject's ΔW, applied as a weight wrapper on a training clone (`add_weight_wrapper`, under
`torch.inference_mode(False)`); the base weights never change and the wrappers are taken off afterwards.

Data: "demo subjects" draws textured demo-world objects (demo/subjects.py, split train: a new subject each draw
from `subjects` of them); "folder" reads one sub-folder per subject (images, captions from a .txt beside each image
or a caption.txt in the sub-folder, else the empty prompt). Captions are encoded and folder images VAE-encoded
before training starts, so the text encoder and the VAE never push the training clone out of memory.

Image encoder: with a CLIP_VISION model (and no `resume`), a new hypernetwork gets the clip_vision encoder
(kernels/hypernet.py): it reads the frozen CLIP vision model's penultimate hidden states through a trainable
projection. Folder images are encoded once, at full size, before training; demo subjects are rendered per draw, so
theirs are encoded per draw (no_grad; the demo model is small). Contrastive encoder pretraining exists for the conv
encoder only: encoder_pretrain_steps > 0 with a CLIP vision model is refused (the CLIP vision model is the
pretrained encoder). freeze_encoder then freezes the trainable projection.

The loss history is measured on four fixed probe draws (same subjects, images, noise and σ each time), so its rows
compare: [step, probe loss, output penalty, probe loss with swapped references] — the last gives each draw's
targets the ΔW of the next draw's references; it exceeds the probe loss only when the hypernetwork reads its
references (a network that learned one update for all subjects scores the same on both). Checkpoints are
written every `checkpoint_every` steps; progress bar; interruptible (the shared model is left clean).

Experimental, not on the node: `fit_lora` optimises one subject's LoRA directly (the per-subject training a
hypernetwork replaces; bench/personalize.py's ceiling rows). `fit_demo_subjects` + `regress_hypernet` are
weight-space pretraining (DESIGN, the HyperDreamBooth precedent): fit many training subjects with one fixed, shared
down-projection A, then regress the hypernetwork's ΔW, predicted from fresh references, onto theirs, with some
fitted subjects held out to tell whether the mapping generalises. `choose_prototypes` + `basis_from_fits` build a
basis-decoder network (kernels/hypernet.py, DESIGN): K prototype training subjects chosen by k-means on the
encoder's subject embeddings, fitted directly (`fit_loras_together` fits several in one batched forward), become its
K up-projections, and the mixing map starts as a softmax over the cosine similarity to the prototypes; end-to-end
training (`train_hypernet`, resume) then continues it like any hypernetwork. `build_basis` (GL_HypernetworkBasis)
runs those steps on demo subjects or on a folder's subjects (`kmeans_prototypes` on their embeddings, then
`fit_loras_together` on each chosen sub-folder's images).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import comfy.model_management
import comfy.utils

from ..kernels import hypernet as hk
from ..kernels._tensor import per_sample_mse
from . import hypernet as hn_mod
from . import training as tr
from .family import family_name

NODE = "GL_HypernetworkTrain"
SOURCES = ("demo subjects", "folder")
LOSS_SPACES = ("native", "x0")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KIND = {"eps": "eps", "v_prediction": "v", "flow": "flow"}


class _Slot:
    """Weight wrapper W ↦ W + ΔW of the subject being trained on (ΔW None: the base weight)."""

    def __init__(self):
        self.delta = None

    def __call__(self, w):
        if self.delta is None:
            return w
        return (w + self.delta.to(w.device).reshape(w.shape)).to(w.dtype)


# --------------------------------------------------------------------------------------------------- data

class DemoSubjects:
    """Textured demo-world subjects (demo/subjects.py, split train), images at `resolution`."""

    CAPTION_VARIANTS = (0, 1)         # "a red circle", "a large red circle": every one is encoded up front

    def __init__(self, count: int, resolution: int, seed: int, *, featurize=None):
        from ..demo import subjects, world
        self.subjects, self.world, self.count, self.size, self.seed = subjects, world, count, resolution, seed
        self.featurize = featurize          # IMAGE [N, H, W, 3] → features [N, T, d]; None: references are images

    def captions(self) -> list[str]:
        w = self.world
        out = []
        for color in w.COLORS:
            for shape in w.SHAPES:
                out.append(w._noun_phrase(color, shape))
                out += [w._noun_phrase(size, color, shape) for size in w.SIZES]
        return out

    def prepare(self, encode) -> None:
        """Nothing to pre-encode: scenes are rendered per draw (the demo model is pixel-space)."""

    def draw(self, gen: torch.Generator, n_ref: int, n_tgt: int):
        """(reference images [n_ref, 3, S, S] or their features [n_ref, T, d], target images [n_tgt, 3, S, S] in
        [0, 1], target captions, None)."""
        subj = self.subjects.subject(int(torch.randint(0, self.count, (1,), generator=gen)))
        start = int(torch.randint(0, 10_000, (1,), generator=gen))
        images, _captions, labels = self.subjects.images(subj, start, n_ref + n_tgt, seed=self.seed, size=self.size)
        variants = torch.randint(0, len(self.CAPTION_VARIANTS), (n_tgt,), generator=gen).tolist()
        caps = [self.world.caption_for(lab, self.CAPTION_VARIANTS[v]) for lab, v in zip(labels[n_ref:], variants)]
        refs = images[:n_ref]
        if self.featurize is not None:
            refs = self.featurize(refs.permute(0, 2, 3, 1))
        return refs, images[n_ref:], caps, None

    def views(self, gen: torch.Generator, subjects: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two disjoint sets of n images for each of `subjects` distinct subjects: [subjects, n, 3, S, S] twice."""
        ids = torch.randperm(self.count, generator=gen)[:subjects].tolist()
        a, b = [], []
        for i in ids:
            start = int(torch.randint(0, 10_000, (1,), generator=gen))
            images, _c, _l = self.subjects.images(self.subjects.subject(i), start, 2 * n, seed=self.seed,
                                                  size=self.size)
            a.append(images[:n])
            b.append(images[n:])
        return torch.stack(a), torch.stack(b)


class FolderSubjects:
    """One sub-folder per subject: its images (any size; centre-cropped and resized) and captions; with `featurize`,
    also every image's features (computed once, from the full-size image, as GL_Personalize computes them)."""

    def __init__(self, root: str, resolution: int, *, node: str = NODE, featurize=None):
        from PIL import Image
        path = Path(root or "")
        if not root or not path.is_dir():
            raise hn_mod.HypernetError(f"{node}: folder {root!r} is not a directory; give a folder with one "
                                       "sub-folder of images per subject")
        self.size, self.items, self.features = resolution, [], None if featurize is None else []
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            shared = (sub / "caption.txt").read_text().strip() if (sub / "caption.txt").is_file() else ""
            pics, caps, feats = [], [], []
            for f in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                with Image.open(f) as im:
                    arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
                pics.append(hn_mod.subject_images(arr[None], resolution, node=node)[0])
                if featurize is not None:
                    feats.append(featurize(arr[None])[0])
                txt = f.with_suffix(".txt")
                caps.append(txt.read_text().strip() if txt.is_file() else shared)
            if len(pics) >= 2:
                self.items.append((sub.name, torch.stack(pics), caps))
                if featurize is not None:
                    self.features.append(torch.stack(feats))
        if not self.items:
            raise hn_mod.HypernetError(f"{node}: no sub-folder of {root!r} holds at least 2 images; each subject "
                                       "needs reference images and images to denoise")

    def captions(self) -> list[str]:
        return sorted({c for _name, _pics, caps in self.items for c in caps})

    def prepare(self, encode) -> None:
        """Encode every image into the model's latents once, before training (`encode`: images → latents)."""
        self.latents = [encode(pics) for _name, pics, _caps in self.items]

    def draw(self, gen: torch.Generator, n_ref: int, n_tgt: int):
        k = int(torch.randint(0, len(self.items), (1,), generator=gen))
        _name, pics, caps = self.items[k]
        order = torch.randperm(len(pics), generator=gen)
        refs = order[:max(1, min(n_ref, len(pics) - 1))]
        rest = order[len(refs):]
        tgt = rest[torch.randint(0, len(rest), (n_tgt,), generator=gen)]
        ref_inputs = pics[refs] if self.features is None else self.features[k][refs]
        return ref_inputs, pics[tgt], [caps[int(i)] for i in tgt], self.latents[k][tgt]

    def views(self, gen: torch.Generator, subjects: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randperm(len(self.items), generator=gen)[:subjects].tolist()
        a, b = [], []
        for k in ids:
            pics = self.items[k][1]
            order = torch.randperm(len(pics), generator=gen)
            half = len(pics) // 2
            pick = torch.randint(0, half, (n,), generator=gen)
            a.append(pics[order[:half]][pick])
            b.append(pics[order[half:2 * half]][pick])
        return torch.stack(a), torch.stack(b)


class ImageSet:
    """One subject's fixed images [N, 3, S, S] in [0, 1] with their captions (a direct LoRA fit's data)."""

    def __init__(self, images: torch.Tensor, captions: list[str]):
        self.images, self.caps = images.float(), list(captions)

    def captions(self) -> list[str]:
        return sorted(set(self.caps))

    def prepare(self, encode) -> None:
        self.latents = encode(self.images)

    def draw(self, gen: torch.Generator, n_ref: int, n_tgt: int):
        idx = torch.randint(0, len(self.images), (n_tgt,), generator=gen)
        return self.images[:1], self.images[idx], [self.caps[int(i)] for i in idx], self.latents[idx]


# ------------------------------------------------------------------------------------------------- training

def _check(steps, lr, subjects_per_step, ref_images, target_images, reg, resolution):
    for name, value, low in (("steps", steps, 1), ("subjects_per_step", subjects_per_step, 1),
                             ("ref_images", ref_images, 1), ("target_images", target_images, 1),
                             ("resolution", resolution, 8)):
        if value < low:
            raise hn_mod.HypernetError(f"{NODE}: {name} must be at least {low}, got {value}")
    if not lr > 0 or reg < 0:
        raise hn_mod.HypernetError(f"{NODE}: learning_rate must be > 0 and output_reg >= 0; got {lr}, {reg}")


def train_hypernet(model, clip, vae, *, source: str = "demo subjects", folder: str = "", subjects: int = 2000,
                   layers: str = "attention", rank: int = 2, width: int = 128, depth: int = 2, steps: int = 1000,
                   learning_rate: float = 3e-4, subjects_per_step: int = 4, ref_images: int = 3,
                   target_images: int = 4, resolution: int = 32, output_reg: float = 1e-4,
                   min_snr_gamma: float = 5.0, warmup: int = 50, encoder_pretrain_steps: int = 0,
                   freeze_encoder: bool = False, seed: int = 0,
                   checkpoint_every: int = 0, checkpoint_prefix: str = "hypernet/train",
                   resume: hn_mod.Hypernet | None = None, clip_vision=None, reference_contrast: float = 0.0,
                   contrast_margin: float = 0.1, loss_space: str = "native", subject_query: bool = False,
                   log=None) -> hn_mod.Hypernet:
    """Train (or continue training `resume`) a hypernetwork for `model`; returns it (CPU, eval). `clip_vision`: a
    new hypernetwork reads its features (encoder clip_vision); required to resume one that does.
    `reference_contrast` λ > 0 (DESIGN, experimental): per subject, also denoise its targets with the ΔW of another
    drawn subject's references and add λ·max(0, m·L_own − (L_swapped − L_own)) (m = `contrast_margin`, L_own
    detached inside m·L_own): the loss with the wrong references must exceed the own one by the share m, which an
    update that ignores the references cannot do. Costs one more forward and backward per subject.
    `loss_space` "x0" (DESIGN, experimental): weigh ‖D − x0‖² alike at every noise level instead of the family's
    native weight (Min-SNR-capped ε/velocity loss, which scales the x0 error by ~1/σ² and so all but ignores the
    noisy steps, where only the references can tell the subject's look).
    `subject_query` (DESIGN, experimental): the network adds its pooled subject embedding to every query
    (kernels/hypernet.py); resuming a network without that path adds it, zero-initialised, so training continues
    from the same function."""
    t0 = time.perf_counter()
    _check_clip_vae_source(NODE, clip, vae, source)
    _check(steps, learning_rate, subjects_per_step, ref_images, target_images, output_reg, resolution)
    if loss_space not in LOSS_SPACES:
        raise hn_mod.HypernetError(f"{NODE}: loss_space {loss_space!r}: choose one of {', '.join(LOSS_SPACES)}")
    if not (reference_contrast >= 0 and contrast_margin >= 0):
        raise hn_mod.HypernetError(f"{NODE}: reference_contrast ({reference_contrast}) and contrast_margin "
                                   f"({contrast_margin}) must be >= 0 (0 = no contrast term)")
    fam = hn_mod.family(model)
    if resume is not None:
        hn_mod.check_model(model, resume, node=NODE)
        targets, layers = resume.targets, resume.layers
        if subject_query and resume.module.config["decoder"] == "basis":
            raise hn_mod.HypernetError(f"{NODE}: resume '{resume.name}' has the basis decoder, which has no decoder "
                                       "queries; leave subject_query off")
    else:
        targets = hn_mod.targets_for(model, layers, node=NODE)
    featurize, encoder_cfg = _feature_encoder(resume, clip_vision, resolution, encoder_pretrain_steps)
    data = (DemoSubjects(subjects, resolution, seed, featurize=featurize) if source == "demo subjects"
            else FolderSubjects(folder, resolution, featurize=featurize))
    ms = model.get_model_object("model_sampling")
    kind = _prediction_kind(ms, NODE)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        if resume is not None:
            module = hk.HyperNetwork(targets, {**resume.module.config,
                                               "subject_query": subject_query or resume.module.config["subject_query"]})
            missing, unexpected = module.load_state_dict(resume.module.state_dict(), strict=False)
            if unexpected or any(not k.startswith("subject_in.") for k in missing):
                raise hn_mod.HypernetError(f"{NODE}: the resumed network's weights do not fit its own settings "
                                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            with torch.random.fork_rng(devices=[]):          # seeded initialisation; the global RNG is left as it was
                torch.manual_seed(seed)
                module = hk.HyperNetwork(targets, {"rank": rank, "width": width, "depth": depth,
                                                   "subject_query": subject_query, **encoder_cfg})
        module.train().requires_grad_(True)
        img_size = module.config["image_size"]
        pre = pretrain_encoder(module, data, encoder_pretrain_steps, gen, img_size=img_size, log=log) \
            if encoder_pretrain_steps > 0 else []
        if freeze_encoder:
            module.encoder.requires_grad_(False)
        t, slots = _training_clone(model, targets)
        device = t.load_device
        probe_x = torch.zeros((1, *_latent(vae, model, torch.zeros(1, 3, resolution, resolution)).shape[1:]))
        conds = {c: tr.model_conds(t.model, clip, clip.tokenize(c), 1, device, probe_x, NODE)
                 for c in data.captions()}
        data.prepare(lambda images: _latent(vae, model, images))
        try:
            comfy.model_management.load_models_gpu([t], memory_required=1e20, force_full_load=True)
            module.to(device)
            step_fn = _Stepper(t, module, slots, data, conds, vae, model, kind, ms, device,
                               n_ref=ref_images, n_tgt=target_images, img_size=img_size, gamma=min_snr_gamma,
                               copy_saved=fam != "UNet", loss_space=loss_space)
            probe_gen = torch.Generator().manual_seed(seed + 7919)
            probe = [step_fn.sample(probe_gen) for _ in range(4)]          # four draws (subjects), fixed per seed
            history = [[0, *step_fn.probe(probe)]]
            opt = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=learning_rate,
                                    weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup)))
            pbar = comfy.utils.ProgressBar(steps)
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                for _ in range(subjects_per_step):
                    draw = step_fn.sample(gen)
                    loss, pen = step_fn.loss(draw)
                    total = loss + output_reg * pen
                    if reference_contrast > 0:
                        swapped, _pen = step_fn.loss({**draw, "refs": step_fn.references(gen)})
                        total = total + reference_contrast * torch.relu(
                            contrast_margin * loss.detach() - (swapped - loss))
                    (total / subjects_per_step).backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                opt.step()
                sched.step()
                if (step + 1) % 25 == 0 or step == steps - 1:
                    history.append([step + 1, *step_fn.probe(probe)])
                    if log:
                        log(f"step {step + 1}: probe loss {history[-1][1]:.5f} (with another subject's references "
                            f"{history[-1][3]:.5f}), penalty {history[-1][2]:.3g}")
                if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                    _checkpoint(module, fam, layers, checkpoint_prefix, step + 1)
                pbar.update(1)
                comfy.model_management.throw_exception_if_processing_interrupted()
        finally:
            for slot in slots.values():
                slot.delta = None
            tr.unload_wrappers(t, _Slot)
        module.cpu().eval().requires_grad_(False)
    prior = resume.info.get("steps", 0) if resume is not None else 0
    info = {"steps": prior + steps, "source": source, "subjects": subjects if source == "demo subjects" else
            len(data.items), "learning_rate": learning_rate, "subjects_per_step": subjects_per_step,
            "ref_images": ref_images, "target_images": target_images, "resolution": resolution,
            "output_reg": output_reg, "min_snr_gamma": min_snr_gamma, "warmup": warmup, "seed": seed,
            "encoder": module.config["encoder"],
            "encoder_pretrain_steps": encoder_pretrain_steps, "freeze_encoder": freeze_encoder,
            "encoder_pretrain_loss": pre[-1][1] if pre else None,
            **({"reference_contrast": reference_contrast, "contrast_margin": contrast_margin}
               if reference_contrast > 0 else {}),
            **({"loss_space": loss_space} if loss_space != "native" else {}),
            "loss_history": history, "base": type(model.model).__name__,
            "seconds": round(time.perf_counter() - t0, 1)}
    logging.info("%s: %d steps in %.1f s; probe loss %.5f -> %.5f", NODE, steps, info["seconds"], history[0][1],
                 history[-1][1])
    return hn_mod.Hypernet(module, fam, layers, "trained", info)


def _check_clip_vae_source(node: str, clip, vae, source: str) -> None:
    """Clear errors for the training nodes: the model's CLIP and VAE connected, a known `source`."""
    if clip is None or vae is None:
        raise hn_mod.HypernetError(f"{node}: connect the model's CLIP (captions) and VAE (encodes the subject "
                                   "images into the model's latent space)")
    if source not in SOURCES:
        raise hn_mod.HypernetError(f"{node}: source {source!r}: choose one of {', '.join(SOURCES)}")


def _check_fit_inputs(name: str, clip, vae, sets, steps: int, batch: int, learning_rate: float) -> None:
    """Clear errors for direct LoRA fits: CLIP and VAE present, each subject's images [N, 3, H, W] with one caption
    each, steps and batch >= 1, a positive learning rate."""
    if clip is None or vae is None:
        raise hn_mod.HypernetError(f"{name}: needs the model's CLIP (captions) and VAE (encodes the images)")
    if not sets:
        raise hn_mod.HypernetError(f"{name}: no subjects to fit")
    for images, captions in sets:
        if images.ndim != 4 or images.shape[1] != 3 or len(images) != len(captions) or len(images) < 1:
            raise hn_mod.HypernetError(f"{name}: images must be [N, 3, H, W] with one caption each; got "
                                       f"{tuple(images.shape)} and {len(captions)} captions")
    if steps < 1 or batch < 1 or not learning_rate > 0:
        raise hn_mod.HypernetError(f"{name}: steps and batch must be >= 1 and learning_rate > 0; got {steps}, "
                                   f"{batch}, {learning_rate}")


def fit_lora(model, clip, vae, images: torch.Tensor, captions: list[str], *, layers: str = "attention",
             rank: int = 4, steps: int = 400, learning_rate: float = 3e-3, batch: int = 4,
             min_snr_gamma: float = 5.0, train_down: bool = True, seed: int = 0, down_seed: int | None = None,
             name: str = "fit_lora", log=None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Optimise one subject's LoRA directly (kernels.hypernet.DirectLoRA) on its images [N, 3, S, S] in [0, 1] and
    captions, with the loss the hypernetwork trains on (the family's loss, Min-SNR-γ): the per-subject
    optimisation a hypernetwork replaces (DreamBooth-LoRA style), used as its ceiling and as weight-space targets.
    Returns (factors {key: (B [out, r], A [r, in])} on the CPU, info with the loss on a fixed probe draw before
    and after, and the seconds). `seed` draws the batches and noise; `down_seed` (default `seed`) the initial A, so
    fits of several subjects with train_down False and one down_seed share A and differ only in B. The shared model
    is left clean; progress bar; interruptible."""
    t0 = time.perf_counter()
    _check_fit_inputs(name, clip, vae, [(images, captions)], steps, batch, learning_rate)
    targets, fam = hn_mod.targets_for(model, layers, node=name), hn_mod.family(model)
    ms = model.get_model_object("model_sampling")
    kind = _prediction_kind(ms, name)
    data = ImageSet(images, captions)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        module = hk.DirectLoRA(targets, rank, train_down=train_down, seed=seed if down_seed is None else down_seed)
        t, slots = _training_clone(model, targets)
        device = t.load_device
        probe_x = _latent(vae, model, images[:1].float())
        conds = {c: tr.model_conds(t.model, clip, clip.tokenize(c), 1, device, probe_x, name) for c in data.captions()}
        data.prepare(lambda pics: _latent(vae, model, pics))
        try:
            comfy.model_management.load_models_gpu([t], memory_required=1e20, force_full_load=True)
            module.to(device)
            step_fn = _Stepper(t, module, slots, data, conds, vae, model, kind, ms, device, n_ref=1, n_tgt=batch,
                               img_size=images.shape[-1], gamma=min_snr_gamma, copy_saved=fam != "UNet")
            probe = step_fn.sample(torch.Generator().manual_seed(seed + 7919))
            before = step_fn.probe([probe])[0]
            opt = torch.optim.AdamW(list(module.parameters()), lr=learning_rate, weight_decay=0.0)
            pbar = comfy.utils.ProgressBar(steps)
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                loss, _pen = step_fn.loss(step_fn.sample(gen))
                loss.backward()
                opt.step()
                pbar.update(1)
                comfy.model_management.throw_exception_if_processing_interrupted()
            after = step_fn.probe([probe])[0]
        finally:
            for slot in slots.values():
                slot.delta = None
            tr.unload_wrappers(t, _Slot)
        factors = {k: (b[0].detach().float().cpu().clone(), a[0].detach().float().cpu().clone())
                   for k, (b, a) in module().items()}
    info = {"steps": steps, "rank": rank, "learning_rate": learning_rate, "batch": batch, "images": len(images),
            "train_down": train_down, "seed": seed, "down_seed": seed if down_seed is None else down_seed,
            "probe_loss": [before, after], "seconds": round(time.perf_counter() - t0, 1)}
    if log:
        log(f"{name}: {steps} steps in {info['seconds']} s; probe loss {before:.5f} -> {after:.5f}")
    return factors, info


class _RowLoRAs:
    """Inside the context: forward hooks on the target layers of `diffusion_model` add a LoRA term with a shared
    down-projection A (a buffer) and one up-projection per subject (B [S, out, r], trained); `rows` [N] tells the
    subject of each batch row (kernels.hypernet.row_lora_linear / row_lora_conv2d). The hooks are taken off on
    exit, so the shared modules are left as they were."""

    def __init__(self, diffusion_model, targets: list[hk.Target], downs: dict, ups: dict, name: str):
        self.rows, self.handles, self.name = None, [], name
        self.layers = []
        for t in targets:
            path = t.key[len("diffusion_model."):-len(".weight")]
            mod = diffusion_model.get_submodule(path)
            if isinstance(mod, torch.nn.Conv2d):
                if mod.groups != 1 or mod.padding_mode != "zeros":
                    raise hn_mod.HypernetError(f"{name}: {t.key} is a grouped or non-zero-padded convolution; "
                                               "batched fits support plain convolutions and linear layers")
            elif not isinstance(mod, torch.nn.Linear):
                raise hn_mod.HypernetError(f"{name}: {t.key} belongs to a {type(mod).__name__}; batched fits "
                                           "support Conv2d and Linear layers")
            self.layers.append((mod, downs[t.key], ups[t.key]))

    def _hook(self, a, b):
        def hook(mod, inputs, output):
            x = inputs[0]
            if x.shape[0] != len(self.rows):
                raise hn_mod.HypernetError(f"{self.name}: a layer saw {x.shape[0]} rows, the batch has "
                                           f"{len(self.rows)}; this model regroups its batch inside")
            b_rows = b[self.rows]
            if isinstance(mod, torch.nn.Conv2d):
                term = hk.row_lora_conv2d(x, a, b_rows, stride=mod.stride, padding=mod.padding,
                                          dilation=mod.dilation)
            else:
                term = hk.row_lora_linear(x, a, b_rows)
            return output + term.to(output.dtype)
        return hook

    def __enter__(self):
        self.handles = [mod.register_forward_hook(self._hook(a, b)) for mod, a, b in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def fit_loras_together(model, clip, vae, sets: list[tuple[torch.Tensor, list[str]]], *, layers: str,
                       rank: int = 4, steps: int = 300, learning_rate: float = 5e-3, batch: int = 4,
                       min_snr_gamma: float = 5.0, down_seed: int = 0, seed: int = 0, name: str = "fit_loras_together",
                       log=None) -> tuple[dict, list[dict], dict]:
    """Direct LoRA fits of several subjects in one batched forward per step (DESIGN, experimental: weight-space
    targets). Each subject (images [N, 3, S, S] in [0, 1], captions) gets its own B; A is fixed and shared
    (DirectLoRA's seeded A of `down_seed`, as `fit_lora(train_down=False)` uses); each step draws `batch` of each
    subject's images with their own σ and noise, and the loss is the sum over subjects of their mean
    `fit_lora` loss, so every B gets the gradient a fit of its own would get (AdamW is per element). Returns
    ({key: A}, [{key: B} per subject], info with each subject's loss on a fixed probe draw before and after). The
    shared model is left clean; progress bar; interruptible. Measured on 2 CPU cores with the demo model: no
    faster per subject than one fit at a time (0.18 s against 0.195 s per subject and step: the CPU is busy at
    batch 4 already); the batching is for accelerators, where a tiny model at batch 4 leaves the device idle."""
    t0 = time.perf_counter()
    _check_fit_inputs(name, clip, vae, sets, steps, batch, learning_rate)
    targets = hn_mod.targets_for(model, layers, node=name)
    ms = model.get_model_object("model_sampling")
    kind = _prediction_kind(ms, name)
    gen = torch.Generator().manual_seed(seed)
    n_sets = len(sets)
    with torch.inference_mode(False):
        downs = {k: a for k, a in zip([t.key for t in targets],
                                      hk.DirectLoRA(targets, rank, train_down=False, seed=down_seed).downs())}
        t = model.clone()
        device = t.load_device
        latents = [_latent(vae, model, images.float()) for images, _captions in sets]
        caps = sorted({c for _images, captions in sets for c in captions})
        conds = {c: tr.model_conds(t.model, clip, clip.tokenize(c), 1, device, latents[0][:1], name) for c in caps}
        comfy.model_management.load_models_gpu([t], memory_required=1e20, force_full_load=True)
        downs = {k: a.to(device) for k, a in downs.items()}
        ups = {tg.key: torch.zeros(n_sets, tg.out_dim, rank, device=device, requires_grad=True) for tg in targets}
        sd = float(getattr(ms, "sigma_data", 1.0))
        rows = torch.arange(n_sets, device=device).repeat_interleave(batch)

        def draw(g: torch.Generator) -> dict:
            idx = [torch.randint(0, len(lat), (batch,), generator=g) for lat in latents]
            x0 = torch.cat([lat[i] for lat, i in zip(latents, idx)])
            u = torch.rand(len(x0), generator=g) * 0.98 + 0.01
            return {"x0": x0, "sigma": torch.tensor([float(ms.percent_to_sigma(float(v))) for v in u]),
                    "noise": torch.randn(x0.shape, generator=g),
                    "caps": [sets[s][1][int(j)] for s, i in enumerate(idx) for j in i]}

        def losses(d: dict) -> torch.Tensor:
            """Each subject's mean loss [S]."""
            x0, sigma = d["x0"].to(device), d["sigma"].to(device)
            x = ms.noise_scaling(sigma, d["noise"].to(device), x0)
            cond = tr.cat_conds([conds[c] for c in d["caps"]])
            with tr.saved_copies(hn_mod.family(model) != "UNet"):
                out = t.model.apply_model(x, sigma, **cond).float()
            err = per_sample_mse(out, x0)
            per_row = hk.denoising_weight(sigma, kind, sd, min_snr_gamma) * err
            return per_row.reshape(n_sets, batch).mean(1)

        probe = draw(torch.Generator().manual_seed(seed + 7919))
        hooks = _RowLoRAs(t.model.diffusion_model, targets, downs, ups, name)
        hooks.rows = rows
        with hooks:
            with torch.no_grad():
                before = losses(probe)
            opt = torch.optim.AdamW(list(ups.values()), lr=learning_rate, weight_decay=0.0)
            pbar = comfy.utils.ProgressBar(steps)
            for _step in range(steps):
                opt.zero_grad(set_to_none=True)
                losses(draw(gen)).sum().backward()
                opt.step()
                pbar.update(1)
                comfy.model_management.throw_exception_if_processing_interrupted()
            with torch.no_grad():
                after = losses(probe)
        a_out = {k: a.detach().float().cpu().clone() for k, a in downs.items()}
        b_out = [{k: b[s].detach().float().cpu().clone() for k, b in ups.items()} for s in range(n_sets)]
    info = {"steps": steps, "rank": rank, "learning_rate": learning_rate, "batch": batch, "subjects": n_sets,
            "down_seed": down_seed, "seed": seed,
            "probe_loss": [[round(float(x), 6), round(float(y), 6)] for x, y in zip(before, after)],
            "seconds": round(time.perf_counter() - t0, 1)}
    if log:
        log(f"{name}: {n_sets} subjects, {steps} steps in {info['seconds']} s; mean probe loss "
            f"{float(before.mean()):.5f} -> {float(after.mean()):.5f}")
    return a_out, b_out, info


FITS_FORMAT = "guidance_lab.subject_loras/1"


def fit_demo_subjects(model, clip, vae, indices: list[int], *, layers: str, rank: int = 4, steps: int = 300,
                      learning_rate: float = 5e-3, images: int = 64, down_seed: int = 0, fits: dict | None = None,
                      parallel: int = 1, after_each=None, log=None) -> dict:
    """Direct LoRA fits of demo training subjects (DESIGN, experimental: weight-space targets, the HyperDreamBooth
    precedent): for each index, `fit_lora` with A fixed and shared (`down_seed`) on `images` images of the subject
    (split train) and their captions. Returns {"A": {key: A}, "B": {index: {key: B}}, "info": {...}}; `fits`
    continues a collection (indices already there are skipped; its settings must match); `after_each(fits)` runs
    after every subject (e.g. to save). `parallel` > 1 fits that many subjects at once (`fit_loras_together`: one
    batched forward per step; same objective, A and settings; the seconds recorded per subject are the chunk's
    share)."""
    from ..demo import subjects as sj
    settings = {"layers": layers, "rank": rank, "steps": steps, "learning_rate": learning_rate, "images": images,
                "down_seed": down_seed}
    if fits is None:
        fits = {"A": None, "B": {}, "info": {**settings, "seconds": {}}}
    elif {k: fits["info"].get(k) for k in settings} != settings:
        raise hn_mod.HypernetError(f"fit_demo_subjects: the collection was made with other settings "
                                   f"({ {k: fits['info'].get(k) for k in settings} } vs {settings})")
    todo = [int(i) for i in indices if int(i) not in fits["B"]]
    if parallel > 1:
        for n in range(0, len(todo), parallel):
            chunk = todo[n:n + parallel]
            sets = [sj.images(sj.subject(i), 0, images, seed=0, size=32)[:2] for i in chunk]
            a, bs, info = fit_loras_together(model, clip, vae, sets, layers=layers, rank=rank, steps=steps,
                                             learning_rate=learning_rate, down_seed=down_seed, seed=chunk[0], log=log)
            if fits["A"] is None:
                fits["A"] = a
            for i, b in zip(chunk, bs):
                fits["B"][i] = b
                fits["info"]["seconds"][str(i)] = round(info["seconds"] / len(chunk), 1)
            if log:
                log(f"fitted {min(n + parallel, len(todo))}/{len(todo)}: subjects {chunk[0]}..{chunk[-1]}")
            if after_each is not None:
                after_each(fits)
        return fits
    for n, idx in enumerate(todo):
        pics, caps, _labels = sj.images(sj.subject(int(idx)), 0, images, seed=0, size=32)
        factors, info = fit_lora(model, clip, vae, pics, caps, layers=layers, rank=rank, steps=steps,
                                 learning_rate=learning_rate, train_down=False, seed=int(idx), down_seed=down_seed)
        if fits["A"] is None:
            fits["A"] = {k: a for k, (_b, a) in factors.items()}
        fits["B"][int(idx)] = {k: b for k, (b, _a) in factors.items()}
        fits["info"]["seconds"][str(int(idx))] = info["seconds"]
        if log:
            log(f"fit {n + 1}/{len(indices)}: subject {idx}, probe loss {info['probe_loss'][0]:.5f} -> "
                f"{info['probe_loss'][1]:.5f}, {info['seconds']} s")
        if after_each is not None:
            after_each(fits)
    return fits


def save_fits(fits: dict, path: str | Path) -> Path:
    """Write a collection of `fit_demo_subjects` as safetensors (A|key, B|index|key; settings in the metadata)."""
    path = Path(path)
    sd = {f"A|{k}": a.contiguous() for k, a in fits["A"].items()}
    for idx, bs in fits["B"].items():
        sd.update({f"B|{idx}|{k}": b.contiguous() for k, b in bs.items()})
    comfy.utils.save_torch_file(sd, str(path), metadata={"format": FITS_FORMAT, "info": json.dumps(fits["info"])})
    return path


def load_fits(path: str | Path) -> dict:
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if not meta or meta.get("format") != FITS_FORMAT:
        raise hn_mod.HypernetError(f"load_fits: {path} is not a collection of subject LoRA fits")
    fits = {"A": {}, "B": {}, "info": json.loads(meta["info"])}
    for name, t in sd.items():
        parts = name.split("|")
        if parts[0] == "A":
            fits["A"][parts[1]] = t
        else:
            fits["B"].setdefault(int(parts[1]), {})[parts[2]] = t
    return fits


def _demo_references(net: hn_mod.Hypernet, index: int, start: int, count: int) -> torch.Tensor:
    """Reference images [count, 3, S, S] of demo training subject `index` from scene `start`, at the network's
    input size."""
    from ..demo import subjects as sj
    size = net.module.config["image_size"]
    return hk.resize_images(sj.images(sj.subject(index), start, count, seed=0, size=size)[0], size)


def _unit_embeddings(net: hn_mod.Hypernet, refs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(net.module.subject_embedding(refs), dim=1)


def kmeans_prototypes(z: torch.Tensor, count: int, *, seed: int = 0) -> list[int]:
    """Indices of `count` rows of the unit embeddings z [N, D] that cover them (DESIGN): k-means with cosine
    similarity (`seed`ed start, 100 rounds), then the member nearest each cluster's centre. An empty cluster's
    nearest row may repeat another pick; repeats are dropped, so fewer than `count` may come back."""
    n = int(z.shape[0])
    if not 1 <= count <= n:
        raise hn_mod.HypernetError(f"kmeans_prototypes: need 1 <= count <= {n} (the subjects); got {count}")
    centres = z[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]].clone()
    for _ in range(100):
        assign = (z @ centres.T).argmax(1)
        for k in range(count):
            if (assign == k).any():
                centres[k] = torch.nn.functional.normalize(z[assign == k].mean(0), dim=0)
    assign = (z @ centres.T).argmax(1)
    chosen = []
    for k in range(count):
        members = (assign == k).nonzero().flatten()
        pick = members[(z[members] @ centres[k]).argmax()] if len(members) else (z @ centres[k]).argmax()
        chosen.append(int(pick))
    return list(dict.fromkeys(chosen))


def choose_prototypes(net: hn_mod.Hypernet, count: int, *, pool: int = 1000, ref_images: int = 3,
                      seed: int = 0) -> list[int]:
    """`count` demo training subjects that cover the subjects as the network's encoder sees them (DESIGN):
    `kmeans_prototypes` on the unit subject embeddings of training subjects 0..pool-1 (their first `ref_images`
    images)."""
    if net.module.reads_features:
        raise hn_mod.HypernetError("choose_prototypes: conv hypernetworks only (the demo subjects are rendered)")
    if not 1 <= count <= pool:
        raise hn_mod.HypernetError(f"choose_prototypes: need 1 <= count <= pool; got {count}, {pool}")
    z = _unit_embeddings(net, torch.stack([_demo_references(net, i, 0, ref_images) for i in range(pool)]))
    return kmeans_prototypes(z, count, seed=seed)


# How a subject's mixing embedding is read when a basis network is built: the mean unit embedding of `BASIS_DRAWS`
# disjoint groups of `BASIS_REF_IMAGES` reference images.
BASIS_REF_IMAGES, BASIS_DRAWS = 3, 4


def basis_from_fits(net: hn_mod.Hypernet, fits: dict, prototypes: list[int], *, temperature: float = 0.05,
                    ref_images: int = BASIS_REF_IMAGES, draws: int = BASIS_DRAWS) -> hn_mod.Hypernet:
    """A basis-decoder hypernetwork (kernels.hypernet, DESIGN) initialised from directly fitted LoRAs of prototype
    subjects (`fit_demo_subjects` with a shared A): `net`'s encoder and embedding head, the fits' A as the
    down-projections, prototype k's B as up-projection k, and the mixing map W = ẑ_k/τ (ẑ_k: prototype k's unit
    embedding, averaged over `draws` draws of `ref_images` images), so the mixing weights start as a softmax over
    the cosine similarity to the prototypes at temperature τ. Train it further end to end with `train_hypernet`
    (resume)."""
    if net.module.reads_features:
        raise hn_mod.HypernetError("basis_from_fits: conv hypernetworks only (the demo subjects are rendered)")
    missing = [i for i in prototypes if i not in fits["B"]]
    if missing or not prototypes:
        raise hn_mod.HypernetError(f"basis_from_fits: prototypes {missing[:5] or prototypes} have no fitted LoRA")
    if set(fits["A"]) != {t.key for t in net.targets}:
        raise hn_mod.HypernetError(f"basis_from_fits: the fits adapt other weights than the network ({net.layers})")
    if not temperature > 0:
        raise hn_mod.HypernetError(f"basis_from_fits: temperature must be > 0; got {temperature}")
    with torch.inference_mode(False):
        anchors = torch.stack([torch.nn.functional.normalize(torch.stack(
            [_unit_embeddings(net, _demo_references(net, i, ref_images * d, ref_images)[None])[0]
             for d in range(draws)]).mean(0), dim=0) for i in prototypes])
    return _basis_network(net, fits["A"], [fits["B"][i] for i in prototypes], anchors, temperature,
                          {"prototypes": list(prototypes), "temperature": temperature, "ref_images": ref_images,
                           "draws": draws, "fits": {k: v for k, v in fits["info"].items() if k != "seconds"}})


def _basis_network(net: hn_mod.Hypernet, downs: dict, ups: list[dict], anchors: torch.Tensor, temperature: float,
                   info: dict) -> hn_mod.Hypernet:
    """The basis-decoder network: `net`'s encoder and embedding head, down-projections `downs` {key: A [r, in]},
    up-projection k = ups[k] {key: B [out, r]}, mixing map W = anchors / τ (anchors [K, width]: unit embeddings)."""
    rank = int(next(iter(downs.values())).shape[0])
    cfg = {**net.module.config, "rank": rank, "decoder": "basis", "basis_size": len(ups), "subject_query": False}
    with torch.inference_mode(False):
        module = hk.HyperNetwork(net.targets, cfg)
        module.encoder.load_state_dict(net.module.encoder.state_dict())
        module.project.load_state_dict(net.module.project.state_dict())
        with torch.no_grad():
            module.coefficients.weight.copy_(anchors / temperature)
            module.coefficients.bias.zero_()
            for t, up, down in zip(net.targets, module.ups, module.downs):
                down.copy_(downs[t.key])
                up.copy_(torch.stack([u[t.key] for u in ups]))
    module.eval().requires_grad_(False)
    return hn_mod.Hypernet(module, net.family, net.layers, net.name,
                           {**{k: v for k, v in net.info.items() if k != "rounds"}, "basis": info})


BASIS_NODE = "GL_HypernetworkBasis"


def _folder_embeddings(net: hn_mod.Hypernet, data: FolderSubjects, ref_images: int, draws: int) -> torch.Tensor:
    """Unit subject embeddings [subjects, width] of folder subjects: per subject, the mean unit embedding of up to
    `draws` disjoint groups of `ref_images` of its images (in file order), normalised again."""
    size = net.module.config["image_size"]
    out = []
    with torch.inference_mode(False):
        for k, (_name, pics, _caps) in enumerate(data.items):
            r = min(ref_images, len(pics))
            groups = [torch.arange(g * r, (g + 1) * r) for g in range(max(1, min(draws, len(pics) // r)))]
            inputs = torch.stack([data.features[k][g] if net.module.reads_features
                                  else hk.resize_images(pics[g], size) for g in groups])
            out.append(torch.nn.functional.normalize(_unit_embeddings(net, inputs).mean(0), dim=0))
    return torch.stack(out)


def build_basis(model, clip, vae, net: hn_mod.Hypernet, *, source: str = "demo subjects", folder: str = "",
                subjects: int = 1000, prototypes: int = 32, rank: int = 4, fit_steps: int = 300,
                fit_learning_rate: float = 5e-3, fit_parallel: int = 8, resolution: int = 32,
                temperature: float = 0.02, seed: int = 0, clip_vision=None, fit_images: int = 64,
                fits: dict | None = None, after_each=None, log=None) -> hn_mod.Hypernet:
    """GL_HypernetworkBasis (DESIGN, after HyperLoRA's LoRA basis): a basis-decoder hypernetwork for `model` from
    `net` (whose encoder must already tell subjects apart): `prototypes` subjects chosen by k-means on `net`'s
    subject embeddings (`kmeans_prototypes`), each fitted directly (a rank-`rank` LoRA with one shared, seeded A;
    `fit_loras_together`, `fit_parallel` subjects per batched forward), become the K up-projections; the mixing
    weights start as a softmax over the cosine similarity to the prototypes at temperature τ. Continue it end to
    end with `train_hypernet(resume=...)`. Demo subjects: training subjects 0..subjects-1 (conv encoders); folder:
    every sub-folder is a candidate and all its images (with their captions) are its fit's data. Demo subjects only:
    `fit_images` images per fit, and `fits` / `after_each` are `fit_demo_subjects`'s (continue a saved collection;
    save after every chunk), so a long build can be resumed."""
    t0 = time.perf_counter()
    node = BASIS_NODE
    if not isinstance(net, hn_mod.Hypernet):
        raise hn_mod.HypernetError(f"{node}: connect a hypernetwork (GL_HypernetworkLoader or "
                                   "GL_HypernetworkTrain) whose image encoder tells subjects apart")
    _check_clip_vae_source(node, clip, vae, source)
    for name, value, low in (("prototypes", prototypes, 1), ("rank", rank, 1), ("fit_steps", fit_steps, 1),
                             ("fit_parallel", fit_parallel, 1), ("resolution", resolution, 8)):
        if value < low:
            raise hn_mod.HypernetError(f"{node}: {name} must be at least {low}, got {value}")
    if not (fit_learning_rate > 0 and temperature > 0):
        raise hn_mod.HypernetError(f"{node}: fit_learning_rate ({fit_learning_rate}) and temperature "
                                   f"({temperature}) must be > 0")
    hn_mod.check_model(model, net, node=node)
    if source == "demo subjects":
        if net.module.reads_features:
            raise hn_mod.HypernetError(f"{node}: source demo subjects needs a hypernetwork with its own conv "
                                       f"encoder; '{net.name}' reads CLIP vision features: use source folder")
        if prototypes > subjects:
            raise hn_mod.HypernetError(f"{node}: prototypes ({prototypes}) must not exceed subjects ({subjects}), "
                                       "the training subjects they are chosen from")
        chosen = choose_prototypes(net, prototypes, pool=subjects, seed=seed)
        if log:
            log(f"{node}: prototypes {chosen}")
        fits = fit_demo_subjects(model, clip, vae, chosen, layers=net.layers, rank=rank, steps=fit_steps,
                                 learning_rate=fit_learning_rate, images=fit_images, fits=fits,
                                 parallel=fit_parallel, after_each=after_each, log=log)
        out = basis_from_fits(net, fits, chosen, temperature=temperature)
        out.info["basis"].update(source=source, seconds=round(time.perf_counter() - t0, 1))
        return out
    if fits is not None or after_each is not None:
        raise hn_mod.HypernetError(f"{node}: a saved collection of fits (fits / after_each) is for source demo "
                                   "subjects only; a folder build fits its prototypes afresh")
    featurize, _cfg = _feature_encoder(net, clip_vision, resolution, 0, node=node)
    data = FolderSubjects(folder, resolution, node=node, featurize=featurize)
    if prototypes > len(data.items):
        raise hn_mod.HypernetError(f"{node}: prototypes ({prototypes}) must not exceed the {len(data.items)} "
                                   f"subject folders of {folder!r} (each needs at least 2 images)")
    z = _folder_embeddings(net, data, ref_images=BASIS_REF_IMAGES, draws=BASIS_DRAWS)
    chosen = kmeans_prototypes(z, prototypes, seed=seed)
    if log:
        log(f"{node}: prototypes {[data.items[i][0] for i in chosen]}")
    downs, ups, probes = None, [], []
    for n in range(0, len(chosen), fit_parallel):
        sets = [(data.items[i][1], data.items[i][2]) for i in chosen[n:n + fit_parallel]]
        a, bs, info = fit_loras_together(model, clip, vae, sets, layers=net.layers, rank=rank, steps=fit_steps,
                                         learning_rate=fit_learning_rate, seed=seed + n, name=node, log=log)
        downs = a if downs is None else downs
        ups += bs
        probes += info["probe_loss"]
    return _basis_network(net, downs, ups, z[chosen], temperature, {
        "source": source, "prototypes": [data.items[i][0] for i in chosen], "temperature": temperature,
        "ref_images": BASIS_REF_IMAGES, "draws": BASIS_DRAWS,
        "fits": {"layers": net.layers, "rank": rank, "steps": fit_steps, "learning_rate": fit_learning_rate,
                 "down_seed": 0, "probe_loss": probes},
        "seconds": round(time.perf_counter() - t0, 1)})


def regress_hypernet(net: hn_mod.Hypernet, fits: dict, *, steps: int, learning_rate: float = 1e-3,
                     subjects_per_step: int = 8, ref_images: int = 3, held_out: float = 0.2, seed: int = 0,
                     train_encoder: bool = False, log=None) -> hn_mod.Hypernet:
    """Weight-space pretraining (DESIGN, experimental): train a copy of `net` so that ΔW predicted from fresh
    reference images of a fitted demo subject matches that subject's directly fitted ΔW = B·A
    (kernels.hypernet.delta_distance, relative). No model calls. The last `held_out` share of the fitted subjects
    is never trained on: the history [step, train distance, held-out distance] (mean over those subjects, fixed
    reference draws) says whether the mapping generalises to subjects it did not see."""
    import copy

    t0 = time.perf_counter()
    if net.module.reads_features:
        raise hn_mod.HypernetError("regress_hypernet: conv hypernetworks only (the demo subjects are rendered)")
    unknown = sorted(set(fits["A"]) - {t.key for t in net.targets})
    if unknown:
        raise hn_mod.HypernetError(f"regress_hypernet: {len(unknown)} fitted weights are not the network's targets "
                                   f"(e.g. {unknown[0]}); fit with the network's layers ({net.layers})")
    ids = sorted(fits["B"])
    n_held = int(round(len(ids) * held_out))
    train_ids, held_ids = ids[:len(ids) - n_held], ids[len(ids) - n_held:]
    if not train_ids:
        raise hn_mod.HypernetError("regress_hypernet: no fitted subjects left to train on")

    def refs(idx: int, gen: torch.Generator) -> torch.Tensor:
        return _demo_references(net, idx, int(torch.randint(1000, 100_000, (1,), generator=gen)), ref_images)

    def targets(batch: list[int]) -> dict:
        return {k: (torch.stack([fits["B"][i][k] for i in batch]), a[None].expand(len(batch), -1, -1))
                for k, a in fits["A"].items()}
    probe_gen = torch.Generator().manual_seed(seed + 7919)
    probes = {i: refs(i, probe_gen) for i in ids}

    def distance(module, batch: list[int]) -> float:
        if not batch:
            return float("nan")
        with torch.no_grad():
            return float(hk.delta_distance(module(torch.stack([probes[i] for i in batch])), targets(batch)).mean())
    with torch.inference_mode(False):
        module = copy.deepcopy(net.module).train().requires_grad_(True)
        if not train_encoder:
            module.encoder.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=learning_rate,
                                weight_decay=0.0)
        history = [[0, distance(module, train_ids), distance(module, held_ids)]]
        pbar = comfy.utils.ProgressBar(steps)
        for step in range(steps):
            batch = [train_ids[int(j)] for j in torch.randint(0, len(train_ids), (subjects_per_step,), generator=gen)]
            loss = hk.delta_distance(module(torch.stack([refs(i, gen) for i in batch])), targets(batch)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            if (step + 1) % 50 == 0 or step == steps - 1:
                history.append([step + 1, distance(module, train_ids), distance(module, held_ids)])
                if log:
                    log(f"regression step {step + 1}: distance train {history[-1][1]:.4f}, held-out "
                        f"{history[-1][2]:.4f}")
            pbar.update(1)
            comfy.model_management.throw_exception_if_processing_interrupted()
        module.eval().requires_grad_(False)
    info = dict(net.info)
    info["weight_space"] = {"fits": {k: v for k, v in fits["info"].items() if k != "seconds"},
                            "train_subjects": len(train_ids), "held_out_subjects": len(held_ids), "steps": steps,
                            "learning_rate": learning_rate, "subjects_per_step": subjects_per_step,
                            "train_encoder": train_encoder, "history": history,
                            "seconds": round(time.perf_counter() - t0, 1)}
    return hn_mod.Hypernet(module, net.family, net.layers, net.name, info)


def _feature_encoder(resume, clip_vision, resolution: int, pretrain_steps: int, node: str = NODE) -> tuple:
    """(featurize: IMAGE [N, H, W, C] → CLIP vision features [N, T, d], or None for the conv encoder; the encoder
    settings of a new hypernetwork). Refuses a clip_vision `resume` without CLIP vision, another CLIP vision than
    the one `resume` was trained with, and encoder pretraining with CLIP vision."""
    reads = resume.module.reads_features if resume is not None else clip_vision is not None
    if not reads:
        if clip_vision is not None:
            logging.warning("%s: %s has its own image encoder (conv); the connected clip_vision is not used", node,
                            "resume" if node == NODE else "the hypernetwork")
        return None, {}
    if clip_vision is None:
        label = f"resume '{resume.name}'" if node == NODE else f"the hypernetwork '{resume.name}'"
        raise hn_mod.missing_clip_vision(resume, label, node=node)
    if pretrain_steps > 0:
        raise hn_mod.HypernetError(
            f"{node}: encoder_pretrain_steps ({pretrain_steps}) pretrains the pack's own conv image encoder; with "
            "a CLIP vision model the image encoder is that frozen, pretrained model: set encoder_pretrain_steps to "
            "0 (or disconnect clip_vision to train the conv encoder)")

    def featurize(images: torch.Tensor) -> torch.Tensor:
        return hn_mod.clip_vision_features(clip_vision, images, node=node)
    probe = featurize(torch.full((1, resolution, resolution, 3), 0.5))
    if resume is not None:
        hn_mod.check_features(resume, probe, node=node)
    return featurize, {"encoder": "clip_vision", "feature_tokens": int(probe.shape[1]),
                       "feature_dim": int(probe.shape[2])}


def pretrain_encoder(module: hk.HyperNetwork, data, steps: int, gen: torch.Generator, *, img_size: int,
                     subjects: int = 64, images: int = 3, lr: float = 1e-3, log=None) -> list:
    """Subject-contrastive pretraining of the image encoder (design; the stand-in for a frozen pretrained encoder):
    InfoNCE between two disjoint image sets of each of `subjects` subjects per step. CPU-cheap (no diffusion model
    call). Returns [step, loss] rows."""
    params = list(module.encoder.parameters()) + list(module.project.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    device = next(module.parameters()).device
    pbar = comfy.utils.ProgressBar(steps)
    rows = []
    with torch.enable_grad():
        for step in range(steps):
            a, b = data.views(gen, subjects, images)
            a = hk.resize_images(a.flatten(0, 1), img_size).reshape(*a.shape[:2], 3, img_size, img_size)
            b = hk.resize_images(b.flatten(0, 1), img_size).reshape(*b.shape[:2], 3, img_size, img_size)
            loss = hk.contrastive_loss(module.subject_embedding(a.to(device)), module.subject_embedding(b.to(device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0 or step == steps - 1:
                rows.append([step + 1, round(float(loss.detach()), 4)])
                if log:
                    log(f"encoder pretraining step {step + 1}: contrastive loss {rows[-1][1]:.4f}")
            pbar.update(1)
            comfy.model_management.throw_exception_if_processing_interrupted()
    return rows


def _prediction_kind(ms, node: str) -> str:
    """"eps", "v" or "flow" for the loss weights; a clear error for other predictions."""
    kind = _KIND.get(family_name(ms))
    if kind is None:
        raise hn_mod.HypernetError(f"{node}: the model predicts {family_name(ms)}; training supports EPS, "
                                   "V-prediction and flow models")
    return kind


def _training_clone(model, targets: list[hk.Target]) -> tuple:
    """(a clone of `model` with a ΔW weight wrapper on every target, frozen; the wrappers {key: _Slot})."""
    t = model.clone()
    slots = {tg.key: _Slot() for tg in targets}
    for key, slot in slots.items():
        t.add_weight_wrapper(key, slot)
    t.model.requires_grad_(False)
    return t, slots


def _latent(vae, model, images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] → the model's latent (what the sampler sees, then process_latent_in)."""
    lat = vae.encode(images.permute(0, 2, 3, 1).contiguous())
    return model.model.process_latent_in(lat.float())


def _checkpoint(module, fam, layers, prefix: str, step: int) -> None:
    import folder_paths
    full, name, counter, _sub, _p = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    path = Path(full) / f"{name}_step{step:06}_{counter:05}_.safetensors"
    hn_mod.save(hn_mod.Hypernet(module, fam, layers, name, {"steps": step, "checkpoint": True}), path)
    logging.info("%s: checkpoint %s", NODE, path)


class _Stepper:
    """One subject's loss: predict ΔW from its references, denoise its targets with ΔW in the wrappers."""

    def __init__(self, patcher, module, slots, data, conds, vae, base, kind, ms, device, *, n_ref, n_tgt, img_size,
                 gamma, copy_saved, loss_space="native"):
        self.p, self.module, self.slots, self.data, self.conds = patcher, module, slots, data, conds
        self.vae, self.base, self.kind, self.ms, self.device = vae, base, kind, ms, device
        self.n_ref, self.n_tgt, self.img_size, self.gamma, self.copy_saved = n_ref, n_tgt, img_size, gamma, copy_saved
        self.loss_space = loss_space

    def sample(self, gen: torch.Generator) -> dict:
        refs, tgts, caps, x0 = self.data.draw(gen, self.n_ref, self.n_tgt)
        if x0 is None:
            x0 = _latent(self.vae, self.base, tgts)
        u = torch.rand(len(caps), generator=gen) * 0.98 + 0.01
        sigma = torch.tensor([float(self.ms.percent_to_sigma(float(v))) for v in u])
        noise = torch.randn(x0.shape, generator=gen)
        return {"refs": self._inputs(refs), "x0": x0, "sigma": sigma, "noise": noise, "caps": caps}

    def references(self, gen: torch.Generator) -> torch.Tensor:
        """The reference inputs of one more drawn subject, without encoding its targets or drawing noise."""
        return self._inputs(self.data.draw(gen, self.n_ref, self.n_tgt)[0])

    def _inputs(self, refs: torch.Tensor) -> torch.Tensor:
        if self.module.reads_features:              # features arrive ready from the data (clip_vision encoder)
            return refs
        return hk.resize_images(refs, self.img_size)

    def loss(self, draw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        factors = self.module(draw["refs"][None].to(dev))
        for key, (b, a) in factors.items():
            self.slots[key].delta = b[0] @ a[0]
        x0, sigma, noise = draw["x0"].to(dev), draw["sigma"].to(dev), draw["noise"].to(dev)
        x = self.ms.noise_scaling(sigma, noise, x0)
        cond = tr.cat_conds([self.conds[c] for c in draw["caps"]])
        with tr.saved_copies(self.copy_saved):
            d = self.p.model.apply_model(x, sigma, **cond).float()
        err = per_sample_mse(d, x0)
        if self.loss_space == "x0":
            loss = err.mean()
        else:
            sd = float(getattr(self.ms, "sigma_data", 1.0))
            loss = (hk.denoising_weight(sigma, self.kind, sd, self.gamma) * err).mean()
        return loss, hk.output_penalty(factors)

    def probe(self, draws: list[dict]) -> list[float]:
        """[loss, penalty, loss with swapped references]: the last denoises each draw's targets with the ΔW predicted
        from the next draw's references (another subject, as a rule). It stays above the loss only while the
        hypernetwork reads its references; equal values mean one update for every subject."""
        with torch.no_grad():
            out = [self.loss(d) for d in draws]
            swapped = [self.loss({**d, "refs": draws[(i + 1) % len(draws)]["refs"]})[0] for i, d in enumerate(draws)]
        for slot in self.slots.values():
            slot.delta = None
        n = len(out)
        return [round(sum(float(x[0]) for x in out) / n, 6), round(sum(float(x[1]) for x in out) / n, 9),
                round(sum(float(x) for x in swapped) / n, 6)]


def save_trained(net: hn_mod.Hypernet, filename_prefix: str, *, output: bool = False, node: str = NODE) -> Path:
    """Save as <prefix>_NNNNN_.safetensors to the first gl_hypernetworks folder (GL_HypernetworkLoader lists it) or,
    with `output`, to ComfyUI's output folder."""
    import folder_paths
    root = folder_paths.get_output_directory() if output else hn_mod.folders()[0]
    full, name, counter, _sub, _p = folder_paths.get_save_image_path(filename_prefix, root)
    path = hn_mod.save(net, Path(full) / f"{name}_{counter:05}_.safetensors")
    logging.info("%s: saved %s", node, path)
    return path

"""GL_AGDCollect: CFG-guided sampling trajectories of the frozen model, the training data of adapter guidance
distillation (methods.md §14; collection loop: Guidance Lab design after the authors' sample_trajectories script).

Trajectory j (j = r·P + p for prompt p of P, round r) samples prompt p with the core KSampler path
(comfy.sample.sample, exactly what the KSampler node runs) at cfg ω_j, drawn uniformly from [ω_min, ω_max] by a
generator seeded with `seed`, from noise seeded `seed + j`; its batch is the LATENT's batch (several images per
trajectory, same prompt and ω). A PREDICT_NOISE wrapper on a clone records every model evaluation of the run: the
state x, σ and the guided prediction D the sampler received (the model's patches included; uncond-skipping Guidance
Lab wrappers removed, so the teacher is full CFG), stored as u = (x − D)/σ (ε on EPS/V models, the velocity on
flow models: finite at every σ). The prompts' model conditionings (what the sampler hands the model: c_crossattn,
and y / guidance where the family has them) are stored once per prompt.

Files: output/agd_data/<name>/conds.safetensors (conditionings; metadata: settings, prompts, model) and
shard_NNNNN.safetensors (x, u as fp16 or fp32; σ, ω, prompt index, trajectory index), `shard_size` trajectories
each. Running again with the same name and settings reads finished shards instead of sampling them again (an
interrupted collection resumes); other settings under the same name are refused.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils

from ..kernels import agd as ak
from .adaptive import WRAPPER_KEY as AG_WRAPPER_KEY
from .family import check_latent, family_name
from .linear_ag_calibration import model_fingerprint
from .run_state import NAMESPACE

NODE = "GL_AGDCollect"
FORMAT = "guidance_lab.agd_data/1"
FOLDER = "agd_data"
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class AGDData:
    """The GL_AGD_DATA value: every recorded evaluation, in memory (x, u in the stored precision)."""

    path: Path
    conds: list[dict]                   # per prompt: {model cond name: tensor [1, ...]}
    x: torch.Tensor                     # [N, C, *spatial]
    u: torch.Tensor                     # [N, C, *spatial]: (x − D_cfg)/σ
    sigma: torch.Tensor                 # [N] float32
    omega: torch.Tensor                 # [N] float32
    prompt: torch.Tensor                # [N] int64
    trajectory: torch.Tensor            # [N] int64
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def summary(self) -> str:
        mb = (self.x.numel() * self.x.element_size() * 2) / 2**20
        meta = self.meta
        return (f"{len(self)} recorded evaluations from {meta['trajectories']} trajectories of "
                f"{len(meta['prompts'])} prompt(s), ω in [{meta['omega_min']:g}, {meta['omega_max']:g}], "
                f"{meta['steps']} {meta['sampler']}/{meta['scheduler']} steps ({mb:.1f} MB) in "
                f"{self.path}")


def check(*, prompts, omega_min, omega_max, steps, sampler_name, scheduler, trajectories_per_prompt, precision,
          name) -> None:
    """ValueError naming the node, the value and the fix."""
    if not prompts:
        raise ValueError(f"{NODE}: no prompts; give one prompt per line (the captions you will sample with)")
    if not (math.isfinite(omega_min) and math.isfinite(omega_max)) or not 0.0 < omega_min <= omega_max:
        raise ValueError(f"{NODE}: the guidance range [{omega_min}, {omega_max}] must satisfy 0 < omega_min <= "
                         "omega_max (the paper draws ω from [1, 12])")
    if steps < 1 or trajectories_per_prompt < 1:
        raise ValueError(f"{NODE}: steps ({steps}) and trajectories_per_prompt ({trajectories_per_prompt}) must be "
                         "at least 1")
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"{NODE}: unknown sampler_name {sampler_name!r}; choose one of KSampler's samplers")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"{NODE}: unknown scheduler {scheduler!r}; choose one of KSampler's schedulers")
    if precision not in PRECISIONS:
        raise ValueError(f"{NODE}: precision {precision!r}: choose fp16 or fp32")
    if not name.strip() or ".." in Path(name).parts or Path(name).is_absolute():
        raise ValueError(f"{NODE}: name {name!r} must be a relative folder name under output/{FOLDER}/")


def prompt_conds(model, positive: list, latent: torch.Tensor) -> dict:
    """The model conditioning the sampler builds from a one-entry CONDITIONING, as tensors with batch 1."""
    if len(positive) != 1 or any(k in positive[0][1] for k in ("area", "mask", "hooks")):
        raise ValueError(f"{NODE}: each prompt must encode to one plain conditioning (no areas, masks or hooks)")
    conds = comfy.sampler_helpers.convert_cond(positive)
    noise = torch.zeros_like(latent[:1])
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, noise, "cpu", "positive",
                                              latent_image=latent[:1], denoise_mask=None, seed=0)
    out = {}
    for k, v in conds[0]["model_conds"].items():
        c = v.process_cond(batch_size=1, area=None).cond
        if not torch.is_tensor(c):
            raise ValueError(f"{NODE}: the model needs a non-tensor conditioning {k!r}; this version distils models "
                             "whose conditioning is tensors (SD1.x, SD2.x, SDXL, SD3, Flux)")
        out[k] = c.detach().cpu().clone()
    return out


def _recorder(sink: list):
    """PREDICT_NOISE wrapper appending (x, σ, D) of every evaluation of the run to `sink`."""
    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        out = executor(x, timestep, model_options, seed)
        sigma = timestep.reshape(-1).float()
        if sigma.numel() != x.shape[0]:
            sigma = sigma[:1].expand(x.shape[0])
        sink.append((x.detach().cpu(), sigma.detach().cpu(), out.detach().cpu()))
        return out
    return predict_noise


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def collect(model, clip, prompts: list[str], latent, *, negative: str = "", trajectories_per_prompt: int = 1,
            omega_min: float = 1.0, omega_max: float = 12.0, steps: int = 20, sampler_name: str = "euler",
            scheduler: str = "normal", seed: int = 0, precision: str = "fp16", name: str = "agd/data",
            shard_size: int = 64, progress=None) -> AGDData:
    """Sample (or read back) every trajectory; returns the dataset in memory."""
    import folder_paths
    import nodes
    prompts = [p.strip() for p in prompts if p.strip()]
    check(prompts=prompts, omega_min=omega_min, omega_max=omega_max, steps=steps, sampler_name=sampler_name,
          scheduler=scheduler, trajectories_per_prompt=trajectories_per_prompt, precision=precision, name=name)
    if clip is None:
        raise ValueError(f"{NODE}: connect the model's CLIP (it encodes the prompts)")
    samples = latent["samples"] if isinstance(latent, dict) else latent
    check_latent(model, samples, node=NODE)
    m = model.clone()
    for key in (AG_WRAPPER_KEY, f"{NAMESPACE}.linear_ag"):       # methods that skip the uncond: not the teacher
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key)
    latent_image = comfy.sample.fix_empty_latent_channels(m, samples)
    positives = [nodes.CLIPTextEncode().encode(clip, p)[0] for p in prompts]
    negative_cond = nodes.CLIPTextEncode().encode(clip, negative)[0]
    conds = [prompt_conds(m, pos, latent_image) for pos in positives]
    n_traj = len(prompts) * trajectories_per_prompt
    gen = torch.Generator().manual_seed(seed)
    omegas = (omega_min + (omega_max - omega_min) * torch.rand(n_traj, generator=gen, dtype=torch.float64)).tolist()
    settings = {"format": FORMAT, "model_class": type(model.model).__name__, "model_fingerprint":
                model_fingerprint(model), "family": family_name(m.get_model_object("model_sampling")),
                "prompts": prompts, "negative": negative, "trajectories_per_prompt": trajectories_per_prompt,
                "omega_min": omega_min, "omega_max": omega_max, "steps": steps, "sampler": sampler_name,
                "scheduler": scheduler, "seed": seed, "precision": precision, "latent_shape": list(latent_image.shape),
                "shard_size": shard_size}
    digest = _settings_hash(settings)
    root = Path(folder_paths.get_output_directory()) / FOLDER / name
    _claim(root, conds, settings, digest)
    sink: list = []
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, f"{NAMESPACE}.agd_collect",
                           _recorder(sink))
    total = n_traj * steps
    if progress is None:
        bar = comfy.utils.ProgressBar(total)

        def progress(done, total_):
            bar.update_absolute(done, total_)
    shards = []
    for k in range(math.ceil(n_traj / shard_size)):
        path = root / f"shard_{k:05}.safetensors"
        lo, hi = k * shard_size, min(n_traj, (k + 1) * shard_size)
        shard = _read_shard(path, digest)
        if shard is None:
            rows = []
            for j in range(lo, hi):
                comfy.model_management.throw_exception_if_processing_interrupted()
                sink.clear()
                noise = comfy.sample.prepare_noise(latent_image, (seed + j) % 2**64)

                def callback(step, x0, x, total_steps, j=j):
                    progress(j * steps + step + 1, total)
                    comfy.model_management.throw_exception_if_processing_interrupted()
                comfy.sample.sample(m, noise, steps, omegas[j], sampler_name, scheduler, positives[j % len(prompts)],
                                    negative_cond, latent_image, denoise=1.0, callback=callback, disable_pbar=True,
                                    seed=(seed + j) % 2**64)
                rows += [_rows(x, s, d, omegas[j], j % len(prompts), j, PRECISIONS[precision]) for x, s, d in sink]
            shard = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
            comfy.utils.save_torch_file(shard, str(path), metadata={"format": FORMAT, "settings": digest})
        progress(hi * steps, total)
        shards.append(shard)
    data = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    meta = {**settings, "trajectories": n_traj, "settings_hash": digest}
    return AGDData(root, conds, data["x"], data["u"], data["sigma"], data["omega"], data["prompt"].long(),
                   data["trajectory"].long(), meta)


def _rows(x, sigma, denoised, omega, prompt, traj, dtype) -> dict:
    keep = sigma > 0
    x, sigma, denoised = x[keep], sigma[keep], denoised[keep]
    n = x.shape[0]
    return {"x": x.to(dtype).contiguous(), "u": ak.native_target(x, denoised, sigma).to(dtype).contiguous(),
            "sigma": sigma.float().contiguous(), "omega": torch.full((n,), float(omega)),
            "prompt": torch.full((n,), prompt, dtype=torch.int32),
            "trajectory": torch.full((n,), traj, dtype=torch.int32)}


def _claim(root: Path, conds: list[dict], settings: dict, digest: str) -> None:
    """Write conds.safetensors, or check that the folder holds a collection with the same settings."""
    path = root / "conds.safetensors"
    if path.is_file():
        _sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
        if (meta or {}).get("settings_hash") != digest:
            raise ValueError(f"{NODE}: {root} already holds a collection made with other settings (model, prompts, "
                             "range, steps, sampler, latent size or seed); choose another name, or delete the folder")
        return
    root.mkdir(parents=True, exist_ok=True)
    sd = {f"p{i}.{k}": v.contiguous() for i, c in enumerate(conds) for k, v in c.items()}
    meta = {"format": FORMAT, "settings_hash": digest, "settings": json.dumps(settings, sort_keys=True)}
    comfy.utils.save_torch_file(sd, str(path), metadata=meta)


def _read_shard(path: Path, digest: str) -> dict | None:
    if not path.is_file():
        return None
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    return sd if (meta or {}).get("settings") == digest else None

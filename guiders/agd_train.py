"""GL_AGDTrain: adapter guidance distillation training (methods.md §14; recipe OFFICIAL, ComfyUI loop DESIGN).

The base model is frozen; the adapters (guiders/agd.py) run on a clone exactly as GL_AGDApply places them, with one
ω per sample passed through `transformer_options`. Loss per sample: w(σ)·‖D_student(x, σ, c; ω) − D_cfg‖² with
w(σ) the family's own output weight — ‖ε_s − ε_cfg‖² on EPS models (the paper's loss), the velocity MSE on flow
models, the v-MSE on V-prediction models (kernels.hypernet.denoising_weight, no Min-SNR) — where D_cfg = x − σ·u
from the recorded trajectories (objective "paper"). Objective "relative" (Guidance Lab design, not the paper's):
‖D_student − D_cfg‖² / ‖D_cond − D_cfg‖² per sample, D_cond the frozen model's conditional prediction, so every
noise level and guidance scale weighs alike; the ε-MSE is ruled by large ω and the last, nearly clean steps, and on
the demo model it left the small-ω and high-σ evaluations almost untrained. The denominator is one forward without
gradients per recorded evaluation, the first time it is drawn, kept for the rest of the run. AdamW (weight decay 0),
linear warm-up then cosine to lr·1e-4 (the authors' schedule), gradient norm clipped at 1. Precision "bf16" runs
the student's forward in bfloat16 autocast (the adapters' weights, optimizer and loss stay float32; the loss
history is measured in float32 either way): faster on GPUs and on CPUs with bfloat16 matrix units.

Every 20th trajectory is held out (when there are at least 20): the reported loss history is measured on a fixed
set of up to 512 held-out evaluations, so its rows compare and show generalisation, not memorisation; step 0 is
the untrained adapter, i.e. the plain conditional model against the CFG target. Progress bar; interruptible;
checkpoints every `checkpoint_every` steps to output/<checkpoint_prefix>_stepNNNNNN_*.safetensors.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils

from ..kernels import agd as ak
from ..kernels.hypernet import denoising_weight
from . import agd as ag
from . import training as trn
from .agd_collect import AGDData
from .family import family_name
from .linear_ag_calibration import model_fingerprint

NODE = "GL_AGDTrain"
HOLDOUT_EVERY = 20
PROBE_SIZE = 512
_KIND = {"eps": "eps", "v_prediction": "v", "flow": "flow"}
OBJECTIVES = ("paper", "relative")
PRECISIONS = ("fp32", "bf16")


def check(data, *, steps, batch_size, learning_rate, warmup, hidden, features, objective="paper",
          precision="fp32") -> None:
    if not isinstance(data, AGDData):
        raise ValueError(f"{NODE}: connect GL_AGDCollect's data output; got {type(data).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"{NODE}: objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"{NODE}: precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("hidden", hidden, 4),
                             ("fourier_features", features, 2)):
        if value < low:
            raise ValueError(f"{NODE}: {name} must be at least {low}, got {value}")
    if not learning_rate > 0 or not 0.0 <= warmup < 1.0:
        raise ValueError(f"{NODE}: learning_rate ({learning_rate}) must be > 0 and warmup ({warmup}) in [0, 1)")


def check_data(model, data: AGDData) -> None:
    meta = data.meta
    if meta.get("model_class") != type(model.model).__name__ or meta.get("model_fingerprint") != model_fingerprint(
            model):
        raise ValueError(f"{NODE}: the data in {data.path} was collected from another model "
                         f"({meta.get('model_class')}); train on the model the trajectories came from")


def split(data: AGDData) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices): every HOLDOUT_EVERY-th trajectory is held out."""
    held = (data.trajectory % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1
    if int(data.trajectory.max()) + 1 < HOLDOUT_EVERY or held.all():
        idx = torch.arange(len(data))
        return idx, idx
    return torch.nonzero(~held).reshape(-1), torch.nonzero(held).reshape(-1)


class _Batches:
    """Moves data rows to the device and evaluates the student's loss on them. The relative objective's denominator
    ‖D_cond − D_cfg‖² depends on the frozen model alone, so it is computed once per recorded evaluation (a forward
    without gradients the first time a row is drawn) and kept: one float per evaluation."""

    def __init__(self, patcher, base, data: AGDData, device, kind: str, sigma_data: float, *,
                 precision: str = "fp32"):
        self.p, self.data, self.device, self.kind, self.sd = patcher, data, device, kind, sigma_data
        self.conds = [{k: v.to(device) for k, v in c.items()} for c in data.conds]
        self.topts = patcher.model_options.get("transformer_options", {})
        self.base_topts = base.model_options.get("transformer_options", {})     # without the adapters
        self.copy_saved = ag.family(patcher) != "UNet"
        self.autocast = precision == "bf16"
        self.seen = torch.zeros(len(data), dtype=torch.bool)      # on the CPU: which rows to run, without a sync
        self.gap = torch.zeros(len(data), device=device)            # ‖D_cond − D_cfg‖² of the rows seen

    @property
    def base_forwards(self) -> int:
        """Rows the frozen model has run on (each once)."""
        return int(self.seen.sum())

    def _rows(self, idx: torch.Tensor):
        d, dev = self.data, self.device
        x, u = d.x[idx].to(dev, torch.float32), d.u[idx].to(dev, torch.float32)
        sigma, omega = d.sigma[idx].to(dev), d.omega[idx].to(dev)
        cond = {k: torch.cat([self.conds[p][k] for p in d.prompt[idx].tolist()]) for k in self.conds[0]}
        return x, sigma, omega, cond, ak.denoised_from_native(x, u, sigma)

    def gaps(self, idx: torch.Tensor) -> torch.Tensor:
        """‖D_cond − D_cfg‖² of the rows `idx` (float32, on the device), computing the rows not seen yet."""
        todo = idx[~self.seen[idx]].unique()
        if len(todo):
            x, sigma, _omega, cond, target = self._rows(todo)
            with torch.no_grad(), trn.saved_copies(self.copy_saved):
                base = self.p.model.apply_model(x, sigma, transformer_options={**self.base_topts, "sigmas": sigma},
                                                **cond)
            self.gap[todo.to(self.device)] = ak.per_sample_mse(base, target)
            self.seen[todo] = True
        return self.gap[idx.to(self.device)]

    def losses(self, idx: torch.Tensor, relative: bool = False, *,
               autocast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the paper's loss, the relative loss or None) on the rows `idx`, from one student forward (in bfloat16
        autocast when training at precision bf16, unless `autocast` says otherwise)."""
        x, sigma, omega, cond, target = self._rows(idx)
        topts = copy.copy(self.topts)
        topts["sigmas"] = sigma
        topts["guidance_lab"] = {**topts.get("guidance_lab", {}), ag.OMEGA_KEY: omega}
        with trn.saved_copies(self.copy_saved), torch.autocast(x.device.type, torch.bfloat16,
                                                                enabled=self.autocast if autocast is None
                                                                else autocast):
            student = self.p.model.apply_model(x, sigma, transformer_options=topts, **cond)
        err = ak.per_sample_mse(student, target)
        paper = (denoising_weight(sigma, self.kind, self.sd) * err).mean()
        if not relative:
            return paper, None
        return paper, ak.relative_from_gap(err, self.gaps(idx)).mean()

    def loss(self, idx: torch.Tensor, objective: str = "paper") -> torch.Tensor:
        paper, rel = self.losses(idx, objective == "relative")
        return paper if rel is None else rel

    def row(self, step: int, idx: torch.Tensor, objective: str, chunk: int = 64) -> list:
        """A loss-history row on the held-out rows `idx`: [step, the paper's loss] (comparable across runs), plus
        the relative loss when that is the training objective (both from the same forwards)."""
        relative = objective == "relative"
        sums = [0.0, 0.0]
        with torch.no_grad():
            for i in range(0, len(idx), chunk):
                part = idx[i:i + chunk]
                paper, rel = self.losses(part, relative, autocast=False)     # float32: rows compare across runs
                sums[0] += float(paper) * len(part)
                sums[1] += float(rel) * len(part) if relative else 0.0
        means = [round(v / len(idx), 6) for v in sums]
        return [step, means[0]] + ([means[1]] if relative else [])


def train_agd(model, data: AGDData, *, hidden: int = 320, features: int = 256, use_prompt: bool = True,
              time_token: bool = True, omega_gain: bool = False, top_sites: bool = False, heads: int = 1,
              steps: int = 5000, batch_size: int = 64, learning_rate: float = 1e-4, warmup: float = 0.1,
              objective: str = "paper", precision: str = "fp32", seed: int = 0,
              checkpoint_every: int = 0, checkpoint_prefix: str = "agd/train",
              resume: ag.AGDAdapter | None = None, log=None) -> ag.AGDAdapter:
    """Train (or continue training `resume`) adapters on `data`; returns them (CPU, eval)."""
    t0 = time.perf_counter()
    check(data, steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup=warmup, hidden=hidden,
          features=features, objective=objective, precision=precision)
    check_data(model, data)
    ms = model.get_model_object("model_sampling")
    kind = _KIND.get(family_name(ms))
    if kind is None:
        raise ValueError(f"{NODE}: the model predicts {family_name(ms)}; training supports EPS, V-prediction and "
                         "flow models")
    adapter = resume if resume is not None else ag.build_adapters(
        model, hidden=hidden, features=features, use_prompt=use_prompt, time_token=time_token, omega_gain=omega_gain,
        top_sites=top_sites, heads=heads, seed=seed, node=NODE)
    train_idx, held_idx = split(data)
    gen = torch.Generator().manual_seed(seed)
    probe_idx = held_idx[torch.randperm(len(held_idx), generator=torch.Generator().manual_seed(seed + 1))
                         [:PROBE_SIZE]].sort().values
    with torch.inference_mode(False):
        modules = adapter.modules
        if resume is not None:
            modules = copy.deepcopy(modules)              # the loaded value stays as it was
            adapter = ag.AGDAdapter(modules, adapter.family, dict(adapter.config), dict(adapter.sites), adapter.name,
                                    dict(adapter.info))
        t = ag.apply_adapters(model, adapter, 1.0, node=NODE)
        t.model.requires_grad_(False)
        comfy.model_management.load_models_gpu([t], memory_required=1e20, force_full_load=True)
        device = t.load_device
        modules.to(device).train().requires_grad_(True)
        batches = _Batches(t, model, data, device, kind, float(getattr(ms, "sigma_data", 1.0)), precision=precision)
        history = [batches.row(0, probe_idx, objective)]
        opt = torch.optim.AdamW(modules.parameters(), lr=learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: ak.lr_factor(i, steps, warmup=warmup))
        pbar = comfy.utils.ProgressBar(steps)
        every = max(1, min(250, steps // 10))
        with torch.enable_grad():
            for step in range(steps):
                idx = train_idx[torch.randint(0, len(train_idx), (batch_size,), generator=gen)]
                loss = batches.loss(idx, objective)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
                opt.step()
                sched.step()
                if (step + 1) % every == 0 or step == steps - 1:
                    history.append(batches.row(step + 1, probe_idx, objective))
                    if log:
                        log(f"step {step + 1}: held-out loss {history[-1][1]:.5f}"
                            + (f", relative {history[-1][2]:.4f}" if objective != "paper" else ""))
                if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                    _checkpoint(adapter, checkpoint_prefix, step + 1)
                pbar.update(1)
                comfy.model_management.throw_exception_if_processing_interrupted()
        modules.cpu().eval().requires_grad_(False)
    prior = adapter.info.get("steps", 0) if resume is not None else 0
    adapter.info.update({
        "steps": prior + steps, "batch_size": batch_size, "learning_rate": learning_rate, "warmup": warmup,
        "objective": objective, "precision": precision,
        "seed": seed, "model_class": type(model.model).__name__, "model_fingerprint": model_fingerprint(model),
        "omega_min": data.meta["omega_min"], "omega_max": data.meta["omega_max"], "data_steps": data.meta["steps"],
        "sampler": data.meta["sampler"], "scheduler": data.meta["scheduler"], "trajectories": data.meta["trajectories"],
        "evaluations": len(data), "held_out": len(held_idx), "loss_history": history,
        "parameters": adapter.parameters(), "seconds": round(time.perf_counter() - t0, 1)})
    logging.info("%s: %d steps in %.1f s; held-out loss %.5f -> %.5f", NODE, steps, adapter.info["seconds"],
                 history[0][1], history[-1][1])
    return adapter


def _checkpoint(adapter: ag.AGDAdapter, prefix: str, step: int) -> None:
    import folder_paths
    full, name, counter, _sub, _p = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    path = Path(full) / f"{name}_step{step:06}_{counter:05}_.safetensors"
    ag.save(ag.AGDAdapter(adapter.modules, adapter.family, adapter.config, adapter.sites, name,
                          {**adapter.info, "checkpoint_step": step}), path)
    logging.info("%s: checkpoint %s", NODE, path)


def save_trained(adapter: ag.AGDAdapter, filename_prefix: str, *, output: bool = False) -> Path:
    """Save as <prefix>_NNNNN_.safetensors to the first gl_agd folder (GL_AGDLoader lists it) or, with `output`,
    to ComfyUI's output folder."""
    import folder_paths
    root = folder_paths.get_output_directory() if output else ag.folders()[0]
    full, name, counter, _sub, _p = folder_paths.get_save_image_path(filename_prefix, root)
    path = ag.save(adapter, Path(full) / f"{name}_{counter:05}_.safetensors")
    logging.info("%s: saved %s", NODE, path)
    return path

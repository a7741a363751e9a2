"""LinearAG calibration in the host: full-CFG runs on several prompts feed the per-step least-squares fit.

The regressors (D_c,k, D_u,k−1, D_c,k−1) are Guidance Lab's DESIGN (kernels/linear_ag.py). Each prompt is sampled
with the core path (comfy.sample.sample → KSampler → CFGGuider, exactly what the KSampler node runs) on a clone of
the model carrying a recorder: a PREDICT_NOISE wrapper whose capture hook (first in the pre-CFG list) reads the raw
conditional and unconditional predictions. The first evaluation at σ = sample_sigmas[k] whose history is the latest
evaluation at step k−1 becomes one observation of step k — the same evaluations GL_LinearAG predicts.

Also: the LINEAR_AG value passed between nodes, the model fingerprint stored with a calibration, and the
coefficient files under ComfyUI's output/linear_ag and input/linear_ag folders.
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
import comfy.samplers
import comfy.utils

from ..kernels.linear_ag import LinearAGFit, load_coefficients, save_coefficients
from .adaptive import WRAPPER_KEY as AG_WRAPPER_KEY
from .family import check_latent
from .run_state import NAMESPACE, install_run_state, run_state, step_index

NODE = "GL_LinearAGCalibrate"
LOAD_NODE = "GL_LinearAGLoad"
STATE_KEY = "linear_ag_calibration"
FOLDER = "linear_ag"
DESIGN_NOTE = ("LinearAG regressors D_c,k, D_u,k-1, D_c,k-1 are Guidance Lab's DESIGN; the paper's exact "
               "regressors are not confirmed")


@dataclass(frozen=True)
class LinearAGCoefficients:
    """The LINEAR_AG value: one calibration's table, residuals and metadata (string values as stored)."""

    coefficients: torch.Tensor          # [n_steps, 3] float64 (a, b, c per step)
    residuals: torch.Tensor             # [n_steps] float64, NaN where the step had no data
    metadata: dict = field(default_factory=dict)
    source: str = ""                    # file it was saved to / loaded from

    @property
    def n_steps(self) -> int:
        return int(self.coefficients.shape[0])

    def summary(self, tau: float = 0.05) -> str:
        """A few readable lines: where it came from, settings, and the fit per step."""
        meta = self.metadata
        head = (f"LinearAG coefficients for {self.n_steps} steps ({meta.get('sampler', '?')}/"
                f"{meta.get('scheduler', '?')}, cfg {meta.get('cfg', '?')}, {meta.get('prompts', '?')} prompts, "
                f"model {meta.get('model_class', '?')} {str(meta.get('model_fingerprint', ''))[:12]})")
        rows = []
        for k in range(self.n_steps):
            r = float(self.residuals[k])
            a, b, c = (float(v) for v in self.coefficients[k])
            fit = "no data" if math.isnan(r) else f"residual {r:.4f}{' < τ' if r < tau else ''}"
            rows.append(f"  step {k}: a {a:+.4f}  b {b:+.4f}  c {c:+.4f}  {fit}")
        tail = f"file: {self.source}" if self.source else ""
        return "\n".join([head, *rows, DESIGN_NOTE + ".", tail]).strip()


def model_fingerprint(patcher) -> str:
    """sha256 (hex) over the model class, every diffusion-model tensor's name/shape/dtype and the first 4096
    values of four tensors spread over the network. Base weights: weight patches (LoRA) are not included — the
    unpatched values are read from the patcher's backup when the patches are currently applied."""
    model = patcher.model
    h = hashlib.sha256(type(model).__name__.encode())
    sd = model.state_dict()
    keys = [k for k in sd if k.startswith("diffusion_model.")] or list(sd)
    for k in keys:
        t = sd[k]
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
    backup = getattr(patcher, "backup", {})
    for k in [keys[i * (len(keys) - 1) // 3] for i in range(4)] if keys else []:
        t = backup[k].weight if k in backup else sd[k]
        values = t.detach().reshape(-1)[:4096].to("cpu", torch.float32)
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def _comfyui_version() -> str:
    try:
        import comfyui_version
    except ImportError:
        return "unknown"
    return str(getattr(comfyui_version, "__version__", "unknown"))


def check_calibration(*, n_prompts, negative, steps, cfg, sampler_name, scheduler) -> None:
    """Raise ValueError naming the node, the value and the fix."""
    if n_prompts < 1:
        raise ValueError(f"{NODE}: no prompts to calibrate on; give at least 2 (one per line)")
    if negative is None:
        raise ValueError(f"{NODE}: a negative conditioning is required (LinearAG predicts the unconditional branch, "
                         "so calibration must evaluate it); connect the negative prompt you sample with")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"{NODE}: steps ({steps}) must be an integer >= 2 (step 0 has no history to fit); use "
                         "the step count of the sampler you will use")
    if not math.isfinite(cfg) or math.isclose(cfg, 1.0):
        raise ValueError(f"{NODE}: cfg ({cfg}) must be a finite value other than 1: at cfg 1 the host evaluates "
                         "no unconditional branch, so there is nothing to calibrate; use your sampler's cfg")
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"{NODE}: unknown sampler_name {sampler_name!r}; choose one of KSampler's samplers")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"{NODE}: unknown scheduler {scheduler!r}; choose one of KSampler's schedulers")


@dataclass
class _Recording:
    """Per-run recorder state: the latest recorded step and its predictions."""

    step: int | None = None
    d_cond: torch.Tensor | None = None
    d_uncond: torch.Tensor | None = None


def _recorder(fit_box: dict):
    """PREDICT_NOISE wrapper feeding fit_box["fit"] (created from the first run's schedule length)."""

    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        rec = run_state(model_options, STATE_KEY)
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        step = step_index(model_options, timestep)
        if rec is None or sigmas is None or step is None or step >= len(sigmas) - 1 or not math.isclose(
                float(timestep.max()), float(sigmas[step]), rel_tol=1e-5, abs_tol=1e-8):
            return executor(x, timestep, model_options, seed)
        captured = {}

        def capture(args):
            out = args["conds_out"]
            if args["conds"][1] is not None and len(out) > 1:
                captured["cond"], captured["uncond"] = out[0].detach().clone(), out[1].detach().clone()
            return out

        opts = dict(model_options)
        opts["sampler_pre_cfg_function"] = [capture] + list(model_options.get("sampler_pre_cfg_function", []))
        result = executor(x, timestep, opts, seed)
        if "cond" not in captured:
            return result
        fit = fit_box.setdefault("fit", LinearAGFit(len(sigmas) - 1))
        if fit.n_steps != len(sigmas) - 1:
            raise ValueError(f"{NODE}: the runs sampled different step counts ({fit.n_steps} and "
                             f"{len(sigmas) - 1}); this is a bug, please report it")
        if rec.step == step - 1 and rec.d_cond.shape == x.shape:
            fit.add(step, captured["cond"], captured["uncond"], rec.d_cond, rec.d_uncond)
        rec.step, rec.d_cond, rec.d_uncond = step, captured["cond"], captured["uncond"]
        return result

    return predict_noise


def calibrate_linear_ag(model, positives: list, negative, *, steps: int, cfg: float, sampler_name: str,
                        scheduler: str, seed: int, latent, progress=None):
    """(coefficients [steps, 3], residuals [steps], metadata) fitted on full-CFG runs of every positive prompt.

    Each prompt is sampled once with the core KSampler path, noise from `seed + i` (mod 2⁶⁴) for the i-th prompt,
    on a latent of the shape of `latent` (a LATENT dict or a tensor; its batch gives several samples per prompt).
    `progress(done, total)` is called after every step (default: a comfy.utils.ProgressBar). Interruptible: the
    host checks at every network call, and this function between prompts and steps.
    """
    steps, cfg, seed = int(steps), float(cfg), int(seed)
    check_calibration(n_prompts=len(positives), negative=negative, steps=steps, cfg=cfg,
                      sampler_name=sampler_name, scheduler=scheduler)
    samples = latent["samples"] if isinstance(latent, dict) else latent
    check_latent(model, samples, node=NODE)
    m = model.clone()
    for key in (AG_WRAPPER_KEY, f"{NAMESPACE}.linear_ag"):     # methods that skip the uncond would poison the fit
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key)
    fit_box: dict = {}
    install_run_state(m, STATE_KEY, lambda guider: _Recording())
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, f"{NAMESPACE}.{STATE_KEY}",
                           _recorder(fit_box))
    total = steps * len(positives)
    if progress is None:
        bar = comfy.utils.ProgressBar(total)

        def progress(done, total_):
            bar.update_absolute(done, total_)
    latent_image = comfy.sample.fix_empty_latent_channels(m, samples)
    for i, positive in enumerate(positives):
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_seed = (seed + i) % 2**64
        noise = comfy.sample.prepare_noise(latent_image, prompt_seed)

        def callback(step, x0, x, total_steps, i=i):
            progress(i * steps + step + 1, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                            denoise=1.0, callback=callback, disable_pbar=True, seed=prompt_seed)
    fit = fit_box.get("fit")
    if fit is None or not any(fit.count(k) for k in range(1, fit.n_steps)):
        raise ValueError(f"{NODE}: no step was recorded (the sampler evaluated no unconditional branch on the "
                         "schedule); check that cfg is not 1 and that no other node removes the negative")
    coefficients, residuals = fit.solve()
    metadata = {"model_class": type(model.model).__name__, "model_fingerprint": model_fingerprint(model),
                "steps": fit.n_steps, "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg,
                "prompts": len(positives), "latent_shape": list(samples.shape), "seed": seed,
                "comfyui_version": _comfyui_version(), "created_by": NODE, "note": DESIGN_NOTE}
    return coefficients, residuals, metadata


# ---------------------------------------------------------------- files

def folders() -> list[Path]:
    """Where coefficient files are looked for: output/linear_ag (written by the calibrate node), input/linear_ag."""
    import folder_paths
    return [Path(folder_paths.get_output_directory()) / FOLDER, Path(folder_paths.get_input_directory()) / FOLDER]


def coefficient_files() -> list[str]:
    """Names of the .safetensors files in the folders (relative, sorted; the output folder wins a name clash)."""
    names: set[str] = set()
    for folder in folders():
        if folder.is_dir():
            names.update(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors") if p.is_file())
    return sorted(names)


def resolve(name: str) -> Path | None:
    """The file behind a name from `coefficient_files`, or None; names cannot leave the folders."""
    for folder in folders():
        path = (folder / name).resolve()
        if path.is_file() and path.is_relative_to(folder.resolve()):
            return path
    return None


def save_calibration(value: LinearAGCoefficients, filename_prefix: str) -> LinearAGCoefficients:
    """Save under output/linear_ag/<prefix>_<counter>_.safetensors; the value with `source` set."""
    import folder_paths
    root = str(Path(folder_paths.get_output_directory()) / FOLDER)
    Path(root).mkdir(parents=True, exist_ok=True)
    full_folder, name, counter, _sub, _ = folder_paths.get_save_image_path(filename_prefix, root)
    path = Path(full_folder) / f"{name}_{counter:05}_.safetensors"
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.metadata.items()}
    save_coefficients(path, value.coefficients, value.residuals, meta)
    return LinearAGCoefficients(value.coefficients, value.residuals, meta, str(path))


def load_calibration(name: str) -> LinearAGCoefficients:
    """Load a file listed by `coefficient_files`; ValueError naming the node, the file and the fix."""
    path = resolve(name)
    if path is None:
        raise ValueError(f"{LOAD_NODE}: coefficient file {name!r} not found in "
                         f"{', '.join(str(f) for f in folders())}; run GL_LinearAGCalibrate first or put the file "
                         "into one of these folders")
    try:
        coefficients, residuals, meta = load_coefficients(path)
    except ValueError as e:
        raise ValueError(f"{LOAD_NODE}: cannot use {name!r}: {e}. Recalibrate with GL_LinearAGCalibrate") from e
    return LinearAGCoefficients(coefficients, residuals, meta, str(path))

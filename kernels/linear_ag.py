"""LinearAG — Castillo et al., arXiv:2312.12487: skip the unconditional model call on some CFG steps and predict it.

Guidance Lab DESIGN, labelled as such: the paper's exact regressors are not confirmed. On a predicted step k the
unconditional denoised prediction is replaced by an affine predictor in x0 ("denoised") space,

    D̂_u,k = a_k·D_c,k + b_k·D_u,k−1 + c_k·D_c,k−1          (one scalar triple per step index k)

with the zero-calibration default (a, b, c) = (1, 1, −1), i.e. D̂_u,k = D_c,k − (D_c,k−1 − D_u,k−1): the previous
step's guidance vector is reused. Calibrated coefficients come from full-CFG trajectories on several prompts,
fitted per step by least squares over every element of every prompt (`LinearAGFit`, float64 normal equations).

Which steps are predicted (`predicted_steps`): in the first part of the run (k < first_fraction·n_steps) the odd
steps k ≥ 1; the even steps run the true unconditional call and refresh the history. Step 0 is never predicted
(there is no history). With calibration residuals, a step is predicted only where the relative residual
‖D_u − D̂_u‖/‖D_u‖ of the fit is below τ.

Coefficient files are safetensors (never pickle): tensors "coefficients" [N, 3] and "residuals" [N], float64,
string metadata with format = "guidance-lab-linear-ag/1".
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

DEFAULT_COEFFICIENTS = (1.0, 1.0, -1.0)
FORMAT = "guidance-lab-linear-ag/1"
DEFAULT_RIDGE = 1e-10          # relative to the mean diagonal of XᵀX; pulls ill-determined directions to the default
_PINV_RTOL = 1e-13             # eigenvalues below this fraction of the largest are treated as zero


def _coefficient_triple(coefficients) -> tuple[float, float, float]:
    """(a, b, c) as Python floats from a 3-sequence or a tensor of 3 elements, validated."""
    if isinstance(coefficients, torch.Tensor):
        if coefficients.numel() != 3:
            raise ValueError(f"coefficients must hold exactly 3 values (a, b, c), got a tensor of shape "
                             f"{tuple(coefficients.shape)}; pass one row of the [n_steps, 3] table")
        values = [float(v) for v in coefficients.detach().reshape(-1).tolist()]
    else:
        try:
            values = [float(v) for v in coefficients]
        except (TypeError, ValueError) as e:
            raise ValueError(f"coefficients must be a sequence of 3 numbers (a, b, c), got {coefficients!r}") from e
        if len(values) != 3:
            raise ValueError(f"coefficients must hold exactly 3 values (a, b, c), got {len(values)}: {values}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"coefficients must be finite, got {values}; use DEFAULT_COEFFICIENTS for an "
                         f"uncalibrated step")
    return values[0], values[1], values[2]


def _check_same_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"all predictions must have the same shape, got {listing}; pass the denoised tensors of "
                         f"the same batch at steps k and k−1")


def predict_uncond(coefficients, d_cond: torch.Tensor, d_uncond_prev: torch.Tensor,
                   d_cond_prev: torch.Tensor) -> torch.Tensor:
    """Predicted unconditional denoised D̂_u,k = a·D_c,k + b·D_u,k−1 + c·D_c,k−1, in the dtype of `d_cond`.

    `coefficients` is (a, b, c) as a 3-sequence or a tensor of 3 (e.g. one row of a calibration table);
    `DEFAULT_COEFFICIENTS` gives D_c,k − (D_c,k−1 − D_u,k−1). The tensors are [B, ...] of one shape; the sum is
    formed in float32 (float64 when any input is float64) on `d_cond`'s device. Inputs are not modified.
    """
    a, b, c = _coefficient_triple(coefficients)
    _check_same_shapes(d_cond=d_cond, d_uncond_prev=d_uncond_prev, d_cond_prev=d_cond_prev)
    wide = any(t.dtype == torch.float64 for t in (d_cond, d_uncond_prev, d_cond_prev))
    dtype = torch.float64 if wide else torch.float32
    dev = d_cond.device
    cur = d_cond.to(dtype)
    up = d_uncond_prev.to(device=dev, dtype=dtype)
    cp = d_cond_prev.to(device=dev, dtype=dtype)
    out = cur * a + up * b + cp * c
    return out.to(d_cond.dtype)


def _float64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` flattened in float64 on `device` (MPS has no float64: those tensors are moved to the CPU)."""
    return t.detach().to(device).reshape(-1).to(torch.float64)


class LinearAGFit:
    """Streaming least-squares fit of (a_k, b_k, c_k) for every step index k of an n-step sampling run.

    For each recorded step the regressors are the columns X = [D_c,k, D_u,k−1, D_c,k−1] and the target is
    y = D_u,k, every element of every sample and every prompt one row. Only the float64 sums XᵀX (3×3), Xᵀy (3)
    and yᵀy are kept, so trajectories of any batch size and any shape (4-D images, 5-D video) can be added one
    call at a time and nothing large is stored. Step 0 has no history and cannot be recorded.
    """

    def __init__(self, n_steps: int):
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1 (the sampler's step count), got {n_steps!r}")
        self.n_steps = n_steps
        self._xtx = torch.zeros(n_steps, 3, 3, dtype=torch.float64)
        self._xty = torch.zeros(n_steps, 3, dtype=torch.float64)
        self._yty = torch.zeros(n_steps, dtype=torch.float64)
        self._samples = [0] * n_steps

    def _check_step(self, step, *, recording: bool) -> int:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an integer step index, got {step!r}")
        low = 1 if recording else 0
        if not low <= step < self.n_steps:
            hint = " (step 0 has no previous step to predict from)" if recording and step == 0 else ""
            raise ValueError(f"step must lie in [{low}, {self.n_steps}) for this {self.n_steps}-step fit, "
                             f"got {step}{hint}")
        return step

    def add(self, step: int, d_cond: torch.Tensor, d_uncond: torch.Tensor, d_cond_prev: torch.Tensor,
            d_uncond_prev: torch.Tensor) -> None:
        """Accumulate one full-CFG observation of step `step` (1 ≤ step < n_steps).

        `d_cond`, `d_uncond` are D_c,k and D_u,k (the target); `d_cond_prev`, `d_uncond_prev` are D_c,k−1 and
        D_u,k−1 of the same samples. All four share one shape [B, ...]; any dtype, any device. The products are
        formed in float64; non-finite inputs are rejected before they can poison the sums.
        """
        step = self._check_step(step, recording=True)
        _check_same_shapes(d_cond=d_cond, d_uncond=d_uncond, d_cond_prev=d_cond_prev, d_uncond_prev=d_uncond_prev)
        if d_cond.numel() == 0:
            raise ValueError(f"the predictions of step {step} have no elements (shape {tuple(d_cond.shape)}); "
                             f"pass non-empty [B, ...] tensors")
        dev = d_cond.device if d_cond.device.type != "mps" else torch.device("cpu")
        # rows: D_c,k, D_u,k−1, D_c,k−1 (the regressors, in coefficient order) and D_u,k (the target)
        m = torch.stack([_float64(t, dev) for t in (d_cond, d_uncond_prev, d_cond_prev, d_uncond)])
        gram = (m @ m.T).cpu()                                           # [4, 4] float64
        if not torch.isfinite(gram).all():
            raise ValueError(f"the predictions recorded at step {step} contain NaN/inf (or overflow float64); "
                             f"record only finite denoised tensors")
        self._xtx[step] += gram[:3, :3]
        self._xty[step] += gram[:3, 3]
        self._yty[step] += gram[3, 3]
        self._samples[step] += int(d_cond.shape[0]) if d_cond.ndim else 1

    def count(self, step: int) -> int:
        """Number of samples (batch entries, summed over `add` calls) recorded at `step`; 0 for step 0."""
        return self._samples[self._check_step(step, recording=False)]

    def solve(self, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients [n_steps, 3], relative_residual [n_steps]), both float64 on the CPU.

        Each recorded step solves (XᵀX + λI)·δ = Xᵀy − XᵀX·β₀, β = β₀ + δ, with β₀ = DEFAULT_COEFFICIENTS and
        λ = ridge·trace(XᵀX)/3, through a symmetric pseudo-inverse: a singular system (e.g. D_u,k−1 = D_c,k−1)
        keeps the default along the directions the data cannot determine, and ridge = 0 gives the exact
        least-squares solution nearest to the default. The relative residual ‖y − Xβ‖/‖y‖ is computed from the
        accumulated sums, rss = yᵀy − 2βᵀXᵀy + βᵀXᵀXβ clamped at 0 (its floor is about 1e-8 from float64
        cancellation); it is 0 for an all-zero target fitted exactly and inf for one that is not. Steps without
        data (step 0 always) get DEFAULT_COEFFICIENTS and residual NaN.
        """
        ridge = float(ridge)
        if not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0 (relative to the mean diagonal of XᵀX), got "
                             f"{ridge}; use 0 for plain least squares")
        default = torch.tensor(DEFAULT_COEFFICIENTS, dtype=torch.float64)
        coefficients = default.repeat(self.n_steps, 1)
        residuals = torch.full((self.n_steps,), float("nan"), dtype=torch.float64)
        for k in range(1, self.n_steps):
            if self._samples[k] == 0:
                continue
            a, g, yty = self._xtx[k], self._xty[k], self._yty[k]
            lam = ridge * float(torch.trace(a)) / 3.0
            system = a + lam * torch.eye(3, dtype=torch.float64)
            if float(torch.trace(system)) > 0:
                delta = torch.linalg.pinv(system, hermitian=True, rtol=_PINV_RTOL) @ (g - a @ default)
                beta = default + delta
            else:
                beta = default.clone()                                   # all regressors are zero
            if not torch.isfinite(beta).all():
                beta = default.clone()
            rss = max(float(yty - 2.0 * beta @ g + beta @ a @ beta), 0.0)
            if float(yty) > 0:
                rel = math.sqrt(rss / float(yty))
            else:
                rel = 0.0 if rss == 0 else math.inf
            coefficients[k], residuals[k] = beta, rel
        return coefficients, residuals


def predicted_steps(n_steps: int, *, residuals=None, tau: float = 0.05, first_fraction: float = 0.5) -> list[bool]:
    """Which step indices skip the unconditional call: list of n_steps booleans.

    True on odd k with 1 ≤ k < first_fraction·n_steps (even steps run the true unconditional call and refresh
    the history). With `residuals` (length n_steps, e.g. from `LinearAGFit.solve`), only where residuals[k] is
    finite and < tau.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    first_fraction = float(first_fraction)
    if not 0.0 <= first_fraction <= 1.0:
        raise ValueError(f"first_fraction must lie in [0, 1] (the share of the run that may be predicted), got "
                         f"{first_fraction}")
    tau = float(tau)
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (the largest relative residual a predicted step may have), got {tau}")
    res = None
    if residuals is not None:
        try:
            res = [float(r) for r in (residuals.reshape(-1).tolist() if isinstance(residuals, torch.Tensor)
                                      else residuals)]
        except (TypeError, ValueError) as e:
            raise ValueError(f"residuals must be a sequence or tensor of numbers, got {residuals!r}") from e
        if len(res) != n_steps:
            raise ValueError(f"residuals must have one value per step ({n_steps}), got {len(res)}; pass the "
                             f"residuals of a calibration with the same step count")
    limit = first_fraction * n_steps
    out = []
    for k in range(n_steps):
        on = k >= 1 and k % 2 == 1 and k < limit
        if on and res is not None:
            on = math.isfinite(res[k]) and res[k] < tau
        out.append(on)
    return out


def _check_table(coefficients: torch.Tensor, residuals: torch.Tensor, where: str) -> None:
    """Shapes and values of a coefficient table; `where` prefixes the message (a path or the function name)."""
    if coefficients.ndim != 2 or coefficients.shape[1] != 3 or coefficients.shape[0] < 1:
        raise ValueError(f"{where}: coefficients must have shape [n_steps, 3] with n_steps >= 1, got "
                         f"{tuple(coefficients.shape)}")
    if residuals.shape != (coefficients.shape[0],):
        raise ValueError(f"{where}: residuals must have shape [{coefficients.shape[0]}] (one per step of the "
                         f"coefficients), got {tuple(residuals.shape)}")
    if not (coefficients.is_floating_point() and residuals.is_floating_point()):
        raise ValueError(f"{where}: coefficients and residuals must be floating point, got {coefficients.dtype} "
                         f"and {residuals.dtype}")
    if not torch.isfinite(coefficients).all():
        bad = sorted({int(i) for i in (~torch.isfinite(coefficients)).nonzero()[:, 0].tolist()})
        raise ValueError(f"{where}: coefficients must be finite, steps {bad[:10]} are not; recalibrate or use "
                         f"DEFAULT_COEFFICIENTS there")
    if (residuals < 0).any():
        raise ValueError(f"{where}: residuals must be >= 0 or NaN (no data), got negative values")


def save_coefficients(path, coefficients, residuals, metadata: Mapping | None = None) -> Path:
    """Write a coefficient table as safetensors: "coefficients" [N, 3] and "residuals" [N], float64.

    `metadata` keys must be strings; values that are not strings are stored JSON-encoded. The key "format" is
    set to FORMAT (a different value is refused). The file is written to a temporary file in the same folder and
    moved into place, so a reader never sees a half-written file. Returns the path.
    """
    import safetensors.torch
    coefficients = torch.as_tensor(coefficients).detach().cpu()
    residuals = torch.as_tensor(residuals).detach().cpu()
    _check_table(coefficients, residuals, "save_coefficients")
    meta = {}
    for key, value in dict(metadata or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings, got {key!r}")
        try:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata[{key!r}] is neither a string nor JSON-serialisable ({e}); pass a "
                             f"string") from e
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"metadata['format'] is reserved for {FORMAT!r}, got {meta['format']!r}; drop that key")
    meta["format"] = FORMAT
    tensors = {"coefficients": coefficients.to(torch.float64).contiguous(),
               "residuals": residuals.to(torch.float64).contiguous()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_coefficients(path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(coefficients [N, 3] float64, residuals [N] float64, metadata) of a file from `save_coefficients`.

    The metadata comes back as stored: every value a string (non-string values were JSON-encoded), "format"
    included. Raises ValueError naming the file when it is missing, not a readable safetensors file, not a
    LinearAG coefficient file, or holds tensors of the wrong shape or non-finite coefficients.
    """
    import safetensors
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LinearAG coefficient file not found: {path}; calibrate first (save_coefficients) or "
                         f"use DEFAULT_COEFFICIENTS")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("coefficients", "residuals") if k in keys}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a LinearAG coefficient file: its metadata has format="
                         f"{metadata.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ("coefficients", "residuals") if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the tensor(s) {missing}; it holds {sorted(keys)}")
    coefficients, residuals = tensors["coefficients"], tensors["residuals"]
    _check_table(coefficients, residuals, str(path))
    return coefficients.to(torch.float64), residuals.to(torch.float64), metadata


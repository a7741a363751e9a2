"""NFE accounting shared by the whole pack: real diffusion-model evaluations per sampling run.

`install_nfe_counter(patcher)` adds two wrappers to a (cloned) ModelPatcher, once per patcher lineage:

* OUTER_SAMPLE creates a fresh `NFERun` for every sampling run (per-run state, see run_state.py), and at the end
  logs one line and stores the run's figures as the counter's `last` report;
* APPLY_MODEL (around `BaseModel._apply_model`, i.e. one real network forward, whatever batching, model function
  wrapper or context windows sit above it) counts calls and batch rows.

NFEs per image = rows / images, so a CFG step on a batch of B images that evaluates cond and uncond in one call
counts 1 call, 2·B rows, 2 NFEs per image. `last_report(model)` gives the latest report of any model that shares
the counter (clones share wrappers); nodes show it to the user (GL_NFEReport). Pack nodes report extra figures
(e.g. Adaptive Guidance's switch step) into the running `NFERun.notes`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import comfy.patcher_extension

from .run_state import NAMESPACE, install_run_state, run_state

KEY = "nfe"
WRAPPER_KEY = f"{NAMESPACE}.{KEY}"
LOG = logging.getLogger("guidance_lab")


@dataclass
class NFERun:
    """Counts of one sampling run."""

    images: int = 0
    steps: int = 0
    calls: int = 0
    rows: int = 0
    seconds: float = 0.0
    notes: dict = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def add(self, rows: int) -> None:
        self.calls += 1
        self.rows += int(rows)

    @property
    def nfe_per_image(self) -> float:
        return self.rows / self.images if self.images else float("nan")

    def as_dict(self) -> dict:
        return {"images": self.images, "steps": self.steps, "calls": self.calls, "rows": self.rows,
                "nfe_per_image": self.nfe_per_image, "seconds": round(self.seconds, 4), **self.notes}

    def line(self) -> str:
        text = (f"{self.nfe_per_image:g} NFEs per image ({self.rows} batch rows in {self.calls} model calls, "
                f"{self.images} image(s), {self.steps} step(s), {self.seconds:.2f} s)")
        extra = ", ".join(f"{k} {v}" for k, v in self.notes.items() if not k.startswith("_"))
        return text + (f"; {extra}" if extra else "")


class NFECounter:
    """Holder shared by clones of a patcher: the last finished run's report (thread-safe replace)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last: NFERun | None = None
        self.runs = 0

    def finish(self, run: NFERun) -> None:
        with self._lock:
            self._last = run
            self.runs += 1

    @property
    def last(self) -> NFERun | None:
        with self._lock:
            return self._last


def _sigmas_steps(args, kwargs) -> int:
    sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
    return max(int(len(sigmas)) - 1, 0) if sigmas is not None else 0


def counter_of(patcher) -> NFECounter | None:
    """The NFECounter installed on `patcher` (or on a model it was cloned from), or None."""
    wrappers = getattr(patcher, "wrappers", {}).get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    for fn in wrappers.get(WRAPPER_KEY, []):
        counter = getattr(fn, "nfe_counter", None)
        if counter is not None:
            return counter
    return None


def install_nfe_counter(patcher) -> NFECounter:
    """Make `patcher` (already a clone owned by the caller) count its NFEs; idempotent per lineage."""
    existing = counter_of(patcher)
    if existing is not None:
        return existing
    counter = NFECounter()

    def factory(guider):
        return NFERun()

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        noise = kwargs.get("noise", args[0] if args else None)
        run = run_state(getattr(guider, "model_options", None), KEY)
        if run is not None:
            run.images = int(noise.shape[0]) if noise is not None and noise.ndim else 1
            run.steps = _sigmas_steps(args, kwargs)
            run._t0 = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            if run is not None:
                run.seconds = time.perf_counter() - run._t0
                counter.finish(run)
                LOG.info("Guidance Lab: %s", run.line())

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        run = run_state({"transformer_options": transformer_options}, KEY)
        if run is not None:
            run.add(x.shape[0])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    # the run-state wrapper is registered first (outermost), so the counting wrapper below already sees the state
    install_run_state(patcher, KEY, factory)
    outer_sample.nfe_counter = counter
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return counter


def current_run(model_options) -> NFERun | None:
    """The NFERun of the sampling run that `model_options` belong to (None outside a counted run)."""
    return run_state(model_options, KEY)


def last_report(patcher) -> NFERun | None:
    """The report of the latest finished sampling run of `patcher` or of any model sharing its counter."""
    counter = counter_of(patcher)
    return counter.last if counter is not None else None

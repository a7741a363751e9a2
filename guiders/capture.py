"""Run the host's normal CFG path while reading the raw conditional / unconditional predictions."""
from __future__ import annotations


def run_capturing_predictions(executor, x, timestep, model_options: dict, seed):
    """Call `executor(x, timestep, opts, seed)` (a PREDICT_NOISE chain) where `opts` is a shallow copy of
    `model_options` whose pre-CFG list starts with a hook that records the raw predictions before any other node
    edits them. Returns (result, captured): captured has "cond" and "uncond" when an unconditional branch was
    evaluated, else it is empty."""
    captured = {}

    def capture(args):
        out = args["conds_out"]
        if args["conds"][1] is not None and len(out) > 1:
            captured["cond"], captured["uncond"] = out[0], out[1]
        return out

    opts = dict(model_options)
    opts["sampler_pre_cfg_function"] = [capture] + list(model_options.get("sampler_pre_cfg_function", []))
    return executor(x, timestep, opts, seed), captured

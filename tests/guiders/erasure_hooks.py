"""GL_ConceptErase's hooks output against its weight-patch route, shared by the erasure host tests of every
family: which weights each model call sees, and the conditional/unconditional predictions of the first step."""
from __future__ import annotations

import torch

from hostutil import encode, original_weights, run


def _capture(patcher, keys, original):
    """A clone recording (cond_denoised, uncond_denoised) of every step through a post-CFG hook, and for every
    model call which rows it ran (0 = conditional, 1 = unconditional) and whether the edited weights were the
    original ones during the call."""
    import comfy.utils
    m, seen, calls = patcher.clone(), [], []

    def post(args):
        seen.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["denoised"]

    def wrapper(apply_model, args):
        same = all(torch.equal(comfy.utils.get_attr(m.model, k), original[k]) for k in keys)
        calls.append((tuple(args["cond_or_uncond"]), same))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_sampler_post_cfg_function(post)
    m.set_model_unet_function_wrapper(wrapper)
    return m, seen, calls


def hooks_case(er, patcher, clip, prompt, **kwargs):
    """The closed-form erasure through its hooks output against the weight-patch route. Returns runs (plain,
    hooked, zero-strength hooked, weight-patched), each as (images, [(D_c, D_u) per step], [(rows, original
    weights) per model call])."""
    erased, edit = er.concept_erase(patcher, clip, **kwargs)
    return edit_hooks_case(er, patcher, clip, prompt, erased, edit)


def edit_hooks_case(er, patcher, clip, prompt, erased, edit):
    """hooks_case for a given edit and the model its weight-patch route gave (the closed form's or the trained
    one's): the zero-strength reference hooks the same deltas at strength 0."""
    import comfy.hooks
    pos, neg = encode(clip, prompt), encode(clip, "")
    zero = er.ErasureEdit(edit.deltas, 0.0, edit.metadata)
    original = original_weights(patcher)
    out = []
    for model, positive in ((patcher, pos),
                            (patcher, comfy.hooks.set_hooks_for_conditioning(pos, er.erasure_hooks(edit, patcher))),
                            (patcher, comfy.hooks.set_hooks_for_conditioning(pos, er.erasure_hooks(zero, patcher))),
                            (erased, pos)):
        m, seen, calls = _capture(model, list(edit.deltas), original)
        out.append((run(m, positive, neg, 5.0, steps=3), seen, calls))
    return out


def check_hooks_case(plain, hooked, zero, patched, steps=3):
    # the hooked run makes two calls per step: the negative's on the original weights, the prompt's on edited ones
    assert hooked[2] == [((0,), False), ((1,), True)] * steps or hooked[2] == [((1,), True), ((0,), False)] * steps
    assert all(same for _rows, same in plain[2])
    # the same call layout with a zero-strength hook: the unconditional branch of the first step (same x) is equal
    # bit for bit; against the plain run, where cond and uncond share one batched call, only to float rounding
    assert torch.equal(hooked[1][0][1], zero[1][0][1])
    torch.testing.assert_close(hooked[1][0][1], plain[1][0][1], rtol=1e-5, atol=1e-5)
    # the weight-patched route (no protect_uncond here) moves the unconditional branch
    assert not torch.allclose(patched[1][0][1], plain[1][0][1], atol=1e-4)
    # the hooked prompt gets the edit: its conditional prediction is the weight-patched model's
    torch.testing.assert_close(hooked[1][0][0], patched[1][0][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked[1][0][0], plain[1][0][0], atol=1e-3)
    assert not torch.allclose(hooked[0], plain[0], atol=1e-3) and torch.isfinite(hooked[0]).all()


"""GL_DynamicCFG in the real host on tiny EPS and flow models: picks what the evaluators prefer, per sample, at
no extra model call, and composes with other pre-CFG nodes."""
import pytest
import torch

from hostutil import count_rows, run


@pytest.fixture(scope="module")
def dyn(host):
    return host.pack("guiders.dynamic_cfg")


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_picks_the_scale_a_toy_evaluator_prefers_at_no_extra_nfe(dyn, tiny, cond, arch):
    base, counter = count_rows(tiny(arch))
    pos, neg = cond(arch, 1), cond(arch, 2)
    trace = {}
    # an evaluator that prefers 7.5 for every image; no classifier, fidelity switched off
    m = dyn.patch_dynamic_cfg(base, multipliers="0.5, 1, 1.5", max_change=0.0, fidelity_weight=0.0,
                              evaluators=[lambda images, w: torch.full((images.shape[0],), -abs(w - 7.5))],
                              end_percent=1.0, trace=trace)
    out = run(m, pos, neg, 5.0, steps=4, batch=2)
    assert counter["rows"] == 4 * 2 * 2                              # 2 rows per image per step, as CFG
    assert [w for _step, w in trace["last"]["trace"]] == [[7.5, 7.5]] * 4
    torch.testing.assert_close(out, run(base, pos, neg, 7.5, steps=4, batch=2), rtol=1e-4, atol=1e-4)


def test_per_sample_choice_change_limit_and_window(dyn, tiny, cond):
    base = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    trace = {}

    def prefer(images, w):          # image 0 wants the largest scale, image 1 the smallest
        return torch.tensor([w, -w], dtype=torch.float32)
    m = dyn.patch_dynamic_cfg(base, multipliers="0.5, 0.75, 1, 1.25, 1.5", max_change=1.0, fidelity_weight=0.0,
                              evaluators=[prefer], end_percent=0.5, trace=trace)
    run(m, pos, neg, 4.0, steps=6, batch=2)
    chosen = [w for _s, w in trace["last"]["trace"]]
    assert chosen[0] == [6.0, 2.0]                                    # first step: no limit yet
    assert len(chosen) < 6                                            # later steps are outside the window
    # a limit of 1.0: from 6.0 the grid (2, 3, 4, 5, 6) allows 5..6 — image 0 stays at 6, image 1 at 2
    assert all(w == [6.0, 2.0] for w in chosen)


def test_cfg_1_still_gets_an_uncond_and_composes_with_apg(dyn, host, tiny, cond):
    apg = host.pack("guiders.apg")
    base, counter = count_rows(tiny("sd15_eps"))
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    m = dyn.patch_dynamic_cfg(apg.patch_apg(base), fidelity_weight=1.0)
    assert len(m.model_options["sampler_pre_cfg_function"]) == 2
    out = run(m, pos, neg, 1.0, steps=3, batch=2)
    assert torch.isfinite(out).all() and counter["rows"] == 3 * 2 * 2


def test_with_the_demo_classifier_and_bad_settings(dyn, host, tiny, cond):
    import json

    import safetensors.torch
    from kernels.classifiers import SmallCNN
    cl = host.pack("guiders.classifier")
    with torch.inference_mode():
        c = cl.load_classifier(cl.resolve_classifier("demo_classifier.safetensors"))
    assert type(c.module).__name__ == SmallCNN.__name__
    base = tiny("flux")
    trace = {}
    m = dyn.patch_dynamic_cfg(base, classifier=c, target="red circle, blue square", trace=trace)
    out = run(m, cond("flux", 1), cond("flux", 2), 4.0, steps=4, batch=2, size=32)
    assert torch.isfinite(out).all() and trace["last"]["trace"]
    with pytest.raises(ValueError, match="GL_DynamicCFG: multipliers"):
        dyn.patch_dynamic_cfg(base, multipliers="1")
    with pytest.raises(ValueError, match="not both 0"):
        dyn.patch_dynamic_cfg(base, alignment_weight=0.0, fidelity_weight=0.0)
    with pytest.raises(ValueError, match="not a class"):
        dyn.patch_dynamic_cfg(base, classifier=c, target="teal blob")
    del json, safetensors

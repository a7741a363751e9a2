"""GL_SamplerDiffIER's sampler (guiders/diffier.py) in the real host on tiny SD1.5 (EPS) and Flux models: the neutral
settings are the core sampler bit for bit, the model calls are 2·(1 + K) per corrected step, the gap drops, a foreign
post-CFG hook still runs, the run is reproducible, clear errors."""
from __future__ import annotations

import re

import pytest
import torch

from hostutil import count_rows, run


@pytest.fixture(scope="module")
def gd(host):
    return host.pack("guiders.diffier")


ARCHS = ["sd15_eps", "flux"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("base", ["euler", "euler_ancestral"])
def test_neutral_settings_are_the_core_sampler(gd, tiny, cond, arch, base):
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    want = run(m, pos, neg, 4.0, sampler=base, steps=4, batch=2)
    for kw in ({"iterations": 0}, {"eta": 0.0}, {"start_percent": 0.999, "end_percent": 0.999}):
        got = run(m, pos, neg, 4.0, sampler=gd.make_sampler(base, **kw), steps=4, batch=2)
        assert torch.equal(got, want), kw
    # cfg 1: D̂ = D_c, no gap, nothing to correct — and no extra call
    counted, counter = count_rows(m)
    at1 = run(counted, pos, neg, 1.0, sampler=gd.make_sampler(base, iterations=2, end_percent=1.0), steps=4, batch=2)
    assert torch.equal(at1, run(m, pos, neg, 1.0, sampler=base, steps=4, batch=2)) and counter["rows"] == 4 * 2


@pytest.mark.parametrize("arch,window", [("sd15_eps", (0.0, 0.5)), ("flux", (0.0, 0.5)), ("sd15_eps", None),
                                         ("flux", None)])
def test_model_calls_are_two_times_one_plus_k_in_the_window(gd, tiny, cond, arch, window, nfe, caplog):
    """An explicit window (the noisy half) and the default one (None: the less noisy half, 0.5–1)."""
    m = tiny(arch).clone()
    nfe.install_nfe_counter(m)
    counted, counter = count_rows(m)
    pos, neg = cond(arch, 1), cond(arch, 2)
    steps, k, batch = 4, 2, 2
    opts = {} if window is None else {"start_percent": window[0], "end_percent": window[1]}
    out = run(counted, pos, neg, 5.0, sampler=gd.make_sampler("euler", iterations=k, tol=0.0, **opts),
              steps=steps, batch=batch)
    ms = m.get_model_object("model_sampling")
    import comfy.samplers
    sig = comfy.samplers.calculate_sigmas(ms, "simple", steps)[:-1]
    start, end = window or (0.5, 1.0)
    in_window = int(((sig <= ms.percent_to_sigma(start)) & (sig >= ms.percent_to_sigma(end))).sum())
    assert 0 < in_window < steps
    assert counter["rows"] == 2 * batch * (steps + k * in_window)
    line = nfe.last_report(m).notes["DiffIER"]
    base = run(m, pos, neg, 5.0, sampler="euler", steps=steps, batch=batch)
    assert not torch.allclose(out, base) and torch.isfinite(out).all()
    found = re.search(r"(\d+) extra guided evaluations on (\d+) step\(s\) .* mean \|gap\| (\S+) before, (\S+) after",
                      line)
    assert found and int(found[1]) == k * in_window and int(found[2]) == in_window
    assert float(found[4]) < float(found[3])


def test_ancestral_flow_run_is_reproducible_and_foreign_post_cfg_runs(gd, tiny, cond):
    m = tiny("flux").clone()
    seen = []

    def foreign(args):
        seen.append(1)
        return args["denoised"]
    m.set_model_sampler_post_cfg_function(foreign)
    pos, neg = cond("flux", 1), cond("flux", 2)
    sampler = gd.make_sampler("euler_ancestral", iterations=1, end_percent=1.0)
    a = run(m, pos, neg, 5.0, sampler=sampler, steps=3, batch=2, seed=5)
    n = len(seen)
    b = run(m, pos, neg, 5.0, sampler=sampler, steps=3, batch=2, seed=5)
    assert torch.equal(a, b) and n >= 3 + 1 and len(seen) == 2 * n
    assert not torch.equal(a, run(m, pos, neg, 5.0, sampler="euler_ancestral", steps=3, batch=2, seed=5))


def test_bad_settings_get_clear_errors(gd):
    with pytest.raises(ValueError, match=r"GL_SamplerDiffIER: sampler_name 'dpmpp_2m' is not offered"):
        gd.make_sampler("dpmpp_2m")
    with pytest.raises(ValueError, match=r"GL_SamplerDiffIER: the window start_percent 0.8 … end_percent 0.2"):
        gd.make_sampler("euler", start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match=r"step_size \(1.5\) in \[0, 1\]"):
        gd.make_sampler("euler", eta=1.5)

"""Model-family detection: explicit EPS / V / flow handling and a clear error for anything else."""
import pytest


@pytest.fixture(scope="module")
def family(host):
    return host.pack("guiders.family")


def test_families_of_tiny_models(family, tiny):
    kinds = {a: family.coords_for(tiny(a).get_model_object("model_sampling"), node="X").kind
             for a in ("sd15_eps", "sd15_v", "sd3", "flux")}
    assert kinds == {"sd15_eps": "ve", "sd15_v": "ve", "sd3": "flow", "flux": "flow"}
    assert family.family_name(tiny("sd15_v").get_model_object("model_sampling")) == "v_prediction"


def test_unsupported_parameterisation_is_a_clear_error(family):
    import comfy.model_sampling as ms

    class CosmosLike(ms.ModelSamplingDiscrete, ms.COSMOS_RFLOW):
        pass
    with pytest.raises(family.UnsupportedModelError, match=r"GL_SamplerCFGPP.*COSMOS|CosmosLike.*not supported"):
        family.coords_for(CosmosLike(), node="GL_SamplerCFGPP")


def test_window_bound_step_is_inside(family, tiny):
    """A schedule step whose σ is a window bound counts as inside (float32 schedules against float64 bounds)."""
    import comfy.samplers
    ms = tiny("flux").get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "simple", 4)
    bound = float(sig[2])                              # the σ at 50 % of the schedule, a float32 value
    assert bound > float(ms.percent_to_sigma(0.5))     # the float64 bound is just below it: the case that was left out
    assert family.in_window(ms, sig[2], 0.5, 1.0) and family.in_window(ms, sig[2], 0.0, 0.5)
    assert not family.in_window(ms, sig[1], 0.5, 1.0) and not family.in_window(ms, sig[3], 0.0, 0.5)
    lo, hi = family.window_bounds(ms, 0.5, 1.0)
    assert lo == 0.0 and hi == bound

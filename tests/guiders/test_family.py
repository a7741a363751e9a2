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

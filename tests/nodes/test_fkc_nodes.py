"""GL_SamplerFKC and GL_FKCGuider: the nodes build the right objects and refuse bad input with a clear message."""
import pytest


@pytest.fixture(scope="module")
def nodes(host):
    found = {c.define_schema().node_id: c for c in host.pack("nodes").NODES}
    return found["GL_SamplerFKC"], found["GL_FKCGuider"]


def test_sampler_node_builds_a_host_sampler(host, nodes):
    import comfy.samplers
    sampler_node, _ = nodes
    out = sampler_node.execute(8, "ddpm", "every_step", 0.5, 1.0, 2.0, 0.0, 1.0, "best").result[0]
    assert isinstance(out, comfy.samplers.Sampler) and out.k == 8


def test_sampler_node_validation_messages(nodes):
    sampler_node, _ = nodes
    assert sampler_node.validate_inputs(particles=4, propagation="ddpm", start_percent=0.0, end_percent=1.0) is True
    msg = sampler_node.validate_inputs(particles=4, propagation="euler", start_percent=0.0, end_percent=1.0)
    assert "GL_SamplerFKC" in msg and "euler" in msg and "ddpm" in msg
    assert sampler_node.validate_inputs(particles=1, propagation="euler", start_percent=0.0, end_percent=1.0) is True
    assert "start_percent" in sampler_node.validate_inputs(particles=2, propagation="ddpm", start_percent=0.9,
                                                           end_percent=0.1)
    assert sampler_node.validate_inputs(particles=None, propagation=None, start_percent=None,
                                        end_percent=None) is True   # linked inputs are not known yet


def test_guider_node_builds_and_checks_its_experts(host, nodes):
    _, guider_node = nodes
    tiny = host.pack("guiders.tiny_models")
    m, c1, c2 = tiny.build_model("sd15_eps"), tiny.build_conditioning("sd15_eps", 1), tiny.build_conditioning(
        "sd15_eps", 2)
    g = guider_node.execute(m, "composition", c1, 1.0, positive_2=c2, negative=c2).result[0]
    assert g.betas == (1.0, 1.0, -1.0) and set(g.original_conds) == {"positive", "positive_2", "negative"}
    with pytest.raises(ValueError, match="GL_FKCGuider.*'product' needs a second prompt"):
        guider_node.execute(m, "product", c1, 1.0)
    assert "beta > 0" in guider_node.validate_inputs(mode="annealing", beta=0.0)
    assert guider_node.validate_inputs(mode="product", beta=0.0) is True

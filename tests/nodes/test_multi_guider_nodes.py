"""GL_MultiModelGuider and GL_MultiConditionGuider: the nodes build the right guiders and refuse bad input."""
import pytest
import torch


@pytest.fixture(scope="module")
def nodes(host):
    found = {c.define_schema().node_id: c for c in host.pack("nodes").NODES}
    return found["GL_MultiModelGuider"], found["GL_MultiConditionGuider"]


@pytest.fixture(scope="module")
def tiny(host):
    return host.pack("guiders.tiny_models")


def test_multi_model_node_builds_each_mode(nodes, tiny):
    node, _ = nodes
    m, weak = tiny.build_model("sd15_eps", 0), tiny.build_model("sd15_eps", 1)
    c1, c2 = tiny.build_conditioning("sd15_eps", 1), tiny.build_conditioning("sd15_eps", 2)
    g = node.execute(m, c1, "autoguidance", 2.5, 1.0, 0.0, 1.0, 0.0, model_2=weak).result[0]
    assert g.cfg == pytest.approx(2.5) and g.second is weak and set(g.original_conds) == {"positive"}
    g = node.execute(m, c1, "sine", 7.5, 0.3, 0.0, 0.6, 0.0, model_2=weak, negative=c2, positive_2=c2).result[0]
    assert set(g.original_conds) == {"positive", "negative", "positive_2"}
    assert [round(t.coefficient, 6) for t in g.recipe.terms] == [-6.5, 2.25]
    with pytest.raises(ValueError, match="GL_MultiModelGuider: mode 'npo' needs a negative"):
        node.execute(m, c1, "npo", 5.0, 1.0, 0.0, 1.0, 0.0, model_2=weak)


def test_multi_model_node_validation_messages(nodes):
    node, _ = nodes
    assert node.validate_inputs(mode="sine", scale_2=0.3, start_percent=0.0, end_percent=0.6) is True
    assert "in [0, 1]" in node.validate_inputs(mode="sine", scale_2=2.0, start_percent=0.0, end_percent=0.6)
    assert node.validate_inputs(mode="hybrid", scale_2=2.0, start_percent=0.0, end_percent=1.0) is True
    assert "smaller than end_percent" in node.validate_inputs(mode="npo", scale_2=1.0, start_percent=0.7,
                                                              end_percent=0.2)
    assert node.validate_inputs(mode=None, scale_2=None, start_percent=None, end_percent=None) is True


def test_multi_condition_node_builds_and_checks(nodes, tiny):
    _, node = nodes
    m = tiny.build_model("flux", 0)
    c = [tiny.build_conditioning("flux", i) for i in range(5)]
    g = node.execute(m, c[0], c[1], c[2], "nested (combine inputs)", 7.5, 3.0, 1, condition_3=c[3],
                     scale_3=2.0, start_2=0.0, end_2=0.5).result[0]
    assert g.scales == [7.5, 3.0, 2.0] and g.windows[1] == (0.0, 0.5) and g.windows[2] == (0.0, 1.0)
    top = g.original_conds["positive"]                              # c_≤3 = conditions 1 + 2 + 3, combined
    assert len(top) == 3 and torch.equal(top[2]["cross_attn"], c[3][0][0])
    g = node.execute(m, c[0], c[1], c[2], "composable", 4.0, 2.0, 1).result[0]
    assert g.form == "composable" and torch.equal(g.original_conds["positive"][0]["cross_attn"], c[1][0][0])
    with pytest.raises(ValueError, match="condition_4 is connected but condition_3 is not"):
        node.execute(m, c[0], c[1], c[2], "nested", 4.0, 2.0, 1, condition_4=c[3])
    with pytest.raises(ValueError, match="needs form 'nested'"):
        node.execute(m, c[0], c[1], c[2], "composable", 4.0, 2.0, 2)
    assert "refresh_every > 1 needs a nested form" in node.validate_inputs(form="composable", refresh_every=2)
    assert "start_2 (0.8) must be smaller than end_2" in node.validate_inputs(start_2=0.8, end_2=0.3)
    assert node.validate_inputs(form="nested", refresh_every=2) is True

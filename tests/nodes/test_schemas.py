"""Every node schema builds on the pinned host and follows the pack's conventions."""
import ast
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[2]
EXPECTED = {"GL_APG", "GL_SamplerCFGPP", "GL_TinyTestModel", "GL_AdaptiveGuidance", "GL_NFECounter", "GL_NFEReport",
            "GL_SamplerFKC", "GL_FKCGuider"}


@pytest.fixture(scope="module")
def pack_nodes(host):
    return host.pack("nodes").NODES


def test_pack_loaded_through_comfy_loader_without_errors(host):
    import nodes
    assert host.import_errors() == []
    registered = {k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("GL_")}
    assert EXPECTED <= registered


def test_ids_unique_prefixed_and_literal(pack_nodes):
    ids = [cls.define_schema().node_id for cls in pack_nodes]
    assert len(ids) == len(set(ids))
    literal = set()
    for path in (PACK / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                literal.add(node.value.value)
    assert set(ids) == literal and all(i.startswith("GL_") for i in ids)


def test_schema_conventions(pack_nodes):
    for cls in pack_nodes:
        schema = cls.define_schema()
        assert schema.category.startswith("Guidance Lab/"), schema.node_id
        assert schema.display_name and len(schema.description) > 40, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 10, f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output without tooltip"


def test_v1_view_of_schemas_for_object_info(pack_nodes):
    for cls in pack_nodes:
        info = cls.INPUT_TYPES()
        assert "required" in info
        assert cls.RETURN_TYPES


def test_apg_node_returns_new_patcher_and_validates(host, pack_nodes):
    apg = next(c for c in pack_nodes if c.define_schema().node_id == "GL_APG")
    tiny = host.pack("guiders.tiny_models").build_model("sd15_eps")
    out = apg.execute(tiny, 0.0, 15.0, -0.5, 0.0, 1.0, False)
    assert out.result[0] is not tiny
    assert isinstance(apg.validate_inputs(start_percent=0.5, end_percent=0.5), str)
    assert apg.validate_inputs(start_percent=0.0, end_percent=1.0) is True
    with pytest.raises(ValueError, match="GL_APG"):
        apg.execute(tiny, 0.0, 15.0, -0.5, 0.8, 0.2, False)


def test_cfgpp_node_returns_sampler(pack_nodes):
    import comfy.samplers
    node = next(c for c in pack_nodes if c.define_schema().node_id == "GL_SamplerCFGPP")
    for name in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"):
        assert isinstance(node.execute(name, 1.0, 1.0).result[0], comfy.samplers.KSAMPLER)


def _node(pack_nodes, node_id):
    return next(c for c in pack_nodes if c.define_schema().node_id == node_id)


def test_adaptive_guidance_node_validates_and_patches(host, pack_nodes):
    ag = _node(pack_nodes, "GL_AdaptiveGuidance")
    tiny = host.pack("guiders.tiny_models").build_model("sd15_eps")
    out = ag.execute(tiny, 0.99, 0.0, 1.0, "all")
    assert out.result[0] is not tiny
    assert isinstance(ag.validate_inputs(start_percent=0.7, end_percent=0.2), str)
    assert "end_percent (1.5) must lie in [0, 1]" in ag.validate_inputs(start_percent=0.0, end_percent=1.5)
    assert ag.validate_inputs(start_percent=None, end_percent=0.5) is True        # linked input: not known yet
    assert ag.validate_inputs(start_percent=0.0, end_percent=1.0) is True
    with pytest.raises(ValueError, match="GL_AdaptiveGuidance.*end_percent"):
        ag.execute(tiny, 0.99, 0.7, 0.2, "all")


def test_nfe_report_errors_and_text(host, pack_nodes):
    import torch
    from hostutil import run
    counter, report = _node(pack_nodes, "GL_NFECounter"), _node(pack_nodes, "GL_NFEReport")
    builder = host.pack("guiders.tiny_models")
    tiny = builder.build_model("sd15_eps")
    latent = {"samples": torch.zeros(1, 3, 8, 8)}
    with pytest.raises(ValueError, match="GL_NFEReport.*GL_NFECounter"):
        report.execute(tiny, latent)
    counted = counter.execute(tiny).result[0]
    with pytest.raises(ValueError, match="GL_NFEReport.*not been sampled"):
        report.execute(counted, latent)
    run(counted, builder.build_conditioning("sd15_eps", 1), builder.build_conditioning("sd15_eps", 2), 5.0, steps=3)
    out = report.execute(counted, latent)
    assert out.result[0].startswith("6 NFEs per image (12 batch rows in 3 model calls, 2 image(s), 3 step(s)")
    assert out.ui.as_dict() == {"text": (out.result[0],)}

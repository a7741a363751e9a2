"""Every node schema builds on the pinned host and follows the pack's conventions."""
import ast
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[2]
EXPECTED = {"GL_APG", "GL_SamplerCFGPP", "GL_TinyTestModel"}


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

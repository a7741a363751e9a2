"""GL_ClassifierLoader and GL_ClassifierGuidance: the shipped demo classifier, the nodes' objects and messages."""
import pytest
import torch


@pytest.fixture(scope="module")
def nodes(host):
    found = {c.define_schema().node_id: c for c in host.pack("nodes").NODES}
    return (found["GL_ClassifierLoader"], found["GL_ClassifierGuidance"], found["GL_GradientFreeGuidance"],
            found["GL_DynamicCFG"])


@pytest.fixture(scope="module")
def demo_classifier(nodes):
    loader = nodes[0]
    with torch.inference_mode():
        return loader.execute("demo_classifier.safetensors").result[0]


def test_loader_offers_and_loads_the_shipped_demo_classifier(nodes, demo_classifier):
    loader = nodes[0]
    options = loader.define_schema().inputs[0].options
    assert "demo_classifier.safetensors" in options
    assert demo_classifier.num_classes == 36 and demo_classifier.labels[0] == "red circle"
    assert demo_classifier.input_size == (32, 32) and demo_classifier.architecture == "gl_small_cnn"
    msg = loader.validate_inputs(classifier="missing.safetensors")
    assert "GL_ClassifierLoader" in msg and "models/classifiers" in msg


def test_demo_classifier_reads_fresh_world_images(demo_classifier):
    """Evaluated on scenes of a world seed used neither for its training (7000) nor its check (7001)."""
    from demo import world
    images, _captions, labels = world.batch(0, 256, seed=4242, size=32, kind="single", split="all")
    with torch.no_grad():
        pred = demo_classifier.module(demo_classifier.prepare(images, node="t")).argmax(1)
    truth = torch.tensor([lab["color_idx"] * len(world.SHAPES) + lab["shape_idx"] for lab in labels])
    assert (pred == truth).float().mean() >= 0.98


def test_demo_classifier_is_not_the_evaluator(demo_classifier):
    from bench.evaluator import Evaluator
    assert not isinstance(demo_classifier.module, Evaluator)


def test_guidance_node_patches_and_validates(host, nodes, demo_classifier):
    guidance = nodes[1]
    tiny = host.pack("guiders.tiny_models")
    m = tiny.build_model("sd15_eps")
    out = guidance.execute(m, demo_classifier, "red circle, 5", 1.0, 1.0, 0.5, 3.0, 0.3, "sine", "auto", 0.0,
                           1.0).result[0]
    assert out is not m and len(out.model_options["sampler_post_cfg_function"]) == 1
    assert "target is empty" in guidance.validate_inputs(target="  ", start_percent=0.0, end_percent=1.0)
    assert "start_percent" in guidance.validate_inputs(target="x", start_percent=0.8, end_percent=0.2)
    assert guidance.validate_inputs(target=None, start_percent=None, end_percent=None) is True
    with pytest.raises(ValueError, match="GL_ClassifierGuidance: target 'teal hexagon' is not a class"):
        guidance.execute(m, demo_classifier, "teal hexagon", 1.0, 1.0, 0.5, 3.0, 0.3, "sine", "auto", 0.0, 1.0)


def test_gfcg_node_encodes_one_prompt_per_candidate_class(host, nodes, demo_classifier):
    gfcg_node = nodes[2]
    dm = host.pack("guiders.demo_model")
    with torch.inference_mode():
        model, clip, _vae = dm.load_demo_model(dm.find_checkpoint("demo_model"))
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        g = gfcg_node.execute(model, pos, neg, clip, demo_classifier, "red circle", "blue circle, red square",
                              "a {label}", 5.0, 2.0, 0.0, 1.0, "auto").result[0]
        expected = clip.encode_from_tokens_scheduled(clip.tokenize("a red square"))
    assert sorted(g.class_conds) == [1, 12] and g.cfg == 5.0
    assert torch.equal(g.class_conds[1][0][0], expected[0][0])
    assert "{label}" in gfcg_node.validate_inputs(target="x", prompt_template="a photo", start_percent=0.0,
                                                  end_percent=1.0)
    with pytest.raises(ValueError, match="'blue blob' is not a class"):
        gfcg_node.execute(model, pos, neg, clip, demo_classifier, "red circle", "blue blob", "a {label}", 5.0, 2.0,
                          0.0, 1.0, "auto")


def test_dynamic_cfg_node_patches_and_validates(host, nodes, demo_classifier):
    node = nodes[3]
    m = host.pack("guiders.tiny_models").build_model("sd15_eps")
    out = node.execute(m, "0.5, 1, 1.5", 1.0, 1.0, 1.0, 0.0, 0.7, "auto").result[0]
    assert out.model_options["disable_cfg1_optimization"] is True and "disable_cfg1_optimization" not in m.model_options
    out = node.execute(m, "0.5, 1, 1.5", 1.0, 1.0, 1.0, 0.0, 0.7, "auto", demo_classifier, "red circle").result[0]
    assert len(out.model_options["sampler_pre_cfg_function"]) == 1
    assert "multipliers" in node.validate_inputs(multipliers="2", start_percent=0.0, end_percent=0.7)
    assert "start_percent" in node.validate_inputs(multipliers="1,2", start_percent=0.8, end_percent=0.7)
    with pytest.raises(ValueError, match="target is empty"):
        node.execute(m, "0.5, 1, 1.5", 1.0, 1.0, 1.0, 0.0, 0.7, "auto", demo_classifier, "")

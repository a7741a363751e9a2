"""GL_CLIPZeroShotClassifier's classifier in the real host: the host's CLIP vision model (tiny config) and the host's
own CLIP text towers (tiny SDXL / Flux text encoders), used by EluCD, GFCG and Dynamic CFG on tiny models."""
import copy

import pytest
import torch

from hostutil import run

LABELS = "red circle, blue square, green star, yellow cross"


@pytest.fixture(scope="module")
def zs(host):
    return host.pack("guiders.clip_classifier")


@pytest.fixture(scope="module")
def tm(host):
    return host.pack("guiders.tiny_models")


@pytest.fixture(scope="module")
def vision(tm):
    with torch.inference_mode():                 # as CLIPVisionLoader runs inside the executor
        return tm.build_clip_vision(32, seed=5)


@pytest.fixture(scope="module")
def sdxl_clip(text_model):
    return text_model("sdxl")[1]


@pytest.fixture(scope="module")
def zero_shot(zs, vision, sdxl_clip):
    with torch.inference_mode():
        return zs.build_zero_shot_classifier(vision, sdxl_clip, LABELS, text_encoder="clip_g")


def test_logits_are_the_hosts_clip_embeddings_cosine(zs, vision, sdxl_clip, zero_shot):
    """Against the host's own paths: CLIPVisionEncode's image_embeds and SDXL CLIP's projected pooled output."""
    assert zero_shot.labels == [s.strip() for s in LABELS.split(",")] and zero_shot.input_size == (32, 32)
    assert zero_shot.kind == "clip_zero_shot" and zero_shot.crop
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), generator=gen).float() / 255   # exact under the host's rounding
    with torch.inference_mode():
        image_embeds = vision.encode_image(pixels)["image_embeds"].float()
        texts = []
        for label in zero_shot.labels:
            _cond, pooled = sdxl_clip.encode_from_tokens(sdxl_clip.tokenize(f"a photo of a {label}"),
                                                         return_pooled=True)      # SDXL: clip_g, projected
            texts.append(pooled[0].float())
    expected = 100.0 * torch.nn.functional.normalize(image_embeds, dim=-1) @ torch.nn.functional.normalize(
        torch.stack(texts), dim=-1).t()
    with torch.no_grad():
        logits = zero_shot.logits(pixels.movedim(-1, 1), node="t")
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert logits.std() > 1e-2                                        # the labels are told apart


def test_gradient_through_the_private_vision_copy(vision, zero_shot):
    assert zero_shot.smoothed(3.0) is zero_shot.module               # no ReLUs: no copy
    assert not any(p.is_inference() for p in zero_shot.module.parameters())
    assert all(p.is_inference() for p in vision.model.parameters())  # the host's model is untouched
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 40, generator=gen)                       # other size and aspect: resized + centre crop
    v = torch.randn(x.shape, generator=gen)
    xx = x.clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        zero_shot.logits(xx, node="t")[:, 2].sum().backward()
    twin = copy.deepcopy(zero_shot.module).double()                  # float64 central differences
    eps = 1e-6
    with torch.no_grad():
        def f(z):
            return twin(zero_shot.prepare(z.double(), node="t"))[:, 2].sum()
        fd = (f(x.double() + eps * v.double()) - f(x.double() - eps * v.double())) / (2 * eps)
    analytic = float((xx.grad.double() * v.double()).sum())
    assert abs(analytic) > 1e-4 and abs(analytic - float(fd)) <= 1e-3 * abs(float(fd)) + 1e-6


def test_choice_of_text_tower_and_errors(zs, tm, vision, sdxl_clip, text_model):
    assert zs.pick_text_encoder(sdxl_clip, "auto", 32) == "clip_g"
    assert zs.pick_text_encoder(sdxl_clip, "clip_l", 32) == "clip_l"
    flux_clip = text_model("flux")[1]
    with torch.inference_mode():
        c = zs.build_zero_shot_classifier(vision, flux_clip, "cat")              # one label: a CLIP score
    assert c.architecture == "clip_zero_shot/clip_l" and c.num_classes == 1
    with torch.inference_mode():
        wide = tm.build_clip_vision(48, seed=1)
    with pytest.raises(zs.ClassifierError, match=r"no text tower of the CLIP has the image embedding's width 48"):
        zs.build_zero_shot_classifier(wide, sdxl_clip, LABELS)
    with pytest.raises(zs.ClassifierError, match=r"'clip_h' is not in the connected CLIP"):
        zs.build_zero_shot_classifier(vision, sdxl_clip, LABELS, text_encoder="clip_h")
    with pytest.raises(zs.ClassifierError, match="labels is empty"):
        zs.build_zero_shot_classifier(vision, sdxl_clip, " , ")
    with pytest.raises(zs.ClassifierError, match="repeat a class"):
        zs.build_zero_shot_classifier(vision, sdxl_clip, "cat, Cat")
    with pytest.raises(zs.ClassifierError, match=r"has no \{label\}"):
        zs.build_zero_shot_classifier(vision, sdxl_clip, LABELS, prompt_template="a photo")
    with torch.inference_mode():
        no_projection = tm.build_clip_vision(None)                             # as the host's SigLIP encoders
    with pytest.raises(zs.ClassifierError, match="no CLIP image projection"):
        zs.build_zero_shot_classifier(no_projection, sdxl_clip, LABELS)
    empty = copy.deepcopy(sdxl_clip)                                           # a tower stored without projection
    with torch.no_grad():
        empty.cond_stage_model.clip_g.transformer.text_projection.weight.zero_()
    with pytest.raises(zs.ClassifierError, match="text projection of this CLIP holds no weights"):
        zs.build_zero_shot_classifier(vision, empty, LABELS)


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_elucd_gfcg_and_dynamic_cfg_with_the_zero_shot_classifier(host, zero_shot, tiny, cond, arch):
    cg = host.pack("guiders.classifier_guidance")
    gfcg = host.pack("guiders.gfcg")
    dyn = host.pack("guiders.dynamic_cfg")
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    plain = run(m, pos, neg, 4.0, batch=2, steps=3)
    guided = run(cg.patch_classifier_guidance(m, zero_shot, "blue square, green star", scale=5.0), pos, neg, 4.0,
                 batch=2, steps=3)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    # EluCD raises the target's CLIP similarity of the final images against plain CFG (per image)
    with torch.no_grad():
        sim_plain = zero_shot.logits((plain + 1) / 2, node="t")[[0, 1], [1, 2]]
        sim_guided = zero_shot.logits((guided + 1) / 2, node="t")[[0, 1], [1, 2]]
    assert (sim_guided > sim_plain).all(), (sim_plain, sim_guided)
    g = gfcg.GFCGGuider(m, zero_shot, "blue square, green star", {i: cond(arch, 20 + i) for i in range(4)}, s_max=2.0)
    g.set_conds(pos, neg)
    g.set_cfg(4.0)
    assert torch.isfinite(run(m, None, None, 4.0, batch=2, steps=3, guider=g)).all() and len(g.trace) == 2
    trace = {}
    patched = dyn.patch_dynamic_cfg(m, classifier=zero_shot, target="blue square", fidelity_weight=0.0,
                                    end_percent=1.0, trace=trace)
    run(patched, pos, neg, 4.0, batch=2, steps=3)
    assert len(trace["last"]["trace"]) == 3

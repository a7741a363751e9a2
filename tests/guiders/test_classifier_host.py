"""GL_ClassifierLoader / GL_ClassifierGuidance (EluCD) in the real host on tiny EPS and flow models."""
import json

import pytest
import safetensors.torch
import torch

from hostutil import run

LABELS = ["red circle", "blue square", "green star", "yellow cross"]


@pytest.fixture(scope="module")
def cl(host):
    return host.pack("guiders.classifier")


@pytest.fixture(scope="module")
def cg(host):
    return host.pack("guiders.classifier_guidance")


@pytest.fixture(scope="module")
def kernels(host):
    return host.pack("kernels.classifier_guidance")


def _save_small_cnn(path, *, size=(16, 16), labels=LABELS, seed=0, extra=None):
    from kernels.classifiers import SmallCNN
    torch.manual_seed(seed)
    net = SmallCNN(len(LABELS), width=4)
    for m in net.modules():       # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.float().contiguous() for k, v in net.state_dict().items() if v.is_floating_point()}
    meta = {"architecture": "gl_small_cnn", "input_size": json.dumps(list(size)), "labels": json.dumps(labels),
            "mean": json.dumps([0.5, 0.5, 0.5]), "std": json.dumps([0.25, 0.25, 0.25]), **(extra or {})}
    safetensors.torch.save_file(state, str(path), metadata=meta)
    return net.eval()


def test_loader_round_trip_and_tensors_usable_by_autograd(cl, tmp_path):
    path = tmp_path / "c.safetensors"
    net = _save_small_cnn(path)
    with torch.inference_mode():
        c = cl.load_classifier(path)
    assert c.labels == LABELS and c.input_size == (16, 16) and c.architecture == "gl_small_cnn"
    assert c.mean == (0.5, 0.5, 0.5) and c.std == (0.25, 0.25, 0.25)
    assert not any(p.is_inference() or p.requires_grad for p in c.module.parameters())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(c.module(c.prepare(x, node="t")), net((x - 0.5) / 0.25))
    smooth = c.smoothed(3.0)
    assert smooth is not c.module and smooth is c.smoothed(3.0) and c.smoothed(0) is c.module
    assert any(isinstance(m, torch.nn.ReLU) for m in c.module.modules())      # the shared module is untouched
    assert not any(isinstance(m, torch.nn.ReLU) for m in smooth.modules())


def test_torchvision_resnet_without_metadata_reads_as_imagenet(cl, tmp_path):
    import torchvision.models as tvm
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file({k: v.float().contiguous() for k, v in
                                 tvm.resnet18(weights=None, num_classes=10).state_dict().items()
                                 if v.is_floating_point()}, str(path))
    c = cl.load_classifier(path)
    assert c.architecture == "resnet" and c.input_size == (224, 224) and c.labels[3] == "class 3"
    assert c.mean == cl.IMAGENET_MEAN


def test_loader_errors_name_the_problem(cl, tmp_path):
    with pytest.raises(cl.ClassifierError, match="safetensors"):
        cl.load_classifier(tmp_path / "model.pth")
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(cl.ClassifierError, match="not a supported classifier"):
        cl.load_classifier(bad)
    few = tmp_path / "few.safetensors"
    _save_small_cnn(few, labels=["a", "b"])
    with pytest.raises(cl.ClassifierError, match="2 labels for 4 outputs"):
        cl.load_classifier(few)
    with pytest.raises(cl.ClassifierError, match="not found"):
        cl.resolve_classifier("nope.safetensors")


def test_targets_by_name_or_index_cycled_over_the_batch(classifier, cl):
    assert classifier.target_indices("Blue Square, 3", 5, node="n").tolist() == [1, 3, 1, 3, 1]
    with pytest.raises(cl.ClassifierError, match="'purple blob' is not a class"):
        classifier.target_indices("purple blob", 2, node="GL_ClassifierGuidance")
    with pytest.raises(cl.ClassifierError, match="target is empty"):
        classifier.target_indices(" , ", 2, node="GL_ClassifierGuidance")


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_scale_zero_is_a_noop_and_guidance_changes_the_result(cg, classifier, tiny, cond, arch):
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    plain = run(m, pos, neg, 4.0, batch=2)
    off = cg.patch_classifier_guidance(m, classifier, "red circle, green star", scale=0.0)
    assert torch.equal(run(off, pos, neg, 4.0, batch=2), plain)
    on = cg.patch_classifier_guidance(m, classifier, "red circle, green star", scale=5.0)
    guided = run(on, pos, neg, 4.0, batch=2)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_post_cfg_step_is_the_score_form_per_sample(cg, kernels, classifier, tiny, cond, arch):
    """D' − D = scale·κ·(s²/a)·∇J per sample, targets per image, κ from the run's schedule."""
    m = tiny(arch)
    pos, neg = cond(arch, 1), cond(arch, 2)
    seen = []
    patched = cg.patch_classifier_guidance(m, classifier, "blue square, yellow cross", scale=2.0, gamma=0.3)
    ours = patched.model_options["sampler_post_cfg_function"][-1]

    def spy(args):
        out = ours(args)
        seen.append((args["denoised"].clone(), out.clone(), args["sigma"].clone(),
                     args["model_options"]["transformer_options"]["sample_sigmas"].clone()))
        return out
    patched.model_options["sampler_post_cfg_function"][-1] = spy
    run(patched, pos, neg, 3.0, batch=2, steps=5)
    assert len(seen) == 5
    coords = cg.coords_for(m.get_model_object("model_sampling"), node="t")
    net = classifier.smoothed(3.0)
    for i, (d, out, sigma, sigmas) in enumerate(seen):
        grad, _ = kernels.objective_gradient(
            lambda z: net(classifier.prepare(cg.decode(z, m.get_model_object("latent_format"), "identity"),
                                             node="t")), d, torch.tensor([1, 3]), 1.0, 0.5)
        kappa = kernels.schedule_factor(i, [float(s) for s in sigmas], coords, 0.3, "sine")
        coef = kernels.score_coefficient(sigma, coords).view(-1, 1, 1, 1)
        expected = 2.0 * kappa * coef * grad
        torch.testing.assert_close(out, d + expected, rtol=1e-6, atol=1e-6)
        assert expected.abs().amax(dim=(1, 2, 3)).min() > (1e-3 if i == 0 else 1e-9)
        assert not torch.allclose(grad[0], grad[1])


def test_composes_with_core_post_cfg_and_keeps_the_input_model(cg, classifier, tiny, cond):
    import nodes
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    core = nodes.NODE_CLASS_MAPPINGS["RescaleCFG"]
    out = core().patch(m, 0.7) if not hasattr(core, "define_schema") else core.execute(m, 0.7)
    rescaled = out[0] if isinstance(out, tuple) else out.result[0]
    before = list(rescaled.model_options.get("sampler_post_cfg_function", []))
    both = cg.patch_classifier_guidance(rescaled, classifier, "red circle", scale=3.0)
    assert rescaled.model_options.get("sampler_post_cfg_function", []) == before
    assert len(both.model_options["sampler_post_cfg_function"]) == len(before) + 1
    assert both.model_options["sampler_cfg_function"] is rescaled.model_options["sampler_cfg_function"]
    out = run(both, pos, neg, 5.0)
    assert (out - run(rescaled, pos, neg, 5.0)).abs().max() > 1e-4
    assert (out - run(cg.patch_classifier_guidance(m, classifier, "red circle", scale=3.0), pos, neg,
                      5.0)).abs().max() > 1e-4


def test_resolution_mismatch_and_bad_settings_give_clear_errors(cg, classifier, tiny, cond):
    m = tiny("sd15_eps")
    pos, neg = cond("sd15_eps", 1), cond("sd15_eps", 2)
    patched = cg.patch_classifier_guidance(m, classifier, "red circle", scale=1.0)
    import comfy.samplers
    g = comfy.samplers.CFGGuider(patched)
    g.set_conds(pos, neg)
    g.set_cfg(3.0)
    noise = torch.randn(1, 3, 16, 24)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 2)
    with pytest.raises(cg.ClassifierError, match="aspect ratios differ"):
        with torch.inference_mode():
            g.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                     disable_pbar=True)
    # same aspect ratio, other size: resized
    assert torch.isfinite(run(patched, pos, neg, 3.0, size=24, batch=1)).all()
    with pytest.raises(cg.ClassifierError, match="not a class"):
        cg.patch_classifier_guidance(m, classifier, "mauve", scale=1.0)
    with pytest.raises(ValueError, match="start_percent"):
        cg.patch_classifier_guidance(m, classifier, "red circle", start_percent=0.6, end_percent=0.5)
    with pytest.raises(ValueError, match="joint_temperature"):
        cg.patch_classifier_guidance(m, classifier, "red circle", t1=0.0)


def test_linear_decoder_uses_the_family_preview_factors(cg):
    import comfy.latent_formats as lf
    sd15, flux = lf.SD15(), lf.Flux()
    assert cg.pick_decoder(sd15, "auto") == "linear" and cg.pick_decoder(lf.ChromaRadiance(), "auto") == "identity"
    with pytest.raises(cg.ClassifierError, match="needs a pixel-space model"):
        cg.pick_decoder(sd15, "identity")
    z = torch.randn(2, 16, 4, 4)
    rgb = cg.decode(z, flux, "linear")
    factors = torch.tensor(flux.latent_rgb_factors)
    bias = torch.tensor(flux.latent_rgb_factors_bias).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb, (torch.einsum("bchw,cr->brhw", z, factors) + bias + 1) / 2)

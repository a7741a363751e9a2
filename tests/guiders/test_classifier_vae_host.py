"""The 'vae' decoder of the classifier nodes (EluCD, GFCG, Dynamic CFG): the host's own TAESD and AutoencoderKL
classes with random weights, decoded differentiably, on latent formats of SD1.5 and Flux and on tiny models."""
import copy

import pytest
import torch

from hostutil import run


@pytest.fixture(scope="module")
def cg(host):
    return host.pack("guiders.classifier_guidance")


@pytest.fixture(scope="module")
def tm(host):
    return host.pack("guiders.tiny_models")


def _vae(tm, kind, channels, seed=0):
    with torch.inference_mode():                 # as VAELoader runs inside the executor
        return (tm.build_taesd_vae if kind == "taesd" else tm.build_kl_vae)(channels, seed)


@pytest.mark.parametrize("kind,fmt_name,channels", [("taesd", "SD15", 4), ("kl", "SD15", 4), ("taesd", "Flux", 16)])
def test_vae_decode_is_the_hosts_decode_unclamped_and_differentiable(cg, tm, kind, fmt_name, channels):
    import comfy.latent_formats as lf
    fmt = getattr(lf, fmt_name)()
    vae = _vae(tm, kind, channels)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, channels, 6, 6, generator=gen)
    image = cg.decode(z, fmt, "vae", vae)
    with torch.inference_mode():
        host_image = vae.decode(fmt.process_out(z)).movedim(-1, 1)       # [B, 3, H, W] in [0, 1], clamped
    assert image.shape == host_image.shape and image.shape[1] == 3
    torch.testing.assert_close(image.clamp(0, 1), host_image, rtol=1e-5, atol=1e-5)
    # autograd through the private copy: directional derivative against central differences
    w = torch.randn(image.shape, generator=gen)
    v = torch.randn(z.shape, generator=gen)
    zz = z.clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        (cg.decode(zz, fmt, "vae", vae) * w).sum().backward()
    twin = copy.deepcopy(cg.private_vae_decoder(vae)).double()     # float64 reference (ReLU kinks, rounding)

    def f(x):
        return (((twin.decode(fmt.process_out(x)) + 1) / 2) * w.double()).sum()
    z64 = z.double().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        f(z64).backward()
    eps = 1e-6
    with torch.no_grad():
        fd = (f(z.double() + eps * v.double()) - f(z.double() - eps * v.double())) / (2 * eps)
    directional = float((z64.grad * v.double()).sum())
    assert abs(directional) > 1e-3 and abs(directional - float(fd)) <= 2e-3 * abs(float(fd))   # ReLU kinks
    assert float((zz.grad.double() - z64.grad).norm() / z64.grad.norm()) < 1e-4      # ours, in float32


def test_private_decoder_is_a_cached_copy_and_the_vae_is_untouched(cg, tm):
    vae = _vae(tm, "taesd", 4)
    private = cg.private_vae_decoder(vae)
    assert private is cg.private_vae_decoder(vae) and private is not vae.first_stage_model
    assert not any(p.is_inference() or p.requires_grad for p in private.parameters())
    assert private.taesd_encoder is None and vae.first_stage_model.taesd_encoder is not None
    assert all(p.is_inference() for p in vae.first_stage_model.parameters())


def test_decoder_choice_and_errors(cg, tm):
    import comfy.latent_formats as lf
    sd15, pixel = lf.SD15(), lf.ChromaRadiance()
    vae4 = _vae(tm, "taesd", 4)
    assert cg.pick_decoder(sd15, "auto") == "linear"
    assert cg.pick_decoder(sd15, "auto", vae=vae4) == "vae"
    assert cg.pick_decoder(pixel, "auto", vae=_vae(tm, "taesd", 3)) == "identity"
    assert cg.pick_decoder(sd15, "linear", vae=vae4) == "linear"
    with pytest.raises(cg.ClassifierError, match=r"GL_ClassifierGuidance: decoder 'vae' needs a VAE.*taesd"):
        cg.pick_decoder(sd15, "vae")
    with pytest.raises(cg.ClassifierError, match=r"decodes 4-channel latents but this model's latents have 16 "
                                                 r"channels; connect the VAE of the model's family"):
        cg.pick_decoder(lf.Flux(), "vae", vae=vae4, node="GL_ClassifierGuidance")


@pytest.mark.parametrize("arch", ["sd15_eps", "flux"])
def test_elucd_through_a_taesd_is_the_score_form_per_sample(host, cg, tm, classifier, tiny, cond, arch):
    """On tiny 3-channel models with a 3-channel TAESD: scale 0 is a no-op; each step is D + s·κ·(s²/a)·∇J with the
    gradient taken through the VAE decode (8× larger image, resized to the classifier), per image target."""
    m = tiny(arch)
    vae = _vae(tm, "taesd", 3, seed=2)
    pos, neg = cond(arch, 1), cond(arch, 2)
    plain = run(m, pos, neg, 3.0, batch=2, steps=3)
    off = cg.patch_classifier_guidance(m, classifier, "blue square, yellow cross", scale=0.0, decoder="vae", vae=vae)
    assert torch.equal(run(off, pos, neg, 3.0, batch=2, steps=3), plain)
    patched = cg.patch_classifier_guidance(m, classifier, "blue square, yellow cross", scale=2.0, decoder="vae",
                                           vae=vae)
    ours = patched.model_options["sampler_post_cfg_function"][-1]
    seen = []

    def spy(args):
        out = ours(args)
        seen.append((args["denoised"].clone(), out.clone(), args["sigma"].clone(),
                     args["model_options"]["transformer_options"]["sample_sigmas"].clone()))
        return out
    patched.model_options["sampler_post_cfg_function"][-1] = spy
    guided = run(patched, pos, neg, 3.0, batch=2, steps=3)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    k = host.pack("kernels.classifier_guidance")
    coords = cg.coords_for(m.get_model_object("model_sampling"), node="t")
    net = classifier.smoothed(3.0)
    fmt = m.get_model_object("latent_format")
    d, out, sigma, sigmas = seen[1]
    with torch.inference_mode(False):
        grad, _ = k.objective_gradient(lambda z: net(classifier.prepare(cg.decode(z, fmt, "vae", vae), node="t")),
                                       d.clone(), torch.tensor([1, 3]), 1.0, 0.5)
    kappa = k.schedule_factor(1, [float(s) for s in sigmas], coords, 0.3, "sine")
    coef = k.score_coefficient(sigma, coords).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, d + 2.0 * kappa * coef * grad, rtol=1e-5, atol=1e-6)
    assert (2.0 * kappa * coef * grad).abs().amax(dim=(1, 2, 3)).min() > 1e-7
    # the gradient seen through the VAE is not the identity decoder's
    with torch.inference_mode(False):
        grad_id, _ = k.objective_gradient(
            lambda z: net(classifier.prepare(cg.decode(z, fmt, "identity"), node="t")), d.clone(),
            torch.tensor([1, 3]), 1.0, 0.5)
    assert not torch.allclose(grad, grad_id)


def test_gfcg_and_dynamic_cfg_read_the_vae_image(host, tm, classifier, tiny, cond):
    gfcg = host.pack("guiders.gfcg")
    dyn = host.pack("guiders.dynamic_cfg")
    m = tiny("flux")
    vae = _vae(tm, "taesd", 3, seed=3)
    sizes = []

    def evaluator(images, w):
        sizes.append(tuple(images.shape[-2:]))
        return torch.zeros(images.shape[0])
    trace = {}
    patched = dyn.patch_dynamic_cfg(m, classifier=classifier, target="red circle, green star", decoder="vae",
                                    vae=vae, evaluators=[evaluator], end_percent=1.0, trace=trace)
    out = run(patched, cond("flux", 1), cond("flux", 2), 4.0, batch=2, steps=3)
    assert torch.isfinite(out).all() and len(trace["last"]["trace"]) == 3
    assert set(sizes) == {(128, 128)}                                # 16×16 latents, TAESD's 8× decode
    class_conds = {i: cond("flux", 20 + i) for i in range(4)}
    g = gfcg.GFCGGuider(m, classifier, "red circle, green star", class_conds, s_max=2.0, decoder="vae", vae=vae)
    g.set_conds(cond("flux", 1), cond("flux", 2))
    g.set_cfg(4.0)
    with_vae = run(m, None, None, 4.0, batch=2, steps=3, guider=g)
    g_id = gfcg.GFCGGuider(m, classifier, "red circle, green star", class_conds, s_max=2.0, decoder="identity")
    g_id.set_conds(cond("flux", 1), cond("flux", 2))
    g_id.set_cfg(4.0)
    run(m, None, None, 4.0, batch=2, steps=3, guider=g_id)
    assert torch.isfinite(with_vae).all() and len(g.trace) == 2
    assert [s for _sig, _r, s in g.trace] != [s for _sig, _r, s in g_id.trace]   # the classifier saw other images

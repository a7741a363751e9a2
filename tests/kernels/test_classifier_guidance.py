"""EluCD kernel: objective, gradient against finite differences, score coefficient, schedule, Softplus swap;
classifier architectures (torchvision key layout)."""
import math

import pytest
import torch

from kernels.classifier_guidance import (
    elucd_objective,
    objective_gradient,
    posterior_variance,
    replace_relu_with_softplus,
    schedule_factor,
    score_coefficient,
)
from kernels.classifiers import SmallCNN, ZeroShotClassifier, build_classifier, detect_architecture, resnet_spec
from kernels.coords import FLOW, VE, Coords


def test_objective_is_the_temperature_split():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    j = elucd_objective(logits, torch.tensor([0, 2]), t1=1.0, t2=0.5)
    expected = [2.0 - math.log(math.exp(1.0) + math.exp(-0.5) + math.exp(0.25)),
                1.0 - math.log(1 + math.exp(1.5) + math.exp(0.5))]
    assert torch.allclose(j, torch.tensor(expected), atol=1e-6)
    # T2 = T1 is the log-softmax of the target
    j1 = elucd_objective(logits, torch.tensor([0, 2]), t1=1.0, t2=1.0)
    assert torch.allclose(j1, torch.log_softmax(logits, 1)[[0, 1], [0, 2]], atol=1e-6)


def _tiny_classifier(seed=0):
    torch.manual_seed(seed)
    net = SmallCNN(num_classes=5, width=4).eval()
    replace_relu_with_softplus(net, 3.0)
    return net.double()


def test_gradient_matches_finite_differences_per_sample():
    net = _tiny_classifier()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    grad, j = objective_gradient(net, z, targets, 1.0, 0.5)
    assert grad.shape == z.shape and j.shape == (3,)
    eps = 1e-6
    for b, c, y, x in [(0, 0, 1, 2), (1, 2, 5, 5), (2, 1, 7, 0)]:
        dz = torch.zeros_like(z)
        dz[b, c, y, x] = eps
        fd = (elucd_objective(net(z + dz), targets, 1.0, 0.5) - elucd_objective(net(z - dz), targets, 1.0, 0.5))
        fd = fd / (2 * eps)
        assert fd[b].item() == pytest.approx(grad[b, c, y, x].item(), rel=1e-5, abs=1e-9)
        others = [i for i in range(3) if i != b]
        assert fd[others].abs().max() < 1e-9          # samples are independent


def test_gradient_works_inside_inference_mode_and_leaves_input_alone():
    net = _tiny_classifier().float()
    z = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        zi = z.clone()
        grad, _ = objective_gradient(net, zi, torch.tensor([1, 2]))
    assert torch.equal(zi, z) and grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_score_coefficient_per_family():
    s = torch.tensor([0.0, 0.5, 2.0, 100.0])
    ve = score_coefficient(s, Coords(VE))
    assert torch.allclose(ve[:3], s[:3] ** 2 / torch.sqrt(1 + s[:3] ** 2))
    assert ve[3] == pytest.approx(14.6 ** 2 / math.sqrt(1 + 14.6 ** 2), rel=1e-5)   # held at σ̃ = 14.6
    f = torch.tensor([0.0, 0.5, 0.9, 1.0])
    flow = score_coefficient(f, Coords(FLOW))
    assert torch.allclose(flow[:3], f[:3] ** 2 / (1 - f[:3]))
    cap = 14.6 / 15.6
    assert flow[3] == pytest.approx(cap ** 2 / (1 - cap), rel=1e-5) and torch.isfinite(flow).all()


def test_posterior_variance_and_schedule():
    # DDPM posterior variance from ᾱ: β = 1 − ᾱ/ᾱ', Σ = β(1 − ᾱ')/(1 − ᾱ)
    abar, abar_next = 1 / (1 + 4.0), 1 / (1 + 1.0)
    beta = 1 - abar / abar_next
    assert posterior_variance(2.0, 1.0) == pytest.approx(beta * (1 - abar_next) / (1 - abar))
    assert posterior_variance(1.0, 0.0) == 0.0 and posterior_variance(1.0, 2.0) == 0.0
    sigmas = [14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0]
    n = len(sigmas) - 1
    ve = Coords(VE)
    assert schedule_factor(0, sigmas, ve, 0.3, "constant") == 1.0
    assert schedule_factor(n - 1, sigmas, ve, 0.3, "sine") == 1.0          # u = 0 and Σ = 0 at the last step
    i = 2
    var0, vari = posterior_variance(14.6, 8.0), posterior_variance(4.0, 2.0)
    expected = 1 + 0.3 * (var0 / vari) * math.sin(math.pi * (n - 1 - i) / n)
    assert schedule_factor(i, sigmas, ve, 0.3, "sine") == pytest.approx(expected)
    assert schedule_factor(i, sigmas, ve, 0.3, "sine_simple") == pytest.approx(
        1 + 0.3 * math.sin(math.pi * (n - 1 - i) / n))
    # flow: σ = 1 at the start has σ̃ = ∞ and stays finite
    flow_sigmas = [1.0, 0.8, 0.5, 0.2, 0.0]
    k = schedule_factor(1, flow_sigmas, Coords(FLOW), 0.3, "sine")
    assert math.isfinite(k) and k > 1
    with pytest.raises(ValueError):
        schedule_factor(0, sigmas, ve, 0.3, "cosine")


def test_softplus_swap_reaches_nested_relus_and_counts_them():
    net = SmallCNN(num_classes=3, width=4)
    assert replace_relu_with_softplus(net, 5.0) == 5
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    assert all(m.beta == 5.0 for m in net.modules() if isinstance(m, torch.nn.Softplus))
    resnet = build_classifier("resnet", {**_resnet_keys(18)})
    assert replace_relu_with_softplus(resnet, 3.0) == 1 + 8     # stem + one module per BasicBlock


def _resnet_keys(depth):
    import torchvision.models as tvm
    return {18: tvm.resnet18, 50: tvm.resnet50}[depth](weights=None, num_classes=7).state_dict()


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_layout_is_read_from_torchvision_keys(depth):
    state = _resnet_keys(depth)
    assert detect_architecture(state) == "resnet"
    assert resnet_spec(state) == (depth, 7)
    net = build_classifier("resnet", state)
    net.load_state_dict(state)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_layouts_are_refused():
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        detect_architecture({"foo.weight": torch.zeros(1)})
    state = _resnet_keys(18)
    state = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    with pytest.raises(ValueError, match="unknown ResNet layout"):
        resnet_spec(state)
    with pytest.raises(ValueError, match="unknown classifier architecture"):
        build_classifier("vit", {})


def test_gfcg_reference_is_the_most_confused_competitor():
    from kernels.classifier_guidance import gfcg_reference, gfcg_term
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.5, 0.45, 0.05]])
    ref, frac = gfcg_reference(probs, torch.tensor([0, 2, 1]))
    assert ref.tolist() == [1, 0, 0]
    assert torch.allclose(frac, torch.tensor([0.3 / 0.9, 0.2 / 0.9, 0.5 / 0.95]))
    # candidates restrict the reference; a sure classifier gives a scale near 0
    ref, _ = gfcg_reference(probs, torch.tensor([0, 2, 1]), torch.tensor([False, True, True]))
    assert ref.tolist() == [1, 1, 2]
    _, frac = gfcg_reference(torch.tensor([[0.999, 0.001, 0.0]]), torch.tensor([0]))
    assert frac.item() < 0.002
    with pytest.raises(ValueError, match="no candidate"):
        gfcg_reference(probs[:1], torch.tensor([0]), torch.tensor([True, False, False]))
    d_c, d_r = torch.ones(2, 3, 2, 2, 2), torch.zeros(2, 3, 2, 2, 2)       # 5-D (video) latents broadcast too
    term = gfcg_term(d_c, d_r, torch.tensor([0.5, 2.0]))
    assert term[0].eq(0.5).all() and term[1].eq(2.0).all()


def test_zero_shot_logits_are_scaled_cosines_and_differentiable():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.GELU(),
                                  torch.nn.Linear(8, 5)).double()
    text = torch.randn(3, 5, dtype=torch.float64) * 3
    head = ZeroShotClassifier(encoder, text, logit_scale=50.0).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    logits = head(x)
    emb = encoder(x)
    expected = 50.0 * torch.stack([torch.stack([torch.nn.functional.cosine_similarity(emb[b], text[k], dim=0)
                                                for k in range(3)]) for b in range(2)])
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 50.0 + 1e-9
    assert torch.autograd.gradcheck(lambda z: head(z), (x,))
    with pytest.raises(ValueError, match="labels, dim"):
        ZeroShotClassifier(encoder, torch.zeros(5))

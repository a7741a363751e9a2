"""kernels/hypernet.py: shapes, zero output before training, fusion of any number of reference images, the output
penalty against its definition, the loss weights against the families' losses, input checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import hypernet as hk

TARGETS = [hk.Target("a.to_q.weight", 16, 16), hk.Target("a.to_k.weight", 16, 24), hk.Target("b.to_out.weight", 8, 16)]


def _net(seed=0, **cfg):
    torch.manual_seed(seed)
    return hk.HyperNetwork(TARGETS, dict(dict(width=32, heads=2, depth=1, image_size=16, encoder_channels=[8, 8, 16]),
                                         **cfg))


def test_factor_shapes_and_zero_delta_before_training():
    net = _net(rank=3)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 3, 16, 16))
    assert set(out) == {t.key for t in TARGETS}
    for t in TARGETS:
        b, a = out[t.key]
        assert b.shape == (2, t.out_dim, 3) and a.shape == (2, 3, t.in_dim)
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0      # B heads start at zero
    assert all(torch.count_nonzero(d) == 0 for d in hk.deltas(out, 1).values())
    assert float(hk.output_penalty(out)) == 0.0
    # heads are shared by shape: two in-widths (16, 24), two out-widths (16, 8)
    assert set(net.heads_a) == {"16", "24"} and set(net.heads_b) == {"8", "16"}


def test_any_number_of_reference_images_and_subjects_are_independent():
    net = _net()
    for head in net.heads_b.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    imgs = torch.rand(3, 4, 3, 16, 16)
    full = net(imgs)
    one = net(imgs[1:2])
    for k in full:
        torch.testing.assert_close(full[k][0][1:2], one[k][0], rtol=1e-5, atol=1e-6)   # subject 1 alone
    two = net(imgs[:, :2])                                                            # fewer images: another ΔW
    assert not torch.allclose(two[TARGETS[0].key][0], full[TARGETS[0].key][0])
    # fusing the reference set is order-free (attention over all tokens; position embeddings are per image)
    perm = net(imgs[:, [2, 0, 3, 1]])
    for k in full:
        torch.testing.assert_close(perm[k][0], full[k][0], rtol=1e-4, atol=1e-5)


def test_output_penalty_is_the_frobenius_norm_of_the_deltas():
    g = torch.Generator().manual_seed(1)
    factors = {k: (torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, 7, generator=g)) for k in ("x", "y")}
    expected = sum(float((factors[k][0][s] @ factors[k][1][s]).square().sum()) for k in factors for s in range(3)) / 3
    assert float(hk.output_penalty(factors)) == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_every_part():
    net = _net()
    out = net(torch.rand(2, 2, 3, 16, 16))
    loss = sum((b @ a).square().sum() for b, a in out.values()) + sum(b.sum() for b, _a in out.values())
    loss.backward()
    assert net.heads_b["16"].weight.grad.abs().sum() > 0
    assert net.encoder.net[0].weight.grad is not None and net.queries.grad is not None


def test_denoising_weight_matches_the_family_losses():
    g = torch.Generator().manual_seed(2)
    x0, n, d = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.5, 0.9, 2.0])
    s = sigma[:, None, None, None]
    err = ((d - x0) ** 2).mean(dim=(1, 2, 3))
    # eps: x = x0 + σn, ε̂ = (x − D)/σ
    eps_hat = (x0 + s * n - d) / s
    torch.testing.assert_close(((n - eps_hat) ** 2).mean(dim=(1, 2, 3)), err * hk.denoising_weight(sigma, "eps"))
    # flow: x = (1−σ)x0 + σn, ε̂ = (x − (1−σ)D)/σ, v = n − x0, v̂ = ε̂ − D
    sf = sigma[:3]
    sfx = sf[:, None, None, None]
    x = (1 - sfx) * x0[:3] + sfx * n[:3]
    v_hat = (x - (1 - sfx) * d[:3]) / sfx - d[:3]
    torch.testing.assert_close((((n[:3] - x0[:3]) - v_hat) ** 2).mean(dim=(1, 2, 3)),
                               err[:3] * hk.denoising_weight(sf, "flow"), rtol=1e-4, atol=1e-5)
    # v-prediction (σ_d = 1): the network's v target in c_out units: ‖D − x0‖²·(σ²+1)/σ²
    assert torch.allclose(hk.denoising_weight(sigma, "v"), (sigma ** 2 + 1) / sigma ** 2)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        hk.denoising_weight(sigma, "x0")


def test_bad_inputs():
    net = _net()
    with pytest.raises(ValueError, match=r"must be 16×16"):
        net(torch.rand(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[subjects, images, 3, H, W\]"):
        net(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="at least one target"):
        hk.HyperNetwork([])
    with pytest.raises(ValueError, match="unknown hypernetwork settings"):
        hk.default_config(size=3)


def test_resize_images():
    img = torch.rand(2, 3, 64, 64)
    small = hk.resize_images(img, 32)
    torch.testing.assert_close(small, img.reshape(2, 3, 32, 2, 32, 2).mean(dim=(3, 5)))
    assert hk.resize_images(torch.rand(1, 3, 8, 8), 16).shape == (1, 3, 16, 16)


def test_contrastive_loss_matches_its_definition_and_prefers_matched_views():
    g = torch.Generator().manual_seed(3)
    za, zb = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    a, b = torch.nn.functional.normalize(za, dim=1), torch.nn.functional.normalize(zb, dim=1)
    logits = a @ b.T / 0.1
    want = 0.5 * (-(logits.log_softmax(1).diagonal().mean()) - logits.T.log_softmax(1).diagonal().mean())
    assert float(hk.contrastive_loss(za, zb)) == pytest.approx(float(want), rel=1e-5)
    eye = torch.eye(5, 8)
    assert float(hk.contrastive_loss(eye, eye)) < float(hk.contrastive_loss(eye, eye[[1, 2, 3, 4, 0]]))
    assert float(hk.contrastive_loss(eye, eye)) == pytest.approx(float(-torch.log(torch.tensor(
        torch.e ** 10 / (torch.e ** 10 + 4)))), rel=1e-3)          # float32 softmax at e^10


def test_subject_embedding_reads_every_reference_image():
    net = _net()
    imgs = torch.rand(2, 3, 3, 16, 16)
    with torch.no_grad():
        z = net.subject_embedding(imgs)
        assert z.shape == (2, 32)
        changed = imgs.clone()
        changed[0, 2] = torch.rand(3, 16, 16)
        z2 = net.subject_embedding(changed)
    assert not torch.allclose(z[0], z2[0]) and torch.allclose(z[1], z2[1])


# ------------------------------------------------------------------------- encoder clip_vision (feature tokens)

def _feature_net(seed=0, tokens=5, dim=12, **cfg):
    torch.manual_seed(seed)
    return hk.HyperNetwork(TARGETS, dict(dict(width=32, heads=2, depth=1, encoder="clip_vision", feature_dim=dim,
                                              feature_tokens=tokens), **cfg))


def test_feature_encoder_shapes_and_zero_delta_before_training():
    net = _feature_net(rank=3)
    assert net.reads_features and isinstance(net.encoder, hk.FeatureEncoder)
    assert net.encoder.proj.weight.shape == (32, 12) and net.encoder.pos.shape == (1, 5, 32)
    feats = torch.randn(2, 4, 5, 12) * 30                     # un-normalised, as a ViT's residual stream
    with torch.no_grad():
        assert net.encode(feats).shape == (2, 4 * 5, 32)
        out = net(feats)
    for t in TARGETS:
        b, a = out[t.key]
        assert b.shape == (2, t.out_dim, 3) and a.shape == (2, 3, t.in_dim)
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0 and torch.isfinite(a).all()
    assert all(torch.count_nonzero(d) == 0 for s in range(2) for d in hk.deltas(out, s).values())
    assert float(hk.output_penalty(out)) == 0.0


def test_feature_encoder_takes_any_number_of_reference_images():
    net = _feature_net()
    for head in net.heads_b.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    feats = torch.randn(3, 4, 5, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = net(feats)
        for n in (1, 2, 7):                                                   # 7: more than at any other call
            more = torch.cat([feats, feats[:, :3]], 1)[:, :n]
            got = net(more)
            assert got[TARGETS[0].key][0].shape == (3, 16, 2) and torch.isfinite(got[TARGETS[0].key][0]).all()
        one = net(feats[1:2])
        perm = net(feats[:, [3, 1, 0, 2]])
        fewer = net(feats[:, :1])
    for k in full:
        torch.testing.assert_close(one[k][0], full[k][0][1:2], rtol=1e-5, atol=1e-6)   # subjects are independent
        torch.testing.assert_close(perm[k][0], full[k][0], rtol=1e-4, atol=1e-5)        # order-free fusion
    assert not torch.allclose(fewer[TARGETS[0].key][0], full[TARGETS[0].key][0])


def test_feature_encoder_refuses_wrong_shapes():
    net = _feature_net()
    with pytest.raises(ValueError, match=r"features \[subjects, images, 5, 12\] \(tokens, width\); got \(1, 2, 5, "
                                         r"16\)"):
        net(torch.randn(1, 2, 5, 16))                      # another encoder's width (a ViT-H file given ViT-L)
    with pytest.raises(ValueError, match=r"got \(1, 2, 6, 12\)"):
        net(torch.randn(1, 2, 6, 12))                      # another token count (another input size)
    with pytest.raises(ValueError, match=r"got \(2, 5, 12\)"):
        net(torch.randn(2, 5, 12))                         # no image axis
    with pytest.raises(ValueError, match=r"image-encoder features"):
        net(torch.rand(1, 2, 3, 16, 16))                   # images given to a feature hypernetwork
    with pytest.raises(ValueError, match=r"\[subjects, images, 3, H, W\]"):
        _net()(torch.randn(1, 2, 5, 12))                   # features given to a conv hypernetwork
    with pytest.raises(ValueError, match=r"feature_dim, feature_tokens >= 1\); got 0, 5"):
        _feature_net(dim=0)
    with pytest.raises(ValueError, match=r"encoder 'dino': choose one of conv, clip_vision"):
        _net(encoder="dino")


def test_feature_encoder_gradients_reach_the_projection():
    net = _feature_net()
    for head in net.heads_b.values():                      # with B = 0 no gradient flows back to the tokens
        torch.nn.init.normal_(head.weight, std=0.1)
    feats = torch.randn(2, 3, 5, 12)
    out = net(feats)
    sum((b @ a).square().sum() for b, a in out.values()).backward()
    for p in (net.encoder.proj.weight, net.encoder.proj.bias, net.encoder.norm.weight, net.encoder.pos,
              net.queries, net.blocks[0].cross.in_proj_weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_config_defaults_keep_conv_files_readable():
    old = {"rank": 2, "width": 32, "depth": 1, "heads": 2, "image_size": 16, "encoder": "conv",
           "encoder_channels": [8, 8, 16]}                # a config written before the clip_vision encoder
    net = hk.HyperNetwork(TARGETS, old)
    assert not net.reads_features and net.config["feature_dim"] == 0 and net.config["feature_tokens"] == 0
    assert isinstance(net.encoder, hk.ConvEncoder)


def test_subject_query_starts_as_the_network_without_it_and_then_reads_the_pooled_embedding():
    plain, sq = _net(seed=5), _net(seed=5, subject_query=True)
    missing, unexpected = sq.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["subject_in.bias", "subject_in.weight"] and not unexpected
    assert not plain.config["subject_query"] and not hasattr(plain, "subject_in")
    for net in (plain, sq):
        for head in net.heads_b.values():
            torch.nn.init.normal_(head.weight, std=0.1, generator=torch.Generator().manual_seed(2))
    imgs = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = plain(imgs), sq(imgs)
    for k in a:                                               # zero-initialised path: the same factors exactly
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    out = sq(imgs)                                            # and it learns: the path gets a gradient at zero
    sum((bb @ aa).square().sum() for bb, aa in out.values()).backward()
    assert float(sq.subject_in.weight.grad.abs().sum()) > 0
    with torch.no_grad():                                     # once non-zero, the queries carry W·z + b
        torch.nn.init.normal_(sq.subject_in.weight, std=0.5, generator=torch.Generator().manual_seed(4))
        z = sq.project(sq.encode(imgs).amax(dim=1))
        q = sq.queries[None] + sq.subject_in(z)[:, None]
        for block in sq.blocks:
            q = block(q, sq.encode(imgs))
        q = sq.norm(q)
        key = TARGETS[0].key
        torch.testing.assert_close(sq(imgs)[key][1], sq.heads_a["16"](q[:, 0]).reshape(2, -1, 16))
        assert not torch.equal(sq(imgs)[key][0], plain(imgs)[key][0])


def test_direct_lora_starts_at_zero_is_seeded_and_can_fix_its_down_projection():
    targets = [hk.Target("a.weight", 6, 5), hk.Target("b.weight", 4, 7)]
    m = hk.DirectLoRA(targets, 3, seed=1)
    f = m(torch.zeros(1, 2, 3, 8, 8))                     # the inputs are ignored
    assert {k: (tuple(b.shape), tuple(a.shape)) for k, (b, a) in f.items()} == {
        "a.weight": ((1, 6, 3), (1, 3, 5)), "b.weight": ((1, 4, 3), (1, 3, 7))}
    assert all(float(d.detach().abs().max()) == 0.0 for d in hk.deltas(f).values())    # ΔW = 0 before fitting
    again, other = hk.DirectLoRA(targets, 3, seed=1), hk.DirectLoRA(targets, 3, seed=2)
    assert torch.equal(again()["a.weight"][1], f["a.weight"][1])
    assert not torch.equal(other()["a.weight"][1], f["a.weight"][1])
    assert len(list(m.parameters())) == 4
    fixed = hk.DirectLoRA(targets, 3, train_down=False, seed=1)
    assert len(list(fixed.parameters())) == 2                                     # B only; A a buffer
    assert torch.equal(fixed()["b.weight"][1], f["b.weight"][1])
    assert set(fixed.state_dict()) == {"b.0", "b.1", "a0", "a1"}
    sum(b.sum() for b, _a in fixed().values()).backward()
    assert all(p.grad is not None for p in fixed.parameters())
    with pytest.raises(ValueError, match="rank must be >= 1"):
        hk.DirectLoRA(targets, 0)


def test_delta_distance_is_the_relative_frobenius_distance_of_the_products():
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (6, 5), "b.weight": (4, 9)}
    pred = {k: (torch.randn(2, o, 3, generator=g), torch.randn(2, 3, i, generator=g)) for k, (o, i) in shapes.items()}
    want = {k: (torch.randn(2, o, 2, generator=g), torch.randn(2, 2, i, generator=g)) for k, (o, i) in shapes.items()}
    explicit = torch.stack([
        sum(((pred[k][0][s] @ pred[k][1][s]) - (want[k][0][s] @ want[k][1][s])).square().sum() for k in shapes)
        / sum((want[k][0][s] @ want[k][1][s]).square().sum() for k in shapes) for s in range(2)])
    torch.testing.assert_close(hk.delta_distance(pred, want), explicit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hk.delta_distance(want, want), torch.zeros(2), atol=1e-5, rtol=0)
    zero = {k: (torch.zeros_like(b), a) for k, (b, a) in pred.items()}
    torch.testing.assert_close(hk.delta_distance(zero, want), torch.ones(2))      # predicting ΔW = 0 scores 1
    with pytest.raises(ValueError, match="no target factors"):
        hk.delta_distance(pred, {})


def test_row_lora_terms_equal_each_rows_own_weight_delta():
    """Per-row LoRA with a shared A: row n of the term equals the layer run with ΔW_n = B_n·A alone (linear on
    [N, L, in] tokens, 3×3 convolution with stride and padding), so one batched forward fits many subjects."""
    g = torch.Generator().manual_seed(0)
    n, r = 3, 2
    x = torch.randn(n, 5, 7, generator=g)
    a, b = torch.randn(r, 7, generator=g), torch.randn(n, 4, r, generator=g)
    got = hk.row_lora_linear(x, a, b)
    want = torch.stack([x[i] @ (b[i] @ a).T for i in range(n)])
    torch.testing.assert_close(got, want)
    xc = torch.randn(n, 6, 9, 9, generator=g)
    ac, bc = torch.randn(r, 6 * 9, generator=g), torch.randn(n, 5, r, generator=g)
    got = hk.row_lora_conv2d(xc, ac, bc, stride=2, padding=1)
    want = torch.cat([F.conv2d(xc[i:i + 1], (bc[i] @ ac).reshape(5, 6, 3, 3), None, 2, 1) for i in range(n)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="not \\[r, 6·k·k\\]"):
        hk.row_lora_conv2d(xc, torch.randn(r, 6 * 8), bc)


def test_basis_decoder_mixes_its_up_projections_by_the_subject_embedding():
    """Decoder basis: ΔW = 0 before training; then ΔW_l = (Σ_k c_k B_k,l)·A_l with c = softmax of the embedding's
    map (rows sum to 1, differ between subjects), rank r whatever K; gradients reach every part; bad settings are
    refused."""
    targets = [hk.Target("a.weight", 6, 5), hk.Target("b.weight", 4, 6)]
    torch.manual_seed(0)
    net = hk.HyperNetwork(targets, {"rank": 2, "width": 16, "heads": 2, "image_size": 8,
                                    "encoder_channels": [4, 4, 8], "decoder": "basis", "basis_size": 3})
    assert not hasattr(net, "queries") and not hasattr(net, "blocks")
    refs = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = net(refs)
    assert all(float(d.detach().abs().max()) == 0 for d in hk.deltas(out, 0).values())
    with torch.no_grad():
        for up in net.ups:
            up.normal_()
    out = net(refs)
    c = net.basis_weights(net.encode(refs))
    assert c.shape == (2, 3) and torch.allclose(c.sum(1), torch.ones(2)) and not torch.allclose(c[0], c[1])
    for s in (0, 1):
        for t, up, down in zip(targets, net.ups, net.downs):
            want = sum(c[s, k] * up[k] for k in range(3)) @ down
            torch.testing.assert_close(hk.deltas(out, s)[t.key], want)
            assert out[t.key][0].shape == (2, t.out_dim, 2) and out[t.key][1].shape == (2, 2, t.in_dim)
    hk.output_penalty(out).backward()
    for name in ("coefficients.weight", "ups.0", "downs.1", "encoder.net.0.weight", "project.0.weight"):
        assert float(dict(net.named_parameters())[name].grad.abs().max()) > 0, name
    for bad, match in (({"decoder": "tree"}, "decoder 'tree'"), ({"decoder": "basis"}, "basis_size >= 1"),
                       ({"decoder": "basis", "basis_size": 2, "subject_query": True}, "no subject_query")):
        with pytest.raises(ValueError, match=match):
            hk.HyperNetwork(targets, {"width": 16, "heads": 2, **bad})

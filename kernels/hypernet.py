"""Hypernetwork personalization (methods.md §13; Shrestha, Sharma, Zhou, Kumar, arXiv 2511.03156): a network that
maps reference images of a subject to low-rank weight updates (LoRA factors) of a frozen diffusion model in one
forward pass, trained end to end through the adapted model with an L2 penalty on its output.

The paper states the idea (images → LoRA-adapted weights, end-to-end training, output regularisation); its
encoder, decoder, layer set and rank are not published in a form we could confirm. The architecture here is the
labelled DESIGN of methods.md (after HyperDreamBooth / HyperLoRA), with two image encoders to choose from:

    encoder "conv": images [S, n, 3, H, W] in [0, 1]
      → a small trainable convolutional encoder → (H/4)·(W/4) tokens per image, learned position embedding
    encoder "clip_vision": features [S, n, T, d_feat] of a frozen image encoder (in the host: a CLIP vision model's
        penultimate hidden states, computed outside this module)
      → LayerNorm → trainable linear map d_feat → width, learned position embedding over the T tokens
    then, for both: every reference image's tokens, concatenated (several images are fused by attention, any n)
      → decoder: one learned query per (target weight, factor) — 2 per target — refined by `depth` blocks of
        cross-attention to the image tokens, self-attention among the queries and an MLP
      → linear heads shared by the targets of one shape: A [r, in] from the A query, B [out, r] from the B query
    ΔW_l = B_l·A_l (scale 1). The B heads start at zero, so an untrained hypernetwork predicts ΔW = 0 exactly.

    decoder "basis" instead of the queries (HyperLoRA's LoRA-basis idea): the pooled subject embedding (the one the
    encoder is pretrained with) → K mixing weights c = softmax(W·ẑ + b) → ΔW_l = (Σ_k c_k·B_{k,l})·A_l, with K
    learned up-projections per target and one learned down-projection A_l (zero B: ΔW = 0 before training). The
    host initialises it from directly fitted prototype subjects (guiders/hypernet_train.basis_from_fits).

The method's design uses a frozen pretrained image encoder ("clip_vision" when one is at hand). Without pretrained
weights, the "conv" encoder can be pretrained on the training subjects with a subject-contrastive objective
(InfoNCE between two image sets of each subject: `contrastive_loss`) and then frozen — the pack's stand-in for a
frozen CLIP/DINO encoder.

Pure torch: no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ENCODERS = ("conv", "clip_vision")
DECODERS = ("queries", "basis")


@dataclass(frozen=True)
class Target:
    """One weight the hypernetwork adapts: its key and shape [out, in] (a Linear's weight)."""

    key: str
    out_dim: int
    in_dim: int


def default_config(**overrides) -> dict:
    """The hypernetwork's hyper-parameters (stored in the file's metadata)."""
    cfg = {"rank": 2, "width": 128, "depth": 2, "heads": 4, "image_size": 32, "encoder": "conv",
           "encoder_channels": [32, 64, 128], "feature_dim": 0, "feature_tokens": 0, "subject_query": False,
           "decoder": "queries", "basis_size": 0}
    # image_size / encoder_channels: the conv encoder; feature_dim / feature_tokens (d_feat, T): the clip_vision one;
    # subject_query: the pooled subject embedding is added to every query (see HyperNetwork.forward);
    # decoder "queries" (attention decoder) or "basis" with basis_size K (see HyperNetwork.forward)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown hypernetwork settings {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg


class ConvEncoder(nn.Module):
    """[N, 3, H, W] in [0, 1] → tokens [N, (H/4)·(W/4), width] with a learned position embedding."""

    def __init__(self, channels: list[int], width: int, image_size: int):
        super().__init__()
        c1, c2, c3 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c3, width, 1))
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.pos = nn.Parameter(torch.randn(1, side * side, width) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.net(images * 2 - 1)
        return f.flatten(2).transpose(1, 2) + self.pos


class FeatureEncoder(nn.Module):
    """Frozen image-encoder features [N, T, d_feat] → tokens [N, T, width]: LayerNorm (a ViT's penultimate hidden
    states are its un-normalised residual stream, whose scale differs between models), a trainable linear map and a
    learned position embedding."""

    def __init__(self, feature_dim: int, tokens: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(feature_dim, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(features)) + self.pos


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3, self.nt = (nn.LayerNorm(width) for _ in range(4))
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = self.nt(tokens)
        h = self.n1(q)
        q = q + self.cross(h, t, t, need_weights=False)[0]
        h = self.n2(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        return q + self.mlp(self.n3(q))


class HyperNetwork(nn.Module):
    """Reference images (encoder conv) or their features (encoder clip_vision) of subjects → LoRA factors
    {key: (B [S, out, r], A [S, r, in])}."""

    def __init__(self, targets: list[Target], config: dict | None = None):
        super().__init__()
        cfg = default_config(**(config or {}))
        if cfg["encoder"] not in ENCODERS:
            raise ValueError(f"encoder {cfg['encoder']!r}: choose one of {', '.join(ENCODERS)}")
        if not targets:
            raise ValueError("a hypernetwork needs at least one target weight")
        if cfg["rank"] < 1 or cfg["width"] % cfg["heads"]:
            raise ValueError(f"rank must be >= 1 and width divisible by heads; got {cfg}")
        if cfg["encoder"] == "clip_vision" and (cfg["feature_dim"] < 1 or cfg["feature_tokens"] < 1):
            raise ValueError("encoder clip_vision needs the features' width and token count (feature_dim, "
                             f"feature_tokens >= 1); got {cfg['feature_dim']}, {cfg['feature_tokens']}")
        if cfg["decoder"] not in DECODERS:
            raise ValueError(f"decoder {cfg['decoder']!r}: choose one of {', '.join(DECODERS)}")
        if cfg["decoder"] == "basis" and (cfg["basis_size"] < 1 or cfg["subject_query"]):
            raise ValueError("decoder basis needs basis_size >= 1 and no subject_query; got "
                             f"{cfg['basis_size']}, {cfg['subject_query']}")
        self.config, self.targets = cfg, list(targets)
        width, r = cfg["width"], cfg["rank"]
        if self.reads_features:
            self.encoder = FeatureEncoder(cfg["feature_dim"], cfg["feature_tokens"], width)
        else:
            self.encoder = ConvEncoder(list(cfg["encoder_channels"]), width, cfg["image_size"])
        self.project = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        if cfg["decoder"] == "basis":
            k = cfg["basis_size"]
            self.coefficients = nn.Linear(width, k)
            nn.init.normal_(self.coefficients.weight, std=width ** -0.5)
            nn.init.zeros_(self.coefficients.bias)
            self.downs = nn.ParameterList(nn.Parameter(torch.randn(r, t.in_dim) * t.in_dim ** -0.5) for t in targets)
            self.ups = nn.ParameterList(nn.Parameter(torch.zeros(k, t.out_dim, r)) for t in targets)   # ΔW = 0
            return
        self.queries = nn.Parameter(torch.randn(2 * len(targets), width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, cfg["heads"]) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(width)
        if cfg["subject_query"]:                    # zero: the path starts as the network without it
            self.subject_in = nn.Linear(width, width)
            nn.init.zeros_(self.subject_in.weight)
            nn.init.zeros_(self.subject_in.bias)
        self.heads_a = nn.ModuleDict({str(d): nn.Linear(width, r * d) for d in sorted({t.in_dim for t in targets})})
        self.heads_b = nn.ModuleDict({str(d): nn.Linear(width, d * r) for d in sorted({t.out_dim for t in targets})})
        for head in self.heads_a.values():
            nn.init.normal_(head.weight, std=width ** -0.5)
            nn.init.zeros_(head.bias)
        for head in self.heads_b.values():          # ΔW = 0 before training
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def reads_features(self) -> bool:
        """True: the input is image-encoder features [S, n, T, d_feat]; False: images [S, n, 3, H, W]."""
        return self.config["encoder"] == "clip_vision"

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images [S, n, 3, H, W] (conv) or features [S, n, T, d_feat] (clip_vision) → tokens [S, n·T, width] (all
        reference images of a subject side by side)."""
        if self.reads_features:
            t, d = self.config["feature_tokens"], self.config["feature_dim"]
            if inputs.ndim != 4 or tuple(inputs.shape[2:]) != (t, d):
                raise ValueError(f"this hypernetwork reads image-encoder features [subjects, images, {t}, {d}] "
                                 f"(tokens, width); got {tuple(inputs.shape)}")
        else:
            if inputs.ndim != 5 or inputs.shape[2] != 3:
                raise ValueError("reference images must be [subjects, images, 3, H, W]; got "
                                 f"{tuple(inputs.shape)}")
            size = self.config["image_size"]
            if inputs.shape[-2:] != (size, size):
                raise ValueError(f"reference images must be {size}×{size}; got {tuple(inputs.shape[-2:])}")
        s, n = inputs.shape[:2]
        tokens = self.encoder(inputs.reshape(s * n, *inputs.shape[2:]).float())
        return tokens.reshape(s, n * tokens.shape[1], tokens.shape[2])

    def subject_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """[S, n, 3, H, W] → [S, width]: the maximum over all reference tokens (the object is a small part of each
        image: a mean would mostly describe the background) through a small projection head — used to pretrain the
        encoder contrastively; not part of the factor path."""
        return self._pooled(self.encode(images))

    def basis_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reference tokens [S, n·T, width] → the basis decoder's mixing weights [S, K] (softmax of a linear map of
        the unit-length subject embedding)."""
        return torch.softmax(self.coefficients(F.normalize(self._pooled(tokens), dim=1)).float(), dim=1)

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reference tokens [S, n·T, width] → the subject embedding [S, width] (max over tokens, projection head)."""
        return self.project(tokens.amax(dim=1))

    def forward(self, inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """With `subject_query` (DESIGN), every query also gets W·z + b, z the pooled subject embedding of
        `subject_embedding` (the head the encoder was pretrained with to tell subjects apart), so the factors see
        which subject this is directly, not only through cross-attention over mostly-background tokens.

        Decoder "basis" (DESIGN, after HyperLoRA's LoRA basis): K learned up-projections per target and one learned
        down-projection A_l; the network predicts K mixing weights c = softmax(W·ẑ + b) from the unit-length
        subject embedding ẑ, and ΔW_l = (Σ_k c_k·B_{k,l})·A_l — rank r, however large K."""
        tokens = self.encode(inputs)
        if self.config["decoder"] == "basis":
            c = self.basis_weights(tokens)
            return {t.key: (torch.einsum("sk,kor->sor", c, up), down.unsqueeze(0).expand(len(c), -1, -1))
                    for t, up, down in zip(self.targets, self.ups, self.downs)}
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if self.config["subject_query"]:
            q = q + self.subject_in(self._pooled(tokens))[:, None]
        for block in self.blocks:
            q = block(q, tokens)
        q = self.norm(q)
        r, out = self.config["rank"], {}
        for i, t in enumerate(self.targets):
            a = self.heads_a[str(t.in_dim)](q[:, 2 * i]).reshape(-1, r, t.in_dim)
            b = self.heads_b[str(t.out_dim)](q[:, 2 * i + 1]).reshape(-1, t.out_dim, r)
            out[t.key] = (b, a)
        return out


class DirectLoRA(nn.Module):
    """Per-subject LoRA factors optimised directly (no hypernetwork): B [out, r] zero-initialised, A [r, in] seeded
    N(0, 1/in). Called like HyperNetwork on one subject's inputs, which it ignores, it returns {key: (B [1, out, r],
    A [1, r, in])}. train_down False keeps A fixed (a buffer), which makes ΔW = B·A unique per subject (no
    B·M, M⁻¹·A ambiguity): the form used as regression targets in weight space."""

    reads_features = False

    def __init__(self, targets: list[Target], rank: int = 4, *, train_down: bool = True, seed: int = 0):
        super().__init__()
        if rank < 1 or not targets:
            raise ValueError(f"rank must be >= 1 and there must be targets; got rank {rank}, {len(targets)} targets")
        g = torch.Generator().manual_seed(seed)
        self.keys = [t.key for t in targets]
        self.config = {"rank": rank, "image_size": 0}
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(t.out_dim, rank)) for t in targets)
        downs = [torch.randn(rank, t.in_dim, generator=g) * t.in_dim ** -0.5 for t in targets]
        if train_down:
            self.a = nn.ParameterList(nn.Parameter(d) for d in downs)
        else:
            for i, d in enumerate(downs):
                self.register_buffer(f"a{i}", d)
            self.a = None

    def downs(self) -> list[torch.Tensor]:
        return list(self.a) if self.a is not None else [getattr(self, f"a{i}") for i in range(len(self.keys))]

    def forward(self, inputs: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: (b[None], a[None]) for k, b, a in zip(self.keys, self.b, self.downs())}


def row_lora_linear(x: torch.Tensor, a: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """A Linear's LoRA term with one up-projection per batch row and a shared down-projection: x [N, ..., in],
    a [r, in], b_rows [N, out, r] → [N, ..., out] = x·(B_n·A)ᵀ per row n (ΔW is never formed). Many subjects'
    LoRAs fitted in one batched forward (rows of subject s use B_s)."""
    h = x.reshape(x.shape[0], -1, x.shape[-1]) @ a.to(x.dtype).T                 # [N, L, r]
    out = h @ b_rows.to(x.dtype).transpose(1, 2)                                # [N, L, out]
    return out.reshape(*x.shape[:-1], b_rows.shape[1])


def row_lora_conv2d(x: torch.Tensor, a: torch.Tensor, b_rows: torch.Tensor, *, stride=1, padding=0,
                    dilation=1) -> torch.Tensor:
    """A Conv2d's LoRA term, per-row up-projection, shared down-projection: x [N, in, H, W], a [r, in·k·k] (the
    [out, in·k·k] layout LoRA files use for convolutions), b_rows [N, out, r] → [N, out, H', W'] = conv(x, B_n·A)
    per row: the down-projection is a k×k convolution to r channels, the up-projection a per-row 1×1 map."""
    r, k2 = a.shape[0], a.shape[1] // x.shape[1]
    k = int(round(math.sqrt(k2)))
    if k * k * x.shape[1] != a.shape[1]:
        raise ValueError(f"row_lora_conv2d: A {tuple(a.shape)} is not [r, {x.shape[1]}·k·k] for a square kernel")
    h = F.conv2d(x, a.to(x.dtype).reshape(r, x.shape[1], k, k), None, stride, padding, dilation)
    return torch.einsum("nrhw,nor->nohw", h, b_rows.to(x.dtype))


def contrastive_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same subjects: za[i] and zb[i] describe subject i (rows are
    L2-normalised here); every other row of the batch is a negative."""
    a, b = F.normalize(za.float(), dim=1), F.normalize(zb.float(), dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def deltas(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], subject: int = 0) -> dict[str, torch.Tensor]:
    """ΔW = B·A of one subject for every target."""
    return {k: b[subject] @ a[subject] for k, (b, a) in factors.items()}


def output_penalty(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ_l ‖B_l·A_l‖²_F, averaged over subjects (the output regularisation). Computed as tr((BᵀB)(AAᵀ)) without
    forming ΔW."""
    return sum(_product_inner(b, a, b, a) for b, a in factors.values()).mean()


def _product_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """⟨B1·A1, B2·A2⟩_F per subject [S] from r×r Gram products, Σ (B1ᵀB2) ⊙ (A1·A2ᵀ), without forming ΔW."""
    b1, a1, b2, a2 = b1.float(), a1.float(), b2.float(), a2.float()
    return ((b1.transpose(1, 2) @ b2) * (a1 @ a2.transpose(1, 2))).sum(dim=(1, 2))


def delta_distance(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   target: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Relative weight-space distance per subject [S]: Σ_l ‖B̂_l·Â_l − B_l·A_l‖²_F / Σ_l ‖B_l·A_l‖²_F between predicted
    factors {key: (B̂ [S, out, r], Â [S, r, in])} and target factors of the same keys (same shapes; the ranks may
    differ), computed with r×r Gram products (ΔW is never formed): ‖X − Y‖² = ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ and
    ⟨B̂Â, BA⟩ = Σ (B̂ᵀB) ⊙ (ÂAᵀ). The loss of weight-space pretraining on directly fitted LoRAs (HyperDreamBooth
    precedent; DESIGN here)."""
    if not target:
        raise ValueError("delta_distance: no target factors (an empty layer set has no distance)")
    num = den = 0
    for key, (b, a) in target.items():
        bh, ah = factors[key]
        want = _product_inner(b, a, b, a)
        num = num + _product_inner(bh, ah, bh, ah) + want - 2 * _product_inner(bh, ah, b, a)
        den = den + want
    return num / den.clamp_min(1e-30)


def denoising_weight(sigma: torch.Tensor, kind: str, sigma_data: float = 1.0,
                     min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Weight w(σ) that turns ‖D − x0‖² into the family's training loss: ε-prediction and rectified flow
    (velocity) both give ‖D − x0‖²/σ² (DERIVED: ε − ε̂ = (D − x0)/σ; v − v̂ = (D − x0)/σ for x = (1−σ)x0 + σε);
    v-prediction gives (σ² + σ_d²)/(σ·σ_d)².

    min_snr_gamma γ > 0: Min-SNR-γ weighting (Hang et al., ICCV 2023) — the weight is capped at γ·(the weight at
    SNR = γ) from below-noise steps upward, i.e. multiplied by min(SNR, γ)/SNR with SNR = 1/σ² (σ in the model's
    VE-normalised scale; for flow, SNR = ((1−σ)/σ)²), so the nearly clean steps, whose loss is mostly noise, do
    not dominate the gradient."""
    s = sigma.float()
    s2 = s ** 2
    if kind in ("eps", "flow"):
        w = 1.0 / s2
    elif kind == "v":
        w = (s2 + sigma_data ** 2) / (s2 * sigma_data ** 2)
    else:
        raise ValueError(f"unknown prediction kind {kind!r} (eps, v, flow)")
    if min_snr_gamma > 0:
        snr = ((1 - s) / s) ** 2 if kind == "flow" else 1.0 / s2
        w = w * torch.clamp(snr, max=min_snr_gamma) / snr
    return w


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 3, H, W] → [N, 3, size, size] (area-preserving downscale, bilinear upscale), clamped to [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images.float().clamp(0, 1)
    mode = "area" if min(images.shape[-2:]) >= size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(images.float(), size=(size, size), mode=mode, **kw).clamp(0, 1)

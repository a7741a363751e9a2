"""demo/subjects.py: deterministic subjects per split, patterns in the object's frame, flat rendering equals the
world's, the pattern darkens part of the object only."""
from __future__ import annotations

import pytest
import torch

from demo import subjects as sj
from demo import world


def test_subjects_are_deterministic_and_splits_differ():
    assert sj.subject(3) == sj.subject(3)
    assert sj.subject(3, split="heldout") != sj.subject(3)
    seen = {sj.subject(i)["pattern"] for i in range(40)}
    assert seen == set(sj.PATTERNS)
    s = sj.subject(5)
    assert sj.PERIOD[0] <= s["period"] <= sj.PERIOD[1] and sj.DUTY[0] <= s["duty"] <= sj.DUTY[1]
    with pytest.raises(ValueError, match="split 'test'"):
        sj.subject(0, split="test")


def test_flat_rendering_is_the_worlds_and_patterns_only_darken_the_object():
    subj = sj.subject(0)
    labels = sj.scenes(subj, 0, 6)
    flat = sj.render(None, labels)
    torch.testing.assert_close(flat, world.render(labels))
    textured = sj.render(subj, labels)
    alpha = world._coverage([lab["objects"][0] for lab in labels], 32)[:, None]
    outside = (alpha == 0).expand_as(flat)
    assert torch.equal(textured[outside], flat[outside])            # the background is untouched
    inside = (alpha == 1).expand_as(flat)
    assert (textured[inside] <= flat[inside] + 1e-6).all()          # the pattern only darkens
    dark = (textured[inside] < flat[inside] * 0.5).float().mean()
    assert 0.1 < float(dark) < 0.9                                   # and it covers part of the object


def test_pattern_turns_with_the_object():
    subj = dict(sj.subject(0), pattern="stripes", angle=0.0, phase=0.13, duty=0.5, period=0.77)
    u = torch.linspace(-1, 1, 9)[None, :].expand(9, 9)
    v = torch.linspace(-1, 1, 9)[:, None].expand(9, 9)
    p = sj.pattern(subj, u, v)
    assert torch.equal(p, sj.pattern(subj, u, v + 0.37))            # angle 0: constant along v
    # a pattern at 90° reads at (u, v) what the 0° pattern reads at the point turned by −90°, (v, −u)
    for name in sj.PATTERNS:
        base = dict(subj, pattern=name)
        torch.testing.assert_close(sj.pattern(dict(base, angle=90.0), u, v), sj.pattern(base, v, -u))


def test_images_and_captions():
    subj = sj.subject(1, split="heldout")
    imgs, caps, labels = sj.images(subj, 4, 3, caption_variant=0)
    assert imgs.shape == (3, 3, 32, 32) and len(caps) == 3
    assert caps[0] == world.caption_for(labels[0], 0) and labels[0]["kind"] == "single"
    again, _c, _l = sj.images(subj, 5, 2, caption_variant=0)
    torch.testing.assert_close(again, imgs[1:])                      # a scene does not depend on its batch
    with pytest.raises(ValueError, match="single-object"):
        sj.render(subj, [world.scene(0, kind="pair")])

"""Sampling ops (sam3_jax/nn/ops.py): hand-worked RoIAlign cases, and every op against PyTorch.

The hand-worked cases also run through the oracle's torchvision stand-in, so the stub that the
geometry parity test trusts is itself checked against numbers derived by hand.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.nn import ops
from sam3_jax.testing.parity import max_abs_diff, t2n

TOL = 1e-5


def _ramp_case():
    """f(y, x) = 2y + 3x + 1 is bilinear-exact, so a bin's average is f at the bin centre."""
    h = w = 12
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    feat = np.stack([2 * yy + 3 * xx + 1, -yy + 0.5 * xx], -1).astype(np.float32)[None]  # (1, H, W, 2)
    x1, y1, x2, y2 = 1.3, 0.7, 9.9, 5.2
    cy = y1 + (np.arange(7) + 0.5) * (y2 - y1) / 7
    cx = x1 + (np.arange(7) + 0.5) * (x2 - x1) / 7
    want = np.stack([2 * cy[:, None] + 3 * cx[None] + 1, -cy[:, None] + 0.5 * cx[None]], -1)
    return feat, np.array([[[x1, y1, x2, y2]]], np.float32), want[None, None]


def _border_case():
    """Constant 1; x spans [-10, 4] (2 samples per bin of width 2), y spans [0, 7] (1 per bin).

    Samples below -1 weigh 0 but still count: bin 4 has samples -1.5 (out) and -0.5 (clamped to
    0, in), so it averages to 1/2; bins 0-3 are entirely out, bins 5-6 entirely in.
    """
    feat = np.ones((1, 8, 8, 1), np.float32)
    row = np.array([0, 0, 0, 0, 0.5, 1, 1], np.float32)
    want = np.broadcast_to(row[None, :, None], (7, 7, 1))[None, None]
    return feat, np.array([[[-10.0, 0.0, 4.0, 7.0]]], np.float32), want


def _tiny_box_case():
    """A 0.2-pixel box grows to 1 pixel (aligned=False): bins of 1/7 pixel, one sample each."""
    feat, _, _ = _ramp_case()
    x1, y1 = 2.0, 3.0
    cy = y1 + (np.arange(7) + 0.5) / 7
    cx = x1 + (np.arange(7) + 0.5) / 7
    want = np.stack([2 * cy[:, None] + 3 * cx[None] + 1, -cy[:, None] + 0.5 * cx[None]], -1)
    return feat, np.array([[[x1, y1, x1 + 0.2, y1 + 0.2]]], np.float32), want[None, None]


HAND_CASES = {"ramp": _ramp_case, "border": _border_case, "tiny_box": _tiny_box_case}


@pytest.mark.parametrize("case", HAND_CASES)
def test_roi_align_hand_worked(case):
    feat, boxes, want = HAND_CASES[case]()
    assert max_abs_diff(jax.jit(ops.roi_align)(feat, boxes), want) < TOL


def _torch_roi_align(torch, feat, boxes, **kw):
    import torchvision

    out = torchvision.ops.roi_align(torch.tensor(feat.transpose(0, 3, 1, 2)), list(torch.tensor(boxes)), 7, **kw)
    return t2n(out).reshape(boxes.shape[0], boxes.shape[1], -1, 7, 7).transpose(0, 1, 3, 4, 2)


@pytest.mark.parity
@pytest.mark.parametrize("case", HAND_CASES)
def test_oracle_roi_align_hand_worked(ref, case):
    feat, boxes, want = HAND_CASES[case]()
    assert max_abs_diff(_torch_roi_align(ref.torch, feat, boxes), want) < TOL


def _random_boxes(rng, b, n, h, w):
    """Boxes of every kind the adaptive grid meets: tiny, inside, partly or entirely outside, and
    up to twice the map (still exact with the default static grid)."""
    x1 = rng.uniform(-0.3 * w, w, (b, n))
    y1 = rng.uniform(-0.3 * h, h, (b, n))
    bw = rng.uniform(0.1, 2.0 * w, (b, n)) * rng.choice([0.05, 0.5, 1.0], (b, n))
    bh = rng.uniform(0.1, 2.0 * h, (b, n)) * rng.choice([0.05, 0.5, 1.0], (b, n))
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1)
    # Twice the map. Not centred: a sample exactly on the map's edge (y == H) is a knife edge where
    # the stub's float64 coordinates and torchvision's (and our) float32 ones can disagree.
    boxes[0, 0] = [-0.43 * w, -0.52 * h, 1.57 * w, 1.48 * h]
    boxes[0, 1] = [w + 2, 1, w + 5, 3]  # entirely outside
    return boxes.astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("kw", [{}, {"aligned": True}, {"sampling_ratio": 2}])
def test_roi_align_matches_torchvision(ref, kw):
    rng = np.random.default_rng(0)
    h, w = 9, 11
    feat = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    boxes = _random_boxes(rng, 2, 6, h, w)
    want = _torch_roi_align(ref.torch, feat, boxes, **kw)
    got = jax.jit(lambda f, bx: ops.roi_align(f, bx, **kw))(feat, boxes)
    assert max_abs_diff(got, want) < TOL


@pytest.mark.parity
def test_roi_align_gradient_matches_torch(ref):
    import torchvision

    torch = ref.torch
    rng = np.random.default_rng(1)
    feat = rng.normal(size=(1, 6, 7, 2)).astype(np.float32)
    boxes = _random_boxes(rng, 1, 2, 6, 7)
    cot = rng.normal(size=(1, 2, 7, 7, 2)).astype(np.float32)
    t_feat = torch.tensor(feat.transpose(0, 3, 1, 2), requires_grad=True)
    out = torchvision.ops.roi_align(t_feat, list(torch.tensor(boxes)), 7)
    out.backward(torch.tensor(cot[0].transpose(0, 3, 1, 2)))
    got = jax.jit(jax.grad(lambda f: jnp.sum(ops.roi_align(f, jnp.asarray(boxes)) * cot)))(feat)
    assert max_abs_diff(got, t2n(t_feat.grad).transpose(0, 2, 3, 1)) < TOL


@pytest.mark.parity
def test_grid_sample_matches_torch(ref):
    torch = ref.torch
    rng = np.random.default_rng(2)
    feat = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
    grid = rng.uniform(-1.3, 1.3, (2, 9, 2)).astype(np.float32)
    grid[0, :4] = [[-1, -1], [1, 1], [0, 0], [1.2, -1.1]]  # corners, centre, outside
    want = torch.nn.functional.grid_sample(torch.tensor(feat.transpose(0, 3, 1, 2)), torch.tensor(grid[:, :, None]),
                                           mode="bilinear", padding_mode="zeros", align_corners=False)
    got = jax.jit(ops.grid_sample)(feat, grid)
    assert max_abs_diff(got, t2n(want)[..., 0].transpose(0, 2, 1)) < TOL


@pytest.mark.parity
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("src,dst", [((8, 8), (32, 32)), ((7, 9), (20, 13)), ((32, 32), (8, 8)),
                                     ((30, 45), (7, 11)), ((16, 16), (12, 12)), ((100, 60), (33, 71))])
def test_resize_bilinear_matches_torch(ref, src, dst, antialias):
    torch = ref.torch
    x = np.random.default_rng(3).normal(size=(2, *src, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear",
                                           align_corners=False, antialias=antialias)
    got = ops.resize_bilinear(jnp.asarray(x), dst, antialias=antialias)
    assert max_abs_diff(got, t2n(want).transpose(0, 2, 3, 1)) < TOL


@pytest.mark.parity
@pytest.mark.parametrize("size", [(6, 10), (7, 9), (2, 3)])
def test_resize_nearest_matches_torch(ref, size):
    torch = ref.torch
    x = np.random.default_rng(4).normal(size=(2, 3, 5, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size=size, mode="nearest")
    assert max_abs_diff(ops.resize_nearest(jnp.asarray(x), size), t2n(want).transpose(0, 2, 3, 1)) == 0.0

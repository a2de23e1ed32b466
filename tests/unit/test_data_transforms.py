"""Geometry and colour augmentation: masks, boxes and pixels move together."""
import cv2
import numpy as np
import pytest
from PIL import Image

from sam3_jax.data import transforms
from sam3_jax.data.sources.base import FrameAnnotation


class Masks(FrameAnnotation):
    """Masks given as an array: exercises the generic bit-plane packing."""

    def __init__(self, masks):
        self.array, self.path, self.size = masks, "<test>", masks.shape[1:]

    def visible_ids(self):
        return [i for i, m in enumerate(self.array) if m.any()]

    def masks(self, ids):
        return self.array[list(ids)]


def test_bit_planes_round_trip_more_than_eight_objects():
    rng = np.random.default_rng(0)
    masks = rng.random((11, 5, 7)) < 0.4
    planes = Masks(masks).bit_planes(range(11))
    assert planes.shape == (2, 5, 7) and planes.dtype == np.uint8
    out = np.zeros_like(masks)
    transforms.masks_from_planes(planes, out)
    np.testing.assert_array_equal(out, masks)


def test_boxes_from_masks_cover_whole_pixels():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 1:7] = True  # rows 2..3, cols 1..6
    boxes, valid = transforms.boxes_from_masks(masks)
    np.testing.assert_allclose(boxes[0], [4 / 8, 3 / 8, 6 / 8, 2 / 8])
    assert valid.tolist() == [True, False] and (boxes[1] == 0).all()


def warp(img, matrix, size):
    out = np.full((size, size, 3), 7, np.uint8)  # every pixel must be written
    assert transforms.warp_image(img, matrix, out, (0, 0, 0)) is out
    return out


def warp_all(img, masks, matrix, size):
    frame = warp(img, matrix, size)
    planes = transforms.warp_planes(Masks(masks).bit_planes(range(len(masks))), matrix, size)
    out = np.zeros((len(masks), size, size), bool)
    transforms.masks_from_planes(planes, out)
    return frame, out


def scene(h=48, w=64):
    """A black image with a red and a green rectangle, and their masks."""
    img = np.zeros((h, w, 3), np.uint8)
    masks = np.zeros((2, h, w), bool)
    masks[0, 5:20, 4:30] = True
    masks[1, 25:45, 40:60] = True
    img[masks[0]] = (255, 0, 0)
    img[masks[1]] = (0, 255, 0)
    return Image.fromarray(img), masks


def test_resize_to_square_and_hflip_mirror_masks_and_boxes():
    img, masks = scene()
    plain = transforms.resize_matrix(64, 48)
    flipped = transforms.resize_matrix(64, 48, hflip=True)
    frame, m = warp_all(img, masks, plain, 32)
    frame_f, m_f = warp_all(img, masks, flipped, 32)
    np.testing.assert_array_equal(m_f, m[:, :, ::-1])
    np.testing.assert_array_equal(frame_f, frame[:, ::-1])
    boxes, _ = transforms.boxes_from_masks(m)
    boxes_f, _ = transforms.boxes_from_masks(m_f)
    np.testing.assert_allclose(boxes_f[:, 0], 1 - boxes[:, 0], atol=1e-6)
    np.testing.assert_allclose(boxes_f[:, 1:], boxes[:, 1:], atol=1e-6)
    # Square resize of a 64x48 frame: x scales by 1/2, y by 2/3.
    np.testing.assert_allclose(boxes[0], [(4 + 30) / 2 / 64, (5 + 20) / 2 / 48, 26 / 64, 15 / 48],
                               atol=1 / 32)


@pytest.mark.parametrize("seed", range(4))
def test_random_affine_moves_pixels_with_their_masks(seed):
    cfg = type("Aug", (), dict(hflip_prob=0.5, degrees=30.0, shear=20.0, scale_min=0.8,
                               scale_max=1.2))
    img, masks = scene()
    m = transforms.sample_geometry(cfg, 64, 48, np.random.default_rng(seed), with_affine=True)
    frame, warped = warp_all(img, masks, m, 96)
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        inside = frame[warped[k]]
        assert warped[k].any()
        # Bilinear edges blend colours; the bulk of each mask shows its object's colour.
        assert (np.abs(inside.astype(int) - colour).max(-1) < 60).mean() > 0.9


def test_identity_and_mirror_keep_every_pixel():
    img, _ = scene(32, 32)
    out = warp(img, transforms.resize_matrix(32, 32), 32)
    np.testing.assert_array_equal(out, np.asarray(img))
    out = warp(img, transforms.resize_matrix(32, 32, True), 32)
    np.testing.assert_array_equal(out, np.asarray(img)[:, ::-1])


def test_large_downscale_is_antialiased():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # aliases to black or white without a low-pass
    out = warp(Image.fromarray(stripes), transforms.resize_matrix(64, 64), 8)
    assert np.abs(out.astype(int)[:, 1:-1] - 128).max() <= 2


def test_fractional_downscale_is_low_passed_along_its_axis_only():
    """A 72 x 40 frame to 40 x 40 shrinks x by 1.8 and keeps y: the Gaussian must act along x
    (vertical stripes lose contrast against a plain bilinear warp, about as much as in PIL's
    antialiased resize) and leave y alone (horizontal stripes, constant along x, come out
    unchanged)."""
    w, size, s = 72, 40, 40 / 72
    vertical = np.zeros((size, w, 3), np.uint8)
    vertical[:, 1::4] = vertical[:, 2::4] = 255  # period 4 px: 2.2 px after scaling
    plain = cv2.warpAffine(vertical, np.array([[s, 0, (s - 1) / 2], [0, 1.0, 0]]), (size, size),
                           flags=cv2.INTER_LINEAR)  # pixel centres: x' + 1/2 = s (x + 1/2)
    out = warp(Image.fromarray(vertical), transforms.resize_matrix(w, size), size)
    pil = np.asarray(Image.fromarray(vertical).resize((size, size), Image.Resampling.BILINEAR))
    contrast = out.astype(int).std()
    assert contrast < 0.75 * plain.astype(int).std()
    assert abs(contrast - pil.astype(int).std()) < 0.15 * contrast
    horizontal = np.ascontiguousarray(vertical[:, :size].transpose(1, 0, 2)[:, :1].repeat(w, 1))
    out = warp(Image.fromarray(horizontal), transforms.resize_matrix(w, size), size)
    np.testing.assert_array_equal(out, horizontal[:, :size])


def test_colour_matrix_matches_the_per_op_formulas():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (100, 3))
    mean = x.mean(0)
    ops = [("brightness", 1.1), ("contrast", 0.9), ("saturation", 1.2), ("grayscale", 1.0)]
    y = x * 1.1

    def grey(v):
        return v @ transforms.LUMA

    y = 0.9 * y + 0.1 * grey(y).mean()
    y = 1.2 * y + (1 - 1.2) * grey(y)[:, None]
    y = np.repeat(grey(y)[:, None], 3, axis=1)
    m = transforms.colour_matrix(ops, mean)
    np.testing.assert_allclose(np.c_[x, np.ones(100)] @ m[:3].T, y, rtol=1e-9)


def test_apply_colour_in_place_rounds_and_clips_once():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 48, 3), np.uint8)
    ops = [("contrast", 0.7), ("brightness", 1.6), ("saturation", 0.5)]
    mean = frame[::16, ::16].reshape(-1, 3).mean(0)  # the grid apply_colour estimates it on
    m = transforms.colour_matrix(ops, mean)[:3]
    want = np.clip(np.rint(np.c_[frame.reshape(-1, 3), np.ones(40 * 48)] @ m.T), 0, 255)
    out = frame.copy()
    assert transforms.apply_colour(out, ops) is None
    assert np.abs(out.reshape(-1, 3).astype(int) - want).max() <= 1  # float32 rounding
    assert (out == 255).any()  # brightness 1.6 saturates some pixels: clipped, not wrapped
    same = frame.copy()
    transforms.apply_colour(same, [])
    np.testing.assert_array_equal(same, frame)


@pytest.mark.parametrize("mode", ["L", "P", "RGB", "RGBA", "LA", "1", "I;16", "F", "I"])
@pytest.mark.parametrize("size", [(1, 1), (37, 5), (301, 257)])  # the last is over 64 KiB
def test_pixels_equals_asarray(mode, size):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), np.uint8), "RGBA")
    img = base.convert(mode)
    out = transforms.pixels(img)
    ref = np.asarray(img)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


def test_pixels_does_not_go_through_tobytes(monkeypatch):
    """The fast path is taken on this Pillow (else it silently costs ~5 ms per frame again)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8))
    images = [rgb, rgb.convert("L"), rgb.convert("P")]
    refs = [np.asarray(x) for x in images]

    def fail(*args, **kwargs):
        raise AssertionError("tobytes called")

    monkeypatch.setattr(Image.Image, "tobytes", fail)
    for img, ref in zip(images, refs):
        np.testing.assert_array_equal(transforms.pixels(img), ref)

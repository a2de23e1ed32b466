"""The batch contract: padding example, validation errors that name the key."""
import numpy as np
import pytest

from sam3_jax.data import schema

DIMS = schema.Dims(num_frames=3, max_objects=2, max_phrases=2, image_size=8, mask_size=16)


def batched(example, b=2):
    return {k: np.stack([v] * b) for k, v in example.items()}


def valid_example():
    ex = schema.empty_example(DIMS)
    ex["frame_valid"][:2] = True
    ex["frames"][:2] = 7
    mask = np.zeros((16, 16), bool)
    mask[4:12, 0:8] = True
    ex["masks"][0, 0] = schema.pack_masks(mask)
    ex["object_valid"][0, 0] = True
    ex["boxes"][0, 0] = [0.25, 0.5, 0.5, 0.5]
    ex["object_ids"][0] = 5
    ex["phrase_ids"][0] = 3
    ex["phrase_valid"][0] = True
    ex["phrase_tokens"][0, :3] = [49406, 736, 49407]
    ex["phrase_token_valid"] = ex["phrase_tokens"] != 0
    ex["query_positives"][0, 0, 0] = True
    ex["query_exhaustive"][:2, 0] = True
    return ex


def test_empty_example_has_every_field_with_its_padding():
    ex = schema.empty_example(DIMS)
    assert list(ex) == list(schema.FIELDS)
    assert ex["masks"].shape == (3, 2, 16, 2) and ex["masks"].dtype == np.uint8
    assert ex["frames"].shape == (3, 8, 8, 3) and ex["frames"].dtype == np.uint8
    assert ex["phrase_tokens"].shape == (2, 32)
    assert (ex["object_ids"] == -1).all() and (ex["phrase_ids"] == -1).all()
    schema.validate(ex, DIMS, batched=False)
    schema.validate(batched(ex), DIMS)


def test_valid_example_passes():
    schema.validate(batched(valid_example()), DIMS)


@pytest.mark.parametrize("key, corrupt, message", [
    ("masks", lambda b: b.pop("masks"), "missing"),
    ("boxes", lambda b: b.update(boxes=b["boxes"].astype(np.float64)), "dtype"),
    ("frames", lambda b: b.update(frames=b["frames"][:, :2]), "shape"),
    ("object_valid", lambda b: b["object_valid"].__setitem__((0, 1, 1), True), "mask non-empty"),
    ("boxes", lambda b: b["boxes"].__setitem__((0, 2, 1), 0.5), "invalid"),
    ("phrase_valid", lambda b: b["phrase_valid"].__setitem__((0, 1), True), "id >= 0"),
    ("query_positives", lambda b: b["query_positives"].__setitem__((0, 1, 0, 0), True),
     "valid objects"),
    ("query_exhaustive", lambda b: b["query_exhaustive"].__setitem__((0, 2, 0), True),
     "valid queries"),
    ("frames", lambda b: b["frames"].__setitem__((0, 2), 1), "padding frames"),
])
def test_validate_names_the_broken_key(key, corrupt, message):
    b = batched(valid_example())
    corrupt(b)
    with pytest.raises(ValueError, match=key) as e:
        schema.validate(b, DIMS)
    assert message in str(e.value)


def test_validate_rejects_inconsistent_batch_axis():
    b = batched(valid_example())
    b["skipped"] = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="skipped"):
        schema.validate(b, DIMS)


def test_masks_pack_eight_pixels_a_byte_and_unpack_with_numpy_or_jax():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    masks = rng.random((2, 3, 16, 16)) < 0.3
    packed = schema.pack_masks(masks)
    assert packed.shape == (2, 3, 16, 2) and packed.dtype == np.uint8
    assert packed[0, 0, 0, 0] == int("".join(str(int(v)) for v in masks[0, 0, 0, :8]), 2)
    np.testing.assert_array_equal(schema.unpack_masks(packed), masks)
    np.testing.assert_array_equal(np.asarray(schema.unpack_masks(jnp.asarray(packed), jnp)), masks)


def test_mask_size_must_pack_into_whole_bytes():
    with pytest.raises(ValueError, match="mask_size=20"):
        schema.Dims(num_frames=1, max_objects=1, max_phrases=1, image_size=8, mask_size=20)

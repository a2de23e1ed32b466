"""The image predictor: several prompts on several images in one forward answer as one at a time."""
import jax
import numpy as np
import pytest

from sam3_jax.infer.image_predictor import ImagePredictor, Prompt
from sam3_jax.model import detector, stacking
from sam3_jax.model.config import ModelConfig


@pytest.fixture(scope="module")
def predictor():
    """The tiny model with random weights drawn on the host (compiling its init would cost more than the
    test), layer by layer in the torch layout, then stacked as the model holds them."""
    cfg = ModelConfig.tiny()
    rng = np.random.default_rng(0)
    abstract = detector.abstract_params(cfg)
    params = stacking.stacked_like(jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype),
                                                stacking.unrolled_shapes(abstract)), abstract)
    return ImagePredictor(cfg, params, max_boxes=4)


def test_batched_prompts_equal_one_at_a_time(predictor):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((50, 70, 3), (112, 112, 3), (31, 20, 3))]
    prompts = [Prompt("red circle", image=1),
               Prompt("red circle", boxes=[[0.5, 0.5, 0.2, 0.3]], image=0),  # text + a positive exemplar
               Prompt("", boxes=[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]], box_labels=[1, 0], image=0),
               Prompt("square", image=2), Prompt("blue square", boxes=[[0.4, 0.4, 0.5, 0.5]], box_labels=[0], image=1)]
    batched = predictor.predict_batch(images, prompts, threshold=0.2)
    assert len(batched) == len(prompts) and any(len(pred.scores) for pred in batched)
    for prompt, got in zip(prompts, batched):
        want = predictor.predict(images[prompt.image], prompt.text, prompt.boxes, prompt.box_labels, threshold=0.2)
        for name in ("pred_logits", "pred_boxes", "presence_logit", "pred_masks"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(got.scores > 0, want.scores > 0)  # the same instances kept ...
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-4, atol=1e-3)
        assert got.masks.shape == want.masks.shape == (len(want.scores),) + images[prompt.image].shape[:2]
        assert np.mean(got.masks != want.masks) < 1e-3  # ... up to pixels whose logit is ~0
    # Negative exemplars change the answer; a prompt's answer does not depend on the others in the call.
    assert not np.allclose(batched[1].pred_logits, predictor.predict(images[0], "red circle", [[0.5, 0.5, 0.2, 0.3]],
                                                                        [0], threshold=0.2).pred_logits)


def test_batched_prompt_errors_name_the_prompt(predictor):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="prompt 1: image 2 is not among the 1 images"):
        predictor.predict_batch([image], [Prompt("cat"), Prompt("dog", image=2)])
    with pytest.raises(ValueError, match="prompt 0: give a text prompt, a box prompt, or both"):
        predictor.predict_batch([image], [Prompt(""), Prompt("dog")])
    with pytest.raises(ValueError, match="prompt 1: 1 boxes but 2 box labels"):
        predictor.predict_batch([image], [Prompt("cat"), Prompt("dog", [[0.5, 0.5, 0.1, 0.1]], [1, 0])])
    with pytest.raises(ValueError, match="at least one image and one prompt"):
        predictor.predict_batch([], [Prompt("cat")])

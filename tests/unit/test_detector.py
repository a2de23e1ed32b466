"""The assembled detector in training mode: DAC outputs, aux outputs, dropout, gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.model import detector
from sam3_jax.model.config import ModelConfig


def test_training_forward_has_reference_outputs_and_gradients():
    cfg = ModelConfig.tiny()
    model = detector.Sam3Detector(cfg)
    params = detector.init_params(cfg, jax.random.key(0))
    images, ids, boxes, box_mask, labels = detector.example_inputs(cfg, batch=2, num_boxes=2)
    images = jax.random.uniform(jax.random.key(1), images.shape, minval=-1, maxval=1)
    ids = ids.at[:, :3].set(jnp.array([49406, 320, 49407]))
    q, layers = cfg.decoder.num_queries, cfg.decoder.num_layers

    def loss(p, rng):
        out = model.apply({"params": p}, images, ids, boxes, box_mask, labels, train=True, deterministic=False,
                          rngs={"dropout": rng})
        return jnp.mean(out["pred_logits"]) + jnp.mean(out["pred_boxes_o2m"]) + jnp.mean(out["pred_masks"]), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, jax.random.key(2))
    assert out["pred_logits"].shape == (2, q, 1) and out["pred_logits_o2m"].shape == (2, q, 1)
    assert out["pred_masks"].shape[:2] == (2, q) and out["pred_masks_o2m"].shape[:2] == (2, q)
    assert len(out["aux_outputs"]) == layers - 1
    assert out["aux_outputs"][0]["presence_logit_dec"].shape == (2, 1)
    assert np.isfinite(float(value))
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    assert all(np.isfinite(v) for v in jax.tree.leaves(norms))
    # The box head and the text encoder both receive gradient.
    assert norms["transformer"]["decoder"]["bbox_embed"]["layers_2"]["kernel"] > 0
    assert norms["backbone"]["language_backbone"]["resizer"]["kernel"] > 0

    # Dropout makes two training passes differ; eval passes are deterministic.
    _, out2 = jax.jit(loss)(params, jax.random.key(3))
    assert not np.allclose(out["pred_logits"], out2["pred_logits"])
    evals = [model.apply({"params": params}, images, ids, boxes, box_mask, labels) for _ in range(2)]
    np.testing.assert_array_equal(evals[0]["pred_logits"], evals[1]["pred_logits"])
    assert "aux_outputs" not in evals[0] and "pred_logits_o2m" not in evals[0]

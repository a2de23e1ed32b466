"""The on-device Hungarian solver against scipy, and the matchers' contracts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from sam3_jax.nn.boxes import box_cxcywh_to_xyxy, box_iou
from sam3_jax.train import matcher

solve = jax.jit(jax.vmap(matcher.linear_sum_assignment))


def random_costs(rng, count, n, m):
    """A third continuous, a third from {0, 1, 2} (many ties), a third uniform on a coarse grid."""
    third = count // 3
    costs = rng.normal(size=(count, n, m))
    costs[:third] = rng.integers(0, 3, size=(third, n, m))
    costs[third:2 * third] = np.round(rng.uniform(0, 1, size=(third, n, m)), 1) * 10
    valid = rng.uniform(size=(count, n)) < rng.uniform(0.2, 1.0, size=(count, 1))
    valid[0], valid[1] = False, True  # no valid row; every row valid
    return costs.astype(np.float32), valid


@pytest.mark.parametrize("n,m,count", [(7, 7, 150), (8, 20, 150), (5, 200, 60), (24, 40, 60)])
def test_assignment_is_optimal(n, m, count):
    rng = np.random.default_rng(n * 1000 + m)
    costs, valid = random_costs(rng, count, n, m)
    got = np.asarray(solve(costs, valid))
    for c, v, cols in zip(costs.astype(np.float64), valid, got):
        assert (cols[~v] == -1).all()
        picked = cols[v]
        assert (picked >= 0).all() and len(set(picked.tolist())) == len(picked)
        rows, best = scipy_lsa(c[v])
        np.testing.assert_allclose(c[v][np.arange(v.sum()), picked].sum(), c[v][rows, best].sum(),
                                   rtol=1e-6, atol=1e-5)


def test_non_finite_costs_still_give_an_assignment():
    rng = np.random.default_rng(0)
    costs = rng.normal(size=(6, 9)).astype(np.float32)
    costs[1, :4] = np.nan
    costs[2] = np.inf
    costs[3, 5] = -np.inf
    cols = np.asarray(jax.jit(matcher.linear_sum_assignment)(costs))
    assert (cols >= 0).all() and len(set(cols.tolist())) == 6


def test_rows_must_not_outnumber_columns():
    with pytest.raises(ValueError):
        matcher.linear_sum_assignment(jnp.zeros((3, 2)))


def boxes(rng, shape):
    return np.concatenate([rng.uniform(0.3, 0.7, shape + (2,)), rng.uniform(0.05, 0.3, shape + (2,))],
                          -1).astype(np.float32)


def test_hungarian_match_batched():
    """Under jit + vmap over queries: each valid target gets exactly one prediction, padding none."""
    rng = np.random.default_rng(1)
    b, q, n = 5, 10, 4
    valid = np.arange(n)[None] < np.array([0, 1, 4, 2, 3])[:, None]
    valid[4] = [True, False, True, True]  # padding between targets
    match = jax.jit(jax.vmap(matcher.hungarian_match))
    tgt_of_pred = np.asarray(match(rng.normal(size=(b, q, 1)), boxes(rng, (b, q)), boxes(rng, (b, n)), valid))
    for t, v in zip(tgt_of_pred, valid):
        matched = t[t >= 0]
        assert sorted(matched.tolist()) == np.nonzero(v)[0].tolist()


def test_hungarian_match_prefers_the_obvious_prediction():
    """A prediction sitting on a target, confident, wins it; the total cost is scipy's optimum."""
    rng = np.random.default_rng(2)
    tgt = boxes(rng, (3,))
    pred = boxes(rng, (9,))
    pred[[7, 2, 4]] = tgt
    logits = np.full((9, 1), -2.0, np.float32)
    logits[[7, 2, 4]] = 3.0
    t = np.asarray(jax.jit(matcher.hungarian_match)(logits, pred, tgt, np.ones(3, bool)))
    assert t[7] == 0 and t[2] == 1 and t[4] == 2 and (np.delete(t, [7, 2, 4]) == -1).all()


def test_one_to_many_rule():
    """At most top-k queries per target, all above the threshold; padding targets never match."""
    rng = np.random.default_rng(3)
    q, n = 40, 5
    tgt = boxes(rng, (n,))
    pred = np.clip(tgt[rng.integers(0, n, q)] + rng.normal(0, 0.02, (q, 4)), 0.01, 0.99).astype(np.float32)
    logits = rng.normal(1.0, 1.0, (q, 1)).astype(np.float32)
    valid = np.array([True, True, False, True, True])
    cfg = matcher.OneToManyMatcherConfig(topk=3)
    m = np.asarray(jax.jit(matcher.one_to_many_match, static_argnums=4)(logits, pred, tgt, valid, cfg))
    assert m.shape == (q, n) and not m[:, 2].any()
    assert (m.sum(0) <= 3).all() and m.sum() >= 8
    iou = np.asarray(box_iou(box_cxcywh_to_xyxy(pred)[:, None], box_cxcywh_to_xyxy(tgt)[None]))
    quality = 0.3 / (1 + np.exp(-logits)) + 0.7 * iou
    assert (quality[m] > 0.4).all()
    for j in np.nonzero(valid)[0]:  # matches are among the column's top k
        assert set(np.nonzero(m[:, j])[0]) <= set(np.argsort(-quality[:, j])[:3])

"""Tracker-training prompts (``sam3_jax.train.tracker_prompts``): SAM2Train's sampling recipe.

Statistics are checked on seeded vmapped draws (deterministic), with tolerances of about 4-5
binomial / sampling standard deviations. The comparisons with the reference's
``sample_box_points`` / ``sample_random_points_from_errors`` (sam3's ``sam3_tracker_utils``) need
torch and skip without it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3_jax.train.tracker_prompts import (
    PromptConfig,
    correction_point,
    initial_points,
    sample_plan,
)

CFG = PromptConfig()
T = 8


@pytest.fixture(scope="module")
def tutils():
    torch = pytest.importorskip("torch")
    from sam3_jax.testing import reference

    try:
        reference.load()
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(str(e))
    from sam3.model import sam3_tracker_utils

    return torch, sam3_tracker_utils


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def within(rate, p, n, sigmas=4.5):
    return abs(rate - p) <= sigmas * np.sqrt(p * (1 - p) / n)


PLANS = jax.jit(jax.vmap(sample_plan, in_axes=(0, None, None, None)), static_argnums=(1, 3))


def plans(n, frame_valid=None, cfg=CFG, seed=0):
    fv = jnp.ones((T,), bool) if frame_valid is None else jnp.asarray(frame_valid)
    return {k: np.asarray(v) for k, v in PLANS(keys(n, seed), T, fv, cfg).items()}


def test_plan_statistics():
    n = 4000
    p = plans(n)
    use_mask, init, corr = p["use_mask"], p["init_cond"], p["correct"]
    assert p["init_cond"].shape == (n, T) and p["from_gt"].shape == (n, T, CFG.num_correction_points)
    assert within(use_mask.mean(), 0.5, n)
    assert within(p["use_box"].mean(), 0.25, n)  # P(clicks) * P(box)
    assert not np.any(p["use_box"] & use_mask) and not np.any(p["use_box_frames"][use_mask])
    assert np.array_equal(p["use_box"], p["use_box_frames"][:, 0])
    assert not np.any(p["use_box_frames"] & ~init)
    # Initial conditioning frames: frame 0 always, 1 or 2 of them uniformly, the others uniform over 1..7.
    assert init[:, 0].all()
    n_init = init.sum(1)
    assert set(np.unique(n_init)) == {1, 2} and within((n_init == 1).mean(), 0.5, n)
    extra = init[n_init == 2][:, 1:].argmax(1)
    counts = np.bincount(extra, minlength=T - 1)
    assert chi2(counts) < 24.3  # 6 dof, p = 0.0005
    # Frames to correct: none with mask input; with clicks a superset of the init frames, 2 frames in
    # total when 2 init frames, else 1 or 2 uniformly.
    assert not corr[use_mask].any()
    clicks = ~use_mask
    assert np.all(corr[clicks] | ~init[clicks])
    n_corr = corr[clicks].sum(1)
    two = n_init[clicks] == 2
    assert np.all(n_corr[two] == 2)
    assert set(np.unique(n_corr[~two])) == {1, 2} and within((n_corr[~two] == 1).mean(), 0.5, (~two).sum())
    # Box on the second init frame: an independent draw.
    second = clicks & (n_init == 2)
    box2 = p["use_box_frames"][second][:, 1:].any(1)
    assert within(box2.mean(), 0.5, second.sum())
    assert within(p["from_gt"].mean(), CFG.prob_to_sample_from_gt, p["from_gt"].size)


def chi2(counts):
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_plan_fixed_counts_and_frame_valid():
    cfg = PromptConfig(prob_to_use_pt_input=1.0, num_init_cond_frames=3, rand_init_cond_frames=False,
                       num_frames_to_correct=4, rand_frames_to_correct=False)
    fv = np.array([True, False, True, True, False, True, True, False])
    p = plans(2000, fv, cfg)
    assert np.all(p["init_cond"].sum(1) == 3) and np.all(p["correct"].sum(1) == 4)
    assert not np.any(p["init_cond"][:, ~fv]) and not np.any(p["correct"][:, ~fv])
    assert np.all(p["correct"] | ~p["init_cond"])
    # Padding frames never picked with the default recipe either; too few valid frames: capped.
    fv2 = np.array([True, False, False, True] + [False] * 4)
    p = plans(1000, fv2, cfg)
    assert np.all(p["init_cond"].sum(1) == 2) and np.all(p["correct"].sum(1) == 2)
    assert np.all(p["init_cond"][:, [0, 3]]) and not np.any(p["correct"][:, ~fv2])
    p = plans(1000, fv)
    assert not np.any(p["init_cond"][:, ~fv]) and not np.any(p["correct"][:, ~fv])


def test_plan_single_frame_is_an_image():
    """Only frame 0 valid (or T = 1): clicks forced, one init frame, frame 0 corrected (num_frames == 1)."""
    p = plans(500, np.eye(T, dtype=bool)[0])
    assert not p["use_mask"].any()
    assert np.array_equal(p["init_cond"], np.broadcast_to(np.eye(T, dtype=bool)[0], (500, T)))
    assert np.array_equal(p["correct"], p["init_cond"])
    one = jax.jit(lambda k: sample_plan(k, 1, None, CFG))(jax.random.key(3))
    assert bool(one["init_cond"][0]) and bool(one["correct"][0]) and not bool(one["use_mask"])


def region_masks(h=16, w=16):
    gt = np.zeros((h, w), bool)
    gt[3:9, 4:12] = True
    pred = np.zeros((h, w), bool)
    pred[5:12, 8:14] = True
    return gt, pred


def test_correction_clicks_land_in_their_region():
    gt, pred = region_masks()
    n = 3000
    f = jax.jit(jax.vmap(lambda k: correction_point(k, gt, pred, 16, PromptConfig(prob_to_sample_from_gt=0.0))))
    xy, lab = map(np.asarray, f(keys(n, 1)))
    col, row = xy[:, 0].astype(int), xy[:, 1].astype(int)
    assert np.array_equal(xy, np.round(xy))  # integer pixel indices at s = 1 (the reference's)
    fn, fp = gt & ~pred, pred & ~gt
    assert np.all(fn[row[lab == 1], col[lab == 1]]) and np.all(fp[row[lab == 0], col[lab == 0]])
    assert set(np.unique(lab)) == {0, 1}
    assert within((lab == 1).mean(), fn.sum() / (fn.sum() + fp.sum()), n)


def test_correction_click_is_uniform():
    gt = np.zeros((8, 8), bool)
    pred = np.zeros((8, 8), bool)
    gt[1, 1:5] = True  # 4 false-negative pixels
    pred[6, 2:4] = True  # 2 false-positive pixels
    n = 6000
    f = jax.jit(jax.vmap(lambda k: correction_point(k, gt, pred, 8, CFG, sample_from_gt=False)))
    xy, lab = map(np.asarray, f(keys(n, 2)))
    pix = xy[:, 1].astype(int) * 8 + xy[:, 0].astype(int)
    region = np.flatnonzero((gt ^ pred).ravel())
    assert np.isin(pix, region).all()
    counts = np.array([(pix == r).sum() for r in region])
    assert chi2(counts) < 20.5  # 5 dof, p = 0.001
    assert np.array_equal(lab == 1, np.isin(pix, np.flatnonzero(gt.ravel())))


def test_sample_from_gt():
    """A perfect prediction: without the GT draw, a negative click on the background; with it (rate
    0.1), a positive click on the GT."""
    gt, _ = region_masks()
    n = 4000
    f = jax.jit(jax.vmap(lambda k: correction_point(k, gt, gt, 16, CFG)))
    xy, lab = map(np.asarray, f(keys(n, 3)))
    on_gt = gt[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert np.array_equal(on_gt, lab == 1)
    assert within(lab.mean(), CFG.prob_to_sample_from_gt, n)
    xy, lab = correction_point(jax.random.key(0), gt, gt, 16, CFG, sample_from_gt=True)
    assert int(lab) == 1 and gt[int(xy[1]), int(xy[0])]


@pytest.mark.parity
def test_all_correct_and_edge_cases_match_reference(tutils):
    torch, tu = tutils
    gt, _ = region_masks()
    torch.manual_seed(0)
    n = 500
    g = torch.tensor(gt)[None, None].expand(n, 1, 16, 16).contiguous()
    pts, labels = tu.sample_random_points_from_errors(g, g.clone())
    f = jax.vmap(lambda k: correction_point(k, gt, gt, 16, CFG, sample_from_gt=False))
    xy, lab = map(np.asarray, f(keys(n, 4)))
    # All correct: the reference and we both click negatively on the background, nowhere else.
    for p, l in ((pts[:, 0].numpy(), labels[:, 0].numpy()), (xy, lab)):
        assert np.all(l == 0) and not gt[p[:, 1].astype(int), p[:, 0].astype(int)].any()
    # GT and prediction both full: pixel (0, 0), label 0 for both.
    full = np.ones((16, 16), bool)
    rp, rl = tu.sample_random_points_from_errors(torch.tensor(full)[None, None], torch.tensor(full)[None, None])
    got = correction_point(jax.random.key(1), full, full, 16, CFG, sample_from_gt=False)
    assert rp[0, 0].tolist() == [0.0, 0.0] and int(rl[0, 0]) == 0
    assert np.asarray(got[0]).tolist() == [0.0, 0.0] and int(got[1]) == 0
    # Empty GT, first prompt: the reference's click is negative (anywhere), its box (0, 0), (0, 0).
    empty = np.zeros((16, 16), bool)
    rp, rl = tu.get_next_point(torch.tensor(empty)[None, None], None, "uniform")
    coords, labs, valid = initial_points(jax.random.key(2), empty, False, 16, CFG)
    assert int(rl[0, 0]) == 0 and int(labs[0]) == 0 and np.asarray(valid).tolist() == [True, False]
    rb, rbl = tu.sample_box_points(torch.tensor(empty)[None, None])
    coords, labs, valid = initial_points(jax.random.key(2), empty, True, 16, CFG)
    assert rb.tolist() == [[[0.0, 0.0], [0.0, 0.0]]] and np.asarray(coords).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert np.asarray(labs).tolist() == rbl[0].tolist() == [2, 3] and np.asarray(valid).all()


def test_initial_click():
    gt, _ = region_masks()
    n = 1000
    f = jax.jit(jax.vmap(lambda k: initial_points(k, gt, False, 16, CFG)))
    coords, labels, valid = map(np.asarray, f(keys(n, 5)))
    assert np.all(labels[:, 0] == 1) and np.all(labels[:, 1] == -1)
    assert np.all(valid[:, 0]) and not np.any(valid[:, 1])
    assert gt[coords[:, 0, 1].astype(int), coords[:, 0, 0].astype(int)].all()
    # GT at half the input resolution: pixel (col 5, row 3) -> centre (5.5, 3.5) * 2 - 0.5.
    one = np.zeros((16, 16), bool)
    one[3, 5] = True
    c, l, _ = initial_points(jax.random.key(0), one, False, 32, CFG)
    assert np.asarray(c[0]).tolist() == [10.5, 6.5] and int(l[0]) == 1
    c, l = correction_point(jax.random.key(0), one, np.zeros_like(one), 32, CFG, sample_from_gt=False)
    assert np.asarray(c).tolist() == [10.5, 6.5] and int(l) == 1


BOX_CFG = PromptConfig(box_noise_max_px=3.0)


def box_mask():
    """A 64 x 64 GT touching the left edge: box x 0..49 (noise min(4.9, 3) = 3 px: the bound),
    y 20..39 (noise 1.9 px)."""
    m = np.zeros((64, 64), bool)
    m[20:40, 0:50] = True
    m[25, 10] = False
    return m


def test_box_corners():
    m = box_mask()
    n = 3000
    f = jax.jit(jax.vmap(lambda k: initial_points(k, m, True, 64, BOX_CFG)))
    coords, labels, valid = map(np.asarray, f(keys(n, 6)))
    assert np.all(labels == [2, 3]) and valid.all()
    box = coords.reshape(n, 4)
    true = np.array([0, 20, 49, 39], np.float32)
    bound = np.array([3.0, 1.9, 3.0, 1.9], np.float32)
    assert np.all(np.abs(box - true) <= bound + 1e-5) and np.all(box >= 0) and np.all(box <= 63)
    assert np.all(box[:, 0] >= 0) and (box[:, 0] == 0).mean() > 0.4  # clamped at the left edge
    # Noise uniform on [-bound, bound] where not clamped.
    for i in (1, 2, 3):
        d = box[:, i] - true[i]
        assert abs(d.mean()) < 4 * bound[i] / np.sqrt(3 * n)
        assert abs(d.std() / (bound[i] / np.sqrt(3)) - 1) < 0.05


@pytest.mark.parity
def test_box_distribution_matches_reference(tutils):
    torch, tu = tutils
    m = box_mask()
    n = 3000
    torch.manual_seed(0)
    chunks = [tu.sample_box_points(torch.tensor(m)[None, None].expand(300, 1, 64, 64), noise=BOX_CFG.box_noise_std,
                                   noise_bound=BOX_CFG.box_noise_max_px) for _ in range(n // 300)]
    ref = torch.cat([c[0] for c in chunks]).reshape(n, 4).numpy()
    assert all(c[1].tolist() == [[2, 3]] * 300 for c in chunks)
    f = jax.jit(jax.vmap(lambda k: initial_points(k, m, True, 64, BOX_CFG)[0]))
    got = np.asarray(f(keys(n, 7))).reshape(n, 4)
    sd = ref.std(0)
    np.testing.assert_array_less(np.abs(got.mean(0) - ref.mean(0)), 5 * sd * np.sqrt(2 / n) + 1e-6)
    np.testing.assert_allclose(got.std(0), sd, rtol=0.06)
    np.testing.assert_allclose(got.min(0), ref.min(0), atol=0.1)
    np.testing.assert_allclose(got.max(0), ref.max(0), atol=0.1)


@pytest.mark.parity
def test_click_distribution_matches_reference(tutils):
    """Correction clicks on a small error region: per-pixel frequencies of ours and the reference's
    ``get_next_point(method="uniform")`` agree (two-sample chi-square)."""
    torch, tu = tutils
    gt = np.zeros((8, 8), bool)
    pred = np.zeros((8, 8), bool)
    gt[2, 2:5] = True
    pred[5:7, 5] = True
    n = 4000
    torch.manual_seed(1)
    rp, rl = tu.get_next_point(torch.tensor(gt)[None, None].expand(n, 1, 8, 8),
                               torch.tensor(pred)[None, None].expand(n, 1, 8, 8), "uniform")
    f = jax.vmap(lambda k: correction_point(k, gt, pred, 8, CFG, sample_from_gt=False))
    xy, lab = map(np.asarray, f(keys(n, 8)))
    ref_pix = (rp[:, 0, 1] * 8 + rp[:, 0, 0]).numpy().astype(int)
    pix = (xy[:, 1] * 8 + xy[:, 0]).astype(int)
    region = np.flatnonzero((gt ^ pred).ravel())
    a = np.array([(pix == r).sum() for r in region])
    b = np.array([(ref_pix == r).sum() for r in region])
    assert a.sum() == b.sum() == n
    stat = float((((a - b) ** 2) / (a + b)).sum())
    assert stat < 20.5  # 5 dof, p = 0.001
    positive = np.flatnonzero(gt.ravel())
    assert np.array_equal(np.isin(ref_pix, positive), rl[:, 0].numpy() == 1)
    assert np.array_equal(np.isin(pix, positive), lab == 1)


def test_jit_vmap_over_objects_and_frames():
    """As the caller uses them: a plan per clip; initial prompts vmapped over objects x frames."""
    gt, pred = region_masks()
    gts = np.stack([gt, np.zeros_like(gt), gt[::-1]])  # (O, H, W)
    masks = np.broadcast_to(gts[:, None], (3, T, 16, 16))

    @jax.jit
    def run(key):
        kp, ki, kc = jax.random.split(key, 3)
        plan = sample_plan(kp, T, jnp.ones((T,), bool), CFG)
        ik = jax.random.split(ki, (3, T))
        init = jax.vmap(jax.vmap(lambda k, g, b: initial_points(k, g, b, 32, CFG), (0, 0, 0)),
                        (0, 0, None))(ik, masks, plan["use_box_frames"])
        ck = jax.random.split(kc, 3)
        corr = jax.vmap(lambda k, g: correction_point(k, g, pred, 32, CFG, sample_from_gt=plan["from_gt"][0, 0]))(ck, gts)
        return plan, init, corr

    plan, (coords, labels, valid), (cxy, clab) = run(jax.random.key(11))
    assert plan["init_cond"].shape == (T,) and bool(plan["init_cond"][0])
    assert coords.shape == (3, T, 2, 2) and labels.shape == (3, T, 2) and valid.shape == (3, T, 2)
    assert cxy.shape == (3, 2) and clab.shape == (3,) and clab.dtype == jnp.int32
    assert coords.dtype == jnp.float32 and labels.dtype == jnp.int32 and valid.dtype == jnp.bool_
    assert np.all((np.asarray(coords) >= -0.5) & (np.asarray(coords) <= 31.5))

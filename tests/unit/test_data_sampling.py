"""Clip sampling: frame windows, the short-video rule, objects and phrases with negatives."""
import types

import numpy as np
import pytest

from sam3_jax.data import sampling
from sam3_jax.data.errors import DataError
from sam3_jax.data.sources.base import FrameAnnotation, Video


def cfg(**overrides):
    base = dict(stride_min=1, stride_max=5, reverse_prob=0.0, first_frame_objects=True,
                window_tries=5)
    return types.SimpleNamespace(**{**base, **overrides})


class Visible(FrameAnnotation):
    def __init__(self, ids):
        self.ids, self.path, self.size = sorted(ids), "<frame>", (4, 4)

    def visible_ids(self):
        return self.ids

    def masks(self, ids):
        raise AssertionError("sampling must not decode masks")


def video(frames, phrases=None, candidates=None, crowd=frozenset()):
    """frames: visible object ids per frame; phrases: object id -> phrase id."""
    return Video(name="v", frame_paths=[f"{i}.jpg" for i in range(len(frames))],
                 frame_numbers=list(range(len(frames))),
                 load_annotation=lambda p: Visible(frames[p]), object_phrases=phrases or {},
                 phrase_candidates=candidates, crowd_phrases=crowd)


@pytest.mark.parametrize("seed", range(20))
def test_positions_have_one_stride_within_bounds(seed):
    rng = np.random.default_rng(seed)
    pos = sampling.sample_positions(40, 8, 2, 4, 0.0, rng)
    steps = np.diff(pos)
    assert len(pos) == 8 and len(set(steps)) == 1 and 2 <= steps[0] <= 4
    assert 0 <= pos[0] and pos[-1] < 40


def test_stride_is_lowered_to_fit_and_reversal_flips_time():
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert sampling.sample_positions(8, 4, 5, 5, 0.0, rng) in ([0, 2, 4, 6], [1, 3, 5, 7])
    assert sampling.sample_positions(5, 5, 3, 3, 1.0, rng) == [4, 3, 2, 1, 0]


def test_short_video_gives_all_frames():
    assert sampling.sample_positions(3, 8, 1, 5, 0.0, np.random.default_rng(0)) == [0, 1, 2]


def plan(v, seed=0, n=3, p=4, vocab=10, exhaustive=True, **kw):
    return sampling.plan_clip(v, cfg(**kw), 4, n, p, vocab, exhaustive, np.random.default_rng(seed))


@pytest.mark.parametrize("seed", range(10))
def test_objects_are_visible_in_the_first_frame(seed):
    v = video([[1, 2, 3, 4, 5]] * 2 + [[6, 7]] * 10)  # late objects 6, 7
    pl = plan(v, seed, stride_min=1, stride_max=1)
    first = set(pl.annotations[0].visible_ids())
    assert set(pl.object_ids) <= first and len(pl.object_ids) == min(3, len(first))


def test_windows_without_a_visible_object_are_redrawn():
    v = video([[]] * 6 + [[1]] * 4)  # only the window starting at frame 6 begins with an object
    pl = plan(v, stride_min=1, stride_max=1, window_tries=200)
    assert pl.positions == [6, 7, 8, 9]


def test_video_without_visible_objects_is_a_data_error():
    with pytest.raises(DataError, match="no object visible"):
        plan(video([[]] * 6))
    pl = plan(video([[]] * 3 + [[9]] * 3), first_frame_objects=False)
    assert pl.object_ids == [9]


def test_phrases_positives_and_negatives():
    # objects 1, 2 are phrase 0 ("red circle"), object 3 phrase 1, object 4 phrase 2 (late).
    phrases = {1: 0, 2: 0, 3: 1, 4: 2}
    v = video([[1, 2, 3], [1, 2, 3], [1, 3, 4], [1, 3, 4]], phrases)
    pl = plan(v, n=3, p=5, vocab=6)
    assert sorted(pl.phrase_ids[:2]) == [0, 1] and len(pl.phrase_ids) == 5
    negatives = pl.phrase_ids[2:]
    assert 2 not in negatives  # present in the clip (object 4), so not a negative
    assert set(negatives) <= {3, 4, 5}
    for t, visible in enumerate([[1, 2, 3], [1, 2, 3], [1, 3, 4], [1, 3, 4]]):
        for j, p in enumerate(pl.phrase_ids):
            want = [phrases.get(o) == p and o in visible for o in pl.object_ids]
            assert pl.positives[t, j].tolist() == want
    assert pl.exhaustive.all()


def test_query_is_not_exhaustive_when_an_instance_is_left_out():
    phrases = {1: 0, 2: 0, 3: 0}
    pl = plan(video([[1, 2, 3]] * 4, phrases), n=2, p=1, vocab=1)
    assert pl.phrase_ids == [0] and not pl.exhaustive.any()
    pl = plan(video([[1, 2, 3]] * 4, phrases), n=3, p=1, vocab=1)
    assert pl.exhaustive.all()
    assert not plan(video([[1, 2, 3]] * 4, phrases), n=3, p=1, vocab=1,
                    exhaustive=False).exhaustive.any()
    assert not plan(video([[1]] * 4, {1: 0}, crowd=frozenset({0})), vocab=1).exhaustive.any()


def test_negatives_come_from_the_video_candidates_when_given():
    pl = plan(video([[1]] * 4, {1: 0}, candidates=[0, 7]), p=4, vocab=10)
    assert pl.phrase_ids == [0, 7]


def test_class_agnostic_objects_have_no_phrase():
    pl = plan(video([[1, 2]] * 4), vocab=0)
    assert pl.phrase_ids == [] and pl.positives.shape == (4, 0, 2)

"""What one detect-and-track call keeps from frame to frame, and from its forward pass to its backward
pass (the reference's tracker states and metadata), in one object per call: two calls at once on one
predictor do not share any of it."""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from sam3_jax.infer.heuristics import REMOVED_SCORE, DetectTrackConfig, Hotstart, padded_rows
from sam3_jax.infer.video_inputs import FrameSource, read_frame
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.memory_bank import MemoryBank, store


def commit_frame(bank: MemoryBank, cfg: TrackerConfig, num_cond: int, feats, ptr, eff, frame_idx, is_cond, write,
                 reset, anchor, force: bool = True) -> MemoryBank:
    """Frame ``frame_idx`` stored (``memory_bank.store``) for the rows in ``write``, as a conditioning frame
    where ``is_cond``, in a bank with ``num_cond`` conditioning slots; rows in ``reset`` (new objects) are
    emptied first."""
    return store(bank.clear(reset), cfg, frame_idx, feats, ptr, eff, anchor, force, is_cond=is_cond, write=write,
                 num_cond=num_cond)


_commit = jax.jit(commit_frame, static_argnames=("cfg", "num_cond", "force"))


@jax.jit
def _take_rows(bank, order):
    return jax.tree.map(lambda x: x[order], bank)


@dataclass
class TrackState:
    """Live objects occupy the first ``rows`` rows of the banks (ascending ids), padded to
    ``padded_rows`` of their count and at least ``cfg.capacity``; the rest are padding."""

    cfg: DetectTrackConfig
    tcfg: TrackerConfig
    num_cond: int  # conditioning slots of a bank
    slots: int  # slots of a bank
    rows: int  # padded object rows of the banks
    bank: MemoryBank
    hot: Hotstart
    seed: MemoryBank | None = None  # "both": what the backward pass will reach of the forward pass
    obj_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # live objects, ascending
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # the frame each was added on
    last_occluded: dict = field(default_factory=dict)
    first_score: dict = field(default_factory=dict)  # id -> detection prob when added
    max_id: int = -1
    size: tuple | None = None  # the frames' (H, W)
    size_frame: int = 0  # the frame it was read from

    @classmethod
    def start(cls, cfg: DetectTrackConfig, tcfg: TrackerConfig, num_cond: int, slots: int, seed: bool) -> TrackState:
        """No object yet; ``seed``: keep a second bank for a backward pass after the forward one."""
        rows = max(1, cfg.capacity)
        bank = MemoryBank.empty(tcfg, rows, slots, dtype=jnp.bfloat16)
        return cls(cfg, tcfg, num_cond, slots, rows, bank, Hotstart(cfg), bank if seed else None)

    def frame(self, frames: FrameSource | np.ndarray, index: int) -> np.ndarray:
        """Frame ``index``, checked against the size of the first frame read."""
        frame = read_frame(frames, index, self.size, f"frame {self.size_frame}")
        if self.size is None:
            self.size, self.size_frame = frame.shape[:2], index
        return frame

    def pad(self, x: np.ndarray, fill=0.0) -> np.ndarray:
        out = np.full((self.rows,) + x.shape[1:], fill, x.dtype)
        out[:len(x)] = x
        return out

    def fit(self, needed: int):
        """Pads the object rows of the banks to ``padded_rows(needed)`` (at least ``cfg.capacity``), growing or
        shrinking them: the tracker's work follows the live count, and each size compiles once. Rows past
        the live ones are padding (new objects reset theirs)."""
        rows = max(self.cfg.capacity, padded_rows(needed))
        if rows == self.rows:
            return
        extra = MemoryBank.empty(self.tcfg, max(rows - self.rows, 0), self.slots, dtype=jnp.bfloat16)

        def resize(bank):
            return jax.tree.map(lambda a, b: jnp.concatenate([a[:rows], b]), bank, extra)

        self.bank = resize(self.bank)
        self.seed = None if self.seed is None else resize(self.seed)
        self.rows = rows

    def commit(self, feats, ptr, eff, frame_idx: int, is_cond, write, reset, anchor: int):
        """Stores frame ``frame_idx`` in the bank (around the current frame), and in the seed bank where it
        is among the frames nearest the pass's first frame ``anchor``."""
        args = (feats, ptr, eff, frame_idx, is_cond, write, reset)
        self.bank = _commit(self.bank, self.tcfg, self.num_cond, *args, frame_idx, force=True)
        if self.seed is not None:
            self.seed = _commit(self.seed, self.tcfg, self.num_cond, *args, anchor, force=False)

    def add(self, new_ids: np.ndarray, scores: np.ndarray, frame_idx: int):
        """Objects ``new_ids`` (after the live ones) added on ``frame_idx`` with detection probs ``scores``."""
        self.obj_ids = np.concatenate([self.obj_ids, new_ids])
        self.group = np.concatenate([self.group, np.full(len(new_ids), frame_idx, np.int32)])
        self.max_id = int(new_ids[-1])
        for i, s in zip(new_ids, scores):
            self.first_score[int(i)] = float(s)

    def remove(self, removed: set):
        """Drops objects ``removed``: the rows of the others move up, in order."""
        stay = ~np.isin(self.obj_ids, list(removed))
        order = jnp.asarray(np.concatenate([np.flatnonzero(stay), np.flatnonzero(~stay),
                                            np.arange(len(self.obj_ids), self.rows)]))
        self.bank = _take_rows(self.bank, order)
        if self.seed is not None:
            self.seed = _take_rows(self.seed, order)
        self.obj_ids, self.group = self.obj_ids[stay], self.group[stay]
        for i in removed:
            self.first_score[i] = REMOVED_SCORE
            self.last_occluded.pop(i, None)

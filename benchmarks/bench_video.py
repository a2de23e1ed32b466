"""Video predictor throughput (frames/s) with 1, 5 and 20 objects: JAX vs the reference, same machine.

``--task=track`` (the SAM 2-style task): each object is given by a mask on frame 0, then tracked
forward through the clip; each tracked frame runs the backbone once and the tracker for all objects.
JAX: ``infer.video_predictor.VideoPredictor``; reference: ``Sam3TrackerPredictor`` as
``model_builder.build_tracker`` configures it, driven through ``init_state`` / ``add_new_mask`` /
``propagate_in_video``, under its own bf16 autocast on a GPU.

``--task=text`` (SAM 3's task): the prompt "a red ball" is detected on every frame and what was found
is tracked. JAX: ``infer.detect_track.DetectTrackPredictor.propagate_iter``; reference:
``Sam3VideoInference.propagate_in_video`` (the loop under ``Sam3VideoPredictor``'s sessions) from
frame 0, built and fed as ``tests/parity/test_detect_track_parity.py`` builds and feeds it (its CPU
shims included). With random weights
every query scores about 0.16 and the queries' masks nearly coincide, so the heuristics are set so
that frame 0 starts ``min(N, queries)`` objects and none is ever added or removed: every detection
kept (threshold 0, NMS off), ``max_num_objects=N``, hot-start off (so outputs are not delayed either),
occlusion suppression off; the rest are the video model's settings. N is then exact up to the
detector's query count (16 for the tiny model: 20 objects cannot be had there, and the printed
counts show 16). JAX tracks the live objects padded to the least 2^k or 3 * 2^k (1, 6 and 16 rows here).

Both tasks give both sides the same weights, read as a user's run reads them: random reference
weights, saved as a video ``sam3.pt`` (which the reference side loads) and converted by our converter
(which the JAX side reads: ``read_video_checkpoint``), in a process of their own. So each side's peak
memory includes loading a checkpoint, not drawing random weights, and in the text task the object
counts, which depend on the weights, agree.

Printed beside each side's frames/s: the objects it tracked (track) or output with a non-empty mask
(text) per frame, mean and max over the timed frames, so that a reader sees like is timed against like.

Frames/s counts, in a warm run, the frames after the prompt frame (1..T-1) in the track task and every
frame (0..T-1) in the text task (``first_timed``: the reference detects a frame ahead); the first run
(compiles, warm-up) and its first frame are timed separately. Frames are generated (moving shapes,
``data.synthetic.render_video``) at the model's image size, so no resizing is timed on either side;
track's object masks are discs spread over frame 0. Each side runs in its own subprocess, so peak
memory is its own.

  python benchmarks/bench_video.py [--task=track|text] [--size=official|tiny] [--objects=1,5,20] [--frames=16]

``--size`` defaults to official on a GPU, tiny on a CPU. On a GPU, JAX computes in bf16.
"""
from __future__ import annotations

import argparse
import glob
import resource
import time

import numpy as np
import sides

PROMPT = "a red ball"


def configs(size: str, dtype: str):
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.model.tracker.config import TrackerConfig

    if size == "official":
        return ModelConfig.official().replace(compute_dtype=dtype), TrackerConfig.official()
    return ModelConfig.tiny().replace(compute_dtype=dtype), TrackerConfig.tiny()


def video(image_size: int, frames: int) -> np.ndarray:
    """(T, S, S, 3) uint8 frames."""
    from sam3_jax.data.synthetic import render_video

    clip, _, _ = render_video(np.random.default_rng(0), frames, image_size)
    clip = np.stack([np.asarray(f) for f in clip])[:, :image_size, :image_size]
    return np.pad(clip, ((0, 0), (0, image_size - clip.shape[1]), (0, image_size - clip.shape[2]), (0, 0)))


def discs(image_size: int, objects: int) -> np.ndarray:
    """(objects, S, S) bool masks for frame 0."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:image_size, :image_size] / image_size
    return np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 0.004 for cy, cx in rng.uniform(0.1, 0.9, (objects, 2))])


def detect_track_config(objects: int):
    """The heuristics that give each side ``objects`` objects from frame 0 on (module docstring)."""
    from sam3_jax.infer.detect_track import DetectTrackConfig

    return DetectTrackConfig(score_threshold_detection=0.0, det_nms_thresh=0.0, hotstart_delay=0,
                             occlusion_iou_thresh=0.0, max_num_objects=objects)


def first_timed(args) -> int:
    """The first frame counted in frames/s. Text: frame 0, since the reference detects a chunk of
    frames ahead (``forward_video_grounding_multigpu``: on frame 0 it detects frames 0 and 1, then
    frame f + 1 on frame f), so from frame 1 on it would be timed for one detection fewer than ours.
    Track: frame 1, after the prompt frame."""
    return 0 if args.task == "text" else 1


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_frames(start, count, repeats: int, sync=lambda: None, first_timed: int = 1) -> dict:
    """``start()`` gives a fresh iterator over a clip's outputs; ``count(output)`` the objects in one.
    A first run (compiles, warm-up), then the best of ``repeats``, timed from frame ``first_timed`` on."""
    def run():
        stamps = [time.perf_counter()]
        counts = []
        for out in start():
            counts.append(count(out))
            stamps.append(time.perf_counter())
        sync()
        stamps[-1] = time.perf_counter()
        return stamps[1] - stamps[0], stamps[-1] - stamps[first_timed], counts[first_timed:]

    t0 = time.perf_counter()
    first_frame_s, _, _ = run()
    first_run_s = time.perf_counter() - t0
    secs, counts = min((s, c) for _, s, c in (run() for _ in range(repeats)))
    return {"fps": len(counts) / secs, "first_run_s": first_run_s, "first_frame_s": first_frame_s,
            "objects_mean": float(np.mean(counts)), "objects_max": int(max(counts))}


def jax_track(args, objects: int):
    from sam3_jax.infer.video_predictor import VideoPredictor, read_video_checkpoint

    params, model_cfg, tracker_cfg, _ = read_video_checkpoint(args.checkpoint, "the track task")
    model_cfg = model_cfg.replace(compute_dtype=args.dtype)
    pred = VideoPredictor(params, model_cfg, tracker_cfg)
    frames = video(model_cfg.image_size, args.frames)
    prompts = {i + 1: m for i, m in enumerate(discs(model_cfg.image_size, objects))}
    return lambda: pred.propagate_iter(frames, prompts), lambda r: len(r.masks)


def jax_text(args, objects: int):
    from sam3_jax.infer.detect_track import DetectTrackPredictor
    from sam3_jax.infer.video_predictor import read_video_checkpoint
    from sam3_jax.model.tokenizer import SimpleTokenizer

    params, model_cfg, tracker_cfg, vocab = read_video_checkpoint(args.checkpoint, "the text task")
    model_cfg = model_cfg.replace(joint_box_scores=True, compute_dtype=args.dtype)
    pred = DetectTrackPredictor(params, model_cfg, tracker_cfg, detect_track_config(objects),
                                SimpleTokenizer(vocab))
    frames = video(model_cfg.image_size, args.frames)
    return lambda: pred.propagate_iter(frames, PROMPT), lambda r: len(r.obj_ids)


def run_jax(args, objects: int) -> dict:
    import jax

    start, count = (jax_track if args.task == "track" else jax_text)(args, objects)
    res = time_frames(start, count, args.repeats, first_timed=first_timed(args))
    stats = jax.devices()[0].memory_stats() or {}
    return {**res, "peak_rss_gib": peak_rss_gib(), "device_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "device": str(jax.devices()[0])}


def torch_track(args, objects: int, torch, cuda: bool):
    from sam3_jax.testing import reference

    model_cfg, tracker_cfg = configs(args.size, "float32")
    image_model, base = sides.reference_models(args.checkpoint, model_cfg, tracker_cfg, torch)
    pred = reference.build_tracker_predictor(image_model, base, tracker_cfg, keep_autocast=cuda)
    if cuda:
        pred = pred.cuda()
    frames = video(model_cfg.image_size, args.frames)
    masks = discs(model_cfg.image_size, objects)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # io_utils' mean/std 0.5
    if cuda:
        images = images.cuda()
    s = model_cfg.image_size

    def start():
        state = pred.init_state(video_height=s, video_width=s, num_frames=args.frames, offload_video_to_cpu=not cuda,
                                offload_state_to_cpu=not cuda)
        state["images"] = images
        for i, m in enumerate(masks):
            pred.add_new_mask(state, 0, i + 1, torch.from_numpy(m))
        pred.propagate_in_video_preflight(state)
        return pred.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=None, reverse=False,
                                       tqdm_disable=True)

    return start, lambda out: len(out[1])


def torch_text(args, objects: int, torch, cuda: bool):
    """``Sam3VideoInference`` as the parity test's ``models`` fixture builds it and ``_run_reference``
    feeds it (frames already at the model's size: no resize), with the converted weights' ``sam3.pt``."""
    from sam3_jax.testing import reference

    model_cfg, tracker_cfg = configs(args.size, "float32")
    image_model, base = sides.reference_models(args.checkpoint, model_cfg.replace(joint_box_scores=True), tracker_cfg,
                                               torch)
    model = reference.build_detect_track_model(image_model, base, tracker_cfg, detect_track_config(objects),
                                               cuda=cuda)
    frames = video(model_cfg.image_size, args.frames)
    images = ((torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0).half() - 0.5) / 0.5  # io_utils' fp16
    if cuda:
        images = images.cuda()
    s = model_cfg.image_size

    def start():
        state = reference.start_text_prompt(model, images, (s, s), PROMPT)
        return model.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=None, reverse=False)

    return start, lambda out: len(out[1]["out_obj_ids"])


def run_torch(args, objects: int) -> dict:
    torch, device = sides.torch_reference(args)
    cuda = device == "cuda"
    start, count = (torch_track if args.task == "track" else torch_text)(args, objects, torch, cuda)
    with torch.inference_mode():
        res = time_frames(start, count, args.repeats, torch.cuda.synchronize if cuda else lambda: None,
                          first_timed=first_timed(args))
    return {**res, "peak_rss_gib": peak_rss_gib(),
            "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "device": device, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="track", choices=["track", "text"])
    parser.add_argument("--size", choices=["tiny", "official"], default=None,
                        help="default: official on a GPU, tiny on a CPU")
    parser.add_argument("--objects", default="1,5,20", help="comma-separated object counts")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # internal: the converted weights
    parser.add_argument("--convert-to", help=argparse.SUPPRESS)  # internal: convert them there
    sides.add_flags(parser)
    args = parser.parse_args()
    gpu = bool(glob.glob("/dev/nvidia[0-9]*"))  # not via jax.devices(): this process must not claim the GPU
    args.size = args.size or ("official" if gpu else "tiny")
    args.dtype = "bfloat16" if gpu else "float32"
    flags = [f"--task={args.task}", f"--size={args.size}", f"--frames={args.frames}", f"--repeats={args.repeats}"]
    if args.convert_to:
        sides.emit({"checkpoint": sides.convert_random_weights(*configs(args.size, "float32"), args.convert_to)})
        return
    if args.side:
        if not args.checkpoint:
            parser.error("--side runs one side on the weights of --checkpoint (a converted checkpoint beside its sam3.pt)")
        sides.over_object_counts(__file__, args, run_jax, run_torch, flags)
        return
    with sides.converted_weights(__file__, flags) as checkpoint:
        rows = sides.over_object_counts(__file__, args, run_jax, run_torch, [*flags, f"--checkpoint={checkpoint}"])
    size = configs(args.size, "float32")[0].image_size
    print(f"video predictor ({args.task}), {args.size} model at {size}px, {args.frames} frames, JAX in {args.dtype}, "
          f"best of {args.repeats} after a first run; frames/s over frames {first_timed(args)}..{args.frames - 1}")
    print(f"{'objects':>8}{'JAX fps':>10}{'PyTorch fps':>13}{'JAX/PyTorch':>13}{'JAX objs mean/max':>19}"
          f"{'torch objs mean/max':>21}{'JAX peak GiB':>14}{'torch peak GiB':>16}{'JAX RSS GiB':>13}"
          f"{'torch RSS GiB':>15}")
    for objects, j, t in rows:
        print(f"{objects:8d}{j['fps']:10.3g}{t['fps']:13.3g}{j['fps'] / t['fps']:13.2f}"
              f"{j['objects_mean']:14.1f}/{j['objects_max']:<4d}{t['objects_mean']:16.1f}/{t['objects_max']:<4d}"
              f"{j['device_peak_gib']:14.2f}{t['device_peak_gib']:16.2f}{j['peak_rss_gib']:13.2f}"
              f"{t['peak_rss_gib']:15.2f}")
    print("first run (incl. compile / warm-up), s, and its first frame, s:")
    for objects, j, t in rows:
        print(f"{objects:8d}  JAX {j['first_run_s']:.1f} ({j['first_frame_s']:.1f}); "
              f"PyTorch {t['first_run_s']:.1f} ({t['first_frame_s']:.1f})")
    print(f"JAX/PyTorch > 1: JAX is faster. JAX on {rows[0][1]['device']}; PyTorch on {rows[0][2]['device']} "
          f"({rows[0][2]['threads']} threads)")


if __name__ == "__main__":
    main()

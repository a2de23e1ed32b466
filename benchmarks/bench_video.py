"""Video predictor throughput (frames/s) with 1, 5 and 20 objects: JAX vs the reference, same machine.

``--task=track`` (the SAM 2-style task): each object is given by a mask on frame 0, then tracked
forward through the clip; frames/s counts the tracked frames (1..T-1), each of which runs the
backbone once and the tracker for all objects. JAX: ``infer.video_predictor.VideoPredictor``;
reference: ``Sam3TrackerPredictor`` as ``model_builder.build_tracker`` configures it, driven through
``init_state`` / ``add_new_mask`` / ``propagate_in_video``, under its own bf16 autocast on a GPU.

Frames are generated (moving shapes, ``data.synthetic.render_video``) at the model's image size,
so no resizing is timed on either side; object masks are discs spread over frame 0. Weights are
random (timing does not depend on them), drawn separately on each side. Each side runs in its own
subprocess, so peak memory is its own.

  python benchmarks/bench_video.py [--size=official|tiny] [--objects=1,5,20] [--frames=16]

``--size`` defaults to official on a GPU, tiny on a CPU. On a GPU, JAX computes in bf16.
"""
from __future__ import annotations

import argparse
import glob
import resource
import time

import numpy as np

import sides



def configs(size: str, dtype: str):
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.model.tracker.config import TrackerConfig

    if size == "official":
        return ModelConfig.official().replace(compute_dtype=dtype), TrackerConfig.official()
    return ModelConfig.tiny().replace(compute_dtype=dtype), TrackerConfig.tiny()


def clip(image_size: int, frames: int, objects: int):
    """(T, S, S, 3) uint8 frames and (objects, S, S) bool masks on frame 0."""
    from sam3_jax.data.synthetic import render_video

    video, _, _ = render_video(np.random.default_rng(0), frames, image_size)
    video = np.stack([np.asarray(f) for f in video])
    video = video[:, :image_size, :image_size]
    video = np.pad(video, ((0, 0), (0, image_size - video.shape[1]), (0, image_size - video.shape[2]), (0, 0)))
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:image_size, :image_size] / image_size
    masks = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 0.004 for cy, cx in rng.uniform(0.1, 0.9, (objects, 2))])
    return video, masks


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_jax(args, objects: int) -> dict:
    import jax

    from sam3_jax.infer.video_predictor import VideoPredictor
    from sam3_jax.model import detector
    from sam3_jax.model.tracker import tracker

    model_cfg, tracker_cfg = configs(args.size, args.dtype)
    params = {"detector": detector.init_params(model_cfg, jax.random.key(0)),
              "tracker": tracker.init_params(tracker_cfg, jax.random.key(1))}
    pred = VideoPredictor(params, model_cfg, tracker_cfg)
    video, masks = clip(model_cfg.image_size, args.frames, objects)
    prompts = {i + 1: m for i, m in enumerate(masks)}

    def run():
        it = pred.propagate_iter(video, prompts)
        next(it)  # frame 0: the prompts
        t0 = time.perf_counter()
        for _ in it:
            pass
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run()  # compiles
    first_s = time.perf_counter() - t0
    secs = min(run() for _ in range(args.repeats))
    stats = jax.devices()[0].memory_stats() or {}
    return {"fps": (args.frames - 1) / secs, "first_run_s": first_s, "peak_rss_gib": peak_rss_gib(),
            "device_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": str(jax.devices()[0])}


def run_torch(args, objects: int) -> dict:
    torch, device = sides.torch_reference(args)
    from sam3_jax.testing import reference

    cuda = device == "cuda"
    model_cfg, tracker_cfg = configs(args.size, "float32")
    image_model = reference.build_image_model(model_cfg)
    pred = reference.build_tracker_predictor(image_model, reference.build_tracker(tracker_cfg), tracker_cfg,
                                             keep_autocast=cuda)
    if cuda:
        pred = pred.cuda()
    video, masks = clip(model_cfg.image_size, args.frames, objects)
    images = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # io_utils' mean/std 0.5
    if cuda:
        images = images.cuda()
    s = model_cfg.image_size

    def run():
        state = pred.init_state(video_height=s, video_width=s, num_frames=args.frames, offload_video_to_cpu=not cuda,
                                offload_state_to_cpu=not cuda)
        state["images"] = images
        for i, m in enumerate(masks):
            pred.add_new_mask(state, 0, i + 1, torch.from_numpy(m))
        pred.propagate_in_video_preflight(state)
        gen = pred.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=None, reverse=False,
                                      tqdm_disable=True)
        next(gen)  # frame 0: the prompts
        t0 = time.perf_counter()
        for _ in gen:
            pass
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        run()  # warm-up
        secs = min(run() for _ in range(args.repeats))
    return {"fps": (args.frames - 1) / secs, "peak_rss_gib": peak_rss_gib(),
            "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "device": device, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="track", choices=["track"])
    parser.add_argument("--size", choices=["tiny", "official"], default=None,
                        help="default: official on a GPU, tiny on a CPU")
    parser.add_argument("--objects", default="1,5,20", help="comma-separated object counts")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    sides.add_flags(parser)
    args = parser.parse_args()
    gpu = bool(glob.glob("/dev/nvidia[0-9]*"))  # not via jax.devices(): this process must not claim the GPU
    args.size = args.size or ("official" if gpu else "tiny")
    args.dtype = "bfloat16" if gpu else "float32"
    rows = sides.over_object_counts(__file__, args, run_jax, run_torch,
                                    [f"--size={args.size}", f"--frames={args.frames}", f"--repeats={args.repeats}"])
    if rows is None:
        return
    size = configs(args.size, "float32")[0].image_size
    print(f"video predictor ({args.task}), {args.size} model at {size}px, {args.frames} frames, JAX in {args.dtype}, "
          f"best of {args.repeats} after a warm-up")
    print(f"{'objects':>8}{'JAX fps':>10}{'PyTorch fps':>13}{'JAX/PyTorch':>13}{'JAX peak GiB':>14}"
          f"{'torch peak GiB':>16}{'JAX RSS GiB':>13}{'torch RSS GiB':>15}")
    for objects, j, t in rows:
        print(f"{objects:8d}{j['fps']:10.2f}{t['fps']:13.2f}{j['fps'] / t['fps']:13.2f}{j['device_peak_gib']:14.2f}"
              f"{t['device_peak_gib']:16.2f}{j['peak_rss_gib']:13.2f}{t['peak_rss_gib']:15.2f}")
    print(f"JAX/PyTorch > 1: JAX is faster. JAX on {rows[0][1]['device']} (first run incl. compile "
          f"{rows[0][1]['first_run_s']:.1f} s); PyTorch on {rows[0][2]['device']} ({rows[0][2]['threads']} threads)")


if __name__ == "__main__":
    main()

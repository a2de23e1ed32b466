"""One memory-conditioned tracker step: JAX ``Tracker.track_step`` vs the reference's ``track_step``.

Both sides hold the same situation: B objects, given by a mask on frame 0, tracked through frames
1..7 (so the memory holds the conditioning frame, 6 previous frames and 8 object pointers), then
frame 8 is timed: memory selection and attention, the SAM heads, the memory encoding of the new
mask. Backbone features are random (the backbone is ``bench_detector``'s business) and the 4x/2x
high-resolution levels are projected once per frame outside the timed step, as the predictors do.
Weights: seeded random (``testing.reference.build_tracker``, with the video model's switches: memory
selection, multimask for tracking, dynamic multimask via stability), the same on both sides. JAX
attends over the spatial memories the selection uses (``compact_memory``), as its predictors do; with
these random weights memory selection keeps few earlier frames, so ``--memory-selection=off`` gives the
step over a full memory (7 spatial memories) on both sides.

  python benchmarks/bench_tracker.py [--size=official|tiny] [--objects=1,8] [--dtype=float32|bfloat16]
      [--memory-selection=on|off]

On GPU, bfloat16 means JAX compute in bf16 and PyTorch under bf16 autocast. Each side runs in its own
subprocess. Prints the step time per object count and the ratio JAX/PyTorch (< 1: JAX is faster).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import sides

HISTORY = 8  # frames 0..7 fill the memory; frame 8 is timed


def tracker_config(args):
    from sam3_jax.model.tracker.config import TrackerConfig

    cfg = TrackerConfig.official() if args.size == "official" else TrackerConfig.tiny()
    return cfg.replace(use_memory_selection=args.memory_selection == "on")


def inputs(cfg, objects: int) -> dict[str, np.ndarray]:
    """Features of HISTORY + 1 frames (NCHW, as the reference takes them) and one mask per object."""
    rng = np.random.default_rng(0)
    g, c, t = cfg.grid, cfg.d_model, HISTORY + 1
    feats = {"pix": rng.normal(size=(t, c, g, g)), "fpn0": rng.normal(size=(t, c, 4 * g, 4 * g)),
             "fpn1": rng.normal(size=(t, c, 2 * g, 2 * g))}
    m = cfg.input_mask_size
    yy, xx = np.mgrid[:m, :m] / m
    centres = rng.uniform(0.25, 0.75, size=(objects, 2))
    masks = ((yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2 < 0.03)
    return {**{k: v.astype(np.float32) for k, v in feats.items()}, "masks": masks.astype(np.float32)}


def time_calls(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def device_peak_gib_jax() -> float:
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30


def run_jax(args, objects: int) -> dict:
    import jax
    import jax.numpy as jnp

    from sam3_jax.convert import keymap
    from sam3_jax.infer.video_predictor import select_config
    from sam3_jax.model.tracker.memory_bank import MemoryBank, compact_memory, select_memory, slots_in_use
    from sam3_jax.model.tracker.tracker import Tracker, abstract_params
    from sam3_jax.testing import reference
    from sam3_jax.testing.parity import state_dict_numpy

    cfg = tracker_config(args)
    select_cfg = select_config(cfg)  # one conditioning frame: one conditioning slot, as the predictor
    state = state_dict_numpy(reference.build_tracker(cfg))
    state.pop("no_mem_pos_enc")  # never read by the reference; dead for the converter
    params = jax.device_put(keymap.convert(state, abstract_params(cfg)).params)
    model = Tracker(cfg, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None)
    x = {k: jnp.asarray(v) for k, v in inputs(cfg, objects).items()}
    b, n = objects, HISTORY + 1

    def frame(t):
        return {k: jnp.broadcast_to(x[k][t].transpose(1, 2, 0)[None], (b,) + x[k].shape[2:] + x[k].shape[1:2])
                for k in ("pix", "fpn0", "fpn1")}

    def step(params, bank, f, t, first: bool, slots: int = 0):
        """first: frame 0 (the mask input, no memory); otherwise a memory-conditioned frame over ``slots``
        spatial memories."""
        high_res = model.apply({"params": params}, f["fpn0"], f["fpn1"], method=Tracker.project_high_res)
        memory = None if first else compact_memory(select_memory(bank, t, n, select_cfg), slots)
        flags = jnp.full((b,), first)
        none = jnp.zeros((b, 1, 2)), jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), bool)
        return model.apply({"params": params}, f["pix"], high_res, memory, flags, *none,
                           x["masks"] if first else None, flags if first else None, method=Tracker.track_step)

    # Each memory-conditioned frame is compiled for the spatial memories its selection uses, as the
    # predictors compile it (frame index traced); frames 1..7 fill the memory, frame 8 is timed.
    stepj = jax.jit(step, static_argnums=(4, 5))
    write = jax.jit(lambda bank, t, out: bank.write(t, t, out["maskmem_features"], out["obj_ptr"], t == 0,
                                                    out["memory_score"]))
    bank = MemoryBank.empty(cfg, b, n)
    bank = write(bank, 0, stepj(params, bank, frame(0), 0, True))
    for t in range(1, HISTORY):
        bank = write(bank, t, stepj(params, bank, frame(t), t, False, slots_in_use(bank, t, n, select_cfg)))
    f, slots = frame(HISTORY), slots_in_use(bank, HISTORY, n, select_cfg)
    t0 = time.perf_counter()
    compiled = stepj.lower(params, bank, f, HISTORY, False, slots).compile()
    compile_s = time.perf_counter() - t0
    step_s = time_calls(lambda: jax.block_until_ready(compiled(params, bank, f, HISTORY)), args.repeats)
    score = float(np.asarray(compiled(params, bank, f, HISTORY)["object_score_logits"]).mean())
    return {"step_s": step_s, "compile_s": compile_s, "device_peak_gib": device_peak_gib_jax(),
            "device": str(jax.devices()[0]), "mean_score": score, "slots": slots}


def run_torch(args, objects: int) -> dict:
    torch, device = sides.torch_reference(args)
    from sam3.model.position_encoding import PositionEmbeddingSine

    from sam3_jax.testing import reference

    cuda = device == "cuda"
    cfg = tracker_config(args)
    trk = reference.build_tracker(cfg).to(device)
    x = inputs(cfg, objects)
    b, n, g = objects, HISTORY + 1, cfg.grid
    pe = PositionEmbeddingSine(num_pos_feats=cfg.d_model, normalize=True)
    dec = trk.sam_mask_decoder
    masks = torch.tensor(x["masks"][:, None], device=device)
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step(t):
        with torch.inference_mode(), autocast:
            levels = [dec.conv_s0(torch.tensor(x["fpn0"][t:t + 1], device=device)),
                      dec.conv_s1(torch.tensor(x["fpn1"][t:t + 1], device=device)),
                      torch.tensor(x["pix"][t:t + 1], device=device)]
            feats = [lv.flatten(2).permute(2, 0, 1).expand(-1, b, -1) for lv in levels]
            pos = [pe(lv).flatten(2).permute(2, 0, 1).expand(-1, b, -1) for lv in levels]
            out = trk.track_step(frame_idx=t, is_init_cond_frame=t == 0, current_vision_feats=feats,
                                 current_vision_pos_embeds=pos, feat_sizes=[(4 * g, 4 * g), (2 * g, 2 * g), (g, g)],
                                 image=None, point_inputs=None, mask_inputs=masks if t == 0 else None,
                                 output_dict=output_dict, num_frames=n)
            if cuda:
                torch.cuda.synchronize()
            return out

    for t in range(HISTORY):
        output_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = step(t)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = time_calls(lambda: step(HISTORY), args.repeats)
    score = float(step(HISTORY)["object_score_logits"].float().mean())
    return {"step_s": step_s, "device": device, "threads": torch.get_num_threads(), "mean_score": score,
            "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "official"], default="official")
    parser.add_argument("--objects", default="1,8", help="comma-separated object counts")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-selection", choices=["on", "off"], default="on",
                        help="on: the video model's switch (with random weights it drops most earlier frames); "
                             "off: both sides attend over all 7 spatial memories")
    sides.add_flags(parser)
    args = parser.parse_args()
    rows = sides.over_object_counts(__file__, args, run_jax, run_torch,
                                    [f"--size={args.size}", f"--dtype={args.dtype}", f"--repeats={args.repeats}",
                                     f"--memory-selection={args.memory_selection}"])
    if rows is None:
        return
    print(f"memory-conditioned track_step (frame {HISTORY}, memory selection {args.memory_selection}), "
          f"{args.size} tracker, {args.dtype}, median of {args.repeats}")
    print(f"{'objects':>8}{'JAX (ms)':>12}{'PyTorch (ms)':>14}{'JAX/PyTorch':>13}{'JAX peak GiB':>14}"
          f"{'torch peak GiB':>16}{'compile (s)':>13}")
    for objects, j, t in rows:
        print(f"{objects:8d}{1e3 * j['step_s']:12.1f}{1e3 * t['step_s']:14.1f}{j['step_s'] / t['step_s']:13.2f}"
              f"{j['device_peak_gib']:14.2f}{t['device_peak_gib']:16.2f}{j['compile_s']:13.1f}")
        print(f"{'':8}mean object score: JAX {j['mean_score']:.4f}, PyTorch {t['mean_score']:.4f}; "
              f"JAX attended over {j['slots']} spatial memories")
    print(f"JAX on {rows[0][1]['device']}; PyTorch on {rows[0][2]['device']} ({rows[0][2]['threads']} threads)")


if __name__ == "__main__":
    main()

"""One-image detector forward (official size by default): JAX (jit, after compile) vs the PyTorch reference.

Both sides load the same random weights from a checkpoint, as a user's run does: the reference's
``sam3.pt`` and our conversion of it (`sides.converted_weights`). Each side runs in its own
subprocess so peak memory is measured separately:
  python benchmarks/bench_detector.py [--dtype=float32|bfloat16] [--repeats=3] [--size=official|tiny] [--json]
On GPU, bfloat16 means JAX compute in bf16 and PyTorch under bf16 autocast (the reference's mode).
Prints both timings and the ratio JAX/PyTorch (< 1 means JAX is faster).
"""
import argparse
import resource
import time

import numpy as np
import sides


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_jax(dtype: str, repeats: int, checkpoint: str, size: str = "official") -> dict:
    import jax
    import jax.numpy as jnp

    from sam3_jax.checkpoint import weights
    from sam3_jax.model import detector
    from sam3_jax.nn import compiler

    params, cfg, _, _ = weights.read(checkpoint, tracker=False)  # every stack scanned, as the predictors run it
    params, cfg = params["detector"], cfg.replace(compute_dtype=dtype)
    model = detector.Sam3Detector(cfg)
    inputs = [jnp.asarray(x) for x in detector.example_inputs(cfg)]
    inputs[0] = jax.random.uniform(jax.random.key(1), inputs[0].shape, minval=-1, maxval=1)
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a), compiler_options=compiler.encoder_options(cfg))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *inputs).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, *inputs))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return {"forward_s": min(times), "compile_s": compile_s, "peak_rss_gib": peak_rss_gib(),
            "device_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": str(jax.devices()[0])}


def configs(size: str):
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.model.tracker.config import TrackerConfig

    return (ModelConfig.official(), TrackerConfig.official()) if size == "official" else (ModelConfig.tiny(),
                                                                                           TrackerConfig.tiny())


def run_torch(dtype: str, repeats: int, checkpoint: str, size: str = "official") -> dict:
    from sam3_jax.testing import reference

    ref = reference.load()
    torch = ref.torch
    cuda = torch.cuda.is_available()
    model_cfg, tracker_cfg = configs(size)
    model, _ = sides.reference_models(checkpoint, model_cfg, tracker_cfg, torch)
    if cuda:
        model = model.cuda()
    device = "cuda" if cuda else "cpu"
    from sam3.model.data_misc import FindStage

    img = torch.rand(1, 3, model_cfg.image_size, model_cfg.image_size, device=device) * 2 - 1
    find = FindStage(img_ids=torch.tensor([0], device=device), text_ids=torch.tensor([0], device=device),
                     input_boxes=None, input_boxes_mask=None, input_boxes_label=None, input_points=None,
                     input_points_mask=None)

    def forward():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model.backbone.forward_image(img)
            out.update(model.backbone.forward_text(["a person"], device=device))
            res = model.forward_grounding(backbone_out=out, find_input=find, find_target=None,
                                          geometric_prompt=model._get_dummy_prompt())
            if cuda:
                torch.cuda.synchronize()
            return res

    forward()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    device_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"forward_s": min(times), "peak_rss_gib": peak_rss_gib(), "device_peak_gib": device_peak,
            "device": device, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["jax", "torch"],
                        help="one side only (with --checkpoint, internal); without --checkpoint, the "
                             "weights are converted first and the table shows that side alone")
    parser.add_argument("--size", default="official", choices=["official", "tiny"])
    parser.add_argument("--json", action="store_true", help="end with one machine-readable RESULT line")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # internal: the converted weights
    parser.add_argument("--convert-to", help=argparse.SUPPRESS)  # internal: convert them there
    args = parser.parse_args()
    if args.convert_to:
        sides.emit({"checkpoint": sides.convert_random_weights(*configs(args.size), args.convert_to)})
        return
    if args.only and args.checkpoint:
        fn = run_jax if args.only == "jax" else run_torch
        sides.emit(fn(args.dtype, args.repeats, args.checkpoint, args.size))
        return
    with sides.converted_weights(__file__, [f"--size={args.size}"]) as checkpoint:
        results = {side: sides.run(__file__, [f"--only={side}", f"--dtype={args.dtype}", f"--repeats={args.repeats}",
                                              f"--size={args.size}", f"--checkpoint={checkpoint}"], f"{side} run")
                   for side in ("jax", "torch") if args.only in (None, side)}
    if args.only:
        print(f"{args.only}: {results[args.only]}")
    else:
        report(args, results["jax"], results["torch"])
    if args.json:
        sides.emit(results)


def report(args, j: dict, t: dict) -> None:
    size = configs(args.size)[0].image_size
    print(f"detector forward, {args.size} size, 1 image {size}x{size}, {args.dtype}, best of {args.repeats}")
    print(f"{'':24}{'JAX':>12}{'PyTorch':>12}{'JAX/PyTorch':>14}")
    print(f"{'forward (s)':24}{j['forward_s']:12.3f}{t['forward_s']:12.3f}{j['forward_s'] / t['forward_s']:14.2f}")
    print(f"{'peak host RSS (GiB)':24}{j['peak_rss_gib']:12.2f}{t['peak_rss_gib']:12.2f}{j['peak_rss_gib'] / t['peak_rss_gib']:14.2f}")
    if j["device_peak_gib"] or t["device_peak_gib"]:
        print(f"{'peak device mem (GiB)':24}{j['device_peak_gib']:12.2f}{t['device_peak_gib']:12.2f}")
    print(f"JAX compile: {j['compile_s']:.1f} s on {j['device']}; PyTorch on {t['device']}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

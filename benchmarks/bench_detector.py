"""One-image detector forward at official size: JAX (jit, after compile) vs the PyTorch reference.

Both sides load the same random weights from a checkpoint, as a user's run does: the reference's
``sam3.pt`` and our conversion of it (`sides.converted_weights`). Each side runs in its own
subprocess so peak memory is measured separately:
  python benchmarks/bench_detector.py [--dtype=float32|bfloat16] [--repeats=3]
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


def run_jax(dtype: str, repeats: int, checkpoint: str) -> dict:
    import jax
    import jax.numpy as jnp

    from sam3_jax import compiler
    from sam3_jax.infer import weights
    from sam3_jax.model import detector

    params, cfg, _ = weights.read(checkpoint, tracker=False)  # every stack scanned, as the predictors run it
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


def run_torch(dtype: str, repeats: int, checkpoint: str) -> dict:
    from sam3_jax.model.config import ModelConfig
    from sam3_jax.model.tracker.config import TrackerConfig
    from sam3_jax.testing import reference

    ref = reference.load()
    torch = ref.torch
    cuda = torch.cuda.is_available()
    model, _ = sides.reference_models(checkpoint, ModelConfig.official(), TrackerConfig.official(), torch)
    if cuda:
        model = model.cuda()
    device = "cuda" if cuda else "cpu"
    from sam3.model.data_misc import FindStage

    img = torch.rand(1, 3, 1008, 1008, device=device) * 2 - 1
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
    parser.add_argument("--only", choices=["jax", "torch"])
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # internal: the converted weights
    parser.add_argument("--convert-to", help=argparse.SUPPRESS)  # internal: convert them there
    args = parser.parse_args()
    if args.convert_to:
        from sam3_jax.model.config import ModelConfig
        from sam3_jax.model.tracker.config import TrackerConfig

        sides.emit({"checkpoint": sides.convert_random_weights(ModelConfig.official(), TrackerConfig.official(),
                                                               args.convert_to)})
        return
    if args.only:
        if not args.checkpoint:
            parser.error("--only runs one side on the weights of --checkpoint (a converted checkpoint beside its sam3.pt)")
        fn = run_jax if args.only == "jax" else run_torch
        sides.emit(fn(args.dtype, args.repeats, args.checkpoint))
        return
    with sides.converted_weights(__file__, []) as checkpoint:
        results = {side: sides.run(__file__, [f"--only={side}", f"--dtype={args.dtype}", f"--repeats={args.repeats}",
                                              f"--checkpoint={checkpoint}"], f"{side} run") for side in ("jax", "torch")}
    j, t = results["jax"], results["torch"]
    print(f"detector forward, official size, 1 image 1008x1008, {args.dtype}, best of {args.repeats}")
    print(f"{'':24}{'JAX':>12}{'PyTorch':>12}{'JAX/PyTorch':>14}")
    print(f"{'forward (s)':24}{j['forward_s']:12.3f}{t['forward_s']:12.3f}{j['forward_s'] / t['forward_s']:14.2f}")
    print(f"{'peak host RSS (GiB)':24}{j['peak_rss_gib']:12.2f}{t['peak_rss_gib']:12.2f}{j['peak_rss_gib'] / t['peak_rss_gib']:14.2f}")
    if j["device_peak_gib"] or t["device_peak_gib"]:
        print(f"{'peak device mem (GiB)':24}{j['device_peak_gib']:12.2f}{t['device_peak_gib']:12.2f}")
    print(f"JAX compile: {j['compile_s']:.1f} s on {j['device']}; PyTorch on {t['device']}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

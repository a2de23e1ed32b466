"""Train step on one clip: JAX (the real trainer step, after compile) vs the PyTorch reference.

``--mode``: ``detector`` (the detector's losses), ``tracker`` (SAM 3's stage 4: the tracker's
losses under SAM 2's recipe, detector frozen, ``--objects`` objects) or ``joint`` (both). The
reference has no tracker training path (``Sam3TrackerBase.forward`` raises ``NotImplementedError``);
its tracker side here is ``sam3_jax.testing.reference_tracker_step``: the reference's SAM 3 tracker modules and
their own ``track_step``, in train mode with autograd, driven as SAM 2's ``SAM2Train`` drives them,
with SAM 2's ``MultiStepMultiMasksAndIous`` built from the reference's loss functions.

Tracker work, both sides (``--prompts=mask0``, the default): every object slot of the clip tracked
through its ``--frames`` frames in order, the GT mask as input on frame 0 (the only initial
conditioning frame), frames 1.. memory-conditioned with multimask output and a loss each, no
corrective clicks. Our trainer samples SAM 2's full recipe instead (clicks or boxes, up to 7
corrective clicks: a random amount of work per step); ``--prompts=recipe`` times that, JAX only.
What cannot be matched exactly (the output prints each side's work):

* frame 0: the SAM heads run once per frame on both sides (on the mask-input frame, prompted by the
  mask, for the pointer), but ours down-sample a mask prompt on every frame (a mask-input frame can be
  any slot of the scan) and discard it where there is no mask input;
* memory selection (``use_memory_selection``): the reference scores a frame by the mean over the
  objects tracked together, ours per object; ours attends to a fixed number of memory slots
  (padding masked), the reference to the frames it selected;
* the frozen backbone: ours runs it in training mode under ``stop_gradient``, the reference in eval
  mode under ``torch.no_grad`` (the same computation: the drop-path rate only differs in training);
* random weights on each side, not the same ones: losses are not comparable, work is.

Both sides train the same model size on the same frames: one clip of ``--frames`` frames from the
generated demo videos (resized to the model's image size), one find query per (frame, phrase) with a
text prompt and no box prompt, in detector and joint modes the detector losses (IABCEMdetr + Boxes + Masks, o2o + o2m, aux
layers) and an AdamW-style update with gradient clipping.

* JAX: ``sam3_jax.train.step.make_loss_fn`` + ``make_train_step`` with the trainer's optimiser
  (``optim.make_optimizer(optim.default_config())``, non-finite skip), ``jit(donate_argnums=0)``
  on a (data=1, frame=#devices) mesh, remat as ``ModelConfig`` sets it (every ViT block, text
  block, encoder and decoder layer).
* PyTorch: ``Sam3Image`` built at the same ``ModelConfig`` by ``sam3_jax.testing.reference``, in
  train mode with activation checkpointing switched on where the official builder has it (ViT,
  text encoder, encoder, decoder, segmentation head, geometry encoder), ``model(BatchedDatapoint)``
  (its matcher runs inside ``forward``), ``Sam3LossWrapper`` configured as the training configs
  do, ``backward()``, ``clip_grad_norm_(0.1)`` and ``torch.optim.AdamW``. Tracker mode: the same
  model's backbone, frozen, on the clip's frames, then the tracker (``testing.reference.build_tracker``
  at the ``TrackerConfig``'s sizes) as above; AdamW over the tracker's parameters. Joint mode: the
  detector's training forward, whose one backbone pass also feeds the tracker, the sum of both
  losses, AdamW over both models.

Each side runs in its own subprocess so peak memory is measured separately. Run:

  CPU (small):  python benchmarks/bench_train_step.py --size=tiny --frames=8 --repeats=3
  GPU (H100/H200, the issue's targets):
                python benchmarks/bench_train_step.py --size=official --dtype=bfloat16 --frames=8

Tracker mode on the CPU (tiny): ``--mode=tracker --size=tiny --frames=8 --objects=3 --torch-threads=1``.
Does a clip fit a device: ``--compile-only`` compiles the JAX step from shapes alone and prints XLA's
memory figures (e.g. ``--mode=tracker --size=official --frames=16 --compile-only`` on a GPU).

``--dtype=bfloat16`` means JAX compute in bf16 and PyTorch under bf16 autocast (the reference's
training mode). ``--side=jax`` skips the reference (e.g. where it is not installed).
On a CPU shared with other work, the reference's small ops are slowed a lot by OpenMP threads
waiting on each other; ``--torch-threads=1`` shows how much (the default keeps torch's own setting).

Reported: compile time (JAX), mean step time over ``--repeats`` steps after one warm-up step,
frames/s per device, peak host RSS, peak device memory (GPU), and on GPUs of known peak
throughput:

* MFU = model FLOPs / step time / peak bf16 dense FLOP/s, with model FLOPs = what XLA's cost
  analysis counts on the lowered (uncompiled) ``value_and_grad`` of the loss with every remat
  switch off: forward + backward, no recomputation. The PyTorch column uses the same count.
* HFU = the compiled step's ``cost_analysis()["flops"]`` / step time / peak. That count is of the
  optimised HLO of the real step, so it includes the remat recomputation (and the optimiser).

Caveats of XLA's FLOP counts: custom calls (e.g. cuDNN flash attention) count 0 (the model count
is therefore taken with attention traced as XLA's einsums; HFU's is not), and a while
loop's body (the Hungarian matcher, the scanned layer stacks, the tracker's scan over the frames) is
counted once, not per trip; and the model count takes gradients of every parameter, frozen or not.
In tracker and joint modes MFU and HFU are therefore not meaningful.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import resource
import tempfile
import time

import numpy as np

import sides

# Peak dense bf16 FLOP/s (no sparsity) by a substring of ``jax.devices()[0].device_kind``; first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
                   ("A100", 312e12))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_flops(device_kind: str) -> float | None:
    return next((f for name, f in PEAK_BF16_FLOPS if name in device_kind), None)


def model_config(size: str, dtype: str):
    from sam3_jax.model.config import ModelConfig

    cfg = ModelConfig.official() if size == "official" else ModelConfig.tiny()
    return cfg.replace(compute_dtype=dtype)


def without_remat(cfg):
    """The same model with every remat switch off and the ViT's attention as XLA's
    einsum-softmax-einsum, not cuDNN's fused kernel (a custom call that XLA's cost analysis counts
    as 0 FLOPs), for counting model FLOPs (nothing runs). The tracker's small SAM-decoder
    attentions have no such switch; on a GPU they may still count as 0, a negligible share."""
    from sam3_jax.model.config import ModelConfig

    d = dataclasses.asdict(cfg)
    for part in ("vit", "text", "encoder", "decoder"):
        d[part]["remat"] = False
    d["vit"]["attention_impl"] = "xla"
    return ModelConfig.from_dict(d)


def tracker_config(size: str):
    from sam3_jax.model.tracker.config import TrackerConfig

    return TrackerConfig.official() if size == "official" else TrackerConfig.tiny()


def prompt_config(prompts: str):
    """The tracker's prompts on the JAX side. ``mask0`` (the default): the GT mask on frame 0, the
    only initial conditioning frame, and no clicks (the work the reference side does: a fixed amount
    per step). ``recipe``: SAM 2's training recipe (clicks or boxes half the time, 1-2 initial
    conditioning frames, up to 7 corrective clicks on up to 2 frames), drawn anew each step: JAX only."""
    from sam3_jax.train.tracker_prompts import PromptConfig

    return PromptConfig() if prompts == "recipe" else PromptConfig(prob_to_use_pt_input=0.0, num_init_cond_frames=1)


def pad_n_queries(size: str) -> int | None:
    """The reference configs pad the CE mean to 200 queries; the tiny decoder only has 16."""
    return 200 if size == "official" else None


# ------------------------------------------------------------------------------------------- data
def make_batch(size: str, frames: int, phrases: int, objects: int, path: str) -> None:
    """One clip of the generated demo videos at the model's image size, saved to ``path`` (.npz),
    with the phrases as text for the reference's text encoder."""
    from sam3_jax.testing.train_reference import demo_clip

    clip = demo_clip(model_config(size, "float32").image_size, frames, phrases, objects,
                     os.path.join(os.path.dirname(path), "videos"))
    np.savez(path, **clip)


def load_batch(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# -------------------------------------------------------------------------------------------- JAX
def run_jax(args, batch_path: str) -> dict:
    import jax

    from sam3_jax.model.detector import abstract_params, init_params
    from sam3_jax.model.tracker import tracker as tracker_lib
    from sam3_jax.nn import repeat
    from sam3_jax.train import config as config_lib
    from sam3_jax.train import mesh as mesh_lib
    from sam3_jax.train import optim, param_groups, tracker_stage
    from sam3_jax.train import step as step_lib
    from sam3_jax.train.losses.detector import DetectorLossConfig
    from sam3_jax.train.losses.tracker import TrackerLossConfig

    batch_np = load_batch(batch_path)
    batch_np.pop("phrase_text")
    cfg = model_config(args.size, args.dtype)
    n_dev = jax.device_count()
    mesh = mesh_lib.make_mesh(1, n_dev)  # the clip's frames over every device
    mesh_lib.check_divisible(mesh, 1, args.frames)
    loss_cfg = DetectorLossConfig(pad_n_queries=pad_n_queries(args.size))
    # The optimiser and what trains: as configs/video.py (default, :tracker, :joint).
    optim_cfg = config_lib.video_config("default" if args.mode == "detector" else args.mode).optim
    abstract = {"detector": abstract_params(cfg)}
    stage = None
    if args.mode != "detector":
        tracker_cfg = tracker_config(args.size)
        abstract["tracker"] = tracker_lib.abstract_params(tracker_cfg)
        stage = tracker_stage.make_tracker_stage(tracker_cfg, prompt_config(args.prompts), TrackerLossConfig(),
                                                 dtype=cfg.compute_dtype)
    tx = optim.make_optimizer(optim_cfg, abstract, 1000)
    grad_norm = optim.Packing(abstract, optim_cfg).norm
    frozen = jax.tree.map(lambda label: label == param_groups.FROZEN, param_groups.param_labels(abstract, optim_cfg))
    replicated = mesh_lib.replicated(mesh)

    if args.compile_only:
        return compile_only(args, mesh, loss_fn_args=(cfg, loss_cfg, stage), tx=tx,
                            step_args=dict(frozen=frozen, grad_norm=grad_norm), abstract=abstract,
                            batch_np=batch_np)
    with jax.set_mesh(mesh):
        params = {"detector": jax.jit(init_params, static_argnums=0, out_shardings=replicated)(cfg, jax.random.key(0))}
        if stage is not None:
            params["tracker"] = jax.jit(tracker_lib.init_params, static_argnums=0, out_shardings=replicated)(
                tracker_cfg, jax.random.key(1))
        state = jax.jit(lambda p: step_lib.init_state(p, tx, 0), out_shardings=replicated)(params)
        batch = mesh_lib.shard_batch(mesh, batch_np)
        detect = args.mode != "tracker"
        loss_fn = step_lib.make_loss_fn(cfg, loss_cfg, mesh, clip_stage=stage, detect=detect)
        # Model FLOPs: forward + backward of the loss without remat, as lowered (nothing is compiled).
        plain_cfg = without_remat(cfg)
        plain_loss = step_lib.make_loss_fn(plain_cfg, loss_cfg, mesh, clip_stage=stage, detect=detect)
        with repeat.unrolled():  # XLA counts a loop's body once: the layer stacks traced unrolled
            model_cost = jax.jit(jax.value_and_grad(plain_loss, has_aux=True)).lower(
                abstract, batch, jax.random.key(1)).cost_analysis() or {}
        step = jax.jit(step_lib.make_train_step(loss_fn, tx, frozen=frozen, grad_norm=grad_norm), donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        step_cost = compiled.cost_analysis() or {}
        if isinstance(step_cost, list):  # older JAX: one dict per executable
            step_cost = step_cost[0]
        if isinstance(model_cost, list):
            model_cost = model_cost[0]

        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready((state, metrics["loss"]))
        times, losses = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics["loss"]))
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {"step_s": float(np.mean(times)), "compile_s": compile_s, "peak_rss_gib": peak_rss_gib(),
            "device_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "devices": n_dev,
            "device_kind": dev.device_kind, "platform": dev.platform, "losses": losses,
            "step_flops": float(step_cost.get("flops", 0.0)),
            "model_flops": float(model_cost.get("flops", 0.0))}


def compile_only(args, mesh, loss_fn_args, tx, step_args, abstract, batch_np) -> dict:
    """Compiles the same step from shapes alone (no parameters are made, nothing runs) and returns
    XLA's account of its memory: whether a clip fits a device, asked without the device time of a run."""
    import jax
    from jax.sharding import NamedSharding

    from sam3_jax.train import mesh as mesh_lib
    from sam3_jax.train import step as step_lib

    cfg, loss_cfg, stage = loss_fn_args
    replicated = mesh_lib.replicated(mesh)
    with jax.set_mesh(mesh):
        state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), abstract)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
        batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, mesh_lib.batch_spec(k)))
                 for k, x in batch_np.items()}
        loss_fn = step_lib.make_loss_fn(cfg, loss_cfg, mesh, clip_stage=stage, detect=args.mode != "tracker")
        step = jax.jit(step_lib.make_train_step(loss_fn, tx, **step_args), donate_argnums=(0,))
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0 - lower_s
    mem = compiled.memory_analysis()
    gib = {name: getattr(mem, f"{name}_size_in_bytes") / 2**30 for name in ("argument", "output", "alias", "temp")}
    hlo = compiled.as_text()  # what XLA built: its size is what the compile time scales with
    dev = jax.devices()[0]
    return {"compile_only": True, "lower_s": lower_s, "compile_s": compile_s, "memory_gib": gib,
            "fusions": hlo.count(" fusion("), "whiles": hlo.count(" while("),
            "peak_rss_gib": peak_rss_gib(), "devices": jax.device_count(), "device_kind": dev.device_kind,
            "platform": dev.platform}


def report_compile_only(args, j: dict) -> None:
    m = j["memory_gib"]
    total = m["argument"] + m["output"] - m["alias"] + m["temp"]
    print(f"{args.mode} train step, {args.size} size, 1 clip x {args.frames} frames at "
          f"{model_config(args.size, 'float32').image_size}px, {args.dtype}: compiled, not run")
    print(f"JAX: lowered in {j['lower_s']:.1f} s, compiled in {j['compile_s']:.1f} s on {j['devices']} x "
          f"{j['device_kind']} ({j['platform']}); peak host RSS {j['peak_rss_gib']:.2f} GiB")
    print(f"optimised HLO: {j['fusions']} fusions, {j['whiles']} while loops")
    print(f"XLA memory per device (GiB): arguments {m['argument']:.2f} (state + batch), outputs {m['output']:.2f}, "
          f"donated {m['alias']:.2f}, temporaries {m['temp']:.2f}; arguments + outputs - donated + temporaries "
          f"= {total:.2f}")
    print(f"machine: {j['device_kind']}, {os.cpu_count()} CPUs")


# ---------------------------------------------------------------------------------------- PyTorch
def detector_reference(args, torch, device: str):
    """The reference ``Sam3Image`` at ``--size`` with random weights and its training loss, as the
    training configs set them up: (model in train mode, ``Sam3LossWrapper``)."""
    from sam3_jax.testing.train_reference import detector_reference as build

    return build(model_config(args.size, "float32"), device, pad_n_queries=pad_n_queries(args.size), seed=0)


def run_torch(args, batch_path: str) -> dict:
    """detector: the reference's own training forward and loss. tracker: the frozen backbone (eval
    mode, no grad) on every frame, then ``reference_tracker_step.track_clip`` (the reference tracker's
    ``track_step`` under SAM 2's recipe). joint: the detector's training forward, whose backbone pass
    also feeds the tracker (with gradient), detector + tracker losses. Then backward, gradient
    clipping and AdamW as the trainer."""
    from sam3_jax.testing import reference_tracker_step as rts

    from sam3_jax.testing import reference, train_reference
    from sam3_jax.testing.parity import randomize_
    from sam3_jax.train.losses.tracker import TrackerLossConfig

    ref = reference.load()
    torch = ref.torch
    reference.install_loss_shims(torch)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch = load_batch(batch_path)
    datapoint = train_reference.reference_inputs(torch, batch, device)
    detect, track = args.mode != "tracker", args.mode != "detector"
    if detect:
        model, det_loss = detector_reference(args, torch, device)
    else:  # stage 4: the backbone is frozen (configs/video.py:tracker freezes everything under detector/)
        model = reference.build_image_model(model_config(args.size, "float32"))
        randomize_(model, seed=0)
        model = model.to(device).eval().requires_grad_(False)
    params = list(model.parameters()) if detect else []
    if track:
        trk = rts.prepare_tracker(reference.build_tracker(tracker_config(args.size)).to(device))
        params += list(trk.parameters())
        gt, tracked = rts.clip_targets(torch, batch, device)
        trk_loss_cfg = TrackerLossConfig()
    # The trainer's optimisers: configs/video.py's default (detector, joint) and :tracker learning rates.
    opt = torch.optim.AdamW(params, lr=8e-5 if detect else 5e-6, weight_decay=0.1)
    stash = {}
    if detect and track:  # the tracker reads the detector's own backbone pass
        forward_image = model.backbone.forward_image

        def keep_forward_image(samples):
            stash["backbone_out"] = forward_image(samples)
            return stash["backbone_out"]

        model.backbone.forward_image = keep_forward_image
    work = {}

    def train_step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            total = torch.zeros((), device=device)
            if detect:
                total = total + train_reference.reference_train_forward(model, det_loss, datapoint)["core_loss"]
                sam2_out = stash.get("backbone_out", {}).get("sam2_backbone_out")
            elif track:
                with torch.no_grad():
                    sam2_out = model.backbone.forward_image(datapoint.img_batch)["sam2_backbone_out"]
            if track:
                trk_loss, _, w = rts.track_clip(torch, trk, sam2_out, datapoint.img_batch, gt, tracked, trk_loss_cfg)
                work.update(w)
                total = total + trk_loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(total.detach())

    train_step()  # warm-up
    times, losses = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        losses.append(train_step())
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.mean(times)), "peak_rss_gib": peak_rss_gib(),
            "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "devices": 1, "device": device, "threads": torch.get_num_threads(), "losses": losses,
            "queries": len(datapoint.find_inputs[0].img_ids) if detect else 0, "work": work,
            "trained_params": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------ report
def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def report(args, j: dict | None, t: dict | None) -> None:
    frames = args.frames
    kind = j["device_kind"] if j else t["device"]
    peak = peak_flops(kind) if j and j["platform"] == "gpu" else None
    rows = []

    def side(r, key):
        return None if r is None else r.get(key)

    j_fps = frames / j["step_s"] / j["devices"] if j else None
    t_fps = frames / t["step_s"] if t else None
    rows.append(("step time (s)", side(j, "step_s"), side(t, "step_s"), ratio(side(j, "step_s"), side(t, "step_s")), ".3f"))
    rows.append(("frames/s per device", j_fps, t_fps, ratio(t_fps, j_fps), ".2f"))
    rows.append(("peak host RSS (GiB)", side(j, "peak_rss_gib"), side(t, "peak_rss_gib"),
                 ratio(side(j, "peak_rss_gib"), side(t, "peak_rss_gib")), ".2f"))
    if (j and j["device_peak_gib"]) or (t and t["device_peak_gib"]):
        rows.append(("peak device mem (GiB)", side(j, "device_peak_gib"), side(t, "device_peak_gib"),
                     ratio(side(j, "device_peak_gib"), side(t, "device_peak_gib")), ".2f"))
    model_flops = j["model_flops"] if j else None

    def util(flops, r, devices):
        if peak is None or not flops or r is None:
            return None
        return flops / r["step_s"] / (peak * devices)

    rows.append(("MFU", util(model_flops, j, j["devices"] if j else 1), util(model_flops, t, 1), None, ".1%"))
    rows.append(("HFU (compiled, + remat)", util(j and j["step_flops"], j, j["devices"] if j else 1), None, None, ".1%"))

    what = {"detector": f"{args.phrases} phrase(s)", "tracker": f"{args.objects} object(s)",
            "joint": f"{args.phrases} phrase(s), {args.objects} object(s)"}[args.mode]
    print(f"{args.mode} train step, {args.size} size, 1 clip x {frames} frames x {what} at "
          f"{model_config(args.size, 'float32').image_size}px, {args.dtype}, mean of {args.repeats} steps after 1 warm-up")
    print(f"{'':26}{'JAX':>12}{'PyTorch':>12}{'ratio':>10}")
    for name, a, b, r, spec in rows:
        print(f"{name:26}{fmt(a, spec):>12}{fmt(b, spec):>12}{fmt(r, '.2f'):>10}")
    print("ratio: JAX/PyTorch for time and memory, PyTorch/JAX for frames/s (< 1 means JAX is better)")
    if j:
        print(f"JAX: compile {j['compile_s']:.1f} s; {j['devices']} x {kind} ({j['platform']}); "
              f"model FLOPs/step {j['model_flops']:.3e} (no remat), compiled step FLOPs {j['step_flops']:.3e} "
              f"(incl. remat recompute); peak bf16 {fmt(peak, '.3e')} FLOP/s; losses {np.round(j['losses'], 4).tolist()}")
    if t:
        print(f"PyTorch: {t['device']}, {t['threads']} threads, {t['queries']} find queries, "
              f"{t['trained_params']:,d} trained parameters; losses {np.round(t['losses'], 4).tolist()}")
    if args.mode != "detector":
        print(tracker_work(args, j, t))
    print(f"machine: {kind}, {os.cpu_count()} CPUs")


def tracker_work(args, j: dict | None, t: dict | None) -> str:
    """What each side's tracker did per step (the two must match for the comparison to hold)."""
    lines = ["tracker work per step:"]
    if j:
        if args.prompts == "recipe":
            what = "prompts sampled each step by SAM 2's recipe (clicks, boxes, corrective clicks)"
        else:
            what = (f"GT mask input on frame 0 (no SAM loss there), frames 1-{args.frames - 1} memory-conditioned "
                    f"with multimask output and losses, 0 corrective clicks; one SAM-heads pass a frame")
        lines.append(f"  JAX: {args.objects} object slots (those visible on frame 0 in the losses), {what}; "
                     f"backbone {'frozen (stop_gradient)' if args.mode == 'tracker' else 'trained'}, "
                     f"memory-attention dropout on")
    if t and t.get("work"):
        w = t["work"]
        lines.append(f"  PyTorch: {w['object_slots']} object slots ({w['tracked']} in the losses), "
                     f"{w['mask_input_frames']} mask-input frame, {w['memory_frames']} memory-conditioned frames "
                     f"({w['multimask_steps']} multimask), {w['loss_steps']} loss steps, {w['sam_heads_calls']} SAM-heads "
                     f"calls, {w['corrections']} corrective clicks; backbone "
                     f"{'frozen (eval, no_grad)' if args.mode == 'tracker' else 'trained'}, modules in train mode")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "official"], default=None,
                        help="model size (default: official on GPU, tiny on CPU)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--phrases", type=int, default=1)
    parser.add_argument("--mode", default="detector", choices=["detector", "tracker", "joint"])
    parser.add_argument("--objects", type=int, default=3, help="objects per clip (tracker and joint modes)")
    parser.add_argument("--prompts", default="mask0", choices=["mask0", "recipe"],
                        help="tracker prompts: the GT mask on frame 0 (both sides), or SAM 2's sampled "
                             "recipe (JAX only); see prompt_config")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--side", default="both", choices=["jax", "torch", "both"])
    parser.add_argument("--compile-only", action="store_true",
                        help="JAX only: compile the step from shapes (nothing is initialised or run) and print "
                             "XLA's memory figures (does the clip fit?) and the compile time")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads for the reference (default 0: torch's own default)")
    parser.add_argument("--json", action="store_true",
                        help="end with one machine-readable line: RESULT {\"jax\": ..., \"torch\": ...}")
    parser.add_argument("--batch", help=argparse.SUPPRESS)  # internal: the saved clip, for a --side run
    args = parser.parse_args()
    if args.size is None:  # not via jax.devices(): this process must not claim the GPU's memory
        args.size = "official" if glob.glob("/dev/nvidia[0-9]*") else "tiny"

    if args.mode != "detector" and args.prompts == "recipe" and args.side != "jax":
        print("--prompts=recipe: SAM 2's sampled prompts and corrective clicks run on the JAX side only")
        args.side = "jax"
    if args.compile_only:
        args.side = "jax"
    if args.batch:  # one side, in a subprocess
        fn = run_jax if args.side == "jax" else run_torch
        sides.emit(fn(args, args.batch))
        return

    results = {"jax": None, "torch": None}
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = os.path.join(tmp, "clip.npz")
        make_batch(args.size, args.frames, args.phrases, args.objects, batch_path)
        for name in ("jax", "torch"):
            if args.side not in (name, "both"):
                continue
            flags = [f"--side={name}", f"--size={args.size}", f"--frames={args.frames}", f"--phrases={args.phrases}",
                     f"--repeats={args.repeats}", f"--mode={args.mode}", f"--objects={args.objects}",
                     f"--dtype={args.dtype}", f"--torch-threads={args.torch_threads}", f"--batch={batch_path}",
                     f"--prompts={args.prompts}"]
            flags += ["--compile-only"] if args.compile_only else []
            results[name] = sides.run(__file__, flags, f"{name} run")
    if args.compile_only:
        report_compile_only(args, results["jax"])
    else:
        report(args, results["jax"], results["torch"])
    if args.json:
        sides.emit(results)


if __name__ == "__main__":
    main()

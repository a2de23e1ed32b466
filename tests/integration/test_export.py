"""Export back to PyTorch: torch -> flax -> torch reproduces every tensor of the tiny ``sam3.pt`` bit for
bit (dead weights and RoPE buffers included), the result loads strictly into the reference modules,
and a checkpoint that cannot be exported fails with the list of keys."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, write_torch

from sam3_jax.checkpoint import converted
from sam3_jax.convert import export, keymap, sam3_checkpoint, torch_io
from sam3_jax.convert.sam3_checkpoint import convert_file
from sam3_jax.model import stacking
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

pytestmark = pytest.mark.parity


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
           or not np.array_equal(got[k], want[k])]
    assert not bad, bad[:20]


def _converted(sd, tmp_path, cfg=None):
    src = write_torch(sd, tmp_path / "sam3_tiny.pt")
    convert_file(src, str(tmp_path / "ckpt"), cfg=cfg or ModelConfig.tiny(), tracker_cfg=TrackerConfig.tiny())
    return tmp_path / "ckpt"


def test_round_trip_is_bit_exact(tiny_state_dict, tmp_path):
    """Every layer stack stored stacked, exported unrolled."""
    ckpt = _converted(tiny_state_dict, tmp_path)
    out = export.export_checkpoint(str(ckpt))
    assert any(k.endswith("freqs_cis") for k in out) and "tracker.no_mem_pos_enc" in out
    _assert_same(out, tiny_state_dict)


def test_cli_export_loads_strictly_into_the_reference(ref, tiny_state_dict, tmp_path):
    from sam3_jax.testing import reference

    ckpt = _converted(tiny_state_dict, tmp_path)
    out = tmp_path / "exported.pt"
    subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), "--direction=to_torch",
                    f"--checkpoint={ckpt}", f"--torch_ckpt={out}"], check=True, cwd=REPO)
    sd = ref.torch.load(out, map_location="cpu", weights_only=True)["model"]
    _assert_same({k: v.numpy() for k, v in sd.items()}, tiny_state_dict)
    image_model = reference.build_image_model(ModelConfig.tiny())
    image_model.load_state_dict({k[len("detector."):]: v for k, v in sd.items() if k.startswith("detector.")},
                                strict=True)
    tracker = reference.build_tracker(TrackerConfig.tiny())
    tracker.load_state_dict({k[len("tracker."):]: v for k, v in sd.items() if k.startswith("tracker.")}, strict=True)
    assert not [k for k in sd if not k.startswith(("detector.", "tracker."))]


def test_fine_tuned_params_are_exported(tiny_state_dict, tmp_path):
    """Changed params (as after fine-tuning) come out in torch layout under their original keys."""
    ckpt = _converted(tiny_state_dict, tmp_path)
    manifest = converted.read_manifest(str(ckpt))
    params = converted.read_params(str(ckpt), converted.abstract_params(*converted.configs(manifest)))
    params["tracker"]["obj_ptr_proj"]["layers_0"]["kernel"] = params["tracker"]["obj_ptr_proj"]["layers_0"]["kernel"] + 1
    out = export.export_checkpoint(str(ckpt), params)
    key = "tracker.obj_ptr_proj.layers.0.weight"
    np.testing.assert_array_equal(out[key], tiny_state_dict[key] + 1)


def _save_run(run_dir, detector_params):
    from sam3_jax.checkpoint.training import Checkpointer

    ckpt = Checkpointer(str(run_dir), async_save=False)
    ckpt.save(7, {"params": {"detector": detector_params}, "step": np.int32(7)})
    ckpt.close()


def test_a_training_run_exports_through_from_run(tiny_state_dict, tmp_path):
    """A run that trained the detector with every layer stack scanned -> ``from_run`` (the CLI) ->
    the export: every mapped detector key carries the run's value, the tracker's keys, the dead
    weights and the RoPE buffers the base checkpoint's; and the new directory loads like any
    converted one."""
    base = _converted(tiny_state_dict, tmp_path)
    manifest = converted.read_manifest(str(base))
    abstract = converted.abstract_params(*converted.configs(manifest))
    tuned = jax.tree.map(lambda x: np.asarray(x) + 1.0, converted.read_params(str(base), abstract)["detector"])
    scanned = {"detector": tuned}
    assert len(stacking.layout(scanned)) == len(stacking.STACKS) - 1  # all but the tracker's
    _save_run(tmp_path / "run", scanned["detector"])
    out_dir = tmp_path / "tuned"
    subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), "--direction=from_run",
                    f"--run={tmp_path / 'run'}", f"--checkpoint={base}", f"--output_dir={out_dir}"], check=True, cwd=REPO)
    assert converted.read_manifest(str(out_dir))["trained"]["models"] == ["detector"]
    out = export.export_checkpoint(str(out_dir))
    assert sorted(out) == sorted(tiny_state_dict)
    mapped = [k for k, fate in manifest["keys"].items() if k.startswith("detector.") and fate.startswith(export.MAPPED)]
    assert len(mapped) > 100
    for key, value in out.items():
        want = tiny_state_dict[key] + 1 if key in mapped else tiny_state_dict[key]
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=key)


def test_a_run_exports_to_torch_through_the_checkpoint_it_started_from(ref, tiny_state_dict, tmp_path):
    """``to_torch --checkpoint=WORKDIR`` of a run fine-tuned from a converted checkpoint: the run's
    detector, the base's tracker, dead weights and RoPE buffers (and ``from_run`` finds the same base
    by itself). A run trained from scratch exports in the layout of its sizes: the reference's keys
    and shapes, its detector, the tracker it started with, and Meta's modules load it strictly."""
    from sam3_jax.checkpoint import weights
    from sam3_jax.convert.from_run import write_from_run
    from sam3_jax.testing import reference

    base = _converted(tiny_state_dict, tmp_path)
    abstract = converted.abstract_params(*converted.configs(converted.read_manifest(str(base))))
    tuned = jax.tree.map(lambda x: np.asarray(x) + 1.0, converted.read_params(str(base), abstract)["detector"])
    for name, init_from in (("run", str(base)), ("scratch", "")):
        workdir = tmp_path / name
        _save_run(workdir / "checkpoints", tuned)
        (workdir / "config.json").write_text(f'{{"init_from": "{init_from}", "seed": 0}}')
        weights.write_run_models(str(workdir), ModelConfig.tiny(), TrackerConfig.tiny())
    cli = [sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), "--direction=to_torch"]
    subprocess.run([*cli, f"--checkpoint={tmp_path / 'run'}", f"--torch_ckpt={tmp_path / 'run.pt'}"], check=True,
                   cwd=REPO)
    out = torch_io.read_state_dict(str(tmp_path / "run.pt"))[0]
    assert sorted(out) == sorted(tiny_state_dict)
    manifest = converted.read_manifest(str(base))
    mapped = {k for k, fate in manifest["keys"].items() if k.startswith("detector.") and fate.startswith(export.MAPPED)}
    for key, value in out.items():
        np.testing.assert_allclose(value, tiny_state_dict[key] + 1 if key in mapped else tiny_state_dict[key],
                                   rtol=1e-6, err_msg=key)
    found = write_from_run(str(tmp_path / "run"), None, str(tmp_path / "tuned"))
    assert found["trained"]["base"] == str(base) and found["trained"]["models"] == ["detector"]

    subprocess.run([*cli, f"--checkpoint={tmp_path / 'scratch'}", f"--torch_ckpt={tmp_path / 'scratch.pt'}"],
                   check=True, cwd=REPO)
    sd = ref.torch.load(tmp_path / "scratch.pt", map_location="cpu", weights_only=True)["model"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: v.shape for k, v in tiny_state_dict.items()}
    for key in mapped:
        np.testing.assert_allclose(sd[key].numpy(), tiny_state_dict[key] + 1, rtol=1e-6, err_msg=key)
    started = weights.read(str(tmp_path / "scratch"), tracker=True).params["tracker"]
    key = "tracker.obj_ptr_proj.layers.0.weight"
    np.testing.assert_array_equal(sd[key].numpy(), np.asarray(started["obj_ptr_proj"]["layers_0"]["kernel"]).T)
    reference.build_image_model(ModelConfig.tiny()).load_state_dict(
        {k[len("detector."):]: v for k, v in sd.items() if k.startswith("detector.")}, strict=True)
    reference.build_tracker(TrackerConfig.tiny()).load_state_dict(
        {k[len("tracker."):]: v for k, v in sd.items() if k.startswith("tracker.")}, strict=True)


def test_from_run_names_a_parameter_of_another_shape(tiny_state_dict, tmp_path):
    from sam3_jax.convert.from_run import write_from_run

    base = _converted(tiny_state_dict, tmp_path)
    abstract = converted.abstract_params(*converted.configs(converted.read_manifest(str(base))))
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract["detector"])
    params["dot_prod_scoring"]["hs_proj"]["kernel"] = np.zeros((3, 3), np.float32)
    _save_run(tmp_path / "run", params)
    with pytest.raises(ValueError, match="dot_prod_scoring/hs_proj/kernel"):
        write_from_run(str(tmp_path / "run"), str(base), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_half_precision_file_keeps_its_dtypes(ref, tiny_state_dict, tmp_path):
    """A bf16 copy of sam3.pt converts (float32 params, exactly the bf16 values) and exports back in
    bf16 bit for bit; the manifest names the keys that were not float32."""
    torch = ref.torch
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v)
          for k, v in tiny_state_dict.items()}
    src = tmp_path / "sam3_bf16.pt"
    torch.save({"model": sd}, src)
    manifest = convert_file(str(src), str(tmp_path / "ckpt"), cfg=ModelConfig.tiny(), tracker_cfg=TrackerConfig.tiny())
    halves = [k for k, v in sd.items() if v.dtype == torch.bfloat16]
    assert manifest["source_dtypes"] == dict.fromkeys(halves, "bfloat16") and halves
    key = "tracker.obj_ptr_proj.layers.0.weight"
    params = converted.read_params(str(tmp_path / "ckpt"), converted.abstract_params(*converted.configs(manifest)))
    kernel = params["tracker"]["obj_ptr_proj"]["layers_0"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, sd[key].float().numpy().T)
    out = tmp_path / "exported.pt"
    export.write_torch(str(tmp_path / "ckpt"), str(out))
    got = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert sorted(got) == sorted(sd)
    assert not [k for k in sd if got[k].dtype != sd[k].dtype or not _same_bytes(torch, got[k], sd[k])]


def test_export_errors_list_every_key(tiny_state_dict, tmp_path):
    ckpt = _converted(tiny_state_dict, tmp_path)
    manifest = converted.read_manifest(str(ckpt))
    params = converted.read_params(str(ckpt), converted.abstract_params(*converted.configs(manifest)))
    del params["tracker"]["no_obj_ptr"], params["tracker"]["maskmem_tpos_enc"]
    params["tracker"]["extra"] = np.zeros(2, np.float32)
    with pytest.raises(keymap.ConversionError) as err:
        export.export_params(params, manifest, dead={})
    msg = str(err.value)
    for needle in ("tracker.no_obj_ptr: no parameter tracker/no_obj_ptr", "tracker.maskmem_tpos_enc",
                   "tracker.no_mem_pos_enc: missing from dead_weights.npz", "parameters no torch key reads (1)",
                   "tracker/extra"):
        assert needle in msg, (needle, msg[:2000])


def test_rope_buffers_are_bit_exact_at_official_size(ref):
    """The tiny tables above happen to match either way; at official size only the torch.polar route does."""
    from sam3.model.vitdet import compute_axial_cis

    cfg = ModelConfig.official()
    prefix = "backbone.vision_backbone.trunk.blocks"
    for block in (0, cfg.vit.global_att_blocks[0]):
        args = sam3_checkpoint.rope_args(f"{prefix}.{block}.attn.freqs_cis", cfg)
        want = compute_axial_cis(*args).numpy()
        got = export._freqs_cis(*args)
        assert got.dtype == want.dtype and np.array_equal(got, want), block


def _same_bytes(torch, a, b) -> bool:
    """Bit-for-bit tensor equality that also holds for NaN bit patterns (uninitialised buffers)."""
    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and raw(a).equal(raw(b))


@pytest.mark.slow
def test_official_size_export_loads_into_build_sam3_video_model(ref, tmp_path):
    """The issue's deployment promise at full size: the official video model's own random weights go
    torch -> flax -> torch bit for bit, and the export loads into ``build_sam3_video_model`` with
    ``strict=True`` (which raises on any missing, unexpected or mis-shaped key)."""
    from sam3_jax.testing import reference

    torch = ref.torch
    torch.manual_seed(0)
    model = ref.model_builder.build_sam3_video_model(load_from_HF=False, bpe_path=reference.bpe_path(),
                                                     device="cpu")
    state = model.state_dict()
    with torch.no_grad():  # the builder leaves some tensors as torch.empty made them: NaN or Inf at times
        for tensor in state.values():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                tensor.normal_()
    src = tmp_path / "sam3.pt"
    torch.save({"model": state}, src)
    del model, state
    convert_file(str(src), str(tmp_path / "ckpt"))
    out = tmp_path / "exported.pt"
    subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), "--direction=to_torch",
                    f"--checkpoint={tmp_path / 'ckpt'}", f"--torch_ckpt={out}"], check=True, cwd=REPO)
    want = torch.load(src, map_location="cpu", weights_only=True, mmap=True)["model"]
    got = torch.load(out, map_location="cpu", weights_only=True, mmap=True)["model"]
    assert len(want) == 1465 and sorted(got) == sorted(want)
    assert not [k for k in want if not _same_bytes(torch, got[k], want[k])]
    del want, got
    ref.model_builder.build_sam3_video_model(checkpoint_path=str(out), load_from_HF=False,
                                             bpe_path=reference.bpe_path(), device="cpu")

"""convert_torch_ckpt.py and python -m sam3_jax.predict end to end on a tiny model, and their
behaviour on bad input (nothing half-written, errors that name the problem)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_torch

from sam3_jax.checkpoint import converted
from sam3_jax.convert import keymap, torch_io
from sam3_jax.convert.sam3_checkpoint import convert_file
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_state_dict, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    src = write_torch(tiny_state_dict, root / "sam3_tiny.pt")
    out = root / "converted"
    subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), f"--torch_ckpt={src}",
                    f"--output_dir={out}", "--preset=tiny"], check=True, cwd=REPO)
    return out, tiny_state_dict


def test_manifest_accounts_for_every_key(tiny_ckpt):
    out, sd = tiny_ckpt
    manifest = json.load(open(out / "manifest.json"))
    assert set(manifest["keys"]) == set(sd)
    fates = manifest["keys"]
    assert fates["tracker.no_obj_ptr"] == "mapped to no_obj_ptr"
    assert fates["tracker.no_mem_pos_enc"].startswith("dead")
    assert fates["tracker.sam_mask_decoder.output_upscaling.0.weight"] == \
        "mapped to sam_mask_decoder/output_upscaling_0/kernel"
    assert manifest["summary"]["mapped"] + manifest["summary"]["dead"] + manifest["summary"]["recomputed"] == len(sd)
    assert manifest["tracker_config"] == dataclasses.asdict(TrackerConfig.tiny())
    assert fates["detector.backbone.vision_backbone.trunk.blocks.0.attn.freqs_cis"].startswith("recomputed")
    assert fates["detector.backbone.vision_backbone.convs.3.conv_1x1.weight"].startswith("dead")
    assert fates["detector.transformer.decoder.query_embed.weight"] == "mapped to transformer/decoder/query_embed/embedding"
    dead = np.load(out / "dead_weights.npz")
    np.testing.assert_array_equal(dead["detector.segmentation_head.pixel_decoder.conv_layers.2.weight"],
                                  sd["detector.segmentation_head.pixel_decoder.conv_layers.2.weight"])
    assert manifest["model_config"]["d_model"] == ModelConfig.tiny().d_model
    assert len(manifest["source"]["sha256"]) == 64


def test_params_round_trip_through_orbax(tiny_ckpt):

    out, sd = tiny_ckpt
    params = converted.read_params(str(out), converted.abstract_params(ModelConfig.tiny(), TrackerConfig.tiny()))
    kernel = np.asarray(params["detector"]["backbone"]["vision_backbone"]["trunk"]["block_groups"]["blocks_0"]["attn"]["qkv"]["kernel"][0])
    np.testing.assert_array_equal(kernel, sd["detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["tracker"]["no_obj_ptr"]), sd["tracker.no_obj_ptr"])


def _predict(ckpt, image_path, tmp_path, *extra):
    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-m", "sam3_jax.predict", f"--checkpoint={ckpt}", f"--image={image_path}",
                           f"--output={out}", f"--overlay={tmp_path / 'overlay.png'}", *extra],
                          capture_output=True, text=True, cwd=REPO)
    return proc, out


def test_predict_cli_outputs(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    proc, out = _predict(ckpt, path, tmp_path, "--prompt=red circle", "--box=0.5,0.5,0.2,0.3", "--threshold=0.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    npz = np.load(out)
    q = ModelConfig.tiny().decoder.num_queries
    assert npz["pred_logits"].shape == (q,) and npz["pred_boxes"].shape == (q, 4)
    assert npz["presence_logit"].shape == () and npz["pred_masks"].shape[0] == q
    assert npz["masks"].shape == (q, 50, 70) and npz["boxes"].shape == (q, 4)  # threshold 0 keeps all
    assert np.all(np.diff(npz["scores"]) <= 0)
    assert Image.open(tmp_path / "overlay.png").size == (70, 50)


@pytest.fixture(scope="module")
def predictor(tiny_ckpt):
    from sam3_jax.infer.image_predictor import ImagePredictor

    return ImagePredictor.from_checkpoint(str(tiny_ckpt[0]))


def test_predict_cli_several_images_and_prompts(tiny_ckpt, predictor, tmp_path):
    from sam3_jax.data import image_io

    rng = np.random.default_rng(2)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, shape in zip(paths, ((40, 60, 3), (30, 30, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
    proc, out = _predict(tiny_ckpt[0], paths[0], tmp_path, f"--image={paths[1]}", "--prompt=red circle",
                         "--prompt=square", "--threshold=0.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.exists()
    for i, path in enumerate(paths):
        image = image_io.load_image(str(path))
        for j, text in enumerate(("red circle", "square")):
            npz = np.load(tmp_path / f"out_{i}_{j}.npz")
            want = predictor.predict(image, text, threshold=0.0)
            np.testing.assert_allclose(npz["pred_logits"], want.pred_logits, rtol=1e-4, atol=1e-4)
            assert npz["masks"].shape == want.masks.shape
            assert Image.open(tmp_path / f"overlay_{i}_{j}.png").size == image.shape[1::-1]
    proc, _ = _predict(tiny_ckpt[0], paths[0], tmp_path, f"--image={paths[1]}", "--box=0.5,0.5,0.2,0.2")
    assert proc.returncode != 0 and "single --image" in proc.stderr


def _awkward_image(mode, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "img.png"
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(path)
    elif mode == "exif":
        path = tmp_path / "img.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed rotated by 90 degrees
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, exif=exif)
    elif mode == "tiny":
        Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(path)
    else:
        channels = {"L": 1, "RGBA": 4}[mode]
        Image.fromarray(rng.integers(0, 255, (30, 40, channels), dtype=np.uint8).squeeze()).save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "exif", "tiny"])
def test_predict_accepts_awkward_images(predictor, tmp_path, mode):
    from sam3_jax.data import image_io

    image = image_io.load_image(str(_awkward_image(mode, tmp_path)))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if mode == "exif":
        assert image.shape[:2] == (40, 30)
    if mode == "I;16":
        assert image.max() > 200  # scaled from 16 bits, not clipped to black or white
    pred = predictor.predict(image, "x " * 40, threshold=0.0)  # > 32 tokens: truncated like the reference
    assert pred.masks.shape[1:] == image.shape[:2]


def test_prompt_errors(predictor):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="prompt"):
        predictor.predict(image, "   ")
    with pytest.raises(ValueError, match="box 0"):
        predictor.predict(image, "cat", boxes=[[0.5, 0.5, 0.0, 0.1]])
    with pytest.raises(ValueError, match="at most"):
        predictor.predict(image, "cat", boxes=[[0.5, 0.5, 0.1, 0.1]] * 100)
    # Box-only prompting uses the reference's "visual" text; a non-ASCII prompt is fine.
    assert predictor.predict(image, "", boxes=[[0.5, 0.5, 0.2, 0.2]]).pred_logits.shape == (16,)
    assert predictor.predict(image, "chat noir \u00e9l\u00e9gant \u732b").pred_logits.shape == (16,)


def test_cli_errors_name_the_problem(tiny_ckpt, tmp_path):
    proc, _ = _predict(tiny_ckpt[0], tmp_path / "missing.jpg", tmp_path, "--prompt=cat")
    assert proc.returncode != 0 and "missing.jpg" in proc.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    proc, _ = _predict(tiny_ckpt[0], bad, tmp_path, "--prompt=cat")
    assert proc.returncode != 0 and "bad.jpg" in proc.stderr
    proc, _ = _predict(tiny_ckpt[0], bad, tmp_path, "--prompt=cat", "--box=1,2,3")
    assert proc.returncode != 0 and "--box" in proc.stderr


def test_bad_checkpoints_fail_clearly_and_write_nothing(tiny_state_dict, tmp_path):
    cfg = ModelConfig.tiny()
    out = tmp_path / "out"

    def convert(sd, **kw):
        src = write_torch(sd, tmp_path / "in.pt", **kw)
        return convert_file(src, str(out), cfg=cfg, tracker_cfg=TrackerConfig.tiny())

    missing = dict(tiny_state_dict)
    del missing["detector.transformer.decoder.presence_token.weight"]
    with pytest.raises(keymap.ConversionError, match="transformer/decoder/presence_token/embedding"):
        convert(missing)
    wrong = dict(tiny_state_dict)
    wrong["detector.dot_prod_scoring.hs_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(keymap.ConversionError, match=r"hs_proj.weight \(3, 3\)"):
        convert(wrong)
    # The tracker: keys missing (all of them, or one) or mis-shaped are listed by name.
    no_tracker = {k: v for k, v in tiny_state_dict.items() if not k.startswith("tracker.")}
    with pytest.raises(keymap.ConversionError, match=r"\(tracker\.\*\)") as err:
        convert(no_tracker)
    assert "no_obj_ptr (1, 64)" in str(err.value) and "maskmem_tpos_enc (3, 1, 1, 16)" in str(err.value)
    missing = dict(tiny_state_dict)
    del missing["tracker.obj_ptr_proj.layers.1.bias"]
    with pytest.raises(keymap.ConversionError, match=r"Flax parameters with no torch key \(1\):\n    obj_ptr_proj/layers_1/bias"):
        convert(missing)
    wrong = dict(tiny_state_dict)
    wrong["tracker.maskmem_tpos_enc"] = np.zeros((2, 1, 1, 16), np.float32)
    with pytest.raises(keymap.ConversionError, match=r"maskmem_tpos_enc \(2, 1, 1, 16\) -> maskmem_tpos_enc expects"):
        convert(wrong)
    extra = dict(tiny_state_dict)
    extra["detector.new_head.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(keymap.ConversionError, match="new_head.weight"):
        convert(extra)
    with pytest.raises(torch_io.CheckpointFormatError, match="SAM 2"):
        convert({"image_encoder.trunk.pos_embed": np.zeros(3, np.float32), "memory_attention.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(torch_io.CheckpointFormatError, match="not a SAM 3 checkpoint"):
        convert({"fc.weight": np.zeros((2, 2), np.float32)})
    assert not out.exists()
    # DDP prefix and a bare state_dict are accepted.
    manifest = convert(tiny_state_dict, wrap=False, prefix="module.")
    assert len(manifest["keys"]) == len(tiny_state_dict)
    # A truncated file.
    src = write_torch(tiny_state_dict, tmp_path / "full.pt")
    data = open(src, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_io.CheckpointFormatError, match="trunc.pt"):
        convert_file(str(tmp_path / "trunc.pt"), str(tmp_path / "out2"), cfg=cfg, tracker_cfg=TrackerConfig.tiny())
    assert not (tmp_path / "out2").exists()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    assert leftovers == []


def test_scanned_layouts_are_converted(tiny_state_dict, tmp_path):
    cfg = ModelConfig.tiny()
    src = write_torch(tiny_state_dict, tmp_path / "in.pt")
    convert_file(src, str(tmp_path / "scan"), cfg=cfg, tracker_cfg=TrackerConfig.tiny())
    params = converted.read_params(str(tmp_path / "scan"), converted.abstract_params(cfg, TrackerConfig.tiny()))
    stacked = np.asarray(params["detector"]["backbone"]["vision_backbone"]["trunk"]["block_groups"]["blocks_1"]["attn"]["qkv"]["kernel"])
    # torch block 3 = group 1, position 1 of the [windowed, global] pattern.
    np.testing.assert_array_equal(stacked[1], tiny_state_dict["detector.backbone.vision_backbone.trunk.blocks.3.attn.qkv.weight"].T)
    text = params["detector"]["backbone"]["language_backbone"]["encoder"]["transformer"]["resblocks_scan"]
    np.testing.assert_array_equal(np.asarray(text["resblocks_0"]["mlp"]["c_fc"]["kernel"][1]), tiny_state_dict[
        "detector.backbone.language_backbone.encoder.transformer.resblocks.1.mlp.c_fc.weight"].T)
    fusion = params["detector"]["transformer"]["encoder"]["layers_scan"]["layers_0"]
    np.testing.assert_array_equal(np.asarray(fusion["linear1"]["kernel"][1]),
                                  tiny_state_dict["detector.transformer.encoder.layers.1.linear1.weight"].T)

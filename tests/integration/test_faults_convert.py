"""The converter and the predictors' loader under faults (issue 33): non-finite weights refused and
named (unless --allow_nonfinite), outputs checked before the conversion, a full disk reported in one
line, integer tensors in float parameters refused. CLI errors: exit code 2, no traceback."""
import errno
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, write_torch
from PIL import Image

from sam3_jax import fileio
from sam3_jax.checkpoint import converted as converted_format
from sam3_jax.checkpoint import finite, weights
from sam3_jax.convert import export, keymap, torch_io
from sam3_jax.convert.sam3_checkpoint import convert_file
from sam3_jax.model.config import ModelConfig
from sam3_jax.model.tracker.config import TrackerConfig

pytestmark = pytest.mark.parity

NAN_KEY, INF_KEY = "detector.transformer.decoder.query_embed.weight", "tracker.no_obj_ptr"


def _cli(*args, prelude=""):
    """convert_torch_ckpt.py with ``args`` (after ``prelude``, Python run first in the same process)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['convert_torch_ckpt.py'] + sys.argv[1:]\n" \
           "runpy.run_path('convert_torch_ckpt.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)


def _refused(proc, *names):
    """Exit code 2, no traceback, one error message naming every one of ``names``."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in proc.stderr, (name, proc.stderr[-3000:])


def _convert(src, out, **kw):
    return convert_file(str(src), str(out), cfg=ModelConfig.tiny(), tracker_cfg=TrackerConfig.tiny(), **kw)


def _hidden(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


@pytest.fixture(scope="module")
def source(tiny_state_dict, tmp_path_factory):
    return write_torch(tiny_state_dict, tmp_path_factory.mktemp("src") / "sam3_tiny.pt")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    _convert(source, out)
    return out


def test_nonfinite_keys_finds_nan_and_inf_in_numpy_and_jax_leaves():
    tree = {"a": {"b": np.array([1.0, np.nan], np.float32), "c": np.ones(3, np.float16)},
            "d": jnp.array([np.inf, 0.0]), "e": np.arange(3), "f": jnp.zeros((2, 2))}
    assert finite.nonfinite_keys(tree) == ["a/b", "d"]
    assert finite.nonfinite_keys({"x.weight": np.full(2, -np.inf, np.float32)}) == ["x.weight"]
    with pytest.raises(finite.NonFiniteError, match=r"where: NaN or Inf in 2 tensor\(s\):\n  a/b\n  d"):
        finite.check_finite(tree, "where")
    assert finite.check_finite(tree, "where", allow=True) == ["a/b", "d"]


def test_nonfinite_weights_are_refused_by_the_converter_and_the_predictors(tiny_state_dict, tmp_path):

    sd = dict(tiny_state_dict)
    sd[NAN_KEY] = np.where(np.arange(sd[NAN_KEY].size).reshape(sd[NAN_KEY].shape) == 5, np.nan, sd[NAN_KEY])
    sd[NAN_KEY] = sd[NAN_KEY].astype(np.float32)
    sd[INF_KEY] = np.full_like(sd[INF_KEY], np.inf)
    src, out = write_torch(sd, tmp_path / "nan.pt"), tmp_path / "out"
    _refused(_cli(f"--torch_ckpt={src}", f"--output_dir={out}", "--preset=tiny"), NAN_KEY, INF_KEY,
             "--allow_nonfinite")
    assert not out.exists() and not _hidden(tmp_path)
    manifest = _convert(src, out, allow_nonfinite=True)  # let through on request, and recorded
    assert sorted(manifest["nonfinite"]) == sorted([NAN_KEY, INF_KEY])
    with pytest.raises(finite.NonFiniteError) as e:
        weights.read(str(out), tracker=True)
    assert "detector/transformer/decoder/query_embed/embedding" in str(e.value)
    assert "tracker/no_obj_ptr" in str(e.value) and str(out) in str(e.value)
    with pytest.raises(finite.NonFiniteError, match="query_embed.weight"):  # and exporting it back
        export.write_torch(str(out), str(tmp_path / "back.pt"))
    assert not (tmp_path / "back.pt").exists()
    assert export.write_torch(str(out), str(tmp_path / "back.pt"), allow_nonfinite=True) == len(sd)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    proc = subprocess.run([sys.executable, "-m", "sam3_jax.predict", f"--checkpoint={out}", "--prompt=cat",
                           f"--image={tmp_path / 'img.png'}", f"--output={tmp_path / 'p.npz'}"],
                          capture_output=True, text=True, cwd=REPO)
    _refused(proc, "NaN or Inf", "detector/transformer/decoder/query_embed/embedding")
    assert not (tmp_path / "p.npz").exists()


def test_integer_tensor_in_a_float_parameter_is_refused(tiny_state_dict, tmp_path):
    sd = dict(tiny_state_dict)
    sd[NAN_KEY] = np.arange(sd[NAN_KEY].size, dtype=np.int64).reshape(sd[NAN_KEY].shape)
    with pytest.raises(keymap.ConversionError, match=rf"{NAN_KEY.removeprefix('detector.')} int64 -> .*query_embed"):
        _convert(write_torch(sd, tmp_path / "int.pt"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _hidden(tmp_path)


def test_to_torch_refuses_an_existing_file_before_exporting(converted, tmp_path, monkeypatch):
    target = tmp_path / "out.pt"
    target.write_bytes(b"keep me")
    _refused(_cli("--direction=to_torch", f"--checkpoint={converted}", f"--torch_ckpt={target}"), str(target),
             "--overwrite")
    assert target.read_bytes() == b"keep me"
    with monkeypatch.context() as m:
        m.setattr(export, "export_checkpoint", lambda *a: pytest.fail("exported before checking the output"))
        with pytest.raises(FileExistsError, match="--overwrite"):
            export.write_torch(str(converted), str(target))
        with pytest.raises(FileExistsError, match="not a file"):
            export.write_torch(str(converted), str(tmp_path), overwrite=True)
    export.write_torch(str(converted), str(target), overwrite=True)
    assert set(torch_io.read_state_dict(str(target))[0]) == set(converted_format.read_manifest(str(converted))["keys"])
    assert not _hidden(tmp_path)


def test_overwrite_is_checked_before_converting(source, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a checkpoint")
    (tmp_path / "ckpt").mkdir()
    with monkeypatch.context() as m:
        m.setattr(torch_io, "read_state_dict", lambda *a: pytest.fail("converted before checking the output"))
        with pytest.raises(FileExistsError, match="is not a directory"):
            _convert(source, tmp_path / "file", overwrite=True)
        with pytest.raises(FileExistsError, match="--overwrite"):
            _convert(source, tmp_path / "ckpt")
    (tmp_path / "ckpt.old" / "mine").mkdir(parents=True)  # a stale (or the user's) X.old is not in the way
    _convert(source, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt.old" / "mine").is_dir() and (tmp_path / "ckpt" / converted_format.MANIFEST).is_file()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt.old", "file"]


def test_a_full_disk_is_one_line_and_leaves_nothing(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = _cli(f"--torch_ckpt={source}", f"--output_dir={out}", "--preset=tiny",
                prelude="from sam3_jax import fileio\n"
                        "fileio.shutil.disk_usage = lambda p: type('U', (), {'free': 4 << 20})()")
    _refused(proc, f"no space left on device: {out} (needs ")
    assert not out.exists() and not _hidden(tmp_path)
    # The disk fills during the write all the same: Orbax's writer threads fail with TensorStore's message.
    monkeypatch.setattr(fileio, "check_space", lambda *a: None)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # write() leaves its filters after a failure
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", list(logging.getLogger(name).filters))

    def fill(self, *a, **kw):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0": Failed to write 11440128 bytes to file 7: '
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(converted_format.ocp.Checkpointer, "save", fill)
    with pytest.raises(OSError) as e:
        _convert(source, out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert fileio.describe_os_error(e.value) == f"no space left on device: {out}"
    assert not out.exists() and not _hidden(tmp_path)

"""The generated dataset: layout, determinism, atomic and idempotent writes; the inspect CLI."""
import filecmp
import json
import os
import subprocess
import sys

import pytest

from sam3_jax.data import config, inspect, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_writes_both_layouts_and_the_split(tmp_path):
    out = tmp_path / "gen"
    subprocess.run([sys.executable, "-m", "sam3_jax.data.synthetic", f"--output_dir={out}",
                    "--num_videos=4", "--num_frames=5", "--size=48", "--seed=3"],
                   check=True, cwd=REPO, capture_output=True)
    names = sorted(os.listdir(out / "davis" / "JPEGImages"))
    assert names == [f"synth_{i:04d}" for i in range(4)]
    for name in names:
        assert len(os.listdir(out / "davis" / "Annotations" / name)) == 5
        assert sorted(os.listdir(out / "ytvis" / "JPEGImages" / name)) == \
            sorted(os.listdir(out / "davis" / "JPEGImages" / name))
    train = (out / "davis" / "ImageSets" / "train.txt").read_text().split()
    val = (out / "davis" / "ImageSets" / "val.txt").read_text().split()
    assert sorted(train + val) == names and val
    ann = json.loads((out / "ytvis" / "annotations.json").read_text())
    assert [v["file_names"][0] for v in ann["videos"]] == [f"{n}/00000.jpg" for n in names]
    assert {c["name"] for c in ann["categories"]} == set(synthetic.PHRASES)
    assert all(len(a["segmentations"]) == 5 for a in ann["annotations"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_deterministic_by_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        synthetic.generate(str(tmp_path / name), num_videos=2, num_frames=3, size=32, seed=seed)
    same = filecmp.dircmp(tmp_path / "a" / "davis" / "Annotations" / "synth_0001",
                          tmp_path / "b" / "davis" / "Annotations" / "synth_0001")
    assert not same.diff_files
    assert (tmp_path / "a/ytvis/annotations.json").read_text() == \
        (tmp_path / "b/ytvis/annotations.json").read_text()
    assert (tmp_path / "a/ytvis/annotations.json").read_text() != \
        (tmp_path / "c/ytvis/annotations.json").read_text()


def test_objects_enter_leave_and_occlude(tmp_path):
    synthetic.generate(str(tmp_path / "g"), num_videos=12, num_frames=10, size=64, seed=0)
    ann = json.loads((tmp_path / "g/ytvis/annotations.json").read_text())
    present = [[s is not None for s in a["segmentations"]] for a in ann["annotations"]]
    assert any(not p[0] and p[-1] for p in present)  # enters
    assert any(p[0] and not p[-1] for p in present)  # leaves
    assert any(all(p) for p in present)


def test_ensure_is_idempotent_and_refuses_other_parameters(tmp_path):
    root = str(tmp_path / "g")
    synthetic.ensure(root, 2, 3, 32, 0)
    stamp = os.stat(os.path.join(root, synthetic.MANIFEST)).st_mtime_ns
    synthetic.ensure(root, 2, 3, 32, 0)
    assert os.stat(os.path.join(root, synthetic.MANIFEST)).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="delete it"):
        synthetic.ensure(root, 3, 3, 32, 0)


def test_inspect_reports_keys_skips_and_rate(tmp_path):
    c = config.ml_collections.ConfigDict({"seed": 0, "data": config.demo_config(str(tmp_path))})
    c.data.synthetic.update(num_videos=3, num_frames=6, size=48)
    report = inspect.summarize(c, num_batches=3)
    assert "frames              (2, 4, 128, 128, 3)" in report
    assert "query_positives" in report and "skipped samples: 0" in report
    assert "clips/s" in report

"""The readers on generated and hand-made files, and what they do with bad input."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_jax.data import config, schema, synthetic
from sam3_jax.data.clips import ClipBuilder
from sam3_jax.data.errors import DataError
from sam3_jax.data.sources import DavisSource, SavSource, coco_source, ytvis_source


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    synthetic.generate(root, num_videos=4, num_frames=6, size=64, seed=1)
    return root


@pytest.fixture
def copy(generated, tmp_path):
    """A private copy of the generated dataset that a test may damage."""
    root = str(tmp_path / "synthetic")
    shutil.copytree(generated, root)
    return root


def davis(root, **kw):
    return DavisSource(f"{root}/davis/JPEGImages", f"{root}/davis/Annotations", **kw)


def ytvis(root, **kw):
    return ytvis_source(f"{root}/ytvis/JPEGImages", f"{root}/ytvis/annotations.json", **kw)


def data_cfg(on_error="raise", **kw):
    c = config.demo_config("/nonexistent")
    c.image_size, c.on_error, c.max_retries = 32, on_error, 3
    c.augment.enabled = False
    c.sampling.reverse_prob = 0.0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def build(source, index=0, seed=0, **kw):
    c = data_cfg(**kw)
    ex = ClipBuilder(source, c, 0, "test")(index, np.random.default_rng(seed))
    schema.validate(ex, schema.Dims.from_config(c), batched=False)
    return ex


def test_davis_and_ytvis_layouts_hold_the_same_videos(generated):
    d, y = davis(generated), ytvis(generated)
    assert len(d) == len(y) == 4 and d.names == [e.name for e in y.entries]
    for i in range(4):
        vd, vy = d.video(i), y.video(i)
        assert vd.frame_numbers == vy.frame_numbers == list(range(6))
        for t in range(6):
            ad, ay = vd.load_annotation(t), vy.load_annotation(t)
            md, my = ad.masks(ad.visible_ids()), ay.masks(ay.visible_ids())
            assert sorted(m.tobytes() for m in md) == sorted(m.tobytes() for m in my)
    ed, ey = build(d, 2), build(y, 2)
    for key in ("frames", "masks", "boxes", "object_valid", "frame_valid", "frame_indices"):
        np.testing.assert_array_equal(ed[key], ey[key], err_msg=key)


@pytest.mark.parametrize("seed", range(6))
def test_label_map_and_bit_plane_paths_give_the_same_clip(generated, monkeypatch, seed):
    """DAVIS masks are warped as one map of ids; forcing the generic bit-plane path (random
    affine, flips, retries of the first-frame visibility check) must not change any field."""
    from sam3_jax.data.sources.davis import LabelMapAnnotation

    c = data_cfg(max_objects=2)
    c.augment.enabled, c.sampling.reverse_prob, c.mask_size = True, 0.5, 24
    c.augment.degrees, c.augment.scale_min, c.augment.scale_max = 45.0, 0.7, 1.6

    def clip():
        return ClipBuilder(davis(generated), c, 0, "t")(seed % 4, np.random.default_rng(seed))

    fast = clip()
    monkeypatch.setattr(LabelMapAnnotation, "label_map", lambda self: None)
    generic = clip()
    assert fast["object_valid"].any()
    for key in fast:
        np.testing.assert_array_equal(fast[key], generic[key], err_msg=key)


def test_ytvis_categories_are_the_phrases(generated):
    y = ytvis(generated)
    assert y.vocabulary.phrases == tuple(sorted(synthetic.PHRASES))
    ex = build(y, 1)
    names = [y.vocabulary.phrases[i] for i in ex["phrase_ids"][ex["phrase_valid"]]]
    assert all(n in synthetic.PHRASES for n in names) and names
    # Every positive's mask belongs to an object of that phrase in the source video.
    v = y.video(1)
    for _, p, n in zip(*np.nonzero(ex["query_positives"])):
        assert v.phrase_of(int(ex["object_ids"][n])) == ex["phrase_ids"][p]


def test_davis_class_agnostic_phrase_or_none(generated):
    ex = build(davis(generated))
    assert ex["phrase_valid"].sum() == 1 and not ex["query_exhaustive"].any()
    np.testing.assert_array_equal(ex["query_positives"][:, 0], ex["object_valid"])
    ex = build(davis(generated, phrase=""))
    assert not ex["phrase_valid"].any() and ex["object_valid"].any()


def test_file_list_selects_videos(generated):
    src = davis(generated, file_list=f"{generated}/davis/ImageSets/val.txt")
    assert src.names == ["synth_0003"]


def write_jpegs(folder, numbers, size=(20, 16)):
    os.makedirs(folder, exist_ok=True)
    for n in numbers:
        Image.new("RGB", size, (90, 90, 90)).save(os.path.join(folder, f"{n:05d}.jpg"))


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


@pytest.fixture
def sav(tmp_path):
    """Two objects annotated every 4th frame; frame 1 exists but is not annotated."""
    write_jpegs(tmp_path / "frames" / "sav_000001", [0, 1, 4, 8])
    h, w = 16, 20
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[2:6, 3:9], b[8:14, 10:18] = True, True
    masklet = [[rle(a), rle(b)], [rle(a), None], [rle(np.zeros((h, w))), rle(b)]]
    os.makedirs(tmp_path / "ann")
    with open(tmp_path / "ann" / "sav_000001_manual.json", "w") as f:
        json.dump({"video_id": "sav_000001", "video_height": h, "video_width": w,
                   "masklet": masklet, "masklet_id": [0, 1]}, f)
    return SavSource(str(tmp_path / "frames"), str(tmp_path / "ann")), a, b


def test_sav_reader_uses_annotated_frames_only(sav):
    src, a, b = sav
    v = src.video(0)
    assert v.frame_numbers == [0, 4, 8]
    assert [v.load_annotation(t).visible_ids() for t in range(3)] == [[0, 1], [0], [1]]
    np.testing.assert_array_equal(v.load_annotation(0).masks([1, 0]), np.stack([b, a]))
    ex = build(src, num_frames=3)
    assert ex["frame_indices"].tolist()[:3] == [0, 4, 8]
    assert ex["object_valid"][:3].tolist() == [[True, True, False], [True, False, False],
                                               [False, True, False]]


def test_sav_stride_maps_masklets_to_frame_numbers(sav, tmp_path):
    src = SavSource(str(tmp_path / "frames"), str(tmp_path / "ann"), annotation_stride=1)
    assert src.video(0).frame_numbers == [0, 1]  # masklet 2 has no frame 2 on disk


@pytest.fixture
def coco(tmp_path):
    write_jpegs(tmp_path / "images", [1, 2], size=(20, 16))
    box = np.zeros((16, 20), bool)
    box[4:12, 5:15] = True
    data = {
        "images": [{"id": 1, "file_name": "00001.jpg", "height": 16, "width": 20},
                   {"id": 2, "file_name": "00002.jpg", "height": 16, "width": 20}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"},
                       {"id": 3, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[5, 4, 15, 4, 15, 12, 5, 12]]},  # polygon
            {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": rle(box)},
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 1, "segmentation": rle(box)},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(tmp_path / "images"), str(path)


def test_coco_image_is_a_one_frame_clip(coco):
    src = coco_source(*coco)
    assert src.vocabulary.phrases == ("cat", "dog", "person")
    v = src.video(0)
    assert sorted(v.object_phrases) == [10, 11]  # the crowd region is not an object
    assert v.crowd_phrases == {src.vocabulary.id("person")}
    polygon, rle_mask = v.load_annotation(0).masks([10, 11])
    assert abs(int(polygon.sum()) - 80) <= 20 and rle_mask.sum() == 80
    ex = build(src, max_phrases=3)
    assert ex["frame_valid"].tolist() == [True, False, False, False]
    assert ex["object_valid"][0, :2].all() and not ex["object_valid"][1:].any()
    phrases = [src.vocabulary.phrases[i] for i in ex["phrase_ids"][ex["phrase_valid"]]]
    # "person" has an instance (the crowd) in the image, so it is never a negative.
    assert sorted(phrases) == ["cat", "dog"]
    assert ex["query_exhaustive"][0, :2].all()


def expect(error_source_fn, path_part, field_part, index=0, **kw):
    """Raise mode names file and field; skip mode counts the sample and moves on."""
    with pytest.raises(DataError) as e:
        build(error_source_fn(), index, **kw)
    assert path_part in e.value.path and field_part in e.value.field, str(e.value)
    return e.value


def test_corrupt_and_truncated_jpeg(copy):
    bad = f"{copy}/davis/JPEGImages/synth_0000/00000.jpg"
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    c = data_cfg()
    c.sampling.stride_min = c.sampling.stride_max = 1
    with pytest.raises(DataError, match="00000.jpg") as e:
        for seed in range(20):  # some window starts at frame 0 and decodes it
            ClipBuilder(davis(copy), c, 0, "t")(0, np.random.default_rng(seed))
    assert e.value.field == "image"
    open(bad, "wb").write(b"not a jpeg at all")
    with pytest.raises(DataError, match="cannot decode"):
        for seed in range(20):
            ClipBuilder(davis(copy), c, 0, "t")(0, np.random.default_rng(seed))


def test_missing_annotation(copy):
    shutil.rmtree(f"{copy}/davis/Annotations/synth_0001")
    os.makedirs(f"{copy}/davis/Annotations/synth_0001")
    expect(lambda: davis(copy), "synth_0001", "annotation", index=1)


def test_mask_size_differs_from_frame(copy):
    folder = f"{copy}/davis/Annotations/synth_0002"
    for f in os.listdir(folder):
        img = Image.open(os.path.join(folder, f))
        img.resize((img.width // 2, img.height // 2), Image.Resampling.NEAREST).save(
            os.path.join(folder, f))
    expect(lambda: davis(copy), "synth_0002", "size", index=2)


def edit_ytvis(root, fn):
    path = f"{root}/ytvis/annotations.json"
    data = json.load(open(path))
    fn(data)
    json.dump(data, open(path, "w"))


def test_invalid_rle(copy):
    def damage(data):
        for ann in data["annotations"]:
            if ann["video_id"] == 1:
                ann["segmentations"] = [s and {"size": s["size"], "counts": "zzzz"}
                                        for s in ann["segmentations"]]
    edit_ytvis(copy, damage)
    err = expect(lambda: ytvis(copy), "annotations.json", "segmentations")
    assert "RLE" in str(err)

    def uncompressed(data):
        data["annotations"][0]["segmentations"][0] = {"size": [48, 64], "counts": [5, 3]}
    edit_ytvis(copy, uncompressed)
    expect(lambda: ytvis(copy), "annotations.json", "segmentations")


def test_rle_size_mismatch(copy):
    def damage(data):
        for ann in data["annotations"]:
            ann["segmentations"] = [s and {"size": [10, 10], "counts": s["counts"]}
                                    for s in ann["segmentations"]]
    edit_ytvis(copy, damage)
    err = expect(lambda: ytvis(copy), "annotations.json", "segmentations")
    assert "size" in str(err)


def test_unknown_ids(copy):
    edit_ytvis(copy, lambda d: d["annotations"][0].update(category_id=999))
    expect(lambda: ytvis(copy), "annotations.json", "category_id")
    edit_ytvis(copy, lambda d: d["annotations"].append(dict(d["annotations"][1], video_id=77)))
    with pytest.raises(DataError, match="unknown video_id 77"):
        ytvis(copy)
    assert len(ytvis(copy, strict=False)) == 4  # dropped with a warning


def test_empty_video(copy):
    for f in os.listdir(f"{copy}/davis/JPEGImages/synth_0003"):
        os.remove(f"{copy}/davis/JPEGImages/synth_0003/{f}")
    expect(lambda: davis(copy), "synth_0003", "frames", index=3)
    edit_ytvis(copy, lambda d: d["videos"][0].update(file_names=[]))
    err = expect(lambda: ytvis(copy), "annotations.json", "file_names")
    assert "empty video" in str(err)


def test_non_utf8_phrase(copy):
    path = f"{copy}/ytvis/annotations.json"
    data = json.load(open(path))
    used = {a["category_id"] for a in data["annotations"]}
    for c in data["categories"]:
        if c["id"] in used:
            c["name"] = "PLACEHOLDER" + str(c["id"])
    raw = json.dumps(data).encode()
    for cid in used:  # raw bytes that are not UTF-8
        raw = raw.replace(f"PLACEHOLDER{cid}".encode(), b"caf\xe9 " + str(cid).encode())
    open(path, "wb").write(raw)
    err = expect(lambda: ytvis(copy), "annotations.json", "phrase")
    assert "UTF-8" in str(err)


def test_skip_mode_counts_and_never_spins_forever(copy):
    for name in ("synth_0000", "synth_0001"):
        shutil.rmtree(f"{copy}/davis/Annotations/{name}")
    c = data_cfg("skip", max_retries=20)
    counts = []
    for seed in range(6):
        ex = ClipBuilder(davis(copy), c, 0, "t")(0, np.random.default_rng(seed))
        assert ex["video_index"] in (2, 3)
        counts.append(int(ex["skipped"]))
    assert min(counts) >= 1
    shutil.rmtree(f"{copy}/davis/Annotations")
    with pytest.raises(RuntimeError, match="in a row"):
        ClipBuilder(davis(copy), c, 0, "t")(0, np.random.default_rng(0))


def test_saco_video_np_pairs_give_each_video_its_negatives(copy):
    def add_pairs(data):
        present = {a["category_id"] for a in data["annotations"] if a["video_id"] == 1}
        absent = next(c["id"] for c in data["categories"] if c["id"] not in present)
        data["video_np_pairs"] = [{"video_id": 1, "category_id": c} for c in [*present, absent]]
        data["absent"] = absent
    edit_ytvis(copy, add_pairs)
    data = json.load(open(f"{copy}/ytvis/annotations.json"))
    src = ytvis(copy)
    absent = src.vocabulary.id(next(c["name"] for c in data["categories"]
                                    if c["id"] == data["absent"]))
    assert absent in src.video(0).phrase_candidates and src.video(1).phrase_candidates == []
    ex = build(src, 0, max_phrases=8)
    assert absent in ex["phrase_ids"].tolist()  # the only negative on offer
    assert len(set(ex["phrase_ids"][ex["phrase_valid"]].tolist())) == ex["phrase_valid"].sum()

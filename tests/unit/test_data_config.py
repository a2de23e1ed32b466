"""configs/video.py variants and the data config's linked fields."""
import importlib.util
import os

import pytest

from sam3_jax.data import schema, sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def video_config(arg):
    spec = importlib.util.spec_from_file_location("video_config", f"{REPO}/configs/video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("variant", [None, "demo", "davis", "sav", "ytvis", "coco", "tracker", "joint",
                                     "tracker_demo"])
def test_variants_name_one_known_source_kind(variant):
    c = video_config(variant)
    assert isinstance(c.seed, int)
    # The demos read the YTVIS layout; the default (official-size) config and the tracker's, DAVIS.
    want = {None: "davis", "demo": "ytvis", "tracker_demo": "ytvis", "tracker": "davis", "joint": "davis"}.get(
        variant, variant)
    assert [s.kind for s in c.data.sources.values()] == [want]
    assert all(s.kind in sources.KINDS for s in c.data.sources.values())
    schema.Dims.from_config(c.data)  # every static maximum is present


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown variant 'kinetics'"):
        video_config("kinetics")


def test_mask_size_and_demo_paths_follow_their_fields():
    c = video_config("demo").data
    c.image_size = 256
    assert c.mask_size == 256
    c.mask_size = 64
    assert (c.image_size, c.mask_size) == (256, 64)
    c.synthetic.output_dir = "/elsewhere"
    assert c.sources.demo.annotations == "/elsewhere/ytvis/annotations.json"
    assert c.sources.demo.file_list.startswith("/elsewhere/")

"""Moving parameter trees between the unrolled and scanned layouts (`model.stacking`), and
giving the memory of the layout left behind back (`host_memory.trim`)."""
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sam3_jax import host_memory
from sam3_jax.model import stacking

SIZES = {stacking.VIT: 2, stacking.TEXT: 1, stacking.MEMORY_ATTENTION: 1}


def _unrolled(seed=0):
    rng = np.random.default_rng(seed)

    def layers(prefix, n):
        return {f"{prefix}_{i}": {"attn": {"kernel": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)},
                                  "norm": {"bias": jnp.asarray(rng.normal(size=5), jnp.float32)}} for i in range(n)}

    return {"detector": {"backbone": {"vision_backbone": {"trunk": {"pos": jnp.ones(2), **layers("blocks", 6)}},
                                      "language_backbone": {"encoder": {"transformer": layers("resblocks", 3)}}}},
            "tracker": {"transformer": {"encoder": layers("layers", 4)}}}


def _leaves(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_same(a, b):
    a, b = _leaves(a), _leaves(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("direction", ["stack", "unstack"])
def test_owned_relayout_equals_the_copying_one_and_releases_what_it_moved(direction, monkeypatch):
    """Handed over (``owned``), the tree comes out the same, the moved layers are gone from the
    tree given (nothing else keeps their arrays alive), and the freed memory is handed back once
    per group of layers."""
    start = _unrolled() if direction == "stack" else stacking.relayout(_unrolled(), SIZES)
    target = SIZES if direction == "stack" else {}
    expected = stacking.relayout(start, target)
    given = jax.tree.map(jnp.copy, start)
    moved = [weakref.ref(leaf) for path, leaf in traverse_util.flatten_dict(given).items() if "pos" not in path]
    trims = []
    monkeypatch.setattr(host_memory, "trim", lambda: trims.append(1))

    out = stacking.relayout(given, target, owned=True)
    gc.collect()
    _assert_same(out, expected)
    assert stacking.layout(start) == ({} if direction == "stack" else SIZES)  # the copying one left it whole
    assert all(ref() is None for ref in moved)
    assert len(trims) == 2 + 1 + 1  # the ViT's two groups, the text encoder, the memory attention
    assert stacking.layout(out) == target


def test_trim_gives_freed_heap_memory_back():
    """Buffers under glibc's adaptive mmap threshold come from its heap; freed between live ones,
    they stay resident until trimmed."""
    if host_memory._malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library")

    def resident_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    del_me = np.ones(16 << 20, np.uint8)  # freeing an mmapped 16 MiB buffer raises the threshold above 4 MiB
    del del_me
    freed, kept = [], []
    for _ in range(100):
        freed.append(np.ones(4 << 20, np.uint8))
        kept.append(np.ones(256 << 10, np.uint8))  # pins each freed buffer below the heap's top
    before = resident_mib()
    del freed
    host_memory.trim()
    assert resident_mib() < before - 300


def test_any_subtree_goes_to_the_torch_layout_and_back():
    """`unrolled` and `stacked_like` find the stacks wherever a (sub)tree holds them: a lone trunk,
    or the whole tree, and `unrolled_shapes` gives the shapes of the same."""
    scanned = stacking.relayout(_unrolled(), SIZES)
    trunk = scanned["detector"]["backbone"]["vision_backbone"]["trunk"]
    assert stacking.scanned_stacks(trunk) == {(): (stacking.VIT, 2)}
    _assert_same(stacking.unrolled(trunk), _unrolled()["detector"]["backbone"]["vision_backbone"]["trunk"])
    _assert_same(stacking.unrolled(scanned), _unrolled())
    _assert_same(stacking.stacked_like(_unrolled(), scanned), scanned)
    shapes = stacking.unrolled_shapes(scanned)
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, _unrolled())


def test_repeat_unrolled_traces_every_layer():
    """Within `repeat.unrolled` a stack's scan leaves no loop in the program, with the same
    parameters and outputs; XLA's FLOP count then covers every layer, not one."""
    import flax.linen as nn

    from sam3_jax.nn import repeat

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return repeat.repeat([lambda name: nn.Dense(8, name=name)], 6, "layers", "layers_scan", x)

    model, x = Stack(), jnp.ones((4, 8))
    params = model.init(jax.random.key(0), x)
    assert params["params"]["layers_scan"]["layers_0"]["kernel"].shape == (6, 8, 8)
    scanned = jax.jit(lambda p, x: model.apply(p, x)).lower(params, x)
    with repeat.unrolled():
        flat = jax.jit(lambda p, x: model.apply(p, x)).lower(params, x)
    assert " while(" in scanned.compile().as_text() and " while(" not in flat.compile().as_text()
    assert flat.cost_analysis()["flops"] > 5 * scanned.cost_analysis()["flops"]
    np.testing.assert_allclose(flat.compile()(params, x), scanned.compile()(params, x), rtol=1e-6)

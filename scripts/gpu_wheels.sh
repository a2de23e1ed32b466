#!/usr/bin/env bash
# Prepares, on a machine with network access, every wheel a GPU host that has only JAX, PyTorch, Flax,
# Optax and Orbax needs to run benchmarks/gpu_suite.py offline: this project, its data and metrics
# dependencies (grain, ml-collections, pycocotools, ...) and the PyTorch reference (sam3 and its light
# dependencies), all with --no-deps so that nothing in the folder can replace the host's jax or torch.
# Binary wheels are fetched for CPython 3.12 on manylinux x86_64 whatever this machine runs.
#   bash scripts/gpu_wheels.sh [DIR]            # default DIR: wheels/ (gitignored)
# On the GPU host, from the repository root (what the host already has is kept, whatever its version):
#   pip install --no-index --no-deps --find-links=wheels -r wheels/requirements.txt
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PY=${PYTHON:-python}
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --only-binary=:all: --no-deps)
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
  PLATFORM+=(--platform "${tag}_x86_64")  # pip takes the tags given, not the older ones they imply
done

# Pinned to the versions the tests run with; jax, torch, flax, optax, orbax and their own
# dependencies (numpy, absl-py, protobuf, pyyaml, psutil, ...) are the host's. Left out: av (35 MB),
# which only reading video files needs (sam3_jax.infer.video_io); the benchmarks generate their frames.
BINARY=(grain==0.2.18 array-record==0.8.6 pycocotools==2.0.11 opencv-python-headless==5.1.0.95
        pillow==13.0.0 regex==2026.12.2 safetensors==0.8.0 hf-xet==1.8.0)
PURE=(ml-collections==1.1.0 cloudpickle==3.1.3 portpicker==1.6.0 ftfy==6.3.1 wcwidth==0.9.5 tensorboardx==2.6.5
      sam3==0.1.4 timm==1.0.31 einops==0.8.2 iopath==0.1.10 portalocker==4.4.2 tqdm==4.70.1
      huggingface-hub==1.33.0 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 idna==3.21
      certifi==2026.10.19.post1 packaging==26.4 click==8.5.1)

mkdir -p "$DIR"
"$PY" -m pip download -q -d "$DIR" "${PLATFORM[@]}" "${BINARY[@]}"
# Pure-Python packages: their wheel, or one built from the sdist where there is none (py3-none-any).
"$PY" -m pip wheel -q -w "$DIR" --no-deps "${PURE[@]}"
"$PY" -m pip wheel -q -w "$DIR" --no-deps .
rm -f "$DIR"/*.tar.gz "$DIR"/*.zip
# Their names, unpinned: pip then installs only the packages the host does not have.
ls "$DIR" | sed -n 's/-.*\.whl$//p' > "$DIR/requirements.txt.tmp" && mv "$DIR/requirements.txt.tmp" "$DIR/requirements.txt"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $DIR; on the GPU host:"
echo "  pip install --no-index --no-deps --find-links=$DIR -r $DIR/requirements.txt"

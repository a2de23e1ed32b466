#!/usr/bin/env bash
# Installs the PyTorch parity oracle (Meta's sam3==0.1.4 on CPU torch 2.13.0) into the active Python.
# Idempotent: returns in about a second when everything is already there.
# torch is pinned to exactly 2.13.0 so pip takes a local CPU build; everything that could pull
# another torch (timm, sam3) is installed with --no-deps.
set -euo pipefail
PY=${PYTHON:-python}

if "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.13.0", "sam3": "0.1.4"}
for name, ver in want.items():
    if not md.version(name).startswith(ver):
        sys.exit(1)
for name in ["timm", "einops", "iopath", "ftfy", "regex", "huggingface_hub", "safetensors", "yaml", "psutil", "tqdm"]:
    __import__(name)
PYEOF
then
  echo "reference oracle: already installed"
  exit 0
fi

echo "reference oracle: installing torch==2.13.0 (CPU), sam3==0.1.4 and light dependencies"
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q --no-deps "sam3==0.1.4" "timm==1.0.31" "einops==0.8.2" "iopath==0.1.10"
"$PY" -m pip install -q ftfy regex tqdm pyyaml safetensors psutil portalocker "huggingface_hub<2" typing_extensions
# sam3 itself imports only under the shims of sam3_jax/testing/reference.py, so check versions here.
"$PY" -c "import torch, importlib.metadata as md; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('reference oracle: torch', torch.__version__, '+ sam3', md.version('sam3'), 'ready')"

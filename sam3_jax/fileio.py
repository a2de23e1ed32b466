"""Writing whole directories atomically: readers see the old one or the complete new one, never a
half-written one, whatever dies mid-way."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary directory beside ``path``; when the block completes it replaces ``path``
    (by renames), and when the block raises it is deleted and ``path`` is left as it was."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = path + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

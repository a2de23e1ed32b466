"""Writing outputs safely: checked before the work starts, written whole under a temporary name and
renamed into place (readers see the old output or the complete new one, never a half-written one),
and temporaries of killed runs cleaned up by the next run.

Temporary names carry the host and process id (``.NAME.tmp-HOST-PID-XXXX``, ``.NAME.old-HOST-PID-XXXX``),
so a later run on the same host removes those whose process is gone (kill -9 leaves them behind) and
leaves any other alone, naming it in a warning.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile

log = logging.getLogger(__name__)
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _tag(kind: str) -> str:
    return f"{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(directory: str, prefix: str) -> list[str]:
    """Removes the temporaries ``PREFIX{tmp,old}-HOST-PID-*`` in ``directory`` left by a process of this
    host that is gone; warns about the others (a live process, another host). Returns those removed."""
    pattern = re.compile(re.escape(prefix) + r"(tmp|old)-(.+)-(\d+)-[^-]+$")
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            m = pattern.match(name)
            if m is None:
                continue
            path, (kind, host, pid) = os.path.join(directory, name), m.groups()
            if kind == "old" and not os.path.lexists(os.path.join(directory, prefix[1:-1])):
                log.warning("%s holds the previous %s (a replace was interrupted): move it back", path,
                            prefix[1:-1])
            elif host == _HOST and not _pid_alive(int(pid)):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                log.warning("removed %s, left by process %s, which is gone", path, pid)
                removed.append(path)
            else:
                log.warning("temporary %s belongs to process %s on %s, which may still be writing it; "
                            "remove it yourself if not", path, pid, host)
    return removed


def check_output(path: str, overwrite: bool, *, directory: bool) -> str:
    """Refuses, before any work, an output that cannot be written: it exists (unless ``overwrite``), it
    exists as the wrong kind (a file where a directory goes or the reverse, which ``overwrite`` does
    not replace), or its folder cannot be written to. Returns ``path`` made absolute."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"output exists (pass --overwrite to replace it): {path}")
        if os.path.isdir(path) != directory or os.path.islink(path):
            want = "a directory" if directory else "a file"
            raise FileExistsError(f"output exists and is not {want}, so --overwrite does not replace it: {path}")
    check_writable(os.path.dirname(path))
    return path


def check_writable(folder: str) -> None:
    """``folder`` (made if missing, so its nearest existing ancestor) accepts new files: probed by
    creating and deleting one, which also catches read-only filesystems. Raises OSError naming it."""
    folder = os.path.abspath(folder)
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", probe)
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=probe)
    except OSError as e:
        raise OSError(e.errno, f"cannot write in {probe} ({e.strerror})", folder) from None
    os.close(fd)
    os.unlink(name)


def check_space(folder: str, needed: int) -> None:
    """Raises OSError(ENOSPC) naming ``folder`` when its filesystem has less than ``needed`` bytes free
    (checked before writing, so a full disk is one clear error, not a failure half-way)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"needs {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free", folder)


def _permissions(mode: int) -> int:
    """``mode`` less the process's umask: what ``open`` / ``mkdir`` would give, where ``tempfile``
    gives only the owner access."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary directory beside ``path``; when the block completes it replaces ``path``
    (by renames), and when the block raises it is deleted and ``path`` is left as it was."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent, f".{name}.")
    tmp = tempfile.mkdtemp(prefix=f".{name}.{_tag('tmp')}", dir=parent)
    os.chmod(tmp, _permissions(0o777))
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.{_tag('old')}", dir=parent)
            os.rename(path, os.path.join(old, name))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str):
    """Yields a temporary file name beside ``path`` (same suffix, so writers that pick a format by it
    still do); renamed to ``path`` when the block completes, deleted when it raises."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent, f".{name}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{_tag('tmp')}", suffix=os.path.splitext(name)[1], dir=parent)
    os.close(fd)
    os.chmod(tmp, _permissions(0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temporary_directory(prefix: str) -> tempfile.TemporaryDirectory:
    """A ``tempfile.TemporaryDirectory`` in the system's temporary folder whose name lets a later run
    remove it if this process is killed before cleaning it up."""
    clean_stale(tempfile.gettempdir(), prefix)
    return tempfile.TemporaryDirectory(prefix=prefix + _tag("tmp"))


def describe_os_error(e: OSError) -> str:
    """One line for an OSError; disk full reads ``no space left on device: PATH``."""
    if e.errno == errno.ENOSPC:
        detail = (e.strerror or "").replace(os.strerror(errno.ENOSPC), "", 1).strip(" ;,")
        return f"no space left on device: {e.filename or '?'}" + (f" ({detail})" if detail else "")
    return str(e)

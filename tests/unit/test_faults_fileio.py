"""Outputs under faults (issue 33): temporaries of a run killed with SIGKILL are removed by the next
run (only those of a process that is gone), outputs are checked before any work, a full disk is one
line naming the path."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from sam3_jax import fileio

HOLD = """
import sys, time
from sam3_jax import fileio
with fileio.{kind}(sys.argv[1]) as tmp:
    open(tmp if "{kind}" == "atomic_file" else tmp + "/part", "w").write("half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _killed_mid_write(kind: str, path) -> str:
    """Runs a process that writes ``path`` through ``fileio.<kind>``, kills it with SIGKILL mid-way and
    returns the temporary it left behind."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(kind=kind), str(path)], stdout=subprocess.PIPE,
                            text=True)
    tmp = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert os.path.exists(tmp) and os.path.basename(tmp).startswith(f".{path.name}.tmp-")
    return tmp


@pytest.mark.parametrize("kind", ["atomic_directory", "atomic_file"])
def test_a_killed_writers_temporary_is_removed_by_the_next_run(tmp_path, kind, caplog):
    out = tmp_path / "out.npz"
    left = _killed_mid_write(kind, out)
    live = tmp_path / f".out.npz.tmp-{fileio._HOST}-{os.getpid()}-abcd1234"  # a live process's: kept
    other_host = tmp_path / ".out.npz.tmp-otherhost-1-abcd1234"
    live.mkdir()
    other_host.mkdir()
    with getattr(fileio, kind)(str(out)) as tmp:
        if kind == "atomic_directory":
            open(os.path.join(tmp, "part"), "w").write("whole")
        else:
            open(tmp, "w").write("whole")
    assert not os.path.exists(left), left
    assert live.exists() and other_host.exists()
    assert f"removed {left}" in caplog.text and str(other_host) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.npz", live.name, other_host.name])


def test_a_killed_runs_frame_spool_is_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.tempfile, "tempdir", str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", "from sam3_jax import fileio; import time; "
                             "d = fileio.temporary_directory('sam3_jax-frames-'); print(d.name, flush=True); "
                             "time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    left = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert os.path.isdir(left) and left.startswith(str(tmp_path))
    spool = fileio.temporary_directory("sam3_jax-frames-")
    assert not os.path.exists(left) and os.path.isdir(spool.name)
    spool.cleanup()


def test_an_interrupted_replace_keeps_the_previous_output(tmp_path, caplog):
    """Killed between moving the old output aside and moving the new one in: the old one is not deleted."""
    old = tmp_path / f".out.old-{fileio._HOST}-999999999-abcd1234"
    (old / "out").mkdir(parents=True)
    fileio.clean_stale(str(tmp_path), ".out.")
    assert old.exists() and "move it back" in caplog.text


def test_outputs_get_the_umasks_permissions_not_the_temporarys(tmp_path):
    """The temporary is the caller's only; the finished output is readable as ``open`` would make it."""
    old = os.umask(0o022)
    try:
        with fileio.atomic_file(str(tmp_path / "a.json")) as tmp:
            open(tmp, "w").write("{}")
        with fileio.atomic_directory(str(tmp_path / "d")) as tmp:
            open(os.path.join(tmp, "x"), "w").write("")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == oct(0o755)


def test_outputs_are_checked_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        fileio.check_output(str(tmp_path / "dir"), False, directory=True)
    with pytest.raises(FileExistsError, match="is not a directory"):
        fileio.check_output(str(tmp_path / "file"), True, directory=True)
    with pytest.raises(FileExistsError, match="is not a file"):
        fileio.check_output(str(tmp_path / "dir"), True, directory=False)
    with pytest.raises(NotADirectoryError, match="file"):
        fileio.check_output(str(tmp_path / "file" / "below" / "out.mp4"), False, directory=False)
    assert fileio.check_output(str(tmp_path / "new" / "deeper"), False, directory=True).endswith("deeper")
    assert not (tmp_path / "new").exists()  # checked, not made
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(PermissionError):
            fileio.check_output(str(tmp_path / "ro" / "out"), False, directory=True)


def test_disk_full_is_one_line_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OSError) as e:
        fileio.check_space(str(tmp_path / "out"), 10 << 20)
    assert e.value.errno == errno.ENOSPC
    line = fileio.describe_os_error(e.value)
    assert line.startswith(f"no space left on device: {tmp_path / 'out'} (needs 10.0 MiB") and "\n" not in line
    assert fileio.describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/x")) == \
        "no space left on device: /x"


def test_live_pid_check():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert fileio._pid_alive(os.getpid()) and not fileio._pid_alive(proc.pid)


def test_exit_time_event_loop_errors_are_dropped():
    """After an interrupted run, Orbax's event loop collected at exit must not print a traceback;
    any other unraisable error still reaches the hook."""
    import asyncio
    import types

    from sam3_jax.checkpoint import save_errors

    seen = []
    hook = save_errors._drop_closed_loop_errors(seen.append)  # noqa: SLF001
    hook(types.SimpleNamespace(exc_value=ValueError("Invalid file descriptor: -1"),
                               object=asyncio.BaseEventLoop.__del__))
    hook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None))
    other = types.SimpleNamespace(exc_value=ValueError("something else"), object=print)
    hook(other)
    assert seen == [other]


def test_read_errors_left_by_a_failed_restore_are_dropped():
    """Orbax's read coroutines of a restore that failed report nothing more when collected; any other
    coroutine's error still reaches the hook."""
    import types

    from sam3_jax.checkpoint import save_errors

    def coroutine(filename):
        space = {}
        exec(compile("async def read():\n    pass\n", filename, "exec"), space)
        coro = space["read"]()
        coro.close()
        return coro

    seen = []
    hook = save_errors.drop_failed_read_errors(seen.append)
    hook(types.SimpleNamespace(exc_value=Exception("Encountered error while reading array index"),
                               object=coroutine(os.path.join(os.sep, "site-packages", "orbax", "serialization.py"))))
    other = types.SimpleNamespace(exc_value=ValueError("something else"), object=coroutine("mine.py"))
    hook(other)
    plain = types.SimpleNamespace(exc_value=ValueError("no coroutine"), object=print)
    hook(plain)
    assert seen == [other, plain]

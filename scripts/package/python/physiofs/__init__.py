"""Mount PhysioNet's MIMIC-CXR buckets from Python (a notebook, a training script).

The wheel that carries this module also carries the ``physiofs`` binary, installed next to
the environment's ``python``; this module runs ``physiofs mount --background`` with it, which
returns only once the mount serves (or fails with its own error), so code after
``physiofs.mount(...)`` never races the mount::

    import physiofs, pydicom

    with physiofs.mount("/tmp/mimic-cxr", billing_project="my-gcp-project") as m:
        ds = pydicom.dcmread(m.path / "files/p10/p10000032/s50414267/02aa804e-....dcm")
    # unmounted here

Only the standard library is used. Linux only (FUSE): as a user, Debian's ``fuse3``
(``fusermount3``) must be installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType
from typing import Dict, List, Optional, Sequence, Type, Union

__all__ = ["Mount", "MountError", "binary", "mount", "unmount"]

StrPath = Union[str, "os.PathLike[str]"]
FlagValue = Union[str, int, float, bool, None, "os.PathLike[str]", Sequence[object]]

# What `physiofs mount --background` prints once the mount serves:
# "physiofs: mounted ... (process 1234, log /root/.cache/physiofs/logs/mnt-x.log)".
_READY = re.compile(r"\(process (\d+), log (.+)\)\s*$", re.MULTILINE)
_ERROR_PREFIX = "physiofs: error: "


class MountError(RuntimeError):
    """``physiofs`` could not mount (or unmount); ``str(error)`` is physiofs's own message.

    Attributes:
        message: the error as physiofs printed it, without the ``physiofs: error:`` prefix.
        command: the command line that failed.
        returncode: its exit status (None if it did not finish in time).
        output: everything it printed (stdout and stderr).
    """

    def __init__(
        self,
        message: str,
        command: Sequence[str] = (),
        returncode: Optional[int] = None,
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.command = list(command)
        self.returncode = returncode
        self.output = output


def binary() -> str:
    """The path of the ``physiofs`` executable this module runs.

    In order: ``$PHYSIOFS_BIN``; the scripts directory of the environment this module is
    installed in (where the wheel put the binary: a venv's ``bin/``, or the user scheme's for
    ``pip install --user``); ``physiofs`` on ``PATH`` (a Debian package, ``cargo install``).

    Raises:
        MountError: no executable was found.
    """
    override = os.environ.get("PHYSIOFS_BIN")
    if override:
        return override
    candidates = []
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        if scripts:
            candidates.append(Path(scripts) / "physiofs")
    # A venv's python is <venv>/bin/python even when sysconfig answers for the base install.
    candidates.append(Path(sys.executable).parent / "physiofs")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("physiofs")
    if found:
        return found
    raise MountError(
        "the physiofs executable was not found (looked in "
        + ", ".join(str(c.parent) for c in candidates)
        + " and on PATH): reinstall the physiofs wheel, or set PHYSIOFS_BIN"
    )


def _flag_args(flags: Dict[str, FlagValue]) -> List[str]:
    """Python keyword arguments as ``physiofs mount`` flags: ``cache_size="2GiB"`` →
    ``--cache-size 2GiB``, ``anonymous=True`` → ``--anonymous``, False/None → nothing,
    a list or tuple → the flag once per item."""
    args: List[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or v is False:
                continue
            if v is True:
                args.append(flag)
            else:
                args += [flag, os.fspath(v) if isinstance(v, os.PathLike) else str(v)]
    return args


def _error_message(output: str) -> str:
    """physiofs's own error (the ``physiofs: error: ...`` part onwards), or all its output."""
    i = output.find(_ERROR_PREFIX)
    if i >= 0:
        return output[i + len(_ERROR_PREFIX):].strip()
    return output.strip() or "physiofs failed without a message"


class Mount:
    """A mounted bucket. Use it as a context manager to unmount on exit.

    Attributes:
        path: the mount point.
        pid: the background ``physiofs`` process serving it (None if not reported).
        log_file: where that process logs (None if not reported).
        command: the ``physiofs mount`` command line that mounted it.
    """

    def __init__(self, path: Path, pid: Optional[int], log_file: Optional[Path], command: Sequence[str]) -> None:
        self.path = path
        self.pid = pid
        self.log_file = log_file
        self.command = list(command)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Mount(path={str(self.path)!r}, pid={self.pid})"

    def __enter__(self) -> "Mount":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.unmount()

    @property
    def mounted(self) -> bool:
        """Whether the mount point is still a mount."""
        return _is_mounted(self.path)

    def unmount(self, timeout: float = 30.0) -> None:
        """Unmounts (see :func:`unmount`) and waits up to ``timeout`` seconds for the
        background process to finish. Does nothing if already unmounted."""
        if self.mounted:
            unmount(self.path)
        if self.pid is not None:
            deadline = time.monotonic() + timeout
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a finished background process is
    reparented, so it is not our child to wait for)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "PID (COMM) STATE ...": COMM may contain spaces and parentheses.
    state = stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _mount_points() -> List[str]:
    points: List[str] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4:
                raw = fields[4]
                # mountinfo writes space, tab, newline and backslash as \ooo.
                decoded = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)
                points.append(os.fsdecode(decoded))
    return points


def _is_mounted(path: Path) -> bool:
    return str(_absolute(path)) in _mount_points()


def _absolute(path: Path) -> Path:
    # The mount point itself may be stale (stat fails), so resolve only its parent.
    p = Path(os.path.abspath(path))
    return p.parent.resolve() / p.name if p.name else p


def mount(
    mountpoint: StrPath,
    bucket: Optional[str] = None,
    billing_project: Optional[str] = None,
    *,
    create: bool = True,
    timeout: Optional[float] = 300.0,
    **flags: FlagValue,
) -> Mount:
    """Mounts a bucket read-only at ``mountpoint`` and returns once the mount serves.

    Runs ``physiofs mount --background [--bucket B] [--billing-project P] FLAGS MOUNTPOINT``.

    Args:
        mountpoint: directory to mount on; created if missing (unless ``create=False``).
        bucket: ``NAME`` or ``gs://NAME/PREFIX`` (default: physiofs's default, the
            MIMIC-CXR DICOM bucket ``mimic-cxr-2.0.0.physionet.org``).
        billing_project: the Google Cloud project billed for the requests; PhysioNet's
            buckets are requester pays (``$PHYSIOFS_BILLING_PROJECT`` is used if not given).
        create: create the mount point directory if it does not exist.
        timeout: seconds to wait for the mount to be ready (None: no limit). physiofs bounds
            its own start-up checks, so this only matters for a hung machine.
        **flags: any other flag of ``physiofs mount`` (see ``physiofs mount --help``):
            ``cache_size="2GiB"`` → ``--cache-size 2GiB``, ``allow_other=True`` →
            ``--allow-other``, ``force=True`` → ``--force`` (clear a stale mount first),
            ``endpoint="http://127.0.0.1:4443"``, ``anonymous=True``, ``key_file=...``.

    Returns:
        a :class:`Mount`; ``with physiofs.mount(...) as m:`` unmounts when the block ends.

    Raises:
        MountError: physiofs could not mount; the message is physiofs's own (a missing
            bucket, no credentials, a stale mount point, a misspelt flag, ...).
    """
    path = Path(os.fspath(mountpoint))
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            # A stale mount point: stat fails, so it looks missing but cannot be created.
            # physiofs reports it (or clears it with force=True).
            pass
    args = [binary(), "mount", "--background"]
    if bucket is not None:
        args += ["--bucket", bucket]
    if billing_project is not None:
        args += ["--billing-project", billing_project]
    args += _flag_args(flags)
    args.append(str(_absolute(path)))
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.output if isinstance(e.output, str) else (e.output or b"").decode(errors="replace")
        raise MountError(
            f"physiofs did not report the mount of {path} ready within {timeout} s",
            args,
            None,
            out,
        ) from None
    except OSError as e:
        raise MountError(f"cannot run {args[0]}: {e}", args) from None
    if done.returncode != 0:
        raise MountError(_error_message(done.stdout), args, done.returncode, done.stdout)
    ready = _READY.search(done.stdout)
    pid = int(ready.group(1)) if ready else None
    log_file = Path(ready.group(2)) if ready else None
    m = Mount(_absolute(path), pid, log_file, args)
    if not m.mounted:
        raise MountError(
            f"physiofs reported {path} mounted but it is not in /proc/self/mountinfo: "
            + done.stdout.strip(),
            args,
            done.returncode,
            done.stdout,
        )
    return m


def unmount(mountpoint: StrPath, lazy: bool = False) -> None:
    """Unmounts a physiofs mount (which ends its background process).

    Uses ``umount`` as root and ``fusermount3 -u`` otherwise (falling back to the other).
    ``lazy=True`` detaches a busy or stale mount at once (``umount -l`` /
    ``fusermount3 -uz``); the kernel finishes it once nothing uses it.

    Raises:
        MountError: neither command could unmount it (the message says why, e.g. busy).
    """
    path = str(_absolute(Path(os.fspath(mountpoint))))
    umount = ["umount"] + (["-l"] if lazy else []) + [path]
    fusermount = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    attempts = [umount, fusermount] if os.geteuid() == 0 else [fusermount, umount]
    errors = []
    for cmd in attempts:
        try:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{' '.join(cmd)}: {e}")
            continue
        if done.returncode == 0:
            return
        errors.append(f"{' '.join(cmd)}: {done.stdout.strip()}")
    raise MountError(f"cannot unmount {path}: " + "; ".join(errors), attempts[0])

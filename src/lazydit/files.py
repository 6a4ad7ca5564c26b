"""Files that are never half-written (write to a temporary file in the target folder, then rename), the lock that
keeps two runs from writing one output, and the fingerprint of weights that resumable outputs record to refuse
mixing runs."""

import errno
import hashlib
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from lazydit.errors import UsageError

_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_write's temporary names: .<name>.<8 random>.tmp


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an exception (the CLI does), so that `finally` blocks run as on Ctrl-C:
    temporary files are removed, locks released. `signum`: the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def terminating_signals():
    """While the block runs, SIGTERM and SIGHUP raise `Terminated` in the main thread (as SIGINT raises
    KeyboardInterrupt), so `finally` blocks remove temporary files and release locks; a signal left ignored by the
    parent (nohup's SIGHUP) stays ignored, and outside the main thread nothing changes. Once one arrived, further
    ones are ignored while the clean-up runs (SIGKILL still ends the process). The previous handlers come back on
    exit."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None))
               if s is not None and signal.getsignal(s) is signal.SIG_DFL]

    def terminate(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, terminate) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def refuse_symlink_loop(path):
    """Raise UsageError "cannot write <path>: symlink loop at <component>" when a component of `path` (from the
    root down) is a symlink loop or a chain past the kernel's limit."""
    path = Path(path)
    for a in [*reversed(path.parents), path]:
        try:
            os.stat(a)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"cannot write {path}: symlink loop at {a}") from None
            return  # missing: nothing below exists either


def output_target(path) -> Path:
    """The file that writing `path` replaces: `path`, or the final target of a symlink (a dangling one: the file it
    names, created with its folder as any new output). Nothing is written.

    Raises:
        UsageError: a symlink loop on the way; a folder on the way that is a dangling symlink; a target that
            exists and is not a regular file (folder, FIFO, socket, device): lazydit only replaces regular files.
    """
    path = Path(path)
    refuse_symlink_loop(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    for a in target.parents:
        if a.is_symlink() and not a.exists():
            raise UsageError(f"cannot write {path}: {a} is a symlink to {os.readlink(a)}, which does not exist")
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new file (or a parent that is a file: the write says so)
        return target
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        shown = f"{path} (-> {target})" if target != path else f"{path}"
        raise UsageError(f"{shown} is a {kind}, not a regular file: lazydit only replaces regular files")
    return target


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) and rename the result onto path, so an interrupted write never leaves half a file.

    Only regular files are replaced (a device, FIFO, socket or folder at `path` is refused with UsageError, before
    write_fn runs); a symlink is written through: its final target is replaced in its own folder and the link stays
    (see `output_target`). A replaced file keeps its permission bits; a new one gets 0666 less the umask."""
    path = output_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        if keep is None:
            umask = os.umask(0)
            os.umask(umask)
            keep = 0o666 & ~umask  # mkstemp makes 0600 files; give the usual permissions
        os.chmod(tmp, keep)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_save_atomic(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path, text: str):
    """Write a text file (JSON, CSV, markdown) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def savefig_atomic(fig, path, **kwargs):
    """fig.savefig to `path` atomically (the format from the file's suffix, since the temporary name has none)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def _make_parents(folder: Path) -> list:
    """mkdir -p `folder`; the folders it created, outermost first."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for f in reversed(missing):
        try:
            f.mkdir()
            made.append(f)
        except FileExistsError:  # another run made it meanwhile: it is theirs to remove
            pass
        except OSError:  # a parent that is a file, no permission: no lock file there (the write reports it)
            break
    return made


def _remove_stale_temps(target: Path):
    """Remove the temporary files of killed writers (SIGKILL, power loss: no `finally` ran) that belong to `target`:
    beside it, directly inside it and its sub-folders (a run folder), and in its parts folder. Called with the lock
    held, so none of them is being written by a lazydit run."""
    places = [(target.parent, f".{target.name}.")]
    for folder in (target, target.with_name(target.name + ".parts")):
        if folder.is_dir() and not folder.is_symlink():
            subs = [sub for sub in folder.iterdir() if sub.is_dir() and not sub.is_symlink()]
            places += [(folder, "."), *((sub, ".") for sub in subs)]
    for folder, prefix in places:
        try:
            names = [e.name for e in os.scandir(folder)
                     if e.name.startswith(prefix) and e.is_file(follow_symlinks=False)]
        except OSError:
            continue
        for name in names:
            if _TEMP.match(name):
                try:
                    os.remove(folder / name)
                except OSError:
                    pass


def _open_lock(lock: Path):
    """An fd holding flock(LOCK_EX) on `lock`, None when another process holds it. A lock file removed by its
    holder between our open and flock is not the lock any more: open the new one."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def output_lock(path, what: str | None = None):
    """Hold an exclusive lock on the output `path` (a file, or a run folder) while the block runs: a second run that
    writes the same output (from another process, or under another name for it: symlinks are resolved) is refused
    at once with UsageError "another lazydit run is writing <path>". Yields the resolved output path.

    The lock is `flock` on `.<name>.lock` beside the output (inside it, for a folder whose parent is not writable),
    removed on exit; one left by a killed run holds no lock (the kernel dropped it) and is taken over. Folders made
    for the lock file are removed on exit when still empty. With the lock held, the temporary files killed writers
    left for this output are removed (`_remove_stale_temps`). Where locking is impossible (no write permission, a
    filesystem without flock) the block runs unlocked: the write itself then reports the problem.
    """
    path = Path(path)
    refuse_symlink_loop(path)
    real = Path(os.path.realpath(path))
    made = []
    fd = lock = None
    try:
        made = _make_parents(real.parent)
        for lock in (real.parent / f".{real.name}.lock", real / ".lazydit.lock"):
            try:
                fd = _open_lock(lock)
            except OSError:  # no permission, a read-only or flock-less filesystem, no such folder (the inside one)
                continue
            if fd is None:
                raise UsageError(f"another lazydit run is writing {what or path}: wait for it to end, or choose "
                                 "another output")
            break
    except BaseException:
        _remove_empty(made)
        raise
    try:
        if fd is not None:
            _remove_stale_temps(real)
        yield real
    finally:
        if fd is not None:
            try:
                os.remove(lock)  # while holding it: a run that opened it meanwhile sees it gone and opens anew
            except OSError:
                pass
            os.close(fd)
        _remove_empty(made)


def _remove_empty(folders):
    for f in reversed(folders):
        try:
            f.rmdir()
        except OSError:
            break


def weights_fingerprint(module) -> str:
    """Short sha256 of a module's state dict (names and bytes, any dtype or device): the same weights, the same
    fingerprint. Reference statistics record their extractor's; resumable sampling records its model's and gates'."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]

"""The CPU kernels' shared library: compiled, cached and checked before it is loaded.

Loading a library runs its constructors, and the cached file's name is predictable, so a
cached build is loaded only when nobody else could have written it (:func:`build`): the
folder is created 0700 and must belong to this user and be writable by no one else; so
must the library and its digest record (written at build time), and the library's bytes
must match that digest. A cached file that fails is logged and rebuilt over; a folder
that fails is logged and left alone, and the library is built into a private temporary
folder for this process instead (a second of compiling per start rather than a slower
fallback). The check and the load read one open descriptor, so the file cannot be swapped
in between.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from server.basemodel.gguf_cache import cache_root

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("skinny_gemm.c"),
           Path(__file__).with_name("decode_attention.c"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
BUILD_TIMEOUT_S = 120


def find_compiler() -> str | None:
    """The system C compiler ($CC, else gcc or cc), or None."""
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.stdout.splitlines()[0] if done.stdout else ""


def library_name(compiler: str) -> str:
    """The cached library's file name: keyed by the sources, the flags and the compiler."""
    parts = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(FLAGS + LIBS).encode(),
                                     _compiler_version(compiler).encode()])).hexdigest()[:16]
    return f"switchboard-kernels-{key}.so"


@dataclass(frozen=True)
class Library:
    """A built library, checked, as an open read-only descriptor (what gets loaded)."""

    fd: int
    path: Path | None
    """Where it lies in the cache (None: built privately, its folder already removed)."""


def _owner() -> int:
    """The uid every cache entry must belong to: this process's."""
    return os.geteuid()


def _distrust(info: os.stat_result, path: Path | str) -> str | None:
    """Why another user could have written ``path`` (None: only this one could)."""
    if info.st_uid != _owner():
        return f"{path} belongs to uid {info.st_uid}, not to this process's uid {_owner()}"
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH))
               if info.st_mode & bit]
    if writers:
        return (f"{path} is writable by {' and '.join(writers)} "
                f"(mode {stat.S_IMODE(info.st_mode):o})")
    return None


def _open_checked(path: Path | str) -> int:
    """A descriptor on the regular file ``path``, not followed through a link, that only
    this user could have written; OSError or RuntimeError saying why not."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    problem = None if stat.S_ISREG(info.st_mode) else f"{path} is not a regular file"
    problem = problem or _distrust(info, path)
    if problem:
        os.close(fd)
        raise RuntimeError(problem)
    return fd


def _digest(fd: int) -> str:
    """sha256 of the open file's bytes."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _record_of(target: Path) -> Path:
    """Where the digest of the library ``target`` is recorded at build time."""
    return target.with_suffix(".sha256")


def _cache_folder() -> tuple[Path, str | None]:
    """``<cache>/kernels``, created 0700 when missing, and why it may not be used (None:
    it may)."""
    folder = cache_root() / "kernels"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        info = folder.lstat()
    except OSError as exc:
        return folder, f"cannot create {folder}: {exc}"
    if not stat.S_ISDIR(info.st_mode):
        return folder, f"{folder} is not a folder (a link or a file)"
    return folder, _distrust(info, folder)


def _open_cached(target: Path) -> int | None:
    """A descriptor on the cached library if this user built it and nobody changed it
    since (its digest record matches); None if absent or refused (logged)."""
    if not target.exists() and not target.is_symlink():
        return None
    fd = None
    try:
        fd = _open_checked(target)
        try:
            record_fd = _open_checked(_record_of(target))
        except FileNotFoundError:
            raise RuntimeError(f"{target} has no digest record") from None
        try:
            recorded = os.pread(record_fd, 256, 0).decode("ascii", "replace").strip()
        finally:
            os.close(record_fd)
        if recorded != (actual := _digest(fd)):
            raise RuntimeError(f"{target} has digest {actual[:16]}..., its record says "
                               f"{recorded[:16] or 'nothing'}...")
        return fd
    except (OSError, RuntimeError) as exc:
        if fd is not None:
            os.close(fd)
        problem = exc if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        log.warning("not loading the cached CPU kernel library (%s); rebuilding it", problem)
        return None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time checks and builds in ``folder`` (replicas starting together
    compile once and never see a library without its digest record)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compile(compiler: str, folder: Path, target: Path | None) -> int:
    """Compile into ``folder`` and return a descriptor on the result; with ``target``, also
    publish it there with its digest record."""
    fd, temporary = tempfile.mkstemp(prefix=".switchboard-kernels-", suffix=".so", dir=folder)
    os.close(fd)
    leftovers = [temporary]
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", temporary, *LIBS],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              check=False)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(compiler).name} failed: {first}")
        # The linker creates its output with the umask's mode: make it this user's alone.
        # Only this user can write in ``folder``, so the file needs no further check.
        os.chmod(temporary, 0o500)
        library = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if target is not None:
                record_fd, record_temporary = tempfile.mkstemp(
                    prefix=".switchboard-kernels-", suffix=".sha256", dir=folder)
                leftovers.append(record_temporary)
                with os.fdopen(record_fd, "w") as out:
                    out.write(_digest(library) + "\n")
                # The record first, then the library: a library never lacks its record.
                os.replace(record_temporary, _record_of(target))
                os.replace(temporary, target)
        except BaseException:
            os.close(library)
            raise
    finally:
        for leftover in leftovers:
            if os.path.exists(leftover):
                os.unlink(leftover)
    return library


def build(compiler: str) -> Library:
    """The compiled library, checked and open: from the cache when this user built it
    there, else built now: into the cache when its folder is safe and writable, else into
    a private temporary folder (the reason logged)."""
    folder, problem = _cache_folder()
    if problem is None:
        try:
            return _from_cache(compiler, folder)
        except OSError as exc:  # a read-only or full disk, say
            problem = f"{type(exc).__name__}: {exc}"
    log.warning("not using the CPU kernel cache (%s); building into a private temporary "
                "folder instead", problem)
    # mkdtemp's folder is 0700 and freshly named; the open descriptor outlives it.
    with tempfile.TemporaryDirectory(prefix="switchboard-kernels-") as private:
        return Library(_compile(compiler, Path(private), None), None)


def _from_cache(compiler: str, folder: Path) -> Library:
    """The cached library if it passes :func:`_open_cached`, else a build published
    into ``folder`` (a safe one)."""
    target = folder / library_name(compiler)
    with _locked(folder):
        fd = _open_cached(target)
        if fd is None:
            fd = _compile(compiler, folder, target)
    return Library(fd, target)

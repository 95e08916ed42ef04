"""Where files live: local paths and bucket URLs (gs://, s3://) behind one path type.

Every path a user gives (model dirs, workdirs, data files, data_dir, eval outputs, export folders)
goes through `path()`, which returns an `etils.epath.Path`: local paths through os, URLs through
fsspec (gcsfs for gs://). Orbax and tensorstore take the same URLs natively, so checkpoints and
model dirs are read and written in the bucket directly. The libraries that only open local files
(safetensors' and GGUF's memory maps, tokenizers, array_record, `datasets`) get `local_copy()`; the
ones that only write local folders write into `staged()`, which is copied up when they are done.
Objects in a bucket cannot be appended to: `append_text` rewrites them.

Credentials are the libraries' own (Application Default Credentials on a TPU VM). Tests point
gcsfs and tensorstore at a local fake bucket (tests/fake_bucket.py).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator

from etils import epath

PathLike = str | os.PathLike
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(p: PathLike) -> bool:
    """True for a bucket URL (`gs://bucket/dir`), false for a local path."""
    return bool(_URL.match(os.fspath(p)))


def path(p: PathLike) -> epath.Path:
    """The path `p` names: a URL as it is, a local path with `~` expanded and made absolute."""
    s = os.fspath(p)
    return epath.Path(s) if is_url(s) else epath.Path(os.path.abspath(os.path.expanduser(s)))


def _fs(url: str):
    """(filesystem, path without the scheme) of a URL: epath's own fsspec filesystem, so that its
    listing cache and ours are one."""
    from etils.epath import backend
    fs = backend.fsspec_backend.fs(url)
    return fs, fs._strip_protocol(url)


_TEMP: list[str] = []


def temp_dir() -> pathlib.Path:
    """A new local temporary folder, removed when the process exits."""
    if not _TEMP:
        _TEMP.append(tempfile.mkdtemp(prefix="derta_jax-"))
        atexit.register(shutil.rmtree, _TEMP[0], True)
    return pathlib.Path(tempfile.mkdtemp(dir=_TEMP[0]))


def local_copy(p: PathLike) -> pathlib.Path:
    """A local path with the contents of `p` (a file or a folder): `p` itself when it is local,
    otherwise a copy downloaded into a temporary folder removed when the process exits."""
    if not is_url(p):
        return pathlib.Path(path(p))
    url = os.fspath(p).rstrip("/")
    fs, root = _fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"{url}: no such file or folder")
    dest = temp_dir() / (url.rsplit("/", 1)[-1] or "root")
    if fs.isdir(root):
        files = fs.find(root)
        for f in files:
            target = dest / f[len(root):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(target))
        dest.mkdir(exist_ok=True)
    else:
        fs.get_file(root, str(dest))
    return dest


def files(p: PathLike) -> list[epath.Path]:
    """The files under folder `p` (recursively, sorted), `[p]` for a file, `[]` when missing."""
    if not is_url(p):
        local = pathlib.Path(path(p))
        found = sorted(f for f in local.rglob("*") if f.is_file()) if local.is_dir() else \
            [local] if local.is_file() else []
        return [epath.Path(f) for f in found]
    url = os.fspath(p).rstrip("/")
    fs, root = _fs(url)
    if fs.isfile(root):
        return [epath.Path(url)]
    scheme = url.split("://", 1)[0]
    return [epath.Path(f"{scheme}://{f}") for f in sorted(fs.find(root))] if fs.isdir(root) else []


def upload(local: PathLike, dest: PathLike) -> None:
    """Copy a local file or folder (its files, recursively) to `dest`, a URL or a local path."""
    local = pathlib.Path(local)
    target = path(dest)
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
    for f in files:
        to = target if f == local else target / f.relative_to(local).as_posix()
        if not is_url(to):
            to.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as src, to.open("wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)


@contextlib.contextmanager
def staged(dest: PathLike) -> Iterator[pathlib.Path]:
    """A local folder to write `dest`'s files into: `dest` itself when it is local, otherwise a
    temporary folder whose files are copied into `dest` when the block ends without an error."""
    if not is_url(dest):
        local = pathlib.Path(path(dest))
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    local = temp_dir()
    try:
        yield local
        upload(local, dest)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def create_new(p: epath.Path, text: str) -> bool:
    """Write a file that must not exist yet; False when it does. Atomic on a local disk (O_EXCL)
    and on GCS (gcsfs's create mode: a does-not-exist precondition on the upload)."""
    if not is_url(p):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    if p.exists():
        return False
    fs, key = _fs(os.fspath(p))
    try:
        fs.pipe_file(key, text.encode(), mode="create")
    except FileExistsError:
        return False
    return True


def write_whole(p: epath.Path, data: str | bytes) -> None:
    """Replace a file's contents so that a reader sees the old or the new, never half: through a
    temporary file and a rename on a local disk; a bucket object is written in one upload (which
    is atomic, where a rename would be a copy)."""
    if is_url(p):
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data, encoding="utf-8")
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    tmp.replace(p)


def append_text(p: epath.Path, text: str) -> None:
    """Append to a text file; a bucket object is rewritten whole (objects have no append)."""
    if is_url(p):
        before = p.read_text(encoding="utf-8") if p.exists() else ""
        p.write_text(before + text, encoding="utf-8")
    else:
        with p.open("a", encoding="utf-8") as f:
            f.write(text)

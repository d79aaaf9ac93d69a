"""Run paths that may be URLs: local paths and `gs://bucket/...` (or `s3://`) through one type.

Every file a run reads or writes (output dir, checkpoints, metrics, exports, data, eval sets) goes
through `etils.epath.Path`, the path layer orbax itself uses: a local path behaves like
`pathlib.Path`, and `gs://bucket/run` stays a URL through `/`, `parent`, `str()`, `open()`,
`exists()` (pathlib would collapse it to `gs:/bucket/run`, a local directory). A `gs://` path
reaches Cloud Storage through `gcsfs` (`pip install laserjax[gcs]`, which `tpu_scripts` setup
installs); orbax's array writes go through TensorStore's own GCS driver.

Object stores have no append, no rename and no local file handle, so what needs them is handled
here: `append_line` rewrites a remote object whole (uploads are atomic), `move` copies and
deletes, and `local_staging` gives writers that only take local paths (safetensors, tokenizers,
TensorBoard) a local directory whose files are then copied up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

# Schemes epath maps to a filesystem (gcsfs / s3fs through fsspec); any other `x://` would turn
# silently into a relative local directory named `x:`.
SUPPORTED_SCHEMES = ("gs", "s3")
_FSSPEC_PACKAGE = {"gs": "gcsfs", "s3": "s3fs"}


class PathError(ValueError):
    """A path or URL the run cannot use; the message names it and the fix."""


def scheme(path: str | os.PathLike) -> str | None:
    """`gs` for `gs://bucket/x`, None for a local path."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", os.fspath(path))
    return m[1].lower() if m else None


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def run_path(path: str | os.PathLike, *, field: str = "path") -> epath.Path:
    """`path` as an `epath.Path`, URLs intact; local paths get `~` expanded.

    Raises PathError naming `field` for a scheme no filesystem serves, or a supported one whose
    filesystem package is not installed.
    """
    text = os.fspath(path)
    s = scheme(text)
    if s is None:
        return epath.Path(os.path.expanduser(text))
    if s not in SUPPORTED_SCHEMES:
        raise PathError(
            f"{field} {text!r}: {s}:// is not supported; use a local path or one of "
            f"{', '.join(f'{x}://' for x in SUPPORTED_SCHEMES)}"
        )
    package = _FSSPEC_PACKAGE[s]
    try:
        __import__(package)
    except ImportError:
        extra = " (pip install 'laserjax[gcs]'; tpu_scripts setup installs it)" if s == "gs" else ""
        raise PathError(
            f"{field} {text!r}: reading and writing {s}:// needs the {package} package, which is "
            f"not installed: pip install {package}{extra}"
        ) from None
    return epath.Path(text)


def absolute(path: epath.Path) -> epath.Path:
    """A URL as it is; a local path made absolute (orbax needs absolute local paths)."""
    return path if is_remote(path) else path.absolute()


def append_line(path: epath.Path, line: str, lines_so_far: list[str] | None = None) -> None:
    """Append `line` to a text file. Local files are appended to; a remote object is rewritten
    whole (object stores have no append, and replace an object atomically) from `lines_so_far`
    when the caller keeps them (this appends `line` to it), else from the object read back."""
    if lines_so_far is not None:
        lines_so_far.append(line)
    if not is_remote(path):
        with path.open("a") as f:
            f.write(line + "\n")
        return
    if lines_so_far is None:
        lines_so_far = path.read_text().splitlines() if path.exists() else []
        lines_so_far.append(line)
    path.write_text("".join(ln + "\n" for ln in lines_so_far))


def move(src: epath.Path, dst: epath.Path) -> None:
    """Rename a file; on an object store (no rename) copy it, then delete the source."""
    if not is_remote(src):
        src.rename(dst)
        return
    with src.open("rb") as f_in, dst.open("wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    src.unlink()


@contextlib.contextmanager
def local_staging(dest: epath.Path, *, upload: bool = True) -> Iterator[str]:
    """A local directory for writers that need one: `dest` itself when it is local, else a
    temporary directory whose files are copied (recursively) to `dest` on exit when `upload`."""
    if not is_remote(dest):
        yield os.fspath(dest)
        return
    with tempfile.TemporaryDirectory(prefix="laserjax-stage-") as tmp:
        yield tmp
        if upload:
            upload_tree(tmp, dest)


def upload_tree(local_dir: str | os.PathLike, dest: epath.Path) -> None:
    """Copy every file under `local_dir` to the same relative name under `dest`."""
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = dest if rel == "." else dest / rel
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as src, (target / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)

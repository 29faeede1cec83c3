"""llama.cpp, the runtime GGUF files are written for: built once, found by every stage that needs it.

    python -m steps.llamacpp build    # download, build, install the bindings (what `make env` runs)
    python -m steps.llamacpp where    # the directory in use

The source is the llama-cpp-python sdist on PyPI (its `vendor/llama.cpp` is llama.cpp itself), pinned to
VERSION, so a package registry is all the build needs. It is built once into a cache shared by every clone
(`$XDG_CACHE_HOME/compress-workflow/llama-cpp-python-VERSION`, ~/.cache by default): the tools the workflow
runs (llama-quantize, llama-imatrix, llama-bench, llama-tokenize, llama-perplexity) and libllama, which the
llama-cpp-python bindings (installed from the same sdist, without a build of their own) load for the
evaluation's per-token log-likelihoods. `LLAMA_CPP_DIR` names another build's binary directory (the one that
holds the tools and libllama.so) instead.

CMake's defaults (GGML_NATIVE) compile for the build machine's CPU, and on machines that advertise AMX
without letting it run every tool dies with SIGILL: the build names its instruction sets (CPU_FLAGS) and
works on any x86-64 CPU with AVX2, these included.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from steps.artifacts import StageError

log = logging.getLogger("steps")

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors the llama.cpp built here
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-tokenize", "llama-perplexity")
GGUF_FILE = "model.gguf"  # what a GGUF output directory holds beside its manifest (quantize writes it, evaluate runs it)
STAMP = "llama-cpp-python.version"  # written beside the tools once the build succeeded
CPU_FLAGS = [
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=ON",
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
]
BUILD_FLAGS = [
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *CPU_FLAGS,
]
FIX = "run `make env` (or `python -m steps.llamacpp build`), or set LLAMA_CPP_DIR to a llama.cpp build's bin/"


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compress-workflow" / f"llama-cpp-python-{VERSION}"


def bin_dir() -> Path:
    """Where the tools and libllama live: LLAMA_CPP_DIR, else the cache's build."""
    return Path(os.environ["LLAMA_CPP_DIR"]) if os.environ.get("LLAMA_CPP_DIR") else cache_root() / "build" / "bin"


def require() -> Path:
    """The binary directory, once it holds every tool and is the pinned version; else one line naming the fix."""
    where = bin_dir()
    missing = [tool for tool in TOOLS if not (where / tool).is_file()]
    if missing:
        raise StageError(f"llama.cpp is not built at {where} (no {', '.join(missing)}); {FIX}")
    stamp = where / STAMP
    if stamp.is_file() and stamp.read_text().strip() != VERSION:
        raise StageError(
            f"llama.cpp at {where} is llama-cpp-python {stamp.read_text().strip()}, this workflow pins {VERSION}; {FIX}"
        )
    return where


def version() -> str:
    """What the manifests record: the pinned version, or the `--version` line of a build of the user's own."""
    where = require()
    if (where / STAMP).is_file():
        return f"llama-cpp-python {VERSION}"
    done = subprocess.run([where / "llama-quantize", "--version"], capture_output=True, text=True)
    return " ".join((done.stdout + done.stderr).split()[:4]) or "unknown"


def run_tool(tool: str, *args, what: str, fix: str, threads: int | None = None) -> str:
    """Run one llama.cpp tool; its stdout, or a one-line StageError quoting the tool's own error.

    `what` says what was being done ("load models/x/model.gguf"), `fix` what the user can do about it.
    """
    command = [str(require() / tool), *map(str, args), *(["-t", str(threads)] if threads else [])]
    # errors="replace": tools echo token pieces, and a piece can be part of a UTF-8 character
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise StageError(f"llama.cpp could not {what} ({tool}: {tool_error(done.stderr + done.stdout)}); {fix}")
    return done.stdout


def tokenize(gguf_file: str | Path, text: str) -> list[int]:
    """The token ids llama.cpp reads `text` as with the vocabulary of `gguf_file` (BOS as the file says)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as prompt:
        prompt.write(text)
        prompt.flush()
        out = run_tool("llama-tokenize", "-m", gguf_file, "-f", prompt.name, "--ids", "--log-disable",
                       what=f"tokenize with {gguf_file}", fix="check the file's tokenizer")
    return json.loads(out.strip().splitlines()[-1])


def tool_error(output: str) -> str:
    """The line of a tool's log that says what went wrong (llama.cpp logs pages before it fails)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (errors or lines or ["no output"])[0][:200]


def bindings():
    """The llama-cpp-python module, loading the libllama of `bin_dir()`."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(require())
    try:
        import llama_cpp
    except ImportError:
        raise StageError(f"the llama-cpp-python bindings are not installed; {FIX}") from None
    return llama_cpp


def build(root: Path | None = None) -> Path:
    """Download the pinned sdist, build the tools and libllama, install the bindings; nothing if already built."""
    root = root or cache_root()
    bin_path = root / "build" / "bin"
    if (bin_path / STAMP).is_file() and all((bin_path / tool).is_file() for tool in TOOLS):
        log.info("llama.cpp %s already built in %s", VERSION, bin_path)
    else:
        cmake, ninja = build_programs()
        root.mkdir(parents=True, exist_ok=True)
        source = root / "src"
        if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            unpack(sdist(root), source)
        build_log = root / "build.log"
        log.info("building llama.cpp (llama-cpp-python %s) in %s: a few minutes; compiler output in %s",
                 VERSION, root / "build", build_log)
        with build_log.open("w") as output:
            for command in ([cmake, "-S", source / "vendor" / "llama.cpp", "-B", root / "build", *BUILD_FLAGS,
                             f"-DCMAKE_MAKE_PROGRAM={ninja}"], [ninja, "-C", root / "build", *TOOLS, "llama"]):
                run_logged(command, output, build_log)
        (bin_path / STAMP).write_text(VERSION + "\n")
    install_bindings(root)
    return bin_path


def run_logged(command: list, output, build_log: Path) -> None:
    """Run a build command with its output in the build log, and a progress line for every 25 ninja steps."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in process.stdout:
        output.write(line)
        step = re.match(r"\[(\d+)/(\d+)\]", line)
        if step and (int(step[1]) % 25 == 0 or step[1] == step[2]):
            log.info("llama.cpp build: step %s of %s", step[1], step[2])
    if process.wait() != 0:
        raise StageError(f"building llama.cpp failed ({Path(str(command[0])).name} exited {process.returncode}); "
                         f"see {build_log}")


def build_programs() -> tuple[str, str]:
    """cmake and ninja: the machine's, else PyPI's wheels of them installed into this environment."""
    here = Path(sys.executable).parent
    found = {name: shutil.which(name) or (str(here / name) if (here / name).is_file() else None) for name in ("cmake", "ninja")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        log.info("no %s on this machine: installing %s from PyPI", " or ".join(missing), " and ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
        found.update({name: str(here / name) for name in missing})
    return found["cmake"], found["ninja"]


def sdist(root: Path) -> Path:
    """The pinned sdist, downloaded by pip into `root` (the index pip is configured with is the only source)."""
    found = sorted(root.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", root,
                        f"llama-cpp-python=={VERSION}"], check=True)
        found = sorted(root.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    return found[0]


def unpack(archive: Path, source: Path) -> None:
    """Unpack into `source` by one rename, so an interrupted unpack is never taken for a whole tree."""
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        shutil.rmtree(source, ignore_errors=True)
        (Path(tmp) / f"llama_cpp_python-{VERSION}").rename(source)


def install_bindings(root: Path) -> None:
    """llama-cpp-python's Python package from the sdist, skipping its own CMake build (it loads our libllama)."""
    from importlib import metadata

    try:
        if metadata.version("llama_cpp_python") == VERSION:
            return
    except metadata.PackageNotFoundError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", sdist(root), "-C", "wheel.cmake=false"],
                   check=True)


def main(argv=None) -> None:
    import argparse

    from steps.artifacts import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("command", choices=["build", "where"])
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "build":
        print(build())
    else:
        print(require())


if __name__ == "__main__":
    main()

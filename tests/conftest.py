"""Shared tiny artifacts: a BPE tokenizer, a 2-layer Llama and prepared data, built once per session."""

from __future__ import annotations

import atexit
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# A private, throwaway HF home for the session and every process it starts: trust_remote_code loads
# write modules under $HF_HOME/modules, which must not land in the user's cache. huggingface_hub and
# transformers read these once, at import, so they are set here, before any test module imports them;
# the finer-grained variables would override HF_HOME, so they go.
assert not {"transformers", "huggingface_hub"} & set(sys.modules), "imported before conftest could set HF_HOME"
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_DATASETS_CACHE",
             "HF_ASSETS_CACHE", "HF_XET_CACHE"):
    os.environ.pop(_var, None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="tests-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub, whatever the caller's environment says
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test`: one test process per core, so one thread each (Snakemake
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # jobs still get their rule's threads; torch reads it at import)
# GPTQModel JIT-compiles a C++ packing extension on first use (~30 s per machine); its pure-torch packer
# writes the same bits, and for the tiny models here in milliseconds. Workflow runs inherit this.
os.environ["GPTQMODEL_DISABLE_PACK_EXT"] = "1"

# A short training run for the tiny models (distillation tests, the trained teacher below).
TRAIN = {"steps": 40, "batch_size": 8, "lr": 1e-2, "warmup": 2, "log_every": 10}

TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def pytest_collection_modifyitems(config, items):
    """Modules of `slow` tests first, those that are nothing else (the real chain, SLURM) before the rest: under
    `make test` (pytest-xdist, a module per process) they start at once, each on its own worker, and the quick
    modules fill in around them."""
    tests = collections.Counter(item.module.__name__ for item in items)
    slow = collections.Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    collected = {name: rank for rank, name in enumerate(tests)}
    items.sort(key=lambda item: (-slow[item.module.__name__] / tests[item.module.__name__], collected[item.module.__name__]))


def _runs_snakemake(args, kwargs) -> bool:
    argv = args[0] if args else kwargs.get("args", ())
    words = [str(word) for word in ([argv] if isinstance(argv, (str, Path)) else argv)]
    return any(word == "snakemake" or word.endswith("/snakemake") for word in words)


@pytest.fixture(autouse=True)
def _only_workflow_tests_run_snakemake(request, monkeypatch):
    """The fast tier (`make test-fast`: -m 'not workflow') must hold every test that starts no Snakemake, and
    none that does: a test that starts one without the `workflow` mark fails here, naming the mark."""
    if request.node.get_closest_marker("workflow"):
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self, *args, **kwargs):
        if _runs_snakemake(args, kwargs):
            pytest.fail(f"{request.node.nodeid} runs Snakemake: mark it @pytest.mark.workflow", pytrace=False)
        popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    from steps.data.fetch import fetch

    out = tmp_path_factory.mktemp("data") / "raw"
    fetch({"builtin": "pydoc_topics"}, str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, raw_dir) -> Path:
    from steps.tokenizer import TokenizerSettings, run

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    run(str(raw_dir), str(out), TokenizerSettings(vocab_size=400))
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, raw_dir, tokenizer_dir) -> Path:
    from steps.data.prepare import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(str(raw_dir), str(tokenizer_dir), str(out), PrepareSettings(block_size=32, max_records=60))
    return out


def make_model_dir(path: Path, tokenizer_dir: Path, seed: int = 0, **arch) -> Path:
    from steps.models import build_scratch, load_tokenizer, save_model

    tokenizer = load_tokenizer(tokenizer_dir)
    save_model(build_scratch({**TINY_ARCH, **arch}, tokenizer, seed=seed), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny", tokenizer_dir)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir, data_dir):
    """A teacher that learned something: the tiny model after a short pre-training."""
    from steps.base import from_scratch
    from steps.models import save_model

    spec = {"scratch": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "max_position_embeddings": 64},
            "pretrain": {**TRAIN, "steps": 60}}
    model, tokenizer = from_scratch(spec, str(tokenizer_dir), str(data_dir))
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    save_model(model, tokenizer, out)
    return out


def copy_workflow(dest: Path) -> Path:
    """A private copy of the workflow (Snakefile, rules, steps, configs) to build in, or edit, apart from the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("Snakefile", "rules", "steps", "config", "tests/config"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / item)
    return dest


def run_snakemake(workdir: Path, *args: str, configs: list[str], cores: int = 1, check: bool = True,
                  timeout: int = 600) -> subprocess.CompletedProcess:
    """`snakemake ARGS --cores N --configfile CONFIGS` in `workdir` (the config files last: --configfile takes
    every word after it); a failure ends the test with the tail of Snakemake's output."""
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", str(cores), "--configfile", *configs]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # rules call `python`
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def reference_kd(student_logits, teacher_logits, mask, temperature: float, beta: float) -> dict:
    """Each KD loss by name, from torch.distributions position by position (not steps.losses' log-softmax
    algebra): the mean over `mask` of the softened divergence, times T² (beta is the teacher's JSD weight)."""
    from torch.distributions import Categorical, kl_divergence

    p = Categorical(logits=teacher_logits / temperature)
    q = Categorical(logits=student_logits / temperature)
    m = Categorical(probs=beta * p.probs + (1 - beta) * q.probs)
    per_position = {
        "forward_kl": kl_divergence(p, q),
        "reverse_kl": kl_divergence(q, p),
        "jsd": beta * kl_divergence(p, m) + (1 - beta) * kl_divergence(q, m),
    }
    return {name: values[mask].mean() * temperature**2 for name, values in per_position.items()}


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run; empty when nothing is to be done."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}

"""The tiny chain through a real single-node SLURM cluster with profiles/slurm, against a local run.

The module fixture starts munge + slurmctld + slurmd on loopback (tests/slurm/bringup.sh; it installs
Debian's slurm-wlm and munge with apt-get when they are missing and we are root, and skips otherwise),
and always stops them again (tests/slurm/teardown.sh). One scenario then runs, and the tests read it:

  run 1  the SLURM job of train_tokenizer is cancelled once: the profile's `retries: 1` resubmits it
         and it succeeds; the job of base_model/student is cancelled on both attempts: the run fails,
         naming the rule's log and the SLURM log, once prepare_data (running beside it) is done;
  run 2  the same command again: it resumes, submitting only what run 1 did not finish;
  local  meanwhile, the same chain with `--cores 2` in another directory, to compare the `.eval`s.

After them, a distill job of 2 srun tasks (one torchrun each, at a c10d rendezvous: the multi-node path on one
node) must train like one process with the global batch.

Both chains run with resources.yaml (RESOURCES_CONFIG): per-rule `resources:` whose effect SLURM reports.
The cluster listens on free ports, and one cluster per machine is ensured by a lock on /etc/slurm.

Each DAG level costs ~20 s on SLURM (plugin 2.6.1 sleeps 5 s before each sbatch, then polls the job's
status 2 s and 14 s after it), so the scenario takes three to four minutes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import copy_workflow

pytestmark = [pytest.mark.slow, pytest.mark.workflow]

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "slurm"
TINY = "tests/config/tiny.yaml"
TARGET = yaml.safe_load((REPO / TINY).read_text())["targets"][0]
TOOLS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scancel")
CONF_DIR = Path("/etc/slurm")  # one test cluster per machine: bringup.sh links its config here
PLACEHOLDERS = {"YOUR-PARTITION": "debug", "YOUR-ACCOUNT": "testacct"}  # what a user edits in the profile
# Per-rule `resources:` that SLURM must see: distill asks for the cluster's one (fake) GPU (-> sbatch --gpus),
# its own memory and time; prune for the cluster's second partition. The other rules keep the config's
# default runtime (30 min), which overrides the profile's default-resources (60 min).
RESOURCES_CONFIG = "resources: {distill: {gpu: 1, mem_mb: 1500, runtime: 17}, prune: {slurm_partition: other}}\n"
LOCAL_RULES = {"fetch_data", "report"}  # `localrules:` in rules/common.smk
CLUSTER_RULES = {"train_tokenizer", "prepare_data", "base_model", "teacher_logits", "distill", "prune", "recover", "quantize",
                 "evaluate", "evaluate_base"}
RUN_TIMEOUT = 480  # seconds; a hung client (e.g. a lost job status) fails the test instead of blocking CI


def _path_env() -> dict[str, str]:
    # rules call `python`: the test's interpreter; the daemons and clients live in /usr/sbin and /usr/bin
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin:/sbin:/bin"
    return {**os.environ, "PATH": path}


def _missing_tools(env) -> list[str]:
    return [tool for tool in TOOLS if not shutil.which(tool, path=env["PATH"])]


def _install_slurm(env) -> str | None:
    """Install slurm-wlm and munge when missing; the reason to skip, or None when all is there."""
    if not _missing_tools(env):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get", path=env["PATH"]):
        return f"SLURM not installed ({', '.join(_missing_tools(env))} missing) and no root apt-get to install it"
    apt_env = {**env, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]):
        result = subprocess.run(cmd, env=apt_env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
            return f"could not install SLURM: `{' '.join(cmd)}` failed: {last[0]}"
    missing = _missing_tools(env)
    return f"SLURM installed but {', '.join(missing)} still missing" if missing else None


def _take_lock(timeout: float) -> int | None:
    """An exclusive lock on the one test cluster this machine can run, or None after `timeout` seconds.

    The lock is on /etc/slurm itself (root's, where the cluster's config goes), not a file in world-writable /tmp.
    """
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(CONF_DIR, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(1)


def _free_ports(count: int) -> list[int]:
    """Ports no one listens on now (held open together, so they differ): the cluster's, instead of fixed ones."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]

    @property
    def ctld_log(self) -> Path:
        return self.state / "log" / "slurmctld.log"

    def log_tail(self, lines: int = 30) -> str:
        tails = []
        for log in sorted((self.state / "log").glob("*")):
            tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)


@pytest.fixture(scope="module")
def cluster():
    env = _path_env()
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmctld/slurmd as root (SlurmUser=root); not root here")
    lock = _take_lock(timeout=600)
    if lock is None:
        pytest.skip(f"another test cluster held {CONF_DIR} for 10 minutes")
    # Not under pytest's private (mode 700) temp tree: munged wants every directory above its socket world-searchable.
    state = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    state.chmod(0o755)
    try:
        reason = _install_slurm(env)
        if reason:
            pytest.skip(reason)
        env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
        ports = [str(port) for port in _free_ports(2)]
        try:
            up = subprocess.run([SCRIPTS / "bringup.sh", state, *ports], env=env, capture_output=True, text=True,
                                timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cluster bring-up took over 120 s\n{Cluster(state, env).log_tail()}")
        if up.returncode == 3:  # /etc/slurm/slurm.conf exists: never touch a real (or someone else's) cluster
            pytest.skip(up.stderr.strip())
        assert up.returncode == 0, f"cluster bring-up failed: {up.stderr.strip()}\n{Cluster(state, env).log_tail()}"
        yield Cluster(state, env)
    finally:
        try:
            subprocess.run([SCRIPTS / "teardown.sh", state], env=env, capture_output=True, timeout=180)
        finally:
            os.close(lock)


# ---------------------------------------------------------------- running the workflow


def private_workflow(dest: Path) -> Path:
    """A private copy of the workflow, so the run is isolated from edits to the repo while it goes."""
    copy_workflow(dest)
    (dest / "resources.yaml").write_text(RESOURCES_CONFIG)
    return dest


def slurm_profile(dest: Path) -> Path:
    """profiles/slurm with its placeholders filled in, as a user does before the first run."""
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    for placeholder, value in PLACEHOLDERS.items():
        assert placeholder in text, f"profiles/slurm/config.yaml lost its {placeholder} placeholder"
        text = text.replace(placeholder, value)
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(text)
    return dest


def snakemake_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--configfile", TINY, "resources.yaml", *args, TARGET]


def start(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A snakemake client in its own session, so a hung one is killed with everything it started."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Its result, or a failed test (the client and all it started killed) after RUN_TIMEOUT seconds."""
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(proc.args)} did not finish in {RUN_TIMEOUT} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def stop(proc: subprocess.Popen) -> None:
    """Kill a client started by `start`, and its whole session, if it is still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return finish(start(cmd, cwd, env))


@dataclass
class Canceller:
    """Cancels the first `budget[comment]` running SLURM jobs with that comment: a job killed on its node.

    The plugin comments each job `rule_<rule>_wildcards_<values joined by _>`. It watches jobs in every
    state, so a job that ended before it was seen running (too short, or scancel lost the race with its
    end) is reported in `missed` instead of silently spoiling the scenario; a failed squeue or scancel
    (a busy controller) is tried again on the next round, never kills the watcher.
    """

    env: dict[str, str]
    budget: dict[str, int]
    cancelled: list[tuple[str, str]] = field(default_factory=list)  # (comment, SLURM job id)
    missed: list[tuple[str, str, str]] = field(default_factory=list)  # (comment, SLURM job id, its end state)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _slurm(self, *cmd: str) -> str | None:
        try:
            result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return None
        return result.stdout if result.returncode == 0 else None

    def _watch(self):
        while not self._stop.wait(0.2):
            queue = self._slurm("squeue", "-h", "-t", "all", "-o", "%i|%T|%k")
            for line in (queue or "").splitlines():
                job_id, state, comment = line.split("|", 2)
                done = {j for _, j in self.cancelled} | {j for _, j, _ in self.missed}
                if self.budget.get(comment, 0) <= 0 or job_id in done:
                    continue
                if state == "RUNNING" and self._slurm("scancel", job_id) is not None:
                    self.budget[comment] -= 1
                    self.cancelled.append((comment, job_id))
                elif state not in ("PENDING", "CONFIGURING", "RUNNING"):  # ended on its own: too late
                    self.missed.append((comment, job_id, state))


def submissions(output: str) -> dict[str, tuple[str, str, str]]:
    """Snakemake job id -> (rule, wildcards, SLURM job id) of every job the client handed to sbatch.

    A resubmitted job keeps its Snakemake id, so only its last SLURM job is kept here; see `slurm_jobs`.
    """
    return {job: (rule, wildcards, slurm) for job, slurm, rule, wildcards in _SUBMITTED.findall(output)}


def slurm_jobs(output: str) -> list[tuple[str, str, str]]:
    """(rule, wildcards, SLURM job id) of every sbatch call, resubmissions included."""
    return [(rule, wildcards, slurm) for _, slurm, rule, wildcards in _SUBMITTED.findall(output)]


_SUBMITTED = re.compile(
    r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+?)/(?:(\S+)/)?\d+\.log\)"
)


def finished(output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of the cluster jobs a run completed."""
    jobs = submissions(output)
    return {jobs[j][:2] for j in re.findall(r"Finished jobid: (\d+) ", output) if j in jobs}


@dataclass
class Scenario:
    run1: subprocess.CompletedProcess
    run2: subprocess.CompletedProcess
    local: subprocess.CompletedProcess
    cancelled: list[tuple[str, str]]  # (job comment, SLURM job id)
    missed: list[tuple[str, str, str]]  # jobs to cancel that ended before the canceller saw them running
    ctld: str  # slurmctld's log during the two SLURM runs
    jobs: str  # `scontrol show job -o` at the end: what SLURM allocated to each job
    slurm_dir: Path
    local_dir: Path
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def scenario(cluster, tmp_path_factory) -> Scenario:
    base = tmp_path_factory.mktemp("chains")
    slurm_dir, local_dir = private_workflow(base / "slurm"), private_workflow(base / "local")
    profile = slurm_profile(base / "profile")
    env = cluster.env
    # The local run overlaps the SLURM runs, which mostly wait on status polls; niced, so that it only
    # takes the CPU the cluster jobs leave (a level that takes longer than ~14 s waits ~22 s more).
    local_cmd = ["nice", "-n", "19", *snakemake_cmd("--cores", "2")]
    local_proc = start(local_cmd, local_dir, env)
    try:
        # The profile waits 20 s before a job's first status check (gentle on a real controller); 2 s is
        # the least the squeue status command accepts with MinJobAge=300, and each DAG level waits for it.
        cmd = snakemake_cmd("--profile", str(profile), "--slurm-init-seconds-before-status-checks", "2")
        ctld_start = cluster.ctld_log.stat().st_size
        t0 = time.monotonic()
        cancel = {"rule_train_tokenizer_wildcards_teacher": 1, "rule_base_model_wildcards_student": 2}
        with Canceller(env, cancel) as canceller:
            run1 = run(cmd, slurm_dir, env)
        t1 = time.monotonic()
        run2 = run(cmd, slurm_dir, env)
        t2 = time.monotonic()
        # run 2's jobs are recent, so MinJobAge=300 still keeps their records
        jobs = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True,
                              timeout=60).stdout
        local = finish(local_proc)
    finally:
        stop(local_proc)  # a failed or hung SLURM run leaves no local chain running behind the tests
    seconds = {"slurm_run1": round(t1 - t0, 1), "slurm_run2": round(t2 - t1, 1)}
    print(f"wall seconds: {seconds}")
    ctld = cluster.ctld_log.read_text(errors="replace")[ctld_start:]
    for name, text in (("run1", run1.stdout), ("run2", run2.stdout), ("local", local.stdout), ("slurmctld", ctld)):
        (base / f"{name}.log").write_text(text)  # kept for a look after a failure
    return Scenario(run1, run2, local, canceller.cancelled, canceller.missed, ctld, jobs, slurm_dir, local_dir, seconds)


def tail(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-6000:]


# ---------------------------------------------------------------- tests


def test_first_run_retries_a_failed_job_then_stops_naming_the_logs(scenario):
    out = scenario.run1.stdout
    assert not scenario.missed, f"jobs to cancel ended before they were seen running: {scenario.missed}"
    assert scenario.run1.returncode != 0, tail(scenario.run1)
    assert [comment for comment, _ in scenario.cancelled].count("rule_base_model_wildcards_student") == 2
    sbatched = [job[:2] for job in slurm_jobs(out)]
    # train_tokenizer: cancelled, resubmitted by the profile's `retries: 1`, then finished
    assert sbatched.count(("train_tokenizer", "teacher")) == 2, tail(scenario.run1)
    assert {("train_tokenizer", "teacher"), ("prepare_data", "pydoc_teacher")} <= finished(out), tail(scenario.run1)
    # base_model/student: cancelled on both attempts, so the run fails and says where to look
    assert sbatched.count(("base_model", "student")) == 2, tail(scenario.run1)
    assert "Error in rule base_model" in out and "logs/base_model/student.log" in out, tail(scenario.run1)
    last = scenario.cancelled[-1][1]
    slurm_log = scenario.slurm_dir / ".snakemake" / "slurm_logs" / "rule_base_model" / "student" / f"{last}.log"
    assert str(slurm_log) in out, tail(scenario.run1)
    # a failed job keeps its SLURM log, and it tells why
    assert slurm_log.exists() and "CANCELLED" in slurm_log.read_text(), tail(scenario.run1)


def test_second_run_resumes_without_redoing_finished_jobs(scenario):
    out = scenario.run2.stdout
    assert scenario.run2.returncode == 0, tail(scenario.run2)
    redone = {job[:2] for job in slurm_jobs(out)} & finished(scenario.run1.stdout)
    assert not redone, f"run 2 resubmitted jobs run 1 had finished: {redone}"
    assert ("base_model", "student") in {job[:2] for job in slurm_jobs(out)}
    assert "localrule fetch_data" not in out  # it ran, locally, in run 1


def test_every_cluster_job_went_through_sbatch_and_local_rules_did_not(scenario):
    stats = scenario.run1.stdout.split("Job stats:")[1].split("total")[0]
    planned = sum(int(n) for n in re.findall(r"^\w+\s+(\d+)$", stats, re.M))
    finished_jobs = 0
    for result in (scenario.run1, scenario.run2):
        sbatched, local = submissions(result.stdout), set(re.findall(r"^localrule (\w+):", result.stdout, re.M))
        for job, rule in re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", result.stdout):
            finished_jobs += 1
            if rule in LOCAL_RULES:
                assert rule in local, f"local rule {rule} did not run locally"
            else:
                assert sbatched.get(job, ("?",))[0] == rule, f"job {job} ({rule}) finished without an sbatch call"
    assert finished_jobs == planned, "the two runs together did not run each planned job exactly once"
    sbatched = slurm_jobs(scenario.run1.stdout + scenario.run2.stdout)
    assert {rule for rule, _, _ in sbatched} == CLUSTER_RULES
    # slurmctld agrees: it accepted exactly those jobs, and all but the cancelled ones exited 0
    accepted = re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", scenario.ctld)
    assert sorted(accepted, key=int) == sorted((job for _, _, job in sbatched), key=int)
    succeeded = set(re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS 0", scenario.ctld))
    assert succeeded == set(accepted) - {job for _, job in scenario.cancelled}


def test_config_resources_reach_the_slurm_jobs(scenario):
    """What SLURM allocated (`scontrol show job`) is what the config's `resources:` and the profile ask for.

    A rule's own entry wins over the config's `default`, which wins over the profile's default-resources.
    """
    records = {m[1]: m[0] for m in re.finditer(r"^JobId=(\d+) .*$", scenario.jobs, re.M)}
    allocated = {}
    for rule, _, job in slurm_jobs(scenario.run2.stdout):  # run 2's jobs: recent enough to be listed still
        assert job in records, f"SLURM job {job} ({rule}) is not in `scontrol show job`"
        fields = dict(re.findall(r"(\w+)=(\S*)", records[job]))
        allocated[rule] = (fields["Partition"], fields["Account"], fields["TimeLimit"], fields["MinMemoryNode"],
                           fields["NumCPUs"])
        gpus = re.search(r"gres/gpu[:=](\d+)|gpu:(\d+)", records[job])
        if rule in ("distill", "teacher_logits"):  # the cache runs the teacher like distill: its resources
            assert gpus and "1" in gpus.groups(), records[job]  # gpu: 1 -> the cluster's one GPU
        else:
            assert gpus is None, records[job]
    assert {"distill", "prune", "evaluate"} <= set(allocated), allocated
    # CPUs: the rule's threads, 1 for a run submitted without --cores or cpus_per_task (tests/test_threads.py: more)
    assert allocated["distill"] == ("debug", "testacct", "00:17:00", "1500M", "1"), allocated
    assert allocated["prune"] == ("other", "testacct", "00:30:00", "4000M", "1"), allocated
    assert allocated["evaluate"] == ("debug", "testacct", "00:30:00", "4000M", "1"), allocated
    # and inside the job, on a node of more CPUs, each step ran torch on the one its job was given
    for log in ("distill/default/teacher_student.log", "prune/default/teacher_student.log"):
        assert "threads: 1 per process" in (scenario.slurm_dir / "logs" / log).read_text(), log


def test_slurm_results_equal_the_local_run(scenario):
    assert scenario.local.returncode == 0, tail(scenario.local)
    remote = json.loads((scenario.slurm_dir / TARGET).read_text())
    local = json.loads((scenario.local_dir / TARGET).read_text())
    assert [row["stage"] for row in remote["chain"]] == [row["stage"] for row in local["chain"]]
    for r, l in zip(remote["chain"], local["chain"]):
        assert (r["params"], r["size_bytes"]) == (l["params"], l["size_bytes"]), r["stage"]
        # same seeds and the same CPU kernels: only thread scheduling may reorder float sums
        assert r["perplexity"] == pytest.approx(l["perplexity"], rel=1e-4), r["stage"]
    assert {k: v.get("settings") for k, v in remote["lineage"].items()} == {
        k: v.get("settings") for k, v in local["lineage"].items()
    }


# ---------------------------------------------------------------- a job across "nodes"

TWO_TASKS = {  # 2 launchers of 1 rank each, on the cluster's one node: the multi-node path with gloo
    "recipes": {"ranks2": {"distill": {"train": {"steps": 6, "batch_size": 4, "checkpoint_every": 0}}}},
    "resources": {"distill": {"tasks": 2, "mem_mb": 3000}},
}


def test_a_distill_job_of_two_tasks_trains_like_one_process_with_the_global_batch(scenario, cluster, tmp_path):
    """srun starts one torchrun per task; they meet at a c10d rendezvous and train 2 ranks of batch 4, which must
    equal 1 process of batch 8 (tests/test_distributed.py does the same within one torchrun)."""
    from safetensors.torch import load_file

    from steps.distill import DistillSettings, run as distill
    from test_distributed import assert_trained_alike

    workdir, out = scenario.slurm_dir, "models/ranks2/teacher_student/distilled"
    (workdir / "ranks2.yaml").write_text(yaml.safe_dump(TWO_TASKS))
    cmd = [sys.executable, "-m", "snakemake", "--configfile", TINY, "resources.yaml", "ranks2.yaml", "--profile",
           str(workdir.parent / "profile"), "--slurm-init-seconds-before-status-checks", "2", out]
    result = run(cmd, workdir, cluster.env)
    log = workdir / "logs/distill/ranks2/teacher_student.log"
    assert result.returncode == 0, tail(result) + "\n" + (log.read_text()[-3000:] if log.exists() else "")
    [(rule, _, job)] = slurm_jobs(result.stdout)
    assert rule == "distill"
    record = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster.env, capture_output=True, text=True,
                            timeout=60).stdout
    assert "NumTasks=2 " in record, record
    manifest = json.loads((workdir / out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    inputs = {name: str(workdir / entry["path"]) for name, entry in manifest["inputs"].items()}
    settings = manifest["settings"]
    settings["train"]["batch_size"] = 8  # the global batch of the two ranks
    distill(inputs["teacher"], inputs["student"], inputs["data"], str(tmp_path / "single"), DistillSettings(**settings),
            logits=inputs["logits"])
    assert_trained_alike(load_file(str(tmp_path / "single" / "model.safetensors")),
                         load_file(str(workdir / out / "model.safetensors")),
                         load_file(str(workdir / "models/base/student/model.safetensors")))

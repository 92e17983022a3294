"""Shared fixtures: a fresh copy of the repository, a way to run its scripts, one tiny training run.

The end-to-end tests run the real scripts, each in a process of its own, inside a copy of the
repository (as a user on a fresh clone would), so nothing they write lands in the working tree;
the process is forked from a Zygote that has imported torch and the other libraries once (see
`run`). In-process tests import the pipeline's modules from the source tree; they only read from it.
"""
import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent
sys.dont_write_bytecode = True  # in-process imports of the pipeline leave no __pycache__ in the source tree
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's processes (pyproject.toml's -n auto):
    import torch  # one torch thread each, as the scripts run here; two per worker on two cores ran slower

    torch.set_num_threads(1)

TIMEOUT = 300  # seconds any one script may run
IGNORE = shutil.ignore_patterns(".git", "results", "model_checkpoints", "__pycache__", ".pytest_cache", ".hypothesis")

TRAIN_CFG = "configs/example_model/example_training_cfg.yaml"
MULTIGPU_CFG = "configs/example_model/example_multigpu_training_cfg.yaml"
EVAL_CFG = "configs/example_model/example_evaluation_cfg.yaml"
TRAIN_EVAL_CFG = "configs/example_model/example_training_evaluation_cfg.yaml"
ARCH_YAML = "models/example_model/example_model_architecture.yaml"
FLOW_PY = "models/example_model/example_model.py"
CHECKPOINTS = Path("models/example_model/model_checkpoints")
TINY = ["--set", "training.n_epochs=2", "--set", "saving.save_epoch_increment=1"]


def script_env():
    """The environment of every script run: the user's, with one thread per process (the runs are
    tiny, and several may run at once) and no bytecode files written into the copy."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    return env


def run(repo, *args, check=True, timeout=TIMEOUT, cwd=None, fresh=False):
    """Run `python *args` in `repo` (or `cwd`); return the CompletedProcess (text stdout/stderr).

    The script runs in a process of its own, forked from this test process's Zygote, which has
    imported the libraries every script imports (torch and torchvision alone take seconds): what a
    test sees is the script's own work, output and exit status. `fresh` (and any interpreter
    option but -m) starts a new interpreter instead, for tests of start-up itself. With check, a
    non-zero exit fails the test and shows everything the script printed."""
    cmd = [sys.executable, *map(str, args)]
    env = script_env()
    if cwd is not None:  # (a script's own folder is on its path; `-m engine.<module>` needs the repository's)
        env["PYTHONPATH"] = str(repo)
    try:
        if fresh or (cmd[1].startswith("-") and cmd[1] != "-m"):
            proc = subprocess.run(cmd, cwd=cwd or repo, capture_output=True, text=True, timeout=timeout, env=env)
        else:
            proc = Zygote.run_job(cmd[1:], cwd or repo, env, timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s\n--- stdout ---\n{e.stdout}\n--- stderr ---\n{e.stderr}",
                    pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
                    f"--- stderr ---\n{proc.stderr}", pytrace=False)
    return proc


# The Zygote: a Python process that imports the third-party libraries (not the pipeline, whose
# files differ between repository copies), then, for each job on its stdin, forks a child that
# runs `python <script> <args>` or `python -m <module> <args>` as the interpreter would (runpy, as
# __main__, with the script's folder first on sys.path), its stdin /dev/null, its stdout and
# stderr in files, its exit status the script's. It answers each job with the child's pid, then
# its exit status.
ZYGOTE = r"""
import atexit, json, os, runpy, sys, traceback
import numpy, yaml, tqdm, PIL.Image, matplotlib.pyplot, torch, torchvision, torchvision.transforms.v2  # noqa: F401
import torchvision.io, torchvision.utils  # noqa: F401
import torch._dynamo  # noqa: F401  (shapes worked out on the meta device import it: seconds)
torch.nn.functional.linear(torch.empty(2, 3, device="meta"), torch.empty(4, 3, device="meta"))  # and the rest it loads
try:
    import torch.utils.tensorboard  # noqa: F401  (optional)
except ImportError:
    pass
sys.path = [p for p in sys.path if p not in ("", os.getcwd())]


def child(job):
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, job["out"]), (2, job["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    extra = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    args, code = job["args"], 0
    try:
        if args[0] == "-m":
            sys.argv, sys.path[:0] = [args[1], *args[2:]], [os.getcwd(), *extra]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[:0] = list(args), [os.path.dirname(os.path.abspath(args[0])), *extra]
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:  # (as the interpreter does: None is 0, a message goes to stderr as status 1)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # The interpreter's exit, less the teardown of every module torch loaded (seconds, and nothing
    # a script's output or files depend on): the atexit handlers, the streams flushed.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """A Zygote (see ZYGOTE) of this test process, started on first use and ended with the process;
    one per thread that runs scripts at once (each runs one job at a time)."""
    idle, lock = [], threading.Lock()

    @classmethod
    def run_job(cls, args, cwd, env, timeout):
        with cls.lock:
            zygote = cls.idle.pop() if cls.idle else None
        if zygote is None or zygote.proc.poll() is not None:
            zygote = cls()
        try:
            return zygote.run(args, cwd, env, timeout)
        finally:
            with cls.lock:
                cls.idle.append(zygote)

    def __init__(self):
        self.logs, self.answers = Path(tempfile.mkdtemp(prefix="zygote-")), b""
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=script_env(), cwd=self.logs)
        atexit.register(self.proc.kill)

    def run(self, args, cwd, env, timeout):
        out, err = self.logs / "out", self.logs / "err"
        job = {"args": args, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        pid = self.answer(None)
        code = self.answer(timeout)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            self.answer(None)
            raise subprocess.TimeoutExpired(args, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, *args], code, out.read_text(), err.read_text())

    def answer(self, timeout):
        """The Zygote's next line, as a number (None: none within `timeout` seconds)."""
        while b"\n" not in self.answers:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the test Zygote ended; see the test output above")
            self.answers += chunk
        line, self.answers = self.answers.split(b"\n", 1)
        return int(line)


def run_all(repo, jobs, workers=1, timeout=TIMEOUT):
    """Run the scripts of `jobs` ({name: [script, *args]}) in `repo`, `workers` at a time, each as
    `run` runs one; {name: CompletedProcess}, as `run(..., check=False)` gives. (One at a time by
    default: pytest-xdist already keeps every core busy, and each more at once starts a Zygote.)"""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run, repo, *args, check=False, timeout=timeout) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def checkpoints(folder):
    """The .pth files in `folder`, by name."""
    return sorted(Path(folder).glob("*.pth"))


def newest_run(save_folder):
    """The newest run_<N> folder of a save_folder_name's folder (the folder itself while it has none)."""
    numbered = [(int(p.name[4:]), p) for p in Path(save_folder).glob("run_*") if p.name[4:].isdigit()]
    return max(numbered)[1] if numbered else Path(save_folder)


def run_folder_of(proc):
    """The run folder a train.py run says it trains in (its start-up header: 'run folder: <folder>')."""
    for line in proc.stdout.splitlines():
        if line.startswith("run folder: "):
            return Path(line.removeprefix("run folder: "))
    raise AssertionError(f"train.py printed no run folder:\n{proc.stdout}")


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """A fresh copy of the repository (no git data, no run outputs) to run the scripts in."""
    dest = tmp_path_factory.mktemp("clone") / "repo"
    shutil.copytree(SRC, dest, ignore=IGNORE)
    return dest


@pytest.fixture(scope="session")
def trained_run(repo):
    """The README's training command, once, on tiny settings: 2 epochs, a checkpoint every epoch."""
    return run(repo, "train.py", "-t", TRAIN_CFG, *TINY)


@pytest.fixture(scope="session")
def trained(repo, trained_run):
    """(repository copy, run folder) of the tiny training run."""
    return repo, run_folder_of(trained_run)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the tests that share a module-scoped fixture (a training run many
    tests read) go to one worker, so that the fixture is built once rather than on each worker:
    tests linked through such fixtures form one xdist_group (pyproject.toml's --dist loadgroup);
    the rest are shared out one by one."""
    parent = {}

    def root(name):
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    shared = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        names = [f"{item.module.__name__}::{name}" for name, defs in (info.name2fixturedefs if info else {}).items()
                 if defs and defs[-1].scope == "module"]
        for name in names[1:]:
            parent[root(name)] = root(names[0])
        if names:
            shared[item] = names[0]
    for item, name in shared.items():
        item.add_marker(pytest.mark.xdist_group(root(name)))

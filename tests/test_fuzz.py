"""Property-based fuzzing of every input a user hands the scripts (SPEC, Errors): mutated training
and evaluation configs, architectures, checkpoints, raw YAML and checkpoint bytes, command lines.

The contract, for each input: the script either runs, or ends with exit status 2 and one
`error: ...` message (3: a loss that turned non-finite, which a mutated learning rate may well
cause), never with another exception or a traceback, and a refused input leaves no file behind.
The scripts run in this process (their `main` under errors.run_main, as `python <script>` runs
it), which keeps an example to a fraction of a second. The fast subset runs the same 12 examples
of each kind every time; the `slow` profile fresh ones, as many as FUZZ_EXAMPLES says.
"""
import contextlib
import copy
import io
import itertools
import os
import shutil

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import evaluate  # noqa: E402
import evaluate_training  # noqa: E402
import jit_trace_model  # noqa: E402
import train  # noqa: E402
from conftest import ARCH_YAML, EVAL_CFG, SRC, TRAIN_CFG, TRAIN_EVAL_CFG  # noqa: E402
from engine.errors import run_main  # noqa: E402

FAST = dict(max_examples=12, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# The slow profile: 30 fresh examples of each kind in the full suite (about 12 s
# in all); FUZZ_EXAMPLES=2000 for a real search.
LONG = dict(FAST, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 30)), derandomize=False)
PROFILES = [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
SCRIPTS = {"train.py": train.main, "evaluate.py": evaluate.main, "evaluate_training.py": evaluate_training.main,
           "jit_trace_model.py": jit_trace_model.main}

# Values that go where a config holds another: of every YAML kind, odd sizes and names.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0, -1, 10**12, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "x", "a.b", "1e-3", "nan", "latest", "../..",
                                                                      "x" * 300, "[1, 2]", "{a: 1}", "\u00e9\u00df"]),
    st.lists(st.integers(-2, 70), max_size=4), st.just([[1], 2]), st.just({}), st.just({"a": None}),
    st.text(max_size=12))


def paths_of(tree, prefix=()):
    """Every key path of a nested YAML tree (dict keys and list indices)."""
    found = [prefix] if prefix else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        found += paths_of(value, (*prefix, key))
    return found


# What a key is renamed to, besides a near miss: empty, dotted, keys YAML reads as other than text
# (1:, 1.5:, yes:, ~:) and names torch.nn.ModuleDict keeps for itself.
RENAMES = ["", "1", "a.b", 1, 1.5, True, None, "keys", "training"]


@st.composite
def mutated(draw, tree):
    """`tree` with 1-3 mutations: a key deleted, a value replaced by an odd one, a key renamed."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(tree)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["delete", "replace", "replace", "rename"]))
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "replace":
            parent[path[-1]] = copy.deepcopy(draw(ODD_VALUES))  # never the strategy's own list or dict
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from([str(path[-1]) + "s", str(path[-1])[:-1], *RENAMES]))] = parent.pop(path[-1])
    return tree


def run_script(script, *args):
    """(exit status, stderr) of `script` run in this process as `python script args` would run it."""
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            run_main(SCRIPTS[script], [str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return code, err.getvalue()


def assert_contract(code, stderr, out_dir, before=None):
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code in (0, 2, 3), (code, stderr[-3000:])
    if code == 2:
        assert any(line.startswith("error: ") for line in stderr.splitlines()), stderr[-2000:]
        now = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")) if out_dir.exists() else []
        assert now == (before or []), f"a refused input left files behind: {now}\n{stderr[-2000:]}"


def listing(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


def tame(cfg):
    """Keep a mutated config that still runs quick (one epoch of few samples)."""
    if isinstance(cfg, dict) and isinstance(cfg.get("training"), dict):
        if isinstance(cfg["training"].get("n_epochs"), int) and not isinstance(cfg["training"]["n_epochs"], bool):
            cfg["training"]["n_epochs"] = min(cfg["training"]["n_epochs"], 1)
        if isinstance(cfg["training"].get("batch_size"), int) and cfg["training"]["batch_size"] > 64:
            cfg["training"]["batch_size"] = 64
    return cfg


BASE_TRAIN = yaml.safe_load((SRC / TRAIN_CFG).read_text())
BASE_TRAIN["training"]["n_epochs"] = 1
BASE_ARCH = yaml.safe_load((SRC / ARCH_YAML).read_text())


CASES = itertools.count()


def fresh(tmp_path):
    """A folder of its own for one example (hypothesis reseeds `random`, so a counter names it)."""
    folder = tmp_path / f"case_{next(CASES)}"
    folder.mkdir()
    return folder


def yaml_case(tmp_path, tree):
    """`tree` written as YAML into a fresh folder: (its path, the folder's `out`, for the run)."""
    folder = fresh(tmp_path)
    path = folder / "case.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path, folder / "out"


@pytest.mark.parametrize("profile", PROFILES)
def test_mutated_training_configs(tmp_path, profile):
    @settings(**profile)
    @given(mutated(BASE_TRAIN))
    def check(cfg):
        path, out = yaml_case(tmp_path, tame(cfg))
        code, err = run_script("train.py", "-t", path, "--set", f"saving.save_folder_name={out}")
        assert_contract(code, err, out)
    check()


@pytest.mark.parametrize("profile", PROFILES)
def test_mutated_architectures(tmp_path, profile):
    @settings(**profile)
    @given(mutated(BASE_ARCH))
    def check(arch):
        path, out = yaml_case(tmp_path, arch)
        code, err = run_script("train.py", "-t", TRAIN_CFG, "--set", f"model.architecture_cfg_path={path}",
                               "--set", "training.n_epochs=1", "--set", f"saving.save_folder_name={out}")
        assert_contract(code, err, out)
    check()


@st.composite
def damaged_text(draw, text):
    """YAML text truncated, with a line written twice, or with bytes flipped."""
    kind = draw(st.sampled_from(["truncate", "duplicate", "flip"]))
    lines = text.splitlines(keepends=True)
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text)))].encode()
    if kind == "duplicate":
        i = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]).encode()
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@pytest.mark.parametrize("profile", PROFILES)
def test_damaged_yaml_text(tmp_path, profile):
    @settings(**profile)
    @given(damaged_text((SRC / TRAIN_CFG).read_text()), st.booleans())
    def check(data, as_architecture):
        folder = fresh(tmp_path)
        path = folder / "file.yaml"
        path.write_bytes(data)
        out = folder / "out"
        args = ["-t", TRAIN_CFG, "--set", f"model.architecture_cfg_path={path}"] if as_architecture else ["-t", path]
        code, err = run_script("train.py", *args, "--set", "training.n_epochs=1", "--set",
                               f"saving.save_folder_name={out}")
        assert_contract(code, err, out)
    check()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the toy GAN: its folder and its last checkpoint."""
    out = tmp_path_factory.mktemp("fuzz_trained") / "run"
    code, err = run_script("train.py", "-t", TRAIN_CFG, "--set", "training.n_epochs=1", "--set",
                           f"saving.save_folder_name={out}")
    assert code == 0, err
    return out, sorted(out.rglob("*epoch1*.pth"))[-1]


BASE_EVAL = yaml.safe_load((SRC / EVAL_CFG).read_text())
BASE_TRAIN_EVAL = yaml.safe_load((SRC / TRAIN_EVAL_CFG).read_text())


@pytest.mark.parametrize("profile", PROFILES)
def test_mutated_evaluation_configs(tmp_path, trained, profile):
    """evaluate.py and evaluate_training.py on a trained run, with their own config mutated."""
    out, _ = trained

    @settings(**profile)
    @given(st.one_of(st.tuples(st.just("evaluate.py"), mutated(BASE_EVAL)),
                     st.tuples(st.just("evaluate_training.py"), mutated(BASE_TRAIN_EVAL))))
    def check(case):
        script, cfg = case
        path, _ = yaml_case(tmp_path, cfg)
        flag = ["-t", TRAIN_CFG, "-e", path] if script == "evaluate.py" else ["-te", path]
        before = listing(out.parent)
        code, err = run_script(script, *flag, "--set", f"saving.save_folder_name={out}")
        assert_contract(code, err, out.parent, before)
    check()


NAN_HISTORY = st.just({"generator": {"total": [float("nan")] * 3}})  # a run that diverged from its first step
ODD_TENSORS = st.sampled_from([torch.zeros(0), torch.zeros(3, 3), torch.full((2,), float("nan")),
                               torch.zeros(2, dtype=torch.int64), torch.tensor(1.0)])


@st.composite
def mutated_checkpoint(draw, state):
    state = copy.copy(state)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(state)))
        kind = draw(st.sampled_from(["delete", "replace", "weights"]))
        if kind == "delete":
            del state[key]
        elif kind == "replace":
            state[key] = copy.deepcopy(draw(st.one_of(ODD_VALUES, ODD_TENSORS, NAN_HISTORY)))
        elif isinstance(state.get("model_state_dict"), dict) and state["model_state_dict"]:
            weights = dict(state["model_state_dict"])
            name = draw(st.sampled_from(sorted(weights)))
            if draw(st.booleans()):
                del weights[name]
            else:
                weights[name] = draw(ODD_TENSORS).clone()
            state["model_state_dict"] = weights
    return state


def script_args(script, checkpoint, out):
    return {
        "train.py": ["-t", TRAIN_CFG, "--set", f"model.model_checkpoint_filename={checkpoint}", "--set",
                     "training.n_epochs=2", "--set", f"saving.save_folder_name={out}"],
        "evaluate.py": ["-t", TRAIN_CFG, "-e", EVAL_CFG, "--set", f"evaluation.model_checkpoint_filename={checkpoint}",
                        "--set", f"saving.save_folder_name={out}"],
        "evaluate_training.py": ["-te", TRAIN_EVAL_CFG, "--set",
                                 f"training_evaluation.model_checkpoint_filename={checkpoint}",
                                 "--set", f"saving.save_folder_name={out}"],
        "jit_trace_model.py": ["-t", TRAIN_CFG, "-c", checkpoint, "-i", "1", "1", "4", "4", "--set",
                               f"saving.save_folder_name={out}"],
    }[script]


@pytest.mark.parametrize("profile", PROFILES)
def test_mutated_checkpoints_in_every_script(tmp_path, trained, profile):
    _, checkpoint = trained
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)

    @settings(**profile)
    @given(mutated_checkpoint(state), st.sampled_from(sorted(SCRIPTS)))
    def check(damaged, script):
        folder = fresh(tmp_path)
        path = folder / "damaged.pth"
        torch.save(damaged, path)
        out = folder / "out"
        shutil.copytree(checkpoint.parent, out / "run_1")  # a run for evaluate_training.py to read
        before = listing(out)
        code, err = run_script(script, *script_args(script, path, out))
        assert_contract(code, err, out, before)
    check()


@pytest.mark.parametrize("profile", PROFILES)
def test_damaged_checkpoint_bytes_in_every_script(tmp_path, trained, profile):
    _, checkpoint = trained
    data = checkpoint.read_bytes()

    @settings(**profile)
    @given(st.integers(0, len(data)), st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                                               max_size=8), st.sampled_from(sorted(SCRIPTS)))
    def check(cut, flips, script):
        folder = fresh(tmp_path)
        damaged = bytearray(data[:max(cut, len(data) // 2)] if not flips else data)
        for i, bit in flips:
            damaged[i % len(damaged)] ^= 1 << bit
        path = folder / "damaged.pth"
        path.write_bytes(bytes(damaged))
        out = folder / "out"
        code, err = run_script(script, *script_args(script, path, out))
        assert_contract(code, err, out)
    check()


ARGUMENT = st.one_of(st.sampled_from(["-t", "-e", "-te", "-c", "-i", "--set", "--format", "--benchmark",
                                      "--dynamic-batch", "--device", "latest", "best", TRAIN_CFG, EVAL_CFG, "1", "0",
                                      "-1", "4", "x", "training.n_epochs=abc", "onnx", "cuda", "a=b=c", "=", ""]),
                     st.text(max_size=6))


@pytest.mark.parametrize("profile", PROFILES)
def test_random_command_lines(tmp_path, trained, profile):
    out, _ = trained

    @settings(**profile)
    @given(st.sampled_from(sorted(SCRIPTS)), st.lists(ARGUMENT, max_size=8))
    def check(script, args):
        before = listing(out)
        code, err = run_script(script, *args, "--set", f"saving.save_folder_name={out}", "--set",
                               "training.n_epochs=1")
        assert "Traceback" not in err, err[-3000:]
        assert code in (0, 2, 3), (code, err[-3000:])
        if code == 2:
            assert listing(out) == before, err[-2000:]
    check()

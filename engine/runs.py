"""A run's files: `Run` owns them, and the other scripts find and load a trained run from here.

Layout: models/<model>/model_checkpoints/<save_folder_name>/      the runs of one config's save_folder_name
            run_<N>/                                              one folder per from-scratch run (1, 2, ...)
                <save_filename_prefix>_epoch<N>[_et]_<YYYYmmdd-HHMMSS>.pth   checkpoints (_et: stopped early)
                <save_filename_prefix>_best.pth                   the best so far by saving.keep_best
                training_cfg_<YYYYmmdd-HHMMSS>.yaml               the config of each start or resume
                run.json                                          each start's command, versions, devices, git commit
                metrics.jsonl                                     one strict-JSON row per step (and validation)
                events.out.tfevents.*                             TensorBoard (logging.tensorboard)
                samples_epoch<N>.png                              generated samples, without TensorBoard
                jit/                                              exported models (jit_trace_model.py)
        results/<model>/<save_folder_name>/run_<N>/               its plots and evaluation outputs
A from-scratch run claims the next free run_<N> (mkdir, which two runs cannot both win) only once
every check has passed, so a refused run leaves nothing behind; a resume continues in the folder of
its checkpoint. (Checkpoints written before run folders existed lie in <save_folder_name>/ itself,
which then counts as its oldest run.) Every file is written to a hidden temporary file in the same
folder, flushed to disk and renamed into place, so a crash never leaves a partial file where a
reader would pick it up; the next run removes such leftovers. Every checkpoint load uses
`weights_only=True`: a checkpoint can hold tensors and plain data, never code.
"""
import contextlib
import errno
import fnmatch
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
import yaml

from engine.config import (
    REPO_ROOT,
    checkpoint_dir,
    is_number,
    load_training_config,
    model_dir,
    parse_yaml,
    resolve_path,
    results_dir,
    to_yaml,
)
from engine.dashboard import Dashboard
from engine.errors import UserError, did_you_mean, shown
from engine.files import atomic_write
from engine.model_base import architecture_text_for, build_model

NAME = re.compile(r"^(?P<prefix>.+)_epoch(?P<epoch>\d+)(?P<et>_et)?_(?P<stamp>\d{8}-\d{6})\.pth$")
RUN = re.compile(r"^run_(?P<n>\d+)$")
BEST = "{prefix}_best.pth"  # not a NAME: keep_last and `latest` pass it by
METRICS = "metrics.jsonl"
RECORD = "run.json"
BOOKKEEPING = ("epoch", "step", "time", "nonfinite", "samples_per_s", "data_wait")  # metrics.jsonl keys no metric


class Run:
    """The one owner of a run's files (see the layout above): its folder, checkpoint names,
    atomic writes, keep_last, partial-write cleanup, the config snapshot and run record,
    metrics.jsonl and the dashboard (dashboard.py), and the places where results and exported
    models go. Nothing else writes into a run's folder.

    `folder` None: a new run, whose run_<N> under `runs_root` is made by `claim` (train.py calls
    it once every check has passed; `start` does if nobody has)."""

    def __init__(self, folder, results, prefix="model", keep_last=None, runs_root=None):
        self.folder, self.results = (Path(folder), Path(results)) if folder is not None else (None, None)
        self.runs_root, self.results_root = runs_root, Path(results)
        self.prefix, self.keep_last = prefix, keep_last
        self.metrics_file = None  # open while training (rank 0)
        self.dashboard = None  # dashboard.Dashboard while training (rank 0)

    @classmethod
    def of(cls, cfg, folder):
        """The existing run in `folder` (a run_<N>, or any folder a checkpoint lies in)."""
        saving = cfg["saving"]
        return cls(folder, results_of(cfg, folder), saving["save_filename_prefix"], saving["keep_last"])

    @classmethod
    def new(cls, cfg):
        """A from-scratch run of `cfg`; its folder is made when it starts (and can be: checked now)."""
        saving = cfg["saving"]
        check_can_make(checkpoint_dir(cfg), saving_key(cfg))
        return cls(None, results_dir(cfg), saving["save_filename_prefix"], saving["keep_last"], checkpoint_dir(cfg))

    @property
    def name(self):
        return self.folder.name if self.folder is not None else "(new run)"

    def claim(self):
        """Make the next free run_<N> folder: one past the highest so far, and never one that
        exists (os.mkdir fails for the second of two runs that start at once)."""
        self.folder = claim_numbered(self.runs_root, "run")
        self.results = self.results_root / self.folder.name
        return self.folder

    # ---- checkpoints ----
    def save(self, state, epoch, early_stop=False):
        """Write the checkpoint of `epoch`; with keep_last, then delete the oldest beyond it."""
        name = f"{self.prefix}_epoch{epoch}{'_et' if early_stop else ''}_{timestamp()}.pth"
        path = atomic_write(self.folder / name, lambda f: torch.save(state, f))
        if self.keep_last:  # only once the new one is safely on disk
            for old in self.checkpoints()[:-self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def save_best(self, state):
        """Write (or replace) the run's best checkpoint."""
        return atomic_write(self.folder / BEST.format(prefix=self.prefix), lambda f: torch.save(state, f))

    def checkpoints(self):
        """This run's periodic checkpoints (its prefix, in its folder), oldest first."""
        if self.folder is None:
            return []
        return [p for p in list_checkpoints(self.folder) if p.name.startswith(f"{self.prefix}_epoch")]

    def latest(self):
        found = self.checkpoints()
        return found[-1] if found else None

    # ---- while training (rank 0) ----
    def start(self, cfg, last_step, about, tensorboard):
        """Make the folder of a new run, or clear what a kill -9 cut short in a resumed one; write
        the config snapshot and this start's record (`about`: devices, world size, checkpoint);
        open metrics.jsonl and the dashboard. A resumed run redoes the steps after its
        checkpoint: their rows (and any line cut short) are dropped, so that every step appears
        once."""
        if self.folder is None:
            self.claim()
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        path = self.folder / METRICS
        kept = [row for row in read_metrics(path) if row["step"] <= last_step]
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in kept).encode()
        atomic_write(path, lambda f: f.write(text))
        self.snapshot(cfg)
        self.write_record(about)
        self.metrics_file = open(path, "a")
        self.dashboard = Dashboard(self.folder, tensorboard, cfg, resumed_at=last_step)

    def log(self, rows):
        """Append rows to metrics.jsonl, as strict JSON (a NaN or inf as null, its key listed
        under "nonfinite"), and to the dashboard (if this process writes them)."""
        if self.metrics_file is None:
            return
        rows = [strict_row(row) for row in rows]
        self.metrics_file.write("".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
        self.metrics_file.flush()
        self.dashboard.scalars(rows)

    def log_images(self, epoch, step, outputs, rows=None, value_range=None):
        """The generator's outputs on the run's fixed inputs, as a grid (TensorBoard or a PNG); with
        `rows` (names), the outputs are that many equal rows, stacked."""
        if self.dashboard is not None:
            self.dashboard.images(epoch, step, outputs, value_range, rows)

    def close(self):
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None

    def snapshot(self, cfg):
        """The config this start or resume runs with, beside its checkpoints."""
        text = to_yaml(cfg).encode()
        return atomic_write(self.folder / f"training_cfg_{timestamp()}.yaml", lambda f: f.write(text))

    def write_record(self, about):
        """Add this start to run.json: what a reader needs to reproduce the run months later."""
        path = self.folder / RECORD
        try:
            starts = json.loads(path.read_text())["starts"] if path.is_file() else []
        except (ValueError, KeyError, TypeError):
            starts = []  # a record cut short or edited by hand: start it afresh rather than refuse to train
        starts.append({**start_record(), **about})
        text = json.dumps({"starts": starts}, indent=2).encode()
        atomic_write(path, lambda f: f.write(text))

    def metrics(self):
        return read_metrics(self.folder / METRICS)

    # ---- outputs of the other scripts ----
    def write_result(self, name, write):
        """results/<model>/<save_folder_name>/<run>/<name>, written by `write(file)`."""
        return atomic_write(self.results / name, write)

    def save_figure(self, name, fig):
        """A matplotlib figure as results/<model>/<save_folder_name>/<run>/<name> (PNG)."""
        return self.write_result(name, lambda f: fig.savefig(f, format="png", dpi=100))

    def write_export(self, name, write):
        """jit/<name> beside the checkpoints: an exported model or its example input."""
        return atomic_write(self.folder / "jit" / name, write)


def strict_row(row):
    """`row` with every non-finite float as None, and their keys under "nonfinite"."""
    bad = [key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
    if not bad:
        return row
    return {**{key: None if key in bad else value for key, value in row.items()}, "nonfinite": bad}


def start_record(repo=REPO_ROOT):
    """The command line, time, software versions and git state of this start."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": [Path(sys.executable).name, *sys.argv],
            "cwd": os.getcwd(), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "git": git_state(repo)}


def git_state(repo):
    """{"commit", "dirty"} of the checkout `repo` is in, or None where it is none (or git is missing)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def claim_numbered(root, prefix):
    """Make and return the folder <prefix>_<N> under `root`: one past the highest N so far, and
    never one that exists (os.mkdir fails for the second of two processes that try at once)."""
    root.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{prefix}_(\d+)$")
    n = max((int(m[1]) for p in root.iterdir() if (m := pattern.match(p.name))), default=0) + 1
    while True:
        try:
            (root / f"{prefix}_{n}").mkdir()
            return root / f"{prefix}_{n}"
        except FileExistsError:
            n += 1


# ---- finding runs and checkpoints ----
@contextlib.contextmanager
def looking_in(where):
    """An OSError while looking through folders for runs and checkpoints (a folder without read
    permission, a file where a folder should be) as a UserError naming `where`, the key that led
    there, and the path."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise  # (errors.run_main says it, for every path)
        raise UserError(f"{where}: cannot look through {e.filename or 'a folder'}: {e.strerror or e}") from None


def saving_key(cfg):
    """Where a config's runs are: what a message about their folder names."""
    return f"{cfg.get('config_path', 'the training config')}: saving.save_folder_name"


def check_can_make(folder, where):
    """`folder` exists or can be made: the nearest part of its path that exists is a folder this
    process may write in. Checked before anything is written; mkdir would fail only after it."""
    with looking_in(where):
        existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        inside = "" if existing == folder else f", so {folder} cannot be made a folder inside it"
        raise UserError(f"{where}: {existing} is a file{inside}; name a folder for the runs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where}: no permission to write in {existing}, where {folder} would be made")


def run_folders(cfg):
    """The runs of `cfg`'s save_folder_name, oldest first: run_1, run_2, ... (and, first, the
    save_folder_name folder itself where it holds checkpoints from before run folders)."""
    root = checkpoint_dir(cfg)
    with looking_in(saving_key(cfg)):
        if not root.is_dir():
            return []
        numbered = sorted((int(m["n"]), p) for p in root.iterdir() if p.is_dir() and (m := RUN.match(p.name)))
        return ([root] if list_checkpoints(root) else []) + [p for _, p in numbered]


def results_of(cfg, folder):
    """The results folder of the run in `folder`: results/<model>/<the folder's path under
    model_checkpoints/>, or results/<model>/<save_folder_name>/<folder name> for a folder
    elsewhere."""
    folder = Path(folder).resolve()
    checkpoints = (model_dir(cfg) / "model_checkpoints").resolve()
    if folder.is_relative_to(checkpoints) and folder != checkpoints:
        return REPO_ROOT / "results" / model_dir(cfg).name / folder.relative_to(checkpoints)
    return results_dir(cfg) / folder.name


def run_config(folder):
    """The config a run last started with (its newest training_cfg_*.yaml), or None."""
    snapshots = sorted(Path(folder).glob("training_cfg_*.yaml"))
    return yaml.safe_load(snapshots[-1].read_text()) if snapshots else None


def newest_checkpoint(cfg):
    """The newest checkpoint of the newest run of `cfg`'s save_folder_name that has one, or None."""
    with looking_in(saving_key(cfg)):
        for folder in reversed(run_folders(cfg)):
            found = list_checkpoints(folder)
            if found:
                return found[-1]
    return None


def best_checkpoint(cfg):
    """The best checkpoint (saving.keep_best) of the newest run of `cfg` that has one, or None."""
    name = BEST.format(prefix=cfg["saving"]["save_filename_prefix"])
    with looking_in(saving_key(cfg)):
        return next((folder / name for folder in reversed(run_folders(cfg)) if (folder / name).is_file()), None)


def find_checkpoint(cfg, spec, where):
    """The checkpoint `spec` names among the runs of `cfg`'s save_folder_name: None; latest (the
    newest of the newest run); best (the best of the newest run that kept one); a run folder (its
    newest); a checkpoint file name (found in whichever run holds it; in several, a user error
    listing them); or a path. A path it cannot look through is a user error naming `where`."""
    with looking_in(where):
        return search_checkpoint(cfg, spec, where)


def search_checkpoint(cfg, spec, where):
    """find_checkpoint's search, which may raise the OSError of a folder it cannot look through."""
    if spec is None:
        return None
    root, runs = checkpoint_dir(cfg), run_folders(cfg)
    if spec == "best":
        found = best_checkpoint(cfg)
        if found is None:
            raise UserError(f"{where}: 'best' but no run in {root} kept a best checkpoint "
                            f"({BEST.format(prefix=cfg['saving']['save_filename_prefix'])}); train with "
                            "saving.keep_best set, e.g. saving.keep_best: validation/generator/total")
        return found
    if spec == "latest":
        found = newest_checkpoint(cfg)
        if found is None:
            raise UserError(f"{where}: 'latest' but there is no checkpoint in {root}; train first "
                            "(python train.py -t <training config>)")
        return found
    for candidate in (root / spec, Path(spec), resolve_path(spec)):  # a run folder, or a path from here or the repo
        if candidate.is_dir():
            found = list_checkpoints(candidate)
            if not found:
                raise UserError(f"{where}: {shown(spec)}: the folder {candidate} holds no checkpoint")
            return found[-1]
        if candidate.is_file():
            return candidate
    matches = [folder / spec for folder in runs if (folder / spec).is_file()]
    if len(matches) > 1:
        raise UserError(f"{where}: {shown(spec)} is a checkpoint of several runs: "
                        f"{', '.join(str(m.parent.relative_to(root)) for m in matches)}; name one as <run>/{spec}")
    if matches:
        return matches[0]
    names = [p.name for folder in runs for p in list_checkpoints(folder)]
    choices = [p.name for p in runs if p != root] + ["latest", "best"]
    listing = ", ".join(names[-5:]) if names else "none"
    raise UserError(f"{where}: checkpoint {shown(spec)} not found in the runs of {root}"
                    f"{did_you_mean(spec, names + choices)}; use latest, best, a run folder "
                    f"({', '.join(choices[-4:])}), a path, or a file name such as: {listing}")


def select_runs(cfg, specs, where):
    """The run folders that `specs` pick among `cfg`'s runs (oldest first, each once): all, latest,
    run folder names, globs over them (run_1*), or paths to run folders."""
    with looking_in(where):
        return pick_runs(cfg, specs, where)


def pick_runs(cfg, specs, where):
    """select_runs' search, which may raise the OSError of a folder it cannot look through."""
    runs, root, picked = run_folders(cfg), checkpoint_dir(cfg), []
    names = {str(p.relative_to(root)) if p != root else ".": p for p in runs}
    for spec in specs if isinstance(specs, list) else [specs]:
        if not isinstance(spec, str):
            raise UserError(f"{where}: {shown(spec)} is not a run: use all, latest, a run folder or a glob")
        if spec == "all":
            found = runs
        elif spec == "latest":
            found = runs[-1:]
        elif any(c in spec for c in "*?["):
            found = [p for name, p in names.items() if fnmatch.fnmatchcase(name, spec)]
        elif spec in names:
            found = [names[spec]]
        elif Path(spec).is_dir() or resolve_path(spec).is_dir():
            found = [Path(spec) if Path(spec).is_dir() else resolve_path(spec)]
        else:
            found = []
        if not found:
            listing = ", ".join(names) if names else f"none yet: train first (python train.py -t {cfg['config_path']})"
            raise UserError(f"{where}: {shown(spec)} picks no run of {root}{did_you_mean(spec, list(names))}; "
                            f"runs: {listing}")
        picked += found
    return list(dict.fromkeys(picked))


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


def read_metrics(path):
    """The rows of a metrics.jsonl (none if there is no file), skipping a line a kill cut short.
    Read it elsewhere with e.g. pandas.read_json(path, lines=True)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def load_checkpoint(path, resume=False):
    """The checkpoint at `path`, loaded onto the CPU with weights_only=True and checked against
    the layout this pipeline writes (check_checkpoint; `resume`: for training on from it)."""
    state = read_checkpoint(path)
    check_checkpoint(state, path, resume)
    return state


def read_checkpoint(path):
    """What the file at `path` holds, loaded onto the CPU with weights_only=True (or a UserError)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # (torch.save writes a zip archive; this is neither that nor a pickle)
            raise UserError(f"{path}: not a PyTorch checkpoint (not the zip archive torch.save writes)") from None
        raise UserError(f"{path}: refused to load: the file holds more than tensors and plain data (possibly code), "
                        f"and checkpoints are only loaded with weights_only=True ({first_line(e, 'Unsupported')})"
                        ) from None
    except UserError:
        raise
    except Exception as e:  # torch.load on damaged bytes can raise nearly anything (the zip reader's RuntimeError...)
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)}); the file is damaged "
                        "(cut short, or changed since it was written)") from None
    return state


def first_line(error, prefer=None):
    """The telling part of a library's long error message: its line containing `prefer`, else its
    first sentence (or the exception's name when it says nothing)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((x for x in lines if prefer and prefer in x), lines[0])
    return line.split(". ")[0][:300]


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_tensors(v):
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def is_optimizer_state(v):
    return isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list) \
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"])


def is_history(v, steps=False):
    """{network: {term: [numbers]}}, as the trainer writes loss_history; with `steps`
    (validation_history), also "step": [the step of each value] once there are values."""
    if not isinstance(v, dict) or steps and set(v) - {"step"} and not (
            isinstance(v.get("step"), list) and all(map(is_count, v["step"]))):
        return False
    return all(isinstance(network, str) and isinstance(terms, dict) and all(
        isinstance(term, str) and isinstance(values, list) and all(map(is_number, values))
        for term, values in terms.items()) for network, terms in v.items() if not (steps and network == "step"))


def is_network_state(v):
    """One network's entry of a checkpoint's `networks` (network.checkpoint_entries)."""
    return isinstance(v, dict) and isinstance(v.get("components"), list) and all(
        isinstance(c, str) for c in v["components"]) and either_none(is_optimizer_state)(v.get("optimizer")) \
        and either_none(is_tensors)(v.get("ema")) and all(v.get(k) is None or isinstance(v[k], dict)
                                                         for k in ("scheduler", "scaler"))


def is_rng_state(v):
    return isinstance(v, dict) and isinstance(v.get("python"), list) and isinstance(v.get("torch"), torch.Tensor) \
        and isinstance(v.get("numpy"), dict) and isinstance(v["numpy"].get("keys"), torch.Tensor) \
        and all(isinstance(v["numpy"].get(k), (int, float)) for k in ("pos", "has_gauss", "cached_gaussian")) \
        and isinstance(v.get("cuda", []), list)


def is_yaml_mapping(v):
    """YAML text of a mapping (the config and architecture a checkpoint keeps), as config.parse_yaml
    reads a file: not nested past reason, no alias bomb, every key text."""
    try:
        return isinstance(v, str) and isinstance(parse_yaml(v, "checkpoint"), dict)
    except UserError:
        return False


def either_none(check):
    return lambda v: v is None or check(v)


# What this pipeline writes into a checkpoint (resume.training_state): key -> (what a resume
# needs, the check of its value, what it should be). Keys a checkpoint lacks are fine where they
# are not needed (older checkpoints lack newer keys); a key of the wrong kind is never fine.
CHECKPOINT = {
    "model_state_dict": (True, is_tensors, "the model's weights, {name: tensor}"),
    "epoch": (True, is_count, "the completed epochs, an integer >= 0"),
    "step": (True, is_count, "the completed steps, an integer >= 0"),
    "batches_done_in_epoch": (True, is_count, "an integer >= 0"),
    "loss_history": (True, is_history, "{network: {term: [numbers]}}"),
    "rng_state": (True, is_rng_state, "the random generators' states, as placement.rng_state writes them"),
    "config": (True, is_yaml_mapping, "the training config as YAML text"),
    "optimizer_state_dict": (False, either_none(is_optimizer_state), "an optimizer's state_dict"),
    "disc_optimizer_state_dict": (False, either_none(is_optimizer_state), "an optimizer's state_dict or null"),
    "scheduler_state_dict": (False, either_none(lambda v: isinstance(v, dict)), "a scheduler's state_dict"),
    "disc_scheduler_state_dict": (False, either_none(lambda v: isinstance(v, dict)), "a scheduler's state_dict"),
    "scaler_state_dicts": (False, either_none(lambda v: isinstance(v, dict) and all(
        isinstance(x, dict) for x in v.values())), "{network: a GradScaler's state_dict}"),
    "ema_state_dict": (False, either_none(is_tensors), "the generator's averaged weights, {name: tensor}"),
    "networks": (False, either_none(lambda v: isinstance(v, dict) and all(map(is_network_state, v.values()))),
                 "{network: {components, optimizer, scheduler, scaler, ema, ema_updates}}"),
    "ema_updates": (False, is_count, "an integer >= 0"),
    "validation_history": (False, either_none(lambda v: is_history(v, steps=True)),
                           "{step: [steps], network: {term: [numbers]}}"),
    "architecture": (False, either_none(is_yaml_mapping), "the architecture YAML text"),
    "skipped_updates": (False, is_count, "an integer >= 0"),
    "world_size": (False, either_none(lambda v: is_count(v) and v >= 1), "an integer >= 1"),
    "early_stop": (False, lambda v: isinstance(v, bool), "true or false"),
    "best": (False, either_none(lambda v: isinstance(v, dict) and (
        not v or {"key", "mode", "value", "epoch"} <= set(v))), "{key, mode, value, epoch} or null"),
    "classes": (False, either_none(lambda v: isinstance(v, dict) and all(
        isinstance(names, list) and all(isinstance(n, str) for n in names) for names in v.values())),
        "{stream: [class names]} or null"),
    "split": (False, either_none(lambda v: isinstance(v, dict) and all(is_count(v.get(k)) for k in (
        "n_samples", "split_seed", "batch_size")) and is_number(v.get("validation_fraction"))),
        "{n_samples, validation_fraction, split_seed, batch_size}"),
}


def check_checkpoint(state, path, resume=False):
    """A UserError naming the key unless `state` has the layout this pipeline writes: every key
    of CHECKPOINT that is present of its kind, the model's weights (and, to `resume`, all a
    resume reads) present, every weight finite. Checked before any of it is used, by every script."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint of this pipeline (it holds a {type(state).__name__}, not a mapping)")
    for key, (for_resume, check, what) in CHECKPOINT.items():
        if key not in state:
            if key == "model_state_dict" or resume and for_resume:
                raise UserError(f"{path}: not a checkpoint of this pipeline{' to resume from' * resume} (no {key}: "
                                f"{what})")
        elif not check(state[key]):
            raise UserError(f"{path}: {key}: {short(state[key])} is not what this pipeline writes there ({what}); "
                            "the file is damaged or not this pipeline's")
    bad = [layer_name(k) for k, v in state["model_state_dict"].items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{path}: model_state_dict: {', '.join(bad[:5])}{more} hold NaN or infinite values; a run that "
                        "diverged, or a damaged file: use an earlier checkpoint")


def short(value):
    return f"a {type(value).__name__} of {len(value)}" if isinstance(value, (dict, list)) else shown(value, 80)


def list_checkpoints(folder):
    """The checkpoints in `folder`, oldest first (by name stamp, then epoch, then write time)."""
    found = []
    for path in Path(folder).glob("*.pth"):
        m = NAME.match(path.name)
        try:
            if m:
                found.append(((m["stamp"], int(m["epoch"]), path.stat().st_mtime_ns), path))
        except FileNotFoundError:  # a link to nothing, or deleted since (keep_last): no checkpoint
            continue
    return [path for _, path in sorted(found)]


# ---- loading a trained run (evaluate.py, evaluate_training.py, jit_trace_model.py) ----
def load_trained_run(training_cfg_path, checkpoint_spec, where, overrides=(), use_ema=True):
    """(config, model with the checkpoint's weights, checkpoint path, checkpoint dict). The model
    is built from the architecture stored in the checkpoint, which is what its weights fit. With
    `use_ema`, a checkpoint's moving average of the generator's weights (training.ema_decay)
    replaces the generator's own."""
    cfg = load_training_config(training_cfg_path, overrides)
    path = find_checkpoint(cfg, checkpoint_spec, where)
    state = load_checkpoint(path)
    torch.manual_seed(cfg["training"]["seed"])
    saved = state.get("architecture") if isinstance(state, dict) else None
    on_disk = resolve_path(cfg["model"]["architecture_cfg_path"])
    if saved is None:
        model = build_model(cfg["model"])
    else:
        if on_disk.read_text() != saved:
            print(f"note: {on_disk} has changed since {path.name} was trained; using the architecture stored in "
                  "the checkpoint", file=sys.stderr)
        with architecture_text_for(on_disk, saved):
            model = build_model(cfg["model"])
    load_weights(model, state, path)
    if use_ema:
        for name, components, ema in averaged_weights(state):
            components_of(model, components).load_state_dict(ema)
            print(f"using the moving average of the {name}'s weights in {path.name} (ema_decay)", file=sys.stderr)
    return cfg, model, path, state


def averaged_weights(state):
    """[(network, its components, its EMA's state_dict)] of the networks a checkpoint keeps a
    moving average of: each network's in `networks`, or an older checkpoint's generator's."""
    if state.get("networks"):
        return [(name, net["components"], net["ema"]) for name, net in state["networks"].items() if net.get("ema")]
    return [("generator", None, state["ema_state_dict"])] if state.get("ema_state_dict") else []


def components_of(model, components):
    """The model's `components` (names; None: those of adv_type generator) as one module, keyed as
    a network's EMA and optimizer are."""
    return model.components_of("generator") if components is None else model.components_named(components)


def saved_config(state, fallback):
    """The config a checkpoint was trained with (`fallback` for a checkpoint without one)."""
    return yaml.safe_load(state["config"]) if isinstance(state.get("config"), str) else fallback


def load_weights(model, state, path):
    """The checkpoint's weights into `model`, or a user error listing the layers that do not fit;
    its generator EMA and optimizer states are checked against the model too, before any is used."""
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(f"{path}: not a checkpoint of this pipeline (no model_state_dict)")
    saved, own = state["model_state_dict"], model.state_dict()
    refuse_mismatches(path, "its weights", weight_mismatches(saved, own), model)
    for name, components, ema in averaged_weights(state):
        own_ema = components_of(model, components).state_dict()
        refuse_mismatches(path, f"the {name}'s ema", weight_mismatches(ema, own_ema), model)
    for key, components, optimizer in saved_optimizers(state, model):
        refuse_mismatches(path, key, optimizer_mismatches(optimizer, components_of(model, components)), model)
    model.load_state_dict(saved)


def saved_optimizers(state, model):
    """[(key path, components, optimizer state_dict)] of the optimizers a checkpoint keeps."""
    if state.get("networks"):
        return [(f"networks.{name}.optimizer", net["components"], net["optimizer"])
                for name, net in state["networks"].items() if net.get("optimizer") is not None]
    return [(key, None if network == "generator" else [c for c, t in model.adv_types.items() if t == network],
             state[key]) for key, network in (("optimizer_state_dict", "generator"),
                                              ("disc_optimizer_state_dict", "discriminator"))
            if state.get(key) is not None and network in model.adv_types.values()]


def refuse_mismatches(path, what, problems, model):
    if problems:
        lines = "\n  ".join(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
        raise UserError(f"{path}: {what} do not fit the architecture {model.architecture_path} (the checkpoint "
                        f"holds the architecture it was trained with, under 'architecture'):\n  {lines}")


def optimizer_mismatches(saved, module):
    """What in an optimizer's saved state does not fit the parameters of `module` (its network)."""
    names = [layer_name(name) for name, _ in module.named_parameters()]
    params = list(module.parameters())
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        return [f"it updates {len(ids)} parameters, the network has {len(params)}"]
    problems = []
    for position, i in enumerate(ids):
        for key, value in (saved["state"].get(i) or {}).items() if isinstance(saved["state"].get(i), dict) else []:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[position].shape:
                problems.append(f"{names[position]}: its {key} is {list(value.shape)}, the parameter "
                                f"{list(params[position].shape)}")
    return problems


def layer_name(key):
    """A state_dict key by its YAML layer name: model_components.<component>.<submodel>.layers.<layer
    name>.<tensor> -> <layer name>.<tensor>."""
    return key.split(".layers.", 1)[-1]


def weight_mismatches(saved, own):
    """What differs between a checkpoint's state_dict and the model's, by YAML layer name."""
    problems = [f"{layer_name(k)}: {list(saved[k].shape)} in the checkpoint, {list(v.shape)} in the architecture"
                for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{layer_name(k)}: in the architecture, not in the checkpoint" for k in own if k not in saved]
    problems += [f"{layer_name(k)}: in the checkpoint, not in the architecture" for k in saved if k not in own]
    return problems

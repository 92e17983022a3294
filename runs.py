"""A run's files: `Run` owns them, and the other scripts load a trained run from here.

Layout: models/<model>/model_checkpoints/<save_folder_name>/
            <save_filename_prefix>_epoch<N>[_et]_<YYYYmmdd-HHMMSS>.pth   checkpoints (_et: stopped early)
            training_cfg_<YYYYmmdd-HHMMSS>.yaml                          the config of each start or resume
            metrics.jsonl                                                one JSON row per step (and validation)
            jit/                                                         exported models (jit_trace_model.py)
        results/<model>/<save_folder_name>/                              plots and evaluation outputs
Every file is written to a hidden temporary file in the same folder, flushed to disk and renamed
into place, so a crash never leaves a partial file where a reader would pick it up; the next run
removes such leftovers. Every checkpoint load uses `weights_only=True`: a checkpoint can hold
tensors and plain data, never code.
"""
import json
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from config import checkpoint_dir, load_training_config, resolve_path, results_dir, to_yaml
from errors import UserError, did_you_mean
from model_base import architecture_text_for, build_model

NAME = re.compile(r"^(?P<prefix>.+)_epoch(?P<epoch>\d+)(?P<et>_et)?_(?P<stamp>\d{8}-\d{6})\.pth$")
METRICS = "metrics.jsonl"


class Run:
    """The one owner of a run's files (see the layout above): checkpoint names, atomic writes,
    keep_last, `latest`, partial-write cleanup, the config snapshot, metrics.jsonl, and the
    places where results and exported models go. Nothing else writes into a run's folder."""

    def __init__(self, folder, results, prefix="model", keep_last=None):
        self.folder, self.results = Path(folder), Path(results)
        self.prefix, self.keep_last = prefix, keep_last
        self.metrics_file = None  # open while training (rank 0)

    @classmethod
    def of(cls, cfg, folder=None):
        """The run of a validated training config (its checkpoints in `folder`, if given)."""
        saving = cfg["saving"]
        return cls(folder or checkpoint_dir(cfg), results_dir(cfg), saving["save_filename_prefix"], saving["keep_last"])

    # ---- checkpoints ----
    def save(self, state, epoch, early_stop=False):
        """Write the checkpoint of `epoch`; with keep_last, then delete the oldest beyond it."""
        name = f"{self.prefix}_epoch{epoch}{'_et' if early_stop else ''}_{timestamp()}.pth"
        path = atomic_write(self.folder / name, lambda f: torch.save(state, f))
        if self.keep_last:  # only once the new one is safely on disk
            for old in self.checkpoints()[:-self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def checkpoints(self):
        """This run's checkpoints (its prefix, in its folder), oldest first."""
        return [p for p in list_checkpoints(self.folder) if p.name.startswith(f"{self.prefix}_epoch")]

    def latest(self):
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, spec, where):
        """The checkpoint `spec` names (None, latest, a file of the folder, a path); see resolve_checkpoint."""
        return resolve_checkpoint(spec, self.folder, where)

    # ---- while training ----
    def start(self, last_step):
        """Clear what a kill -9 cut short, and open metrics.jsonl. A resumed run redoes the
        steps after its checkpoint: their rows (and any line cut short) are dropped, so that
        every step appears once."""
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        path = self.folder / METRICS
        text = "".join(json.dumps(row) + "\n" for row in read_metrics(path) if row["step"] <= last_step).encode()
        atomic_write(path, lambda f: f.write(text))
        self.metrics_file = open(path, "a")

    def log(self, rows):
        """Append rows to metrics.jsonl (if this process writes it)."""
        if self.metrics_file is not None:
            self.metrics_file.write("".join(json.dumps(row) + "\n" for row in rows))
            self.metrics_file.flush()

    def close(self):
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None

    def snapshot(self, cfg):
        """The config this start or resume runs with, beside its checkpoints."""
        text = to_yaml(cfg).encode()
        return atomic_write(self.folder / f"training_cfg_{timestamp()}.yaml", lambda f: f.write(text))

    def metrics(self):
        return read_metrics(self.folder / METRICS)

    # ---- outputs of the other scripts ----
    def write_result(self, name, write):
        """results/<model>/<save_folder_name>/<name>, written by `write(file)`."""
        return atomic_write(self.results / name, write)

    def save_figure(self, name, fig):
        """A matplotlib figure as results/<model>/<save_folder_name>/<name> (PNG)."""
        return self.write_result(name, lambda f: fig.savefig(f, format="png", dpi=100))

    def write_export(self, name, write):
        """jit/<name> beside the checkpoints: an exported model or its example input."""
        return atomic_write(self.folder / "jit" / name, write)


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


def atomic_write(path, write):
    """Call `write(file)` on a temp file in `path`'s folder, fsync it, then rename it to `path`:
    readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def load_checkpoint(path):
    """The checkpoint at `path`, loaded onto the CPU with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file holds more than tensors and plain data "
                        f"(possibly code), and checkpoints are only loaded with weights_only=True ({e})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({e})") from None


def list_checkpoints(folder):
    """The checkpoints in `folder`, oldest first (by name stamp, then epoch, then write time)."""
    found = []
    for path in Path(folder).glob("*.pth"):
        m = NAME.match(path.name)
        if m:
            found.append(((m["stamp"], int(m["epoch"]), path.stat().st_mtime_ns), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec, folder, where):
    """The checkpoint path that `spec` names: None, 'latest', a file in `folder`, or a path."""
    if spec is None:
        return None
    folder = Path(folder)
    if spec == "latest":
        found = list_checkpoints(folder)
        if not found:
            raise UserError(f"{where}: 'latest' but there is no checkpoint in {folder}; train first "
                            "(python train.py -t <training config>)")
        return found[-1]
    for candidate in (folder / spec, Path(spec), resolve_path(spec)):  # run's file, or a path from here or the repo
        if candidate.is_file():
            return candidate
    names = [p.name for p in list_checkpoints(folder)]
    listing = ", ".join(names[-5:]) if names else "none"
    raise UserError(f"{where}: checkpoint {spec!r} not found in {folder}{did_you_mean(spec, names + ['latest'])}; "
                    f"use 'latest' or one of: {listing}")


# ---- loading a trained run (evaluate.py, evaluate_training.py, jit_trace_model.py) ----
def load_trained_run(training_cfg_path, checkpoint_spec, where, overrides=(), use_ema=True):
    """(config, model with the checkpoint's weights, checkpoint path, checkpoint dict). The model
    is built from the architecture stored in the checkpoint, which is what its weights fit. With
    `use_ema`, a checkpoint's moving average of the generator's weights (training.ema_decay)
    replaces the generator's own."""
    cfg = load_training_config(training_cfg_path, overrides)
    path = Run.of(cfg).resolve(checkpoint_spec, where)
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
    if use_ema and state.get("ema_state_dict"):
        model.components_of("generator").load_state_dict(state["ema_state_dict"])
        print(f"using the moving average of the generator's weights in {path.name} (training.ema_decay)",
              file=sys.stderr)
    return cfg, model, path, state


def saved_config(state, fallback):
    """The config a checkpoint was trained with (`fallback` for a checkpoint without one)."""
    return yaml.safe_load(state["config"]) if isinstance(state.get("config"), str) else fallback


def load_weights(model, state, path):
    """The checkpoint's weights into `model`, or a user error listing the layers that do not fit."""
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(f"{path}: not a checkpoint of this pipeline (no model_state_dict)")
    saved, own = state["model_state_dict"], model.state_dict()
    problems = weight_mismatches(saved, own)
    if problems:
        lines = "\n  ".join(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
        raise UserError(f"{path}: its weights do not fit the architecture {model.architecture_path} (the checkpoint "
                        f"holds the architecture it was trained with, under 'architecture'):\n  {lines}")
    model.load_state_dict(saved)


def weight_mismatches(saved, own):
    """What differs between a checkpoint's state_dict and the model's, by YAML layer name."""
    def layer(key):  # model_components.<component>.<submodel>.layers.<layer name>.<tensor>
        return key.split(".layers.", 1)[-1]

    problems = [f"{layer(k)}: {list(saved[k].shape)} in the checkpoint, {list(v.shape)} in the architecture"
                for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{layer(k)}: in the architecture, not in the checkpoint" for k in own if k not in saved]
    problems += [f"{layer(k)}: in the checkpoint, not in the architecture" for k in saved if k not in own]
    return problems

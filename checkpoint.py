"""Checkpoints: names, atomic writes, safe loads, `latest`.

Layout: models/<model>/model_checkpoints/<save_folder_name>/
        <save_filename_prefix>_epoch<N>[_et]_<YYYYmmdd-HHMMSS>.pth
Every checkpoint is written to a hidden temporary file in the same folder, flushed to disk and
renamed into place, so a crash never leaves a partial file where a loader would pick it up.
Every load uses `weights_only=True`: a checkpoint can hold tensors and plain data, never code.
"""
import os
import pickle
import re
import tempfile
import time
from pathlib import Path

import torch

from config import resolve_path
from errors import UserError, did_you_mean

NAME = re.compile(r"^(?P<prefix>.+)_epoch(?P<epoch>\d+)(?P<et>_et)?_(?P<stamp>\d{8}-\d{6})\.pth$")


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


def checkpoint_name(prefix, epoch, early_stop=False):
    return f"{prefix}_epoch{epoch}{'_et' if early_stop else ''}_{timestamp()}.pth"


def save_checkpoint(path, state):
    """Write `state` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(state, f))


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


def remove_partial_writes(folder):
    """Delete the temp files of atomic_write calls that a kill -9 cut short in `folder` (hidden
    .<name>.<random>.tmp files, never read by any loader)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    """The run's checkpoints in `folder`, oldest first (by name stamp, then epoch, then write time)."""
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

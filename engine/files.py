"""Files written whole or not at all: a reader (a resumed run, evaluate.py, a person) never sees
half of a checkpoint, a metrics table or a picture, whatever kills the writer."""
import os
import tempfile
from pathlib import Path


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

"""User errors: one exception type, one place per script that turns it into `error: ...` + exit 2.

Anything a user can get wrong (a config key, an architecture, a path, a name, a CLI argument)
raises `UserError` with a message that names the file, the key path and what would be valid.
Entry points wrap their `main` in `run_main`, so users never see a traceback for their own
mistakes (pass `--debug` to see one anyway). A name the user types (a layer type, an optimizer, a
function) is resolved in registry.py, whose `lookup` raises the UserError with a did-you-mean.
"""
import difflib
import errno
import sys
import sysconfig
import traceback
from pathlib import Path


class UserError(Exception):
    """A mistake in something the user wrote; the message says where and what is valid."""


def did_you_mean(name, valid):
    """' (did you mean 'x'?)' when a near name exists (ignoring case), else ''."""
    by_lower = {str(v).lower(): str(v) for v in valid}
    close = difflib.get_close_matches(str(name).lower(), by_lower, n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def kwargs_text(kwargs):
    """{"a": 1} as "a=1", for messages that show a call."""
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


ROOT = Path(__file__).resolve().parent
# The repository's own files that a user edits: their frames are the user's, like a flow's.
USER_MODULES = {ROOT / name for name in ("layers.py", "loss.py", "dataset_functions.py")}
LIBRARIES = [Path(p).resolve() for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                          sysconfig.get_paths()["platlib"]}]


def is_users(filename):
    """Whether a traceback frame lies in the user's code: a model flow or helper (anywhere but the
    pipeline's own modules and the installed libraries), or layers.py, loss.py, dataset_functions.py."""
    path = Path(filename).resolve()
    if path in USER_MODULES:
        return True
    pipeline = path.parent == ROOT or ROOT / "benchmarks" in path.parents or ROOT / "tests" in path.parents
    return not pipeline and not filename.startswith("<") and not any(lib in path.parents for lib in LIBRARIES)


def user_frames(error):
    """The frames of `error`'s traceback in the user's files, innermost last, as indented lines
    ('' when none): the pipeline's own and torch's would bury them."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if is_users(f.filename)]
    return "".join(f"\n  {f.filename}, line {f.lineno}, in {f.name}" + (f"\n    {f.line}" if f.line else "")
                   for f in frames)


def user_code_error(error, doing):
    """A UserError for an exception raised inside the user's own Python while the pipeline was
    `doing` something (e.g. "importing models/x/x.py"): one line naming it and the exception,
    then the user's frames."""
    frames = user_frames(error)
    return UserError(f"{doing} raised {type(error).__name__}: {error}" + (f"\nin your code:{frames}" if frames else ""))


def run_main(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: ...` on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if debug or e.errno != errno.ENAMETOOLONG:
            raise
        # (any check of a path a user typed can raise it: one place for all of them)
        name = str(e.filename or "")
        print(f"error: a path is too long for this file system (a name over 255 characters?): "
              f"{name[:120]}{'...' * (len(name) > 120)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one inside it
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)

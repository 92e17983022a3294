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
    """' (did you mean 'x'?)' when a near name exists (ignoring case), else ''. Only text is compared:
    a name of another kind (a list, a number) is near no name, and its text may be huge."""
    if not isinstance(name, str):
        return ""
    by_lower = {str(v).lower(): str(v) for v in valid}
    close = difflib.get_close_matches(str(name).lower(), by_lower, n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def kwargs_text(kwargs):
    """{"a": 1} as "a=1", for messages that show a call."""
    return ", ".join(f"{k}={shown(v)}" for k, v in kwargs.items())


SHOWN_WIDTH = 100  # characters of a value that a message echoes
MESSAGE_LIMIT = 4000  # characters of a whole message; run_main cuts the middle out of a longer one
BRACKETS = {list: "[]", tuple: "()", dict: "{}"}


def shown(value, width=SHOWN_WIDTH):
    """`value` as a message echoes it: its repr, cut past `width` characters with how many were left
    out. Worked out piece by piece, never whole: a YAML value built of aliases is small in memory,
    but its repr can run to gigabytes."""
    head = ""
    try:
        for piece in repr_pieces(value, set()):
            head += piece
            if len(head) > width:
                return left_out(head[:width], repr_length(value, {}, set()) - width)
    except RecursionError:
        return f"{head[:width]}... (nested too deep to show whole)"
    return head


def dtype_name(dtype):
    """A torch dtype as messages and file records name it: float32, int64."""
    return str(dtype).removeprefix("torch.")


def cut(text, width=SHOWN_WIDTH):
    """Text that a message echoes as it is (not as a repr), cut past `width` characters as `shown` cuts."""
    return text if len(text) <= width else left_out(text[:width], len(text) - width)


def left_out(head, n):
    return f"{head}... ({n:,} characters left out)"


def repr_pieces(value, inside):
    """repr(value) in pieces, lazily (`inside`: the containers being written, to write one that
    holds itself as repr does, [...])."""
    brackets = BRACKETS.get(type(value))
    if brackets is None:
        yield repr(value)
        return
    if id(value) in inside:
        yield f"{brackets[0]}...{brackets[1]}"
        return
    inside.add(id(value))
    yield brackets[0]
    for i, item in enumerate(value.items() if isinstance(value, dict) else value):
        yield ", " if i else ""
        if isinstance(value, dict):
            yield from repr_pieces(item[0], inside)
            yield ": "
            yield from repr_pieces(item[1], inside)
        else:
            yield from repr_pieces(item, inside)
    yield "," if isinstance(value, tuple) and len(value) == 1 else ""
    yield brackets[1]
    inside.discard(id(value))


def repr_length(value, known, inside):
    """len(repr(value)), each container and value counted once however often it recurs (`known`:
    id -> length), as an alias-built value holds the same few many times."""
    if id(value) in known:
        return known[id(value)]
    brackets = BRACKETS.get(type(value))
    if brackets is None:
        n = len(repr(value))
    elif id(value) in inside:
        return 5  # [...]
    else:
        inside.add(id(value))
        items = [x for pair in value.items() for x in pair] if isinstance(value, dict) else value
        n = 2 + sum(repr_length(x, known, inside) for x in items) + 2 * max(len(value) - 1, 0) \
            + 2 * isinstance(value, dict) * len(value) + (isinstance(value, tuple) and len(value) == 1)
        inside.discard(id(value))
    known[id(value)] = n
    return n


def cut_middle(text, limit=MESSAGE_LIMIT):
    """`text` whole or, past `limit` characters, its start and its end with how much was left out
    between: the last safety net for a message that echoes more than it should."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}\n... ({len(text) - 2 * keep:,} characters left out) ...\n{text[-keep:]}"


ROOT = Path(__file__).resolve().parent.parent  # the repository
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
    pipeline = path.parent == ROOT or any(ROOT / folder in path.parents for folder in ("engine", "benchmarks", "tests"))
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
        print(f"error: {cut_middle(str(e))}", file=sys.stderr)
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

"""User errors: one exception type, one place per script that turns it into `error: ...` + exit 2.

Anything a user can get wrong (a config key, an architecture, a path, a name, a CLI argument)
raises `UserError` with a message that names the file, the key path and what would be valid.
Entry points wrap their `main` in `run_main`, so users never see a traceback for their own
mistakes (pass `--debug` to see one anyway).
"""
import difflib
import sys


class UserError(Exception):
    """A mistake in something the user wrote; the message says where and what is valid."""


def did_you_mean(name, valid):
    """' (did you mean 'x'?)' when a near name exists (ignoring case), else ''."""
    by_lower = {str(v).lower(): str(v) for v in valid}
    close = difflib.get_close_matches(str(name).lower(), by_lower, n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def lookup(name, table, what, where, valid=None):
    """Resolve a user-typed `name` in `table` (a dict), or raise a UserError that lists options.

    `what` says what kind of name it is ("loss function in loss.py"); `where` names the file and
    key path it came from ("configs/x.yaml: loss.loss_fn"); `valid` describes the valid names
    when there are too many to list.
    """
    if isinstance(name, str) and name in table:
        return table[name]
    raise UserError(f"{where}: {name!r}: {unknown_name(name, table, what, valid)}")


def unknown_name(name, table, what, valid=None):
    """What to say of a name missing from `table`: what it should be, a did-you-mean, the valid names."""
    return f"unknown {what}{did_you_mean(name, table)}; valid: {valid or ', '.join(sorted(table))}"


def kwargs_text(kwargs):
    """{"a": 1} as "a=1", for messages that show a call."""
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def public_functions(module):
    """The functions a user may name from `module`: defined there, not starting with '_'."""
    return {name: obj for name, obj in vars(module).items()
            if callable(obj) and not name.startswith("_") and not isinstance(obj, type)
            and getattr(obj, "__module__", None) == module.__name__}


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
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one inside it
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)

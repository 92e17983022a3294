"""User errors: one exception type, one place per script that turns it into `error: ...` + exit 2.

Anything a user can get wrong (a config key, an architecture, a path, a name, a CLI argument)
raises `UserError` with a message that names the file, the key path and what would be valid.
Entry points wrap their `main` in `run_main`, so users never see a traceback for their own
mistakes (pass `--debug` to see one anyway). A name the user types (a layer type, an optimizer, a
function) is resolved in registry.py, whose `lookup` raises the UserError with a did-you-mean.
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


def kwargs_text(kwargs):
    """{"a": 1} as "a=1", for messages that show a call."""
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


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

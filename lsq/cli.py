"""What sweep.py, lsq.train and lsq.export share: exit statuses, an exception as one `error:` line."""

import os
import sys

from .config import ConfigError

OK, FAILED, BAD_INPUT, INTERRUPTED, PIPE_CLOSED = 0, 1, 2, 130, 141
EXIT_HELP = "exit status: 0 done, 1 a run or check failed, 2 a mistake in the input, 130 interrupted, 141 output pipe closed"


def run_command(body, debug: bool = False, failures: tuple = (), interrupted=lambda: "interrupted") -> int:
    """body() -> exit status. ConfigError: bad input (2). An exception in `failures`: a failed run
    (1). Both print one `error:` line, as does any other exception (1, with its type). Ctrl-C prints
    interrupted() and gives 130; a closed output pipe (`| head`) ends quietly with 141."""
    try:
        return body()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's exit flush complains
        return PIPE_CLOSED
    except KeyboardInterrupt:
        if debug:
            raise
        print(interrupted(), file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if debug:
            raise
        if isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
            return BAD_INPUT
        known = isinstance(e, failures)
        print(
            f"error: {e}"
            if known
            else f"error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return FAILED

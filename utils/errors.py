"""User-facing errors: one clear line, exit code 2, no traceback; one rank speaks under a launcher."""
from __future__ import annotations

import functools
import os
import sys
import time

# Under a launcher every rank usually meets the same error. Ranks other than 0 wait this long before
# printing theirs: if rank 0 failed too, the launcher ends them in the meantime and one line shows;
# an error of one rank alone still shows, late.
OTHER_RANKS_DELAY_S = 20.0


class UserError(Exception):
    """Something the user can fix (a path, an option, the data, a missing previous step).

    Who words what: the command-line layer (argparser.py, run.py, scripts/, and what reads the options
    namespace itself: Method.validate, make_model) checks option values before anything is built and names
    options by their flags; library code words its errors in its own terms (parameter names, files, data).
    When the fix of a library error may also be an option, the library gives the words the command line
    would change as named parts of a str.format template (every value in a part, so the template holds no
    other braces): `UserError("{path} does not match {backbone}", path=p, backbone="resnet18")`. The
    command line catches it and raises `err.reworded(backbone="--backbone resnet18", hint=" or pass ...")`:
    the same sentence in its own words.
    """

    def __init__(self, message: str = "", **parts):
        self.template, self.parts = message, parts
        super().__init__(message.format(**parts) if parts else message)

    def reworded(self, hint: str = "", **parts) -> UserError:
        """The message with `parts` in place of the library's words of the same names (names it does not
        use are ignored) and `hint` appended."""
        text = self.template.format(**{**self.parts, **parts}) if self.parts else self.template
        return UserError(text + hint)


def exit_on_user_error(main):
    """Decorate a command-line entry point: a UserError prints `error: <message>` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print_error(one_line(err))
            sys.exit(2)

    return wrapper


def print_error(message: str) -> None:
    """`error: <message>` on stderr; under a launcher rank 0 prints it at once, other ranks only late."""
    rank = os.environ.get("RANK", "0") or "0"
    if rank != "0":
        time.sleep(OTHER_RANKS_DELAY_S)
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)


def one_line(err: UserError) -> str:
    """The user's message; a UserError re-raised from a DataLoader worker carries the worker's traceback
    text, of which only the last line (our message) is kept."""
    message = str(err).strip()
    if "Traceback" in message:
        message = message.splitlines()[-1].split("UserError: ", 1)[-1]
    return message

"""User-facing errors: one clear line, exit code 2, no traceback; one rank speaks under a launcher."""
import functools
import os
import sys
import time

# Under a launcher every rank usually meets the same error. Ranks other than 0 wait this long before
# printing theirs: if rank 0 failed too, the launcher ends them in the meantime and one line shows;
# an error of one rank alone still shows, late.
OTHER_RANKS_DELAY_S = 20.0


class UserError(Exception):
    """Something the user can fix (a path, an option, the data, a missing previous step)."""


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

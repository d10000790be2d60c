"""Option roles (what an option's value means for a run) and frozen option records handed to each part."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Role:
    """What an option is to a run, declared where the option is defined (argparser.py, Method.add_arguments).

    kind:
      "model": changes what the step trains or tests: compared when a run resumes from its resume
               checkpoint, and by a campaign deciding whether a finished step is done;
      "bookkeeping": paths, logging, launch and resumption: compared by neither;
      "source": where the step starts from (--step_ckpt): compared on resume; a campaign follows the
               step's dependencies instead.
    compatible: a checkpoint this run loads (step t-1, --step_ckpt, --ckpt) must have been trained with
      the same value (else an error naming both, a warning with --allow_mismatch).
    step0: the option acts at step 0 and is counted in the method's step-0 signature (a campaign trains a
      step 0 once for methods with the same signature): a term name; options of one term form a list in
      declaration order, counted when the term's first option is on. Only the options of the method's
      own classes (and the shared ones) count.
    per_run: the campaign sets it for each run (it may not be passed after `--`).
    """

    kind: str = "model"
    compatible: bool = False
    step0: str | None = None
    per_run: bool = False

    def __post_init__(self):
        if self.kind not in ("model", "bookkeeping", "source"):
            raise ValueError(f"unknown option kind {self.kind!r}")


MODEL = Role()
BOOKKEEPING = Role(kind="bookkeeping")


class OptionGroup(argparse._ArgumentGroup):  # noqa: SLF001 - argparse has no public group class to extend
    """An argument group whose options declare their role (`role=`; default: changes the model): the
    role is kept on the option's action as `action.role`."""

    def add_argument(self, *args, role: Role | None = None, **kwargs):
        action = super().add_argument(*args, **kwargs)
        action.role = role or MODEL
        return action


def option_group(parser: argparse.ArgumentParser, *args, **kwargs) -> OptionGroup:
    """A new OptionGroup of any argparse parser (what ArgumentParser.add_argument_group does)."""
    group = OptionGroup(parser, *args, **kwargs)
    parser._action_groups.append(group)  # noqa: SLF001
    return group


class OptionRecord:
    """A read-only record of options (attribute access), e.g. the options a method reads."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no option {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError(f"{type(self).__name__} is read-only (options are settled by argparser)")

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._values == self._values

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(self._values.items()))})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def replace(self, **changes: Any):
        return type(self)(**{**self._values, **changes})

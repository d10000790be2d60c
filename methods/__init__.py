"""Incremental-learning methods: a registry from name to Method class; each owns its losses, presets and state."""
from methods.base import Method, SetupContext, StepContext
from methods.dft import DFTStar
from methods.hciss import HCISS
from methods.mib_cd import MiBCD
from methods.mib_family import EWC, FT, ILT, LWF, LWFMC, PI, RW, UFT, MiB, MiBEWF
from methods.micro import MiCro
from methods.plop import PLOP, PLOPEWF
from utils.errors import UserError

__all__ = ["ALIASES", "METHODS", "Method", "SetupContext", "StepContext", "get_method_class"]

# The registry: a new method is one file plus one entry here.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FT, UFT, LWF, LWFMC, ILT, EWC, RW, PI, MiB, HCISS, MiCro, MiBCD, PLOP, MiBEWF, PLOPEWF,
                 DFTStar)
}
ALIASES = {"MIB": "MiB", "LWFMC": "LWF-MC", "MIB-CD": "MiB-CD", "MICRO": "MiCro", "DFT*": "DFTstar"}


def get_method_class(name: str) -> type[Method]:
    """Look a method up by the name users type (case-insensitive, MiB aliases accepted)."""
    lookup = {n.upper(): n for n in METHODS}
    lookup.update({alias.upper(): target for alias, target in ALIASES.items()})
    key = lookup.get(str(name).upper())
    if key is None:
        # the command line names its option in place of {method} (argparser, scripts/campaign.py)
        raise UserError("unknown {method}; known: {known}", method=f"method {name!r}", known=", ".join(METHODS))
    return METHODS[key]

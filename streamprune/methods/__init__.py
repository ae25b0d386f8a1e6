"""Pruning methods, one file each, and the registry: the only place a method name is compared.

To add a method:
1. Write `methods/yours.py` with a `Method` subclass (base.py): `name`, `summary` (its --help line),
   `statistic` (a `Statistic` subclass collected per input site during the dense forward, or None
   for a method that needs the weights alone), and `prune(weight, statistic, target) -> Pruned`
   (a mask, and new weights if the survivors change). Keep the math in small pure functions.
2. If it has settings that change the output, return them from `settings()` (resume checks them);
   if they are flags, name them in `options` (and add the flag to config.py and cli/options.py); if `prune`
   needs more scratch than a score matrix or real compute, override `prune_scratch_bytes` and
   `prune_flops` (the plan).
3. Add it to METHODS below. `run --method`, `plan --method`, --help and resume then know it.
4. Test it against a whole-model implementation of its paper's formula (tests/test_methods.py).
"""

from __future__ import annotations

from ..errors import UsageError
from .base import Method, Pruned, Statistic, Target
from .magnitude import Magnitude
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[Method]] = {m.name: m for m in (Wanda, Magnitude, RIA, SparseGPT)}


def method_named(name: str, **options) -> Method:
    """The method registered as `name` (config.py has checked that it is one), built with the
    given options (None: the method's default); an option it does not take is a UsageError."""
    method = METHODS[name]
    given = {key: value for key, value in options.items() if value is not None}
    for option in given.keys() - set(method.options):
        owners = [other for other, cls in METHODS.items() if option in cls.options]
        raise UsageError(
            f"--{option.replace('_', '-')} is a setting of --method {' or '.join(owners)}; "
            f"--method {name} has none: drop it"
        )
    return method(**given)


def methods_help() -> str:
    return "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items())


__all__ = ["METHODS", "Method", "Pruned", "Statistic", "Target", "method_named", "methods_help"]

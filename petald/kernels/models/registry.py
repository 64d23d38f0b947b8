"""The families petald serves: every module of this package that defines ``FAMILY``.

Found by listing the package, so that adding a family is adding its file; sorted by
architecture name, which is the order the refusal message names them in.
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import PretrainedConfig

from petald.kernels import models
from petald.kernels.models.family import ModelFamily


class UnsupportedArchitecture(ValueError):
    """A config of a family petald does not serve; the message names the ones it does."""


# The package's own machinery, not families: never imported from here (features.py imports this module).
_MACHINERY = frozenset({"family", "registry", "dims", "features"})


def _find_families() -> dict[str, ModelFamily]:
    found = []
    for module_info in pkgutil.iter_modules(models.__path__):
        if module_info.name in _MACHINERY:
            continue
        family = getattr(importlib.import_module(f"{models.__name__}.{module_info.name}"), "FAMILY", None)
        if isinstance(family, ModelFamily):
            found.append(family)
    return {family.architecture: family for family in sorted(found, key=lambda f: f.architecture)}


FAMILIES: dict[str, ModelFamily] = _find_families()
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


def family_of(config: PretrainedConfig) -> ModelFamily:
    """The family of ``config`` (by its ``model_type``); UnsupportedArchitecture if petald serves none such."""
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise UnsupportedArchitecture(f"architecture {config.model_type!r} is not supported; "
                                      f"petald serves {', '.join(SUPPORTED_ARCHITECTURES)}") from None

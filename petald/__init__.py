"""petald: run large language models BitTorrent-style.

The public API, stable however the rooms inside move::

    from petald import ClientOptions, DistributedModel, PromptTuning

The package has four rooms that import one way only:
``cli -> p2pnode -> {protocol, kernels}`` (docs/architecture.md).
Names are imported on first use, so ``import petald`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "DistributedModel": "petald.p2pnode.client.distributed_model",
    "ClientOptions": "petald.p2pnode.client.client_options",
    "ModelMismatchError": "petald.p2pnode.client.distributed_model",
    "PromptTuning": "petald.p2pnode.client.prompt_tuning",
    "NoRouteError": "petald.p2pnode.routing.route",
    "ServerUnavailable": "petald.p2pnode.transport.peer_streams",
    "LocalSwarm": "petald.cli.local_swarm",
    "open_source": "petald.kernels.sources.open_source",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports
    from petald.cli.local_swarm import LocalSwarm  # noqa: F401
    from petald.kernels.sources.open_source import open_source  # noqa: F401
    from petald.p2pnode.client.client_options import ClientOptions  # noqa: F401
    from petald.p2pnode.client.distributed_model import DistributedModel, ModelMismatchError  # noqa: F401
    from petald.p2pnode.client.prompt_tuning import PromptTuning  # noqa: F401
    from petald.p2pnode.routing.route import NoRouteError  # noqa: F401
    from petald.p2pnode.transport.peer_streams import ServerUnavailable  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'petald' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

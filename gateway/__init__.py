"""ssw-gateway: the signed, encrypted case exchange between the Japan and Pakistan
contact points of the Specified Skilled Worker cooperation (MOC of 2019-12-23).

The package is layered: ``gateway.core`` is pure (values in, values out, no I/O,
no clock, no environment); ``gateway.store``, ``gateway.peer``, ``gateway.api`` and
``gateway.cli`` are thin shells that do I/O around it; ``gateway.node`` holds the
services that join the core to the store.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"

"""Analyses: store (or arrays) -> numbers.

Every estimator follows scikit-learn's conventions and accepts numpy arrays or lazy
:class:`probekit.store.Activations`; every result has ``to_dict()``. Formulas: docs/METRICS.md.
"""

from ._probes import LinearProbe as LinearProbe
from ._probes import ProbeIdOodResult as ProbeIdOodResult
from ._probes import RidgeProbe as RidgeProbe
from ._probes import probe_id_ood as probe_id_ood

__all__ = [
    "LinearProbe",
    "ProbeIdOodResult",
    "RidgeProbe",
    "probe_id_ood",
]

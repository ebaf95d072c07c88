"""Analyses: store (or arrays) -> numbers.

Every estimator follows scikit-learn's conventions and accepts numpy arrays or lazy
:class:`probekit.store.Activations`; every result has ``to_dict()``. Formulas: docs/METRICS.md.
"""

from ._background import BackgroundCorrelation as BackgroundCorrelation
from ._background import BackgroundCorrelationResult as BackgroundCorrelationResult
from ._background import BackgroundSensitivityResult as BackgroundSensitivityResult
from ._background import NormalizedMeanShiftResult as NormalizedMeanShiftResult
from ._background import background_sensitivity as background_sensitivity
from ._background import normalized_mean_shift as normalized_mean_shift
from ._decodability import BackgroundDecodability as BackgroundDecodability
from ._decodability import DecodabilityResult as DecodabilityResult
from ._decodability import background_decodability as background_decodability
from ._probes import LinearProbe as LinearProbe
from ._probes import ProbeIdOodResult as ProbeIdOodResult
from ._probes import RidgeProbe as RidgeProbe
from ._probes import probe_id_ood as probe_id_ood

__all__ = [
    "BackgroundCorrelation",
    "BackgroundCorrelationResult",
    "BackgroundDecodability",
    "BackgroundSensitivityResult",
    "DecodabilityResult",
    "LinearProbe",
    "NormalizedMeanShiftResult",
    "ProbeIdOodResult",
    "RidgeProbe",
    "background_decodability",
    "background_sensitivity",
    "normalized_mean_shift",
    "probe_id_ood",
]

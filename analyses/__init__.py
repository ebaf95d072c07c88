"""Analyses: store (or arrays) -> numbers.

Every estimator follows scikit-learn's conventions and accepts numpy arrays or lazy
:class:`probekit.store.Activations`; every result has ``to_dict()``. Formulas: docs/METRICS.md.
"""

from ._attribution import AttributionShareResult as AttributionShareResult
from ._attribution import background_attribution_share as background_attribution_share
from ._background import BackgroundCorrelation as BackgroundCorrelation
from ._background import BackgroundCorrelationResult as BackgroundCorrelationResult
from ._background import BackgroundSensitivityResult as BackgroundSensitivityResult
from ._background import NormalizedMeanShiftResult as NormalizedMeanShiftResult
from ._background import background_sensitivity as background_sensitivity
from ._background import normalized_mean_shift as normalized_mean_shift
from ._behaviour import BackgroundBehaviourResult as BackgroundBehaviourResult
from ._behaviour import RelianceResult as RelianceResult
from ._behaviour import VariantBehaviourResult as VariantBehaviourResult
from ._behaviour import background_behaviour as background_behaviour
from ._behaviour import background_reliance as background_reliance
from ._behaviour import output_predictions as output_predictions
from ._behaviour import variant_behaviour as variant_behaviour
from ._crossed import BackgroundComparisonResult as BackgroundComparisonResult
from ._crossed import CrossedDecompositionResult as CrossedDecompositionResult
from ._crossed import compare_background as compare_background
from ._crossed import crossed_decomposition as crossed_decomposition
from ._decodability import DecodabilityResult as DecodabilityResult
from ._decodability import background_decodability as background_decodability
from ._deploy import CompositeGapResult as CompositeGapResult
from ._deploy import PredictedAccuracyResult as PredictedAccuracyResult
from ._deploy import composite_gap as composite_gap
from ._deploy import predicted_accuracy as predicted_accuracy
from ._directions import DirectionClusters as DirectionClusters
from ._directions import DirectionClustersResult as DirectionClustersResult
from ._directions import DirectionSeriesResult as DirectionSeriesResult
from ._directions import PatchBasesResult as PatchBasesResult
from ._directions import WeightProjectionResult as WeightProjectionResult
from ._directions import direction_series as direction_series
from ._directions import patch_bases as patch_bases
from ._directions import projection_series as projection_series
from ._directions import weight_projections as weight_projections
from ._probes import LinearProbe as LinearProbe
from ._probes import ProbeIdOodResult as ProbeIdOodResult
from ._probes import probe_id_ood as probe_id_ood
from ._ridge import RidgeProbe as RidgeProbe
from ._similarity import RelativeMSEResult as RelativeMSEResult
from ._similarity import linear_cka as linear_cka
from ._similarity import relative_mse as relative_mse

__all__ = [
    "AttributionShareResult",
    "BackgroundBehaviourResult",
    "BackgroundComparisonResult",
    "BackgroundCorrelation",
    "BackgroundCorrelationResult",
    "BackgroundSensitivityResult",
    "CompositeGapResult",
    "CrossedDecompositionResult",
    "DecodabilityResult",
    "DirectionClusters",
    "DirectionClustersResult",
    "DirectionSeriesResult",
    "LinearProbe",
    "NormalizedMeanShiftResult",
    "PatchBasesResult",
    "PredictedAccuracyResult",
    "ProbeIdOodResult",
    "RelativeMSEResult",
    "RelianceResult",
    "RidgeProbe",
    "VariantBehaviourResult",
    "WeightProjectionResult",
    "background_attribution_share",
    "background_behaviour",
    "background_decodability",
    "background_reliance",
    "background_sensitivity",
    "compare_background",
    "composite_gap",
    "crossed_decomposition",
    "direction_series",
    "linear_cka",
    "normalized_mean_shift",
    "output_predictions",
    "patch_bases",
    "predicted_accuracy",
    "probe_id_ood",
    "projection_series",
    "relative_mse",
    "variant_behaviour",
    "weight_projections",
]

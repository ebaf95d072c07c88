"""Built-in datasets (background digits, the papers' synthetic models) and data loading.

``load_data(spec, split)`` resolves a CLI DATA spec; ``as_samples(ds)`` normalises any dataset's items;
built-ins register with ``register_dataset`` and are fetched with ``get_dataset(name, split)``.
"""

from ..vocab import import_callable as import_callable
from ._loading import NpzDataset as NpzDataset
from ._loading import SampleDataset as SampleDataset
from ._loading import as_samples as as_samples
from ._loading import load_data as load_data
from ._registry import BuiltinDataset as BuiltinDataset
from ._registry import builtin_datasets as builtin_datasets
from ._registry import get_dataset as get_dataset
from ._registry import register_dataset as register_dataset

__all__ = [
    "BuiltinDataset",
    "NpzDataset",
    "SampleDataset",
    "as_samples",
    "builtin_datasets",
    "get_dataset",
    "import_callable",
    "load_data",
    "register_dataset",
]

# image folders with foregrounds and their counterfactuals (Xiao et al. 2020 variants, crossed stress)
from ._foreground import ForegroundFolder as ForegroundFolder
from ._foreground import adjust_mask as adjust_mask
from ._images import CounterfactualDataset as CounterfactualDataset
from ._images import Counterfactuals as Counterfactuals
from ._images import DeploymentScenes as DeploymentScenes
from ._images import composite as composite
from ._images import feather_sigma as feather_sigma
from ._images import fill_foreground as fill_foreground
from ._images import image_counterfactuals as image_counterfactuals
from ._images import mirror_crop as mirror_crop
from ._images import soft_mask as soft_mask

__all__ += [
    "CounterfactualDataset",
    "Counterfactuals",
    "DeploymentScenes",
    "ForegroundFolder",
    "adjust_mask",
    "composite",
    "feather_sigma",
    "fill_foreground",
    "image_counterfactuals",
    "mirror_crop",
    "soft_mask",
]

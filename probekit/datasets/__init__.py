"""Built-in datasets (background digits, the papers' synthetic models) and data loading.

``load_data(spec, split)`` resolves a CLI DATA spec; ``as_samples(ds)`` normalises any dataset's items;
built-ins register with ``register_dataset`` and are fetched with ``get_dataset(name, split)``.
"""

from ..vocab import import_callable as import_callable
from ._loading import NpzDataset as NpzDataset
from ._loading import SampleDataset as SampleDataset
from ._loading import as_samples as as_samples
from ._loading import dataset_of as dataset_of
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
    "dataset_of",
    "get_dataset",
    "import_callable",
    "load_data",
    "register_dataset",
]

# the built-in datasets' own classes and generators, for runs that set their options (experiments,
# demo); image folders with foregrounds and their counterfactuals (Xiao et al. 2020 variants, the crossed split)
from ._bgdigits import BackgroundDigits as BackgroundDigits
from ._foreground import ForegroundFolder as ForegroundFolder
from ._foreground import adjust_mask as adjust_mask
from ._images import CounterfactualDataset as CounterfactualDataset
from ._images import Counterfactuals as Counterfactuals
from ._images import DeploymentScenes as DeploymentScenes
from ._images import composite as composite
from ._images import feather_sigma as feather_sigma
from ._images import fill_foreground as fill_foreground
from ._images import mirror_crop as mirror_crop
from ._images import soft_mask as soft_mask
from ._loading import check_image_sizes as check_image_sizes
from ._shapes import Shapes as Shapes
from ._shapes import write_image_folder as write_image_folder
from ._synthetic import StructuredFeatures as StructuredFeatures
from ._synthetic import gen_skew_data as gen_skew_data
from ._synthetic import gen_sym_data as gen_sym_data
from ._synthetic import make_structured as make_structured
from ._synthetic import xor_axes as xor_axes

__all__ += [
    "BackgroundDigits",
    "CounterfactualDataset",
    "Counterfactuals",
    "DeploymentScenes",
    "ForegroundFolder",
    "Shapes",
    "StructuredFeatures",
    "adjust_mask",
    "check_image_sizes",
    "composite",
    "feather_sigma",
    "fill_foreground",
    "gen_skew_data",
    "gen_sym_data",
    "make_structured",
    "mirror_crop",
    "soft_mask",
    "write_image_folder",
    "xor_axes",
]

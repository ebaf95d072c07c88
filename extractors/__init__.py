"""Extractors: forward hooks on any nn.Module -> pooled activations -> a store.

- :func:`resolve_layers`, :func:`list_layers`, :class:`LayerInfo`: choose layers by name, glob,
  ``name@K`` call selector or predicate; list every layer with its output shape.
- :func:`default_layers`, :func:`execution_order`, :func:`choose_layers`: layers spread over any model's depth,
  in depth order; each model's own (a teacher of another architecture).
- :func:`default_pool`, :func:`default_pools`, :func:`resolve_pools`, :func:`parse_layer_pools`: each
  layer's pooling (``cls`` / ``tokens_mean`` for tokens, ``avg`` for maps), per layer (``cls,@output=avg``).
- :func:`pool`, :data:`POOLS`: avg, max, cls, tokens_mean, last, flatten, none (mask-aware on tokens).
- :class:`Padding`: how keyword-input items (``input_ids``, ``attention_mask``, ...) are padded per batch.
- :func:`capture`: the one hook context manager (hooks removed and train/eval restored on exit);
  :func:`forward_precision`: its forward passes under autocast (bf16 / fp16).
- :func:`weight_rows`, :func:`weights_sha256`, :func:`param_count`: neuron weight rows and a fingerprint.
- :func:`extract_models`, :class:`ModelSpec`: the streaming pipeline (several models, one pass, one store).
"""

from ._distributed import extract_distributed as extract_distributed
from ._distributed import shard_bounds as shard_bounds
from ._distributed import shard_path as shard_path
from ._distributed import shard_samples as shard_samples
from ._hooks import Capture as Capture
from ._hooks import OutputKey as OutputKey
from ._hooks import capture as capture
from ._hooks import forward_precision as forward_precision
from ._layers import OUTPUT_LAYER as OUTPUT_LAYER
from ._layers import LayerInfo as LayerInfo
from ._layers import LayerSpec as LayerSpec
from ._layers import choose_layers as choose_layers
from ._layers import class_token_head as class_token_head
from ._layers import default_layers as default_layers
from ._layers import default_pool as default_pool
from ._layers import default_pools as default_pools
from ._layers import depth_sort as depth_sort
from ._layers import execution_order as execution_order
from ._layers import first_tensor as first_tensor
from ._layers import glob_match as glob_match
from ._layers import list_layers as list_layers
from ._layers import parse_layer_pools as parse_layer_pools
from ._layers import parse_selector as parse_selector
from ._layers import prefix_tokens as prefix_tokens
from ._layers import resolve_layers as resolve_layers
from ._layers import resolve_pools as resolve_pools
from ._layers import takes_token_ids as takes_token_ids
from ._layers import token_example as token_example
from ._pipeline import ModelSpec as ModelSpec
from ._pipeline import extract_models as extract_models
from ._pooling import MASK_LAYER as MASK_LAYER
from ._pooling import POOLS as POOLS
from ._pooling import PoolSpec as PoolSpec
from ._pooling import pool as pool
from ._pooling import pool_for as pool_for
from ._pooling import pools_for_rank as pools_for_rank
from ._recorder import Recorder as Recorder
from ._recorder import RecorderCallback as RecorderCallback
from ._tokens import Padding as Padding
from ._weights import param_count as param_count
from ._weights import weight_rows as weight_rows
from ._weights import weights_sha256 as weights_sha256

__all__ = [
    "MASK_LAYER",
    "OUTPUT_LAYER",
    "POOLS",
    "Capture",
    "LayerInfo",
    "LayerSpec",
    "ModelSpec",
    "OutputKey",
    "Padding",
    "PoolSpec",
    "Recorder",
    "RecorderCallback",
    "capture",
    "choose_layers",
    "class_token_head",
    "default_layers",
    "default_pool",
    "default_pools",
    "depth_sort",
    "execution_order",
    "extract_distributed",
    "extract_models",
    "first_tensor",
    "forward_precision",
    "glob_match",
    "list_layers",
    "param_count",
    "parse_layer_pools",
    "parse_selector",
    "pool",
    "pool_for",
    "pools_for_rank",
    "prefix_tokens",
    "resolve_layers",
    "resolve_pools",
    "shard_bounds",
    "shard_path",
    "shard_samples",
    "takes_token_ids",
    "token_example",
    "weight_rows",
    "weights_sha256",
]

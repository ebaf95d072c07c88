"""The HDF5 activation store, format version 2 (see docs/FORMAT.md; version 1 stores stay readable).

:class:`StoreWriter` appends rows in committed batches and resumes after an interruption;
:class:`Store` reads lazily, one layer of one split at a time, never past the committed rows;
:func:`check_resume` says whether a run may append to a store, :func:`stored_fingerprint` what inputs it
was computed from.
"""

from ._format import FORMAT_NAME as FORMAT_NAME
from ._format import FORMAT_VERSION as FORMAT_VERSION
from ._format import ROLES as ROLES
from ._format import escape_name as escape_name
from ._format import unescape_name as unescape_name
from ._merge import merge_shards as merge_shards
from ._reader import Activations as Activations
from ._reader import Store as Store
from ._reader import open_store as open_store
from ._resume import FINGERPRINT_ATTR as FINGERPRINT_ATTR
from ._resume import SETTINGS_ATTR as SETTINGS_ATTR
from ._resume import check_resume as check_resume
from ._resume import stored_fingerprint as stored_fingerprint
from ._writer import StoreWriter as StoreWriter

__all__ = [
    "FINGERPRINT_ATTR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ROLES",
    "SETTINGS_ATTR",
    "Activations",
    "Store",
    "StoreWriter",
    "check_resume",
    "escape_name",
    "merge_shards",
    "open_store",
    "stored_fingerprint",
    "unescape_name",
]

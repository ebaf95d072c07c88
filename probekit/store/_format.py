"""Constants and naming rules of the store format (docs/FORMAT.md is the spec)."""

from __future__ import annotations

FORMAT_NAME = "probekit.activations"
FORMAT_VERSION = 2
#: versions this probekit reads (version 1 stores lack the crossed-design fields; nothing else changed)
READABLE_VERSIONS = (1, 2)
ROWS_ATTR = "rows_committed"
ENCODING_TYPE = "encoding-type"
ENCODING_VERSION = "encoding-version"
ROLES = ("teacher", "student", "model")
SAMPLE_FIELDS = ("index", "label", "factors", "group", "background", "background_label", "variant")
#: the optional integer fields of a sample besides ``index`` (format version 2 added the last three)
INT_FIELDS = ("label", "group", "background", "background_label", "variant")
SAMPLE_DTYPES = {"index": "int64", "label": "int64", "factors": "float32", "group": "int64",
                 "background": "int64", "background_label": "int64", "variant": "int64"}
#: ``variant`` codes index this tuple (the image variants of Xiao et al. 2020, "Noise or Signal: The
#: Role of Image Backgrounds in Object Recognition"); the dataset carries it as attribute ``names``
#: "composite_self" (appended, so older codes keep their meaning): an object pasted back on its own image
#: with the background filled, the compositing control of :func:`probekit.analyses.composite_gap`
VARIANTS = ("original", "only_fg", "no_fg", "only_bg", "mixed_same", "mixed_rand", "mixed_next", "composite_self")
ACT_DTYPES = ("float16", "float32")


def escape_name(name: str) -> str:
    """Make a module name safe as one HDF5 path component ('/' would nest groups).

    ``%`` is escaped first so the mapping is reversible.
    """
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(name: str) -> str:
    """Inverse of :func:`escape_name`."""
    return name.replace("%2F", "/").replace("%25", "%")


def mark(obj, encoding_type: str) -> None:
    """Tag a group or dataset with its encoding type and version (anndata-style self-description)."""
    obj.attrs[ENCODING_TYPE] = encoding_type
    obj.attrs[ENCODING_VERSION] = str(FORMAT_VERSION)

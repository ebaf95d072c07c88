"""The HTML report of an audit: one self-contained file (plots embedded, no network)."""

from ._html import render_html as render_html
from ._html import write_report as write_report

__all__ = ["render_html", "write_report"]

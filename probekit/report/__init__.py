"""The HTML report of an audit: one self-contained file (plots embedded, no network), and its CI outputs:
JUnit XML (:func:`write_junit`) and a Markdown summary (:func:`write_summary`)."""

from ._compare import write_compare_report as write_compare_report
from ._findings import model_verdicts as model_verdicts
from ._gallery import build_gallery as build_gallery
from ._gallery import deploy_examples as deploy_examples
from ._gallery import predictions_from_store as predictions_from_store
from ._html import render_html as render_html
from ._html import write_report as write_report
from ._junit import junit_xml as junit_xml
from ._junit import write_junit as write_junit
from ._summary import summary_markdown as summary_markdown
from ._summary import write_summary as write_summary

__all__ = ["build_gallery", "deploy_examples", "junit_xml", "model_verdicts", "predictions_from_store", "render_html",
           "summary_markdown", "write_compare_report", "write_junit", "write_report", "write_summary"]

"""Pictures of a report: PNG figures and a self-contained HTML page.

Input is the JSON report of ``lsr refine``, ``lsr iterate`` or ``lsr instances`` (a plain dict,
schema in the README), plus optional pointwise errors for 1-D/2-D inputs (:class:`FieldData`).
matplotlib is optional and imported only when a figure is drawn; figures are built with the
object-oriented API (``matplotlib.figure.Figure`` on the Agg canvas), so no display, no pyplot
state and no global backend switch.
"""

from .common import FieldData, report_kind
from .figures import require_matplotlib, write_plots
from .html import write_html

__all__ = ["FieldData", "report_kind", "require_matplotlib", "write_html", "write_plots"]

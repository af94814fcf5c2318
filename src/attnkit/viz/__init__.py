"""Pictures of attention: static plots (`attnkit.viz.plots`) and the offline HTML report (`attnkit.viz.report`).

`attnkit.viz.notebook` shows them inline in Jupyter: `ReportView` (the whole report in a sandboxed
frame), `HeadView` (one head), `FlowView` (the section flow) and `RolesView` (the head-role table).

Rendering only: nothing here runs a model. The `attnkit show` command, which runs one and
renders what it found with these, lives in `attnkit.apps.show`.

matplotlib is imported only when a plot is drawn (``pip install 'attnkit[viz]'``).
"""

from attnkit.viz.notebook import FlowView, HeadView, ReportView, RolesView
from attnkit.viz.report import ReportData, render_report, write_report

__all__ = ["FlowView", "HeadView", "ReportData", "ReportView", "RolesView", "render_report", "write_report"]

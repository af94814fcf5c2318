"""Pictures of attention: static plots (`attnkit.viz.plots`) and the offline HTML report (`attnkit.viz.report`).

Rendering only: nothing here runs a model. The `attnkit show` command, which runs one and
renders what it found with these, lives in `attnkit.apps.show`.

matplotlib is imported only when a plot is drawn (``pip install 'attnkit[viz]'``).
"""

from attnkit.viz.report import ReportData, render_report, write_report

__all__ = ["ReportData", "render_report", "write_report"]

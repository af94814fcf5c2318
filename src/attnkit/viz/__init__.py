"""Pictures of attention: static plots (`attnkit.viz.plots`), the offline HTML report (`attnkit.viz.report`)
and the `attnkit show` command (`attnkit.viz.show`).

matplotlib is imported only when a plot is drawn (``pip install 'attnkit[viz]'``).
"""

from attnkit.viz.report import ReportData, render_report, write_report

__all__ = ["ReportData", "render_report", "write_report"]

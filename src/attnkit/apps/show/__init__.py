"""``attnkit show``: what attention does on a real input, as a terminal summary, an HTML report and PNGs.

* `api`: `show`, the command as a Python call (for notebooks: the result displays inline), and the
  shipped examples (`example_text`).
* `command`: the command (arguments, the summary it prints, the files it writes).
* `analysis`: what both analyses share: `Analysis`, `Link`, `long_range_links`, `report_data`, `StageBar`.
* `pretrained`: `analyse` for a Hugging Face checkpoint (the shipped all-MiniLM-L6-v2 by default).
* `protein`: `analyse` for the protein example, through a small character-level attnkit model.

The rendering (the HTML report, the figures) is the library's: `attnkit.viz`.
"""

from attnkit.apps.show.analysis import Analysis
from attnkit.apps.show.api import EXAMPLES, example_text, show

__all__ = ["EXAMPLES", "Analysis", "example_text", "show"]

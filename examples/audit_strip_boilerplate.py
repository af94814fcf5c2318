"""A ``--format-b`` script for ``attnkit audit``: each document without its template lines.

    attnkit audit --format-b examples/audit_strip_boilerplate.py --out audit-ab

The demo corpus repeats signature blocks, e-mail footers and newsletter lines across documents;
this rewrites every document without them, so the A/B table says how the model's attention to
dates, amounts and names moves once the boilerplate is gone (docs/audit.md).
"""

from __future__ import annotations

import re

# Lines that open a template block in the demo corpus: signatures, ticket footers, news footers.
TEMPLATE = re.compile(
    r"^(?:Signed for and on behalf of|This message was sent by|Our support hours|Copyright \d{4}|Sign up for|--$)"
)


def reformat(text: str) -> str:
    """``text`` without the lines `TEMPLATE` matches (leading white space ignored)."""
    return "\n".join(line for line in text.splitlines() if not TEMPLATE.match(line.strip()))

"""CSV text that spreadsheets open as data: every export goes through here, so no cell can start a formula.

Excel, LibreOffice and Google Sheets run a cell that starts with = + - @ (or a tab or carriage return before one) as a
formula, which can exfiltrate data or run commands when the exported votes, comments or questions are opened. Such a
cell gets a leading apostrophe (OWASP's CSV injection advice); plain numbers such as -12.5 are left alone, since they
cannot run anything and must stay numbers. Lines end in CRLF (RFC 4180), which also makes the writer quote a cell
holding a lone carriage return: unquoted, readers would split the row there, and a comment could start a row of its
own (whose first cell no escaping had seen).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?\d+(?:\.\d+)?$")


def safe_cell(value: object) -> str:
    """The cell's text, with a leading apostrophe if a spreadsheet would read it as a formula."""
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_START) and not _NUMBER.match(text):
        return "'" + text
    return text


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A header and rows as CSV (CRLF-terminated lines), every cell escaped with safe_cell."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([safe_cell(h) for h in header])
    writer.writerows([safe_cell(v) for v in row] for row in rows)
    return out.getvalue()

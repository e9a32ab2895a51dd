"""The arena's HTML: self-contained pages (inline CSS, no scripts, no CDN) that work with plain form posts."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from urllib.parse import quote

from persllm.arena.rank import Standing
from persllm.arena.store import Ballot

STYLE = """
body{font:16px/1.5 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem}nav a{margin-right:1rem}.note{color:#555}.ok{color:#176a2a}
.question{font-size:1.15rem;background:#f3f3f8;padding:.8rem 1rem;border-radius:.4rem}
.answers{display:grid;grid-template-columns:1fr 1fr;gap:1rem;margin:1rem 0}
.answer{border:1px solid #ccc;border-radius:.4rem;padding:.8rem 1rem;white-space:pre-wrap}
.answer h2{font-size:1rem;margin:0 0 .5rem}
.buttons{display:flex;gap:.6rem;margin-top:.6rem}button{font-size:1rem;padding:.5rem 1rem;cursor:pointer}
textarea{width:100%;min-height:4rem;font:inherit}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}
"""


def _page(title: str, body: str, results: str = "") -> str:
    """A whole page; `results` is the link to the results, shown only to the organiser (voters cannot open them)."""
    link = f'<a href="{escape(results)}">Results</a>' if results else ""
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><nav><a href=\"/\">Vote</a>{link}</nav>{body}</body></html>")


def ballot_page(persona: str, label: str, ballot: Ballot | None, notice: str = "", done: bool = False) -> str:
    """A question, answers A and B, the three choices and a comment box (`done`: the voter has voted on all)."""
    note = f'<p class="ok" id="notice">{escape(notice)}</p>' if notice else ""
    if ballot is None:
        empty = ("You have voted on every question. Thank you for taking part!" if done else
                 "No questions are ready: prepare answers with <code>persllm arena</code> first.")
        return _page(f"{persona} arena", f"<h1>{escape(persona)} arena</h1>{note}<p id=\"empty\">{empty}</p>")
    answers = "".join(
        f'<div class="answer" id="answer-{side.lower()}"><h2>Answer {side}</h2>{escape(text)}</div>'
        for side, text in (("A", ballot.left_answer), ("B", ballot.right_answer)))
    form = (f'<form method="post" action="/vote"><input type="hidden" name="token" value="{escape(ballot.token)}">'
            '<label for="comment">Comment (optional)</label>'
            '<textarea id="comment" name="comment" maxlength="2000"></textarea><div class="buttons">'
            '<button type="submit" name="choice" value="left" id="vote-a">A is more in character</button>'
            '<button type="submit" name="choice" value="tie" id="vote-tie">Tie</button>'
            '<button type="submit" name="choice" value="right" id="vote-b">B is more in character</button>'
            "</div></form>")
    body = (f"<h1>Which answer sounds more like {escape(persona)} in {escape(label)}?</h1>{note}"
            f'<p class="note">Two models answered this question. Pick the one that is more in character: what '
            f"{escape(persona)} would know, think and say at that time, in their own voice.</p>"
            f'<p class="question" id="question">{escape(ballot.question.question)}</p>'
            f'<div class="answers">{answers}</div>{form}')
    return _page(f"{persona} arena", body)


def locked_page(persona: str, message: str) -> str:
    """What a voter sees at /results: results are the organiser's until the study is over."""
    return _page(f"{persona} arena results", f"<h1>{escape(persona)} arena: results</h1>"
                 f'<p id="locked">{escape(message)}</p>')


def results_page(persona: str, rows: Sequence[Standing], total: int,
                 pairs: dict[tuple[str, str], tuple[int, int, int]], key: str = "") -> str:
    """Win rates, the Bradley-Terry ranking with intervals, and head-to-head counts; links carry the admin `key`."""
    query = f"?key={quote(key, safe='')}" if key else ""
    ranking = "".join(
        f"<tr><td>{s.rank}</td><td>{escape(s.model)}</td><td>{s.games}</td><td>{s.wins}</td><td>{s.losses}</td>"
        f"<td>{s.ties}</td><td>{'-' if s.win_rate is None else f'{100 * s.win_rate:.0f}%'}</td>"
        f"<td>{s.rating:.0f}</td><td>{s.low:.0f} to {s.high:.0f}</td></tr>" for s in rows)
    heads = "".join(f"<tr><td>{escape(a)} vs {escape(b)}</td><td>{escape(a)}</td><td>{wa}</td><td>{wb}</td>"
                    f"<td>{t}</td></tr>" for (a, b), (wa, wb, t) in pairs.items())
    body = (f"<h1>{escape(persona)} arena: results</h1><p id=\"total\">{total} vote{'s' if total != 1 else ''}</p>"
            '<table id="ranking"><tr><th>rank</th><th>model</th><th>games</th><th>wins</th><th>losses</th>'
            f"<th>ties</th><th>win rate</th><th>rating</th><th>95% interval</th></tr>{ranking}</table>"
            '<p class="note">Win rate counts a tie as half a win. Ratings are Bradley-Terry strengths on the Elo '
            "scale (mean 1000); intervals come from resampling the votes.</p>"
            '<table id="pairs"><tr><th>pair</th><th>first</th><th>first wins</th><th>second wins</th><th>ties</th>'
            f'</tr>{heads}</table><p><a href="{escape(f"/results.csv{query}")}">ranking CSV</a> · '
            f'<a href="{escape(f"/votes.csv{query}")}">votes CSV</a></p>')
    return _page(f"{persona} arena results", body, f"/results{query}")

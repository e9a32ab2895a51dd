"""The arena web app: a ballot page, form or JSON votes, results with CSV export, and a health endpoint.

Voting is for people with the voter cookie the ballot page hands out (at most `new_voters_per_window` new ones per
client address), on ballots made for them; results and CSV exports need the admin key, because the votes name the
model on each side and, with fixed stored answers, one vote per question would tell a voter which answer is whose.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.requests import Request

from persllm.arena.page import ballot_page, locked_page, results_page
from persllm.arena.rank import pairwise, standings, standings_csv, votes_csv
from persllm.arena.store import ArenaStore, RateLimited
from persllm.config import Project
from persllm.errors import DataError

THANKS = "Thank you, your vote was recorded. Here is the next question."
VOTER_COOKIE = "persllm_arena_voter"
VOTER_COOKIE_AGE_S = 365 * 24 * 3600


class TooLarge(DataError):
    """A request body over the arena's limit (HTTP 413)."""


class AddressWindow:
    """Voter ids handed to each client address in the last window; in memory, so no address is ever stored."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.seen: dict[str, list[float]] = {}
        self.lock = threading.Lock()  # sync routes run on a thread pool

    def allow(self, address: str, now: float) -> bool:
        """Count one more id for `address` unless it already had `limit` in the window."""
        with self.lock:
            recent = [t for t in self.seen.get(address, []) if t > now - self.window_s]
            allowed = len(recent) < self.limit
            self.seen[address] = recent + [now] if allowed else recent
            if len(self.seen) > 10_000:  # many addresses: forget the ones with nothing in the window
                self.seen = {a: ts for a, ts in self.seen.items() if ts and ts[-1] > now - self.window_s}
            return allowed


def create_arena_app(project: Project, store: ArenaStore, models: Sequence[str] | None = None,
                     admin_key: str | None = None) -> Any:
    """A FastAPI app for voting on `models` (default: every model with stored answers).

    Results and exports need `admin_key` (as `Authorization: Bearer KEY` or `?key=KEY`); without one a random key is
    made, readable as `app.state.admin_key`.
    """
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    chosen = list(models or store.models())
    labels = {s.id: s.label for s in project.stages}
    limits = store.limits
    app = FastAPI(title=f"{project.name} arena", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admin_key = key = admin_key or secrets.token_urlsafe(16)
    issued = AddressWindow(limits.new_voters_per_window, limits.window_s)
    fresh = {"Cache-Control": "no-store"}

    def known_voter(request: Request) -> str | None:
        voter = request.cookies.get(VOTER_COOKIE, "")
        return voter if voter and store.known_voter(voter) else None

    def page_voter(request: Request) -> tuple[str, bool]:
        """The request's voter and whether the id is new (then the response sets the cookie)."""
        voter = known_voter(request)
        if voter is not None:
            return voter, False
        if not issued.allow(request.client.host if request.client else "", store.clock()):
            raise RateLimited(f"{limits.new_voters_per_window} new voters from one address per "
                              f"{limits.window_s / 60:.0f} minutes is the limit; enable cookies, or try again later")
        return store.new_voter(), True

    def with_cookie(response: Response, voter: str, new: bool) -> Response:
        if new:
            response.set_cookie(VOTER_COOKIE, voter, max_age=VOTER_COOKIE_AGE_S, httponly=True, samesite="lax")
        return response

    def is_admin(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else request.query_params.get("key", "")
        return hmac.compare_digest(key.encode(), given.encode("utf-8", "surrogatepass"))

    def locked(as_json: bool) -> Response:
        message = ("results are for the arena's organiser: pass the admin key printed when the arena started "
                   "(Authorization: Bearer KEY, or ?key=KEY)")
        auth = {"WWW-Authenticate": "Bearer"}
        if as_json:
            return JSONResponse({"error": message}, status_code=401, headers=auth)
        return HTMLResponse(locked_page(project.name, message), status_code=401, headers=auth)

    @app.get("/")
    def index(request: Request) -> Response:
        try:
            voter, new = page_voter(request)
        except RateLimited as exc:
            return HTMLResponse(ballot_page(project.name, "", None, str(exc)), status_code=429)
        ballot = store.ballot(chosen, voter=voter)
        label = labels.get(ballot.question.stage, ballot.question.stage) if ballot else ""
        done = ballot is None and store.votes_by(voter) > 0
        notice = THANKS if request.query_params.get("voted", "0") not in ("", "0") else ""
        return with_cookie(HTMLResponse(ballot_page(project.name, label, ballot, notice, done), headers=fresh),
                           voter, new)

    @app.get("/api/ballot")
    def api_ballot(request: Request) -> Response:
        try:
            voter, new = page_voter(request)
        except RateLimited as exc:
            return JSONResponse({"error": str(exc)}, status_code=429)
        ballot = store.ballot(chosen, voter=voter)
        if ballot is None:
            done = store.votes_by(voter) > 0
            message = "you have voted on every question" if done else "no questions are ready"
            return with_cookie(JSONResponse({"error": message}, status_code=404), voter, new)
        return with_cookie(JSONResponse({"token": ballot.token, "question": ballot.question.question,
                                         "stage": ballot.question.stage, "label": labels.get(ballot.question.stage, ""),
                                         "answers": {"A": ballot.left_answer, "B": ballot.right_answer}},
                                        headers=fresh), voter, new)

    @app.post("/vote")
    async def vote(request: Request) -> Response:
        as_json = request.headers.get("content-type", "").startswith("application/json")
        try:
            fields = _fields(await _body(request, limits.max_body), as_json)
            voter = await run_in_threadpool(known_voter, request)
            if voter is None:
                raise DataError("no voter id: open the arena page first (with cookies enabled), then vote")
            choice = fields.get("choice", "")
            recorded = await run_in_threadpool(store.vote, fields.get("token", ""),
                                               {"A": "left", "B": "right"}.get(choice, choice),
                                               fields.get("comment", ""), voter)
        except DataError as exc:
            status = 413 if isinstance(exc, TooLarge) else 429 if isinstance(exc, RateLimited) else 400
            if as_json:
                return JSONResponse({"error": str(exc)}, status_code=status)
            return HTMLResponse(ballot_page(project.name, "", None, str(exc)), status_code=status)
        if as_json:
            return JSONResponse({"ok": True, "id": recorded.id})
        return RedirectResponse("/?voted=1", status_code=303)

    @app.get("/results")
    def results(request: Request) -> Response:
        if not is_admin(request):
            return locked(as_json=False)
        votes = store.votes()
        return HTMLResponse(results_page(project.name, standings(votes, chosen), len(votes), pairwise(votes),
                                         request.query_params.get("key", "")), headers=fresh)

    @app.get("/api/results")
    def api_results(request: Request) -> Response:
        if not is_admin(request):
            return locked(as_json=True)
        votes = store.votes()
        rows = [s.__dict__ for s in standings(votes, chosen)]
        return JSONResponse({"votes": len(votes), "standings": rows}, headers=fresh)

    @app.get("/results.csv")
    def ranking_csv(request: Request) -> Response:
        if not is_admin(request):
            return locked(as_json=True)
        return _csv(standings_csv(standings(store.votes(), chosen)), f"{project.slug}-arena-ranking.csv")

    @app.get("/votes.csv")
    def all_votes_csv(request: Request) -> Response:
        if not is_admin(request):
            return locked(as_json=True)
        return _csv(votes_csv(store.votes()), f"{project.slug}-arena-votes.csv")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": chosen, "questions": len(store.questions())}

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request body, or TooLarge as soon as it passes `limit` bytes (announced or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the request body is larger than {limit} bytes")
    return bytes(body)


def _fields(body: bytes, as_json: bool) -> dict[str, str]:
    """Form or JSON fields as strings; a body that is neither gives a DataError saying what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("the request body is not valid UTF-8") from None
    if as_json:
        try:
            data = json.loads(text or "{}")
        except ValueError:
            raise DataError("the request body is not valid JSON") from None
        except RecursionError:  # thousands of nested brackets, well within the body limit
            raise DataError("the request body nests too deeply; a vote is a flat JSON object") from None
        if not isinstance(data, dict):
            raise DataError('a vote is a JSON object: {"token": ..., "choice": "A"|"B"|"tie", "comment": ...}')
        fields = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    else:
        fields = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
    for name, value in fields.items():
        try:
            (name + value).encode("utf-8")  # JSON may carry a lone surrogate ("\ud800"), which SQLite cannot store
        except UnicodeEncodeError:
            raise DataError(f"field {name!r} is not valid Unicode (it holds a lone surrogate)") from None
    return fields


def _csv(text: str, filename: str) -> Response:
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})

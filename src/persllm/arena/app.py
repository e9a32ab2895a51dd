"""The arena web app: a ballot page, form or JSON votes, results with CSV export, and a health endpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.requests import Request

from persllm.arena.page import ballot_page, results_page
from persllm.arena.rank import pairwise, standings, standings_csv, votes_csv
from persllm.arena.store import ArenaStore
from persllm.config import Project
from persllm.errors import DataError

THANKS = "Thank you, your vote was recorded. Here is the next question."


def create_arena_app(project: Project, store: ArenaStore, models: Sequence[str] | None = None) -> Any:
    """A FastAPI app for voting on `models` (default: every model with stored answers)."""
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    chosen = list(models or store.models())
    labels = {s.id: s.label for s in project.stages}
    app = FastAPI(title=f"{project.name} arena", docs_url=None, redoc_url=None, openapi_url=None)
    fresh = {"Cache-Control": "no-store"}

    @app.get("/")
    def index(voted: int = 0) -> HTMLResponse:
        ballot = store.ballot(chosen)
        label = labels.get(ballot.question.stage, ballot.question.stage) if ballot else ""
        return HTMLResponse(ballot_page(project.name, label, ballot, THANKS if voted else ""), headers=fresh)

    @app.get("/api/ballot")
    def api_ballot() -> JSONResponse:
        ballot = store.ballot(chosen)
        if ballot is None:
            return JSONResponse({"error": "no questions are ready"}, status_code=404)
        return JSONResponse({"token": ballot.token, "question": ballot.question.question,
                             "stage": ballot.question.stage, "label": labels.get(ballot.question.stage, ""),
                             "answers": {"A": ballot.left_answer, "B": ballot.right_answer}}, headers=fresh)

    @app.post("/vote")
    async def vote(request: Request) -> Response:
        as_json = request.headers.get("content-type", "").startswith("application/json")
        fields = _fields(await request.body(), as_json)
        try:
            recorded = await run_in_threadpool(store.vote, fields.get("token", ""),
                                               {"A": "left", "B": "right"}.get(fields.get("choice", ""),
                                                                              fields.get("choice", "")),
                                               fields.get("comment", ""))
        except DataError as exc:
            if as_json:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return HTMLResponse(ballot_page(project.name, "", None, str(exc)), status_code=400)
        if as_json:
            return JSONResponse({"ok": True, "id": recorded.id})
        return RedirectResponse("/?voted=1", status_code=303)

    @app.get("/results")
    def results() -> HTMLResponse:
        votes = store.votes()
        return HTMLResponse(results_page(project.name, standings(votes, chosen), len(votes), pairwise(votes)),
                            headers=fresh)

    @app.get("/api/results")
    def api_results() -> JSONResponse:
        votes = store.votes()
        rows = [s.__dict__ for s in standings(votes, chosen)]
        return JSONResponse({"votes": len(votes), "standings": rows}, headers=fresh)

    @app.get("/results.csv")
    def ranking_csv() -> Response:
        return _csv(standings_csv(standings(store.votes(), chosen)), f"{project.slug}-arena-ranking.csv")

    @app.get("/votes.csv")
    def all_votes_csv() -> Response:
        return _csv(votes_csv(store.votes()), f"{project.slug}-arena-votes.csv")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": chosen, "questions": len(store.questions())}

    return app


def _fields(body: bytes, as_json: bool) -> dict[str, str]:
    """Form or JSON fields as strings (bad input gives empty fields, which the store rejects clearly)."""
    try:
        if as_json:
            data = json.loads(body or b"{}")
            return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    except (ValueError, UnicodeDecodeError):
        return {}


def _csv(text: str, filename: str) -> Response:
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})

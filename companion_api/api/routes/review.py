"""Server-rendered reviewer page: synced results (or encounters) with grade, quality verdict, CAM overlay and insight.

Everything a device wrote is escaped; grade names and referral flags are the server's own derivations.
"""
from __future__ import annotations

import html
import json
from typing import Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select, tuple_

from edge_runtime import presentation
from edge_runtime.contract import GRADE_NAMES, SCREENING_DISCLAIMER
from edge_runtime.wire import SAFE_ID

from ...crud import InvalidCursorError, query_encounters, query_results, referral_reason_of
from ...models import Insight, Result
from ...schemas import ResultPublic
from ..deps import COOKIE, SessionDep, current_caller

router = APIRouter(tags=["review"], include_in_schema=False)

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;vertical-align:top}img{width:160px;border-radius:4px}
.ref{color:#b00;font-weight:600}.ungr{color:#a60}.note{background:#fff8e1;padding:.6rem;border-radius:4px}
form.filters{margin:1rem 0}nav a{margin-right:1rem}"""
_E = html.escape


def _page(title: str, body: str) -> str:
    return (f"<html><head><title>{_E(title)}</title><style>{_STYLE}</style></head><body><h1>RetinaEdge review</h1>"
            f"<p id='disclaimer'><b>{_E(SCREENING_DISCLAIMER)}</b></p>{body}</body></html>")


@router.get("/review/login", response_class=HTMLResponse)
def login_page() -> str:
    return _page("RetinaEdge review", "<form method='post' action='/review/login'><label>Reviewer token "
                 "<input name='token' type='password' id='token'></label> <button id='login' type='submit'>Sign in</button>"
                 "</form>")


@router.post("/review/login")
def login(request: Request, token: str = Form(..., max_length=200)) -> RedirectResponse:
    response = RedirectResponse("/review", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                        secure=request.app.state.settings.COOKIE_SECURE, max_age=12 * 3600)
    return response


def _grade_cell(outcome: str, grade: int | None, confidence: float | None) -> str:
    if outcome == "ungradable" or grade is None:
        return f"<span class='ungr'>{_E(presentation.UNGRADABLE)}</span>"
    text = f"{grade} - {_E(GRADE_NAMES[grade])}<br>conf {confidence or 0:.2f}"
    if outcome == "uncertain":
        text += f"<br><span class='ref'>{_E(presentation.UNCERTAIN)}</span>"
    return text


def _referable_cell(referable: bool | None, reason: str | None = None) -> str:
    if not referable:
        return "no" if referable is not None else "-"
    return "<span class='ref'>REFERABLE</span>" + (f"<br><small class='reason'>{_E(reason)}</small>" if reason else "")


def _dme_cell(present: bool | None, probability: float | None) -> str:
    """The DME head's finding; '-' for DR-only models and ungradable captures."""
    if present is None:
        return "<span class='dme'>-</span>"
    label = "<span class='ref'>DME PRESENT</span>" if present else "no DME"
    return f"<span class='dme'>{label}<br><small>p {probability or 0:.2f}</small></span>"


def _overlay(device: str, result_id: str, has_overlay: bool) -> str:
    if not has_overlay:
        return ""
    query = urlencode({"device": device})
    return f"<img alt='CAM overlay' src='/v1/results/{_E(result_id)}/overlay.png?{_E(query)}'>"


def _result_row(row: Result, note: Insight | None) -> str:
    payload = json.loads(row.payload)
    reason = referral_reason_of(row, payload)
    quality = payload.get("quality", {})
    verdict = "gradable" if quality.get("gradable") else "ungradable: " + _E("; ".join(quality.get("reasons", []))[:200])
    note_html = ""
    if note:
        parsed = json.loads(note.body)
        note_html = (f"<div class='note'><b>{_E(note.source)}</b>: {_E(parsed['summary'])} "
                     f"<i>Follow-up: {_E(parsed['follow_up_interval'])}</i></div>")
    visit = f"<br><small>visit {_E(row.encounter_id)} {_E(row.eye or '')}</small>" if row.encounter_id else ""
    return (f"<tr class='result'><td>{_E(row.device)}<br><small>{row.captured_at:%Y-%m-%d %H:%M} UTC</small>{visit}</td>"
            f"<td>{_grade_cell(row.outcome, row.grade, row.confidence)}</td>"
            f"<td>{_referable_cell(row.referable, reason)}</td><td>{_dme_cell(row.dme_present, row.dme_probability)}</td>"
            f"<td>{verdict}</td><td>{_overlay(row.device, row.result_id, row.overlay_png is not None)}</td>"
            f"<td>{note_html}<small>{_E(str(payload.get('model_version', '')))} "
            f"({_E(str(payload.get('backend', '')))})</small></td></tr>")


def _eye_cell(result: ResultPublic | None) -> str:
    if result is None:
        return "<td class='eye'>not captured</td>"
    dme = f"{_dme_cell(result.dme_present, result.dme_probability)}<br>" if result.dme_present is not None else ""
    return (f"<td class='eye'>{_grade_cell(result.outcome, result.grade, result.confidence)}<br>"
            f"{_referable_cell(result.referable, result.referral_reason)}<br>{dme}"
            f"{_overlay(result.device, result.result_id, result.has_overlay)}</td>")


def _pager(request: Request, next_cursor: str | None, shown: int) -> str:
    """Newest page and next (older) page links: pages are read by key, so there is no total and no page number."""
    params = {k: v for k, v in request.query_params.items() if k != "cursor"}
    links = []
    if request.query_params.get("cursor"):
        links.append(f"<a id='newest' href='/review?{_E(urlencode(params))}'>newest</a>")
    if next_cursor:
        links.append(f"<a id='next' href='/review?{_E(urlencode({**params, 'cursor': next_cursor}))}'>older</a>")
    return f"<nav>{''.join(links)}<span id='shown'>{shown} shown</span></nav>"


@router.get("/review", response_class=HTMLResponse)
def review(request: Request, session: SessionDep, grade: int | None = Query(None, ge=0, le=4),
           referable: bool | None = None, dme: bool | None = None,
           device: str | None = Query(None, max_length=120, pattern=SAFE_ID),
           view: Literal["results", "encounters"] = "results",
           cursor: str | None = Query(None, max_length=400, pattern=r"^[A-Za-z0-9_-]+$")):
    try:
        caller = current_caller(request, session)
    except HTTPException as exc:
        if exc.status_code == 429:
            raise
        return RedirectResponse("/review/login", status_code=303)
    if caller.role != "reviewer":
        raise HTTPException(403, "reviewer token required")
    size = request.app.state.settings.REVIEW_PAGE_SIZE
    tabs = "<nav><a id='tab-results' href='/review'>results</a><a id='tab-encounters' href='/review?view=encounters'>encounters</a></nav>"
    if view == "encounters":
        try:
            encounters, next_cursor = query_encounters(session=session, device=device, since=None, until=None,
                                                       limit=size, cursor=cursor)
        except InvalidCursorError as exc:
            raise HTTPException(422, str(exc)) from None
        rows = "".join(
            f"<tr class='encounter'><td>{_E(e.device)}<br><small>visit {_E(e.encounter_id)}</small></td>"
            f"<td class='decision'><span class='{'ref' if e.decision == 'refer' else ''}'>{_E(e.decision.upper())}</span>"
            f"<br><small>{_E(e.reason)}</small></td>{_eye_cell(e.left)}{_eye_cell(e.right)}</tr>" for e in encounters)
        return _page("RetinaEdge encounters", tabs + _pager(request, next_cursor, len(encounters))
                     + "<table><tr><th>device / visit</th><th>decision</th><th>left eye</th><th>right eye</th></tr>"
                     + rows + "</table>")
    try:
        rows, next_cursor = query_results(session=session, device=device, grade=grade, referable=referable, since=None,
                                          until=None, limit=size, dme=dme, cursor=cursor)
    except InvalidCursorError as exc:
        raise HTTPException(422, str(exc)) from None
    keys = [(r.device, r.result_id) for r in rows]
    notes = {(i.device, i.result_id): i for i in session.scalars(
        select(Insight).where(tuple_(Insight.device, Insight.result_id).in_(keys)))} if keys else {}
    filters = ("<form class='filters' method='get'>grade <select name='grade'><option value=''>any</option>"
               + "".join(f"<option value='{g}'>{g}</option>" for g in range(5))
               + "</select> referable <select name='referable'><option value=''>any</option><option value='true'>yes</option>"
               "<option value='false'>no</option></select> DME <select name='dme'><option value=''>any</option>"
               "<option value='true'>present</option><option value='false'>absent</option></select> "
               "<button id='filter' type='submit'>Filter</button></form>")
    return _page("RetinaEdge review", tabs + filters + _pager(request, next_cursor, len(rows))
                 + "<table><tr><th>device</th><th>grade</th><th>referable</th><th>DME</th><th>quality</th><th>CAM</th>"
                 "<th>insight / model</th></tr>" + "".join(_result_row(r, notes.get((r.device, r.result_id))) for r in rows)
                 + "</table>")

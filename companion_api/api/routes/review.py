"""Server-rendered reviewer page: synced results with grade, quality verdict, CAM overlay and insight."""
from __future__ import annotations

import html
import json

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from edge_runtime.contract import SCREENING_DISCLAIMER

from ...crud import query_results
from ...models import Insight
from ..deps import COOKIE, SessionDep, current_caller

router = APIRouter(tags=["review"], include_in_schema=False)

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;vertical-align:top}img{width:160px;border-radius:4px}
.ref{color:#b00;font-weight:600}.ungr{color:#a60}.note{background:#fff8e1;padding:.6rem;border-radius:4px}
form.filters{margin:1rem 0}"""


@router.get("/review/login", response_class=HTMLResponse)
def login_page() -> str:
    return (f"<html><head><title>RetinaEdge review</title><style>{_STYLE}</style></head><body><h1>RetinaEdge review</h1>"
            "<form method='post' action='/review/login'><label>Reviewer token <input name='token' type='password' id='token'>"
            "</label> <button id='login' type='submit'>Sign in</button></form></body></html>")


@router.post("/review/login")
def login(token: str = Form(..., max_length=200)) -> RedirectResponse:
    response = RedirectResponse("/review", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
    return response


@router.get("/review", response_class=HTMLResponse)
def review(request: Request, session: SessionDep, grade: int | None = Query(None, ge=0, le=4),
           referable: bool | None = None, device: str | None = Query(None, max_length=120)):
    try:
        caller = current_caller(request, session)
    except HTTPException:
        return RedirectResponse("/review/login", status_code=303)
    if caller.role != "reviewer":
        raise HTTPException(403, "reviewer token required")
    rows, count = query_results(session=session, device=device, grade=grade, referable=referable, since=None,
                                until=None, offset=0, limit=100)
    insights = {i.result_id: i for i in session.scalars(select(Insight).where(Insight.result_id.in_([r.result_id for r in rows])))}
    body = []
    for row in rows:
        payload = json.loads(row.payload)
        quality = payload.get("quality", {})
        grade_text = (f"{row.grade} - {html.escape(payload.get('grade_name') or '')}" if row.grade is not None
                      else "<span class='ungr'>ungradable - retake, or refer if a retake fails</span>")
        ref = "<span class='ref'>REFERABLE</span>" if row.referable else ("no" if row.referable is not None else "-")
        verdict = "gradable" if quality.get("gradable") else "ungradable: " + html.escape("; ".join(quality.get("reasons", []))[:200])
        overlay = f"<img alt='CAM overlay' src='/v1/results/{row.result_id}/overlay.png'>" if row.overlay_png else ""
        note = insights.get(row.result_id)
        note_html = ""
        if note:
            parsed = json.loads(note.body)
            note_html = (f"<div class='note'><b>{html.escape(note.source)}</b>: {html.escape(parsed['summary'])} "
                         f"<i>Follow-up: {html.escape(parsed['follow_up_interval'])}</i></div>")
        body.append(f"<tr class='result'><td>{html.escape(row.device)}<br><small>{row.captured_at:%Y-%m-%d %H:%M}</small></td>"
                    f"<td>{grade_text}<br>conf {row.confidence or 0:.2f}</td><td>{ref}</td><td>{verdict}</td>"
                    f"<td>{overlay}</td><td>{note_html}<small>{html.escape(payload.get('model_version', ''))} "
                    f"({html.escape(payload.get('backend', ''))})</small></td></tr>")
    return (f"<html><head><title>RetinaEdge review</title><style>{_STYLE}</style></head><body>"
            f"<h1>RetinaEdge review</h1><p><b>{html.escape(SCREENING_DISCLAIMER)}</b></p>"
            "<form class='filters' method='get'>grade <select name='grade'><option value=''>any</option>"
            + "".join(f"<option value='{g}'>{g}</option>" for g in range(5))
            + "</select> referable <select name='referable'><option value=''>any</option><option value='true'>yes</option>"
            "<option value='false'>no</option></select> <button id='filter' type='submit'>Filter</button></form>"
            f"<p id='count'>{count} result(s)</p><table><tr><th>device</th><th>grade</th><th>referable</th>"
            "<th>quality</th><th>CAM</th><th>insight / model</th></tr>" + "".join(body) + "</table></body></html>")

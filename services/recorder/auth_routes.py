"""The recorder's side of authentication: the check in front of every route, the sign-in
page, sessions for scripts and the viewer, and the admin routes for users, API tokens and
the audit log. The checks themselves are services/auth's, shared with the viewer."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from services.auth.directory import Directory, DirectoryError
from services.auth.gate import (
    CLIENT_HEADER,
    CSRF_FIELD,
    LOGIN_CSS,
    LOGIN_PATH,
    PUBLIC_PATHS,
    AuthError,
    Gate,
    LocalResolver,
    clear_cookies,
    login_redirect,
    safe_next,
    same_origin,
    wants_html,
)
from services.auth.limiter import FailureLimiter
from services.auth.pages import LOGIN_CSP, LOGIN_CSS_BYTES, login_page
from services.auth.principal import ANONYMOUS, Principal
from services.auth.settings import AuthSettings

from . import params

TITLE = "emotion-stream recorder"


def principal_of(request: Request) -> Principal:
    """The principal the check in front of the routes found (a FastAPI dependency)."""
    return getattr(request.state, "principal", ANONYMOUS)


def admin_of(principal: Principal = Depends(principal_of)) -> Principal:
    if not principal.admin:
        raise params.HTTPException(403, "admins only")
    return principal


def client_of(request: Request) -> str:
    """The client's address, for the audit log."""
    return request.client.host if request.client else ""


async def _form_or_json(request: Request) -> dict:
    body = await request.body()
    if "json" in request.headers.get("content-type", ""):
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise params.HTTPException(400, "body: not JSON") from None
        return data if isinstance(data, dict) else {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def authenticate(app: FastAPI, directory: Directory, auth: AuthSettings | None) -> None:
    """Put the check in front of every route (the OpenAPI page and its assets included)."""
    gate = None if auth is None else Gate(LocalResolver(directory, auth.signer), auth.signer)

    @app.middleware("http")
    async def check(request: Request, call_next):
        if gate is None or request.url.path in PUBLIC_PATHS:
            request.state.principal = ANONYMOUS if gate is None else None
            return await call_next(request)
        csrf = None
        if request.method == "POST" and "form" in request.headers.get("content-type", ""):
            csrf = (await _form_or_json(request)).get(CSRF_FIELD)
        try:
            principal = await run_in_threadpool(gate.check, request.method, request.headers, csrf)
        except AuthError as error:
            if error.status == 401 and wants_html(request.method, request.headers):
                return RedirectResponse(login_redirect(request.url.path), status_code=303)
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)
        request.state.principal = principal
        return await call_next(request)


class NewUser(BaseModel):
    name: str
    password: str
    role: str = "viewer"
    streams: list[str] | None = Field(None, description="streams the user may see (null: all)")


class UserChange(BaseModel):
    password: str | None = None
    role: str | None = None
    streams: list[str] | None = Field(None, description="streams the user may see")
    all_streams: bool = Field(False, description="true: every stream (clears streams)")


class NewToken(BaseModel):
    name: str
    role: str = "viewer"
    streams: list[str] | None = None


def add_auth_routes(app: FastAPI, directory: Directory, auth: AuthSettings | None) -> None:
    limiter = FailureLimiter()

    def refused(error: DirectoryError):
        return params.HTTPException(400, str(error))

    @app.get(LOGIN_PATH, include_in_schema=False)
    def login_form(next: str = "/docs"):
        return HTMLResponse(login_page(TITLE, next), headers={"Content-Security-Policy": LOGIN_CSP})

    @app.get(LOGIN_CSS, include_in_schema=False)
    def login_css():
        return Response(LOGIN_CSS_BYTES, media_type="text/css; charset=utf-8")

    @app.post(
        LOGIN_PATH,
        summary="Sign in: a form (sets the session cookie) or JSON {username, password} "
        "(answers the session, to send as Authorization: Bearer)",
    )
    async def login(request: Request):
        if auth is None:
            raise params.HTTPException(404, "authentication is off")
        if not same_origin(request.headers):
            raise params.HTTPException(403, "sign-in from another site's page")
        fields = await _form_or_json(request)
        browser = "form" in request.headers.get("content-type", "")
        forwarded = request.headers.get(CLIENT_HEADER)
        client = (auth.signer.read_client_claim(forwarded) if forwarded else None) or client_of(request)
        if limiter.blocked(client):
            raise params.HTTPException(429, "too many failed sign-ins; wait a minute")
        name, password = str(fields.get("username", "")), str(fields.get("password", ""))
        found = await run_in_threadpool(directory.verify, name, password)
        if found is None:
            limiter.fail(client)
            await run_in_threadpool(directory.audit, name or "?", "sign_in_failed", "", client)
            if browser:
                page = login_page(TITLE, str(fields.get("next", "/docs")), "Wrong user name or password.")
                return HTMLResponse(page, status_code=401, headers={"Content-Security-Policy": LOGIN_CSP})
            raise params.HTTPException(401, "wrong user name or password")
        limiter.succeed(client)
        principal, generation = found
        await run_in_threadpool(directory.audit, principal.name, "sign_in", "", client)
        token, expires = auth.signer.session(principal.name, generation)
        secure = auth.https or request.headers.get("x-forwarded-proto") == "https"
        if browser:
            response: Response = RedirectResponse(
                safe_next(str(fields.get("next", "/docs"))), status_code=303
            )
        else:
            response = JSONResponse(
                {"token": token, "csrf": auth.signer.csrf(token), "expires": expires, **principal.as_dict()}
            )
        for cookie in Gate(None, auth.signer).session_cookies(token, expires, secure):
            response.headers.append("Set-Cookie", cookie)
        return response

    @app.post("/logout", summary="Sign out: ends the session cookie")
    def logout(request: Request, principal: Principal = Depends(principal_of)):
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        secure = bool(auth and auth.https) or request.headers.get("x-forwarded-proto") == "https"
        for cookie in clear_cookies(secure):
            response.headers.append("Set-Cookie", cookie)
        return response

    @app.get("/api/auth/me", summary="Who the credential belongs to: name, role and streams")
    def me(principal: Principal = Depends(principal_of)):
        return principal.as_dict()

    @app.get("/api/users", summary="Users (admins only)")
    def list_users(_admin: Principal = Depends(admin_of)):
        return {"users": directory.list_users()}

    @app.post("/api/users", status_code=201, summary="Add a user (admins only)")
    def add_user(user: NewUser, request: Request, admin: Principal = Depends(admin_of)):
        try:
            directory.add_user(user.name, user.password, user.role, user.streams)
        except DirectoryError as error:
            raise refused(error) from None
        directory.audit(admin.name, "user_added", user.name, client_of(request), f"role={user.role}")
        return {"name": user.name}

    @app.patch("/api/users/{name}", summary="Change a user's password, role or streams (admins only)")
    def change_user(name: str, change: UserChange, request: Request, admin: Principal = Depends(admin_of)):
        streams = None if change.all_streams else (... if change.streams is None else change.streams)
        try:
            directory.change_user(name, change.password, change.role, streams)
        except DirectoryError as error:
            raise refused(error) from None
        what = [k for k in ("password", "role", "streams") if getattr(change, k) is not None]
        directory.audit(admin.name, "user_changed", name, client_of(request), ",".join(what))
        return {"name": name}

    @app.delete("/api/users/{name}", summary="Remove a user (admins only)")
    def remove_user(name: str, request: Request, admin: Principal = Depends(admin_of)):
        try:
            directory.remove_user(name)
        except DirectoryError as error:
            raise params.HTTPException(404, str(error)) from None
        directory.audit(admin.name, "user_removed", name, client_of(request))
        return {"removed": name}

    @app.get("/api/tokens", summary="API tokens, without the tokens themselves (admins only)")
    def list_tokens(_admin: Principal = Depends(admin_of)):
        return {"tokens": directory.list_tokens()}

    @app.post("/api/tokens", status_code=201, summary="Make an API token; it is shown only now (admins only)")
    def create_token(new: NewToken, request: Request, admin: Principal = Depends(admin_of)):
        try:
            pk, token = directory.create_token(new.name, new.role, new.streams, admin.name)
        except DirectoryError as error:
            raise refused(error) from None
        directory.audit(
            admin.name, "token_created", f"{pk} {new.name}", client_of(request), f"role={new.role}"
        )
        return {"id": pk, "token": token}

    @app.delete("/api/tokens/{token_id}", summary="Revoke an API token (admins only)")
    def revoke_token(token_id: str, request: Request, admin: Principal = Depends(admin_of)):
        pk = params.row_id(token_id, "token_id") or 0
        try:
            directory.revoke_token(pk)
        except DirectoryError as error:
            raise params.HTTPException(404, str(error)) from None
        directory.audit(admin.name, "token_revoked", str(pk), client_of(request))
        return {"revoked": pk}

    @app.get("/api/audit", summary="The audit log: sign-ins, failures, exports, deletions, user changes")
    def read_audit(after: str | None = None, limit: str | None = None, _admin: Principal = Depends(admin_of)):
        count = params.limit(limit, "json") or 100
        rows = directory.read_audit(params.row_id(after, "after"), count)
        return {"audit": rows, "next_cursor": str(rows[-1]["id"]) if len(rows) == count else None}

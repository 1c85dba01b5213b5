"""The console's accounts page (admin): teacher and office accounts, their passwords and the
courses each teacher teaches, without a shell on the server (the ``aggregator users`` CLI
does the same). Every change is audited as the admin who made it; a new password ends every
session of that account; the last administrator cannot be removed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.console.web import (
    DB,
    PostUser,
    User,
    back,
    render,
    require_admin,
)
from cloud_sync.aggregator.db.models import Course
from cloud_sync.aggregator.services.common import ServiceError

router = APIRouter(include_in_schema=False)
Name = Annotated[str, Form(max_length=100)]
Password = Annotated[str, Form(max_length=1000)]


def _by(who: accounts.ConsolePrincipal) -> str:
    return who.name  # accounts.audit makes it console:<name>


def _same(password: str, again: str) -> None:
    if password != again:
        raise ServiceError("the two passwords differ: type the same one twice")


@router.get("/accounts", response_class=HTMLResponse)
def accounts_page(request: Request, who: User, session: DB) -> Response:
    require_admin(who)
    users = accounts.list_users(session)
    courses = list(session.scalars(select(Course).order_by(Course.id)))
    return render(request, "accounts.html", who, users=users, courses=courses,
                  roles=accounts.ROLES)


@router.post("/accounts")
def add_account(who: PostUser, session: DB, name: Name, role: Annotated[str, Form(max_length=20)],
                password: Password, again: Password,
                courses: Annotated[list[str] | None, Form()] = None) -> Response:
    require_admin(who)
    _same(password, again)
    accounts.add_user(session, name, role, password, courses or [], by=_by(who))
    return back("/accounts", f"account {name.strip()} ({role}) added")


@router.post("/accounts/{name}/password")
def change_password(who: PostUser, session: DB, name: str, password: Password,
                    again: Password) -> Response:
    require_admin(who)
    _same(password, again)
    accounts.set_password(session, name, password, by=_by(who))
    return back("/accounts", f"new password for {name}: their open sessions ended")


@router.post("/accounts/{name}/courses")
def assign(who: PostUser, session: DB, name: str,
           course_id: Annotated[str, Form(max_length=64)]) -> Response:
    require_admin(who)
    accounts.assign_courses(session, name, [course_id], _by(who))
    return back("/accounts", f"{name} teaches {course_id}")


@router.post("/accounts/{name}/courses/{course_id}/remove")
def unassign(who: PostUser, session: DB, name: str, course_id: str) -> Response:
    require_admin(who)
    accounts.unassign_course(session, name, course_id, _by(who))
    return back("/accounts", f"{name} no longer teaches {course_id}")


@router.post("/accounts/{name}/remove")
def remove(who: PostUser, session: DB, name: str) -> Response:
    require_admin(who)
    if name == who.name:
        raise ServiceError("you cannot remove your own account while logged in with it")
    accounts.remove_user(session, name, by=_by(who))
    return back("/accounts", f"account {name} removed")

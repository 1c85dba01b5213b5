"""The office's admin work in the console (issue 25 item 7), without a shell on the server:
accounts and passwords, course assignment, unenrol, rename and delete a student, consent for
several students at once, delete a device. Admin only, CSRF-protected, audited as the admin."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AuditLog, Device, Enrollment, Student

from .conftest import World, batch, record
from .console_helpers import csrf_of, login

PW = "correct horse battery"
NEW = "a brand new password"


def test_accounts_and_course_assignment(world: World, sessions: Any) -> None:
    c = world.client
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    login(c, "office", PW)
    token = csrf_of(c.get("/accounts").text)
    r = c.post("/accounts", data={"csrf": token, "name": "ms-lee", "role": "teacher",
                                  "password": PW, "again": PW + "x", "courses": ["CS101"]})
    assert r.status_code == 400 and "the two passwords differ" in r.text
    r = c.post("/accounts", data={"csrf": token, "name": "ms-lee", "role": "teacher",
                                  "password": PW, "again": PW, "courses": ["CS101"]})
    assert r.status_code == 200 and "account ms-lee (teacher) added" in r.text
    r = c.post("/accounts/ms-lee/courses", data={"csrf": token, "course_id": "MA201"})
    assert "ms-lee teaches MA201" in r.text
    r = c.post("/accounts/ms-lee/courses/CS101/remove", data={"csrf": token})
    assert "ms-lee no longer teaches CS101" in r.text
    assert c.post("/accounts/office/remove", data={"csrf": token}).status_code == 400

    teacher = type(c)(c.app)  # another browser: the teacher
    login(teacher, "ms-lee", PW)
    assert "MA201" in teacher.get("/courses").text and "CS101" not in teacher.get(
        "/courses").text
    assert teacher.get("/accounts").status_code == 403
    t_token = csrf_of(teacher.get("/courses").text)
    assert teacher.post("/accounts", data={"csrf": t_token, "name": "x", "role": "admin",
                                           "password": PW, "again": PW}).status_code == 403
    assert c.post("/accounts/ms-lee/password", data={
        "password": NEW, "again": NEW}).status_code == 403  # no CSRF token
    r = c.post("/accounts/ms-lee/password", data={"csrf": token, "password": NEW,
                                                  "again": NEW})
    assert "their open sessions ended" in r.text
    assert teacher.get("/courses", follow_redirects=False).status_code == 303  # logged out
    assert login(teacher, "ms-lee", NEW).status_code == 200
    r = c.post("/accounts/ms-lee/remove", data={"csrf": token})
    assert "account ms-lee removed" in r.text
    assert login(teacher, "ms-lee", NEW).status_code == 401
    with sessions() as session:
        actions = {(a.actor, a.action) for a in session.scalars(select(AuditLog))}
    assert {("console:office", "user.add"), ("console:office", "user.password"),
            ("console:office", "user.unassign"), ("console:office", "user.remove")} <= actions


def test_student_and_device_admin(world: World, sessions: Any) -> None:
    c = world.client
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
        session.add(Student(id="S090", name="New One", created_at=session.get(
            Student, "S001").created_at))
        session.add(Student(id="S091", name="New Two", created_at=session.get(
            Student, "S001").created_at))
        session.commit()
    teacher = type(c)(c.app)
    login(teacher, "lee", PW)
    t_token = csrf_of(teacher.get("/courses").text)
    for path, data in (("/students/S001/unenrol", {"course_id": "CS101"}),
                       ("/students/S001/rename", {"name": "X"}),
                       ("/students/S001/delete", {}),
                       ("/students/consent", {"student_ids": ["S090"]}),
                       (f"/devices/{world.other_device_id}/delete", {})):
        assert teacher.post(path, data={"csrf": t_token, **data}).status_code == 403, path

    login(c, "office", PW)
    token = csrf_of(c.get("/students").text)
    page = c.get("/students").text
    assert 'name="student_ids" value="S090"' in page
    r = c.post("/students/consent", data={"csrf": token, "student_ids": ["S090", "S091",
                                                                          "S001"]})
    assert "consent recorded for 2 students (1 already had it)" in r.text
    r = c.post("/students/S004/unenrol", data={"csrf": token, "course_id": "MA201"})
    assert "Student 4 no longer in Algebra" in r.text
    r = c.post("/students/S090/rename", data={"csrf": token, "name": "Renamed One"})
    assert "New One is now Renamed One" in r.text
    assert c.post("/api/v1/attendance", json=batch(world, [record(world, "S002", world.at(
        0, 9, 2))]), headers=world.device).json()["accepted"] == 1
    r = c.post("/students/S002/delete", data={"csrf": token})
    assert "Student 2 (S002) deleted" in r.text
    r = c.post(f"/devices/{world.device_id}/delete", data={"csrf": token})
    assert r.status_code == 409 and "Rotate its key" in r.text  # pi-301 made records
    r = c.post(f"/devices/{world.other_device_id}/delete", data={"csrf": token})
    assert r.status_code == 200 and "deleted: its key no longer works" in r.text
    with sessions() as session:
        assert session.get(Student, "S090").consent == "granted"
        assert session.get(Student, "S090").name == "Renamed One"
        assert session.get(Enrollment, ("S004", "MA201")) is None
        assert session.get(Student, "S002") is None
        assert session.get(Device, world.other_device_id) is None
    assert c.post("/api/v1/heartbeat", headers=world.other, json={}).status_code == 401

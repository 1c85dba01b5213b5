"""The office's forms and imports (issue 25 items 5 and 6): adding a student is one
transaction, a refusal keeps what was typed and says why beside the field; a CSV import's
report comes first on the page, in plain words, refuses duplicates within the file and
explains a mistyped weekday."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select

from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AuditLog, Enrollment, Student

from .conftest import World
from .console_helpers import csrf_of, login

PW = "correct horse battery"


def _office(world: World, sessions: Any) -> str:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
    login(world.client, "office", PW)
    return csrf_of(world.client.get("/students").text)


def test_add_student_is_one_transaction_and_keeps_the_input(world: World,
                                                            sessions: Any) -> None:
    c = world.client
    token = _office(world, sessions)
    r = c.post("/students", data={"csrf": token, "student_id": "S010", "name": "Ann Example",
                                  "course_id": "CS1O1"})  # a letter O for a zero
    assert r.status_code == 422
    assert 'value="S010"' in r.text and 'value="Ann Example"' in r.text  # the input is kept
    assert 'id="err-course_id">there is no course “CS1O1”: pick one in the list<' in r.text
    assert "Nothing was saved" in r.text
    with sessions() as session:
        assert session.get(Student, "S010") is None  # not half-created
    r = c.post("/students", data={"csrf": token, "student_id": "S010", "name": "Ann Example",
                                  "course_id": "CS101", "consent": "granted"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/students/S010")
    with sessions() as session:
        student = session.get(Student, "S010")
        assert student is not None and student.consent == "granted"
        assert session.get(Enrollment, ("S010", "CS101")) is not None
    r = c.post("/students", data={"csrf": token, "student_id": "S010", "name": "Other",
                                  "course_id": ""})
    assert r.status_code == 422
    assert re.search(r'id="err-student_id">S010 already exists \(Ann Example\)<', r.text)
    r = c.post("/students", data={"csrf": token, "student_id": "bad id", "name": ""})
    assert r.status_code == 422
    assert "may use only letters, digits" in r.text and 'id="err-name">is empty<' in r.text
    assert "should match pattern" not in r.text
    with sessions() as session:
        assert session.scalars(select(Student.name).where(Student.id == "S010")).one() == (
            "Ann Example")


def _import(world: World, token: str, kind: str, text: str) -> str:
    r = world.client.post("/timetable/import", data={"csrf": token, "kind": kind},
                          files={"file": (f"{kind}.csv", text.encode(), "text/csv")})
    assert r.status_code == 200, r.text
    return r.text


def test_csv_import_report_first_in_plain_words(world: World, sessions: Any) -> None:
    token = _office(world, sessions)
    page = _import(world, token, "students",
                   "id,name\nS020,First Name\nS021,Bea\nS020,Second Name\nbad id!,X\n")
    assert page.index('id="import-report"') < page.index('id="class-now"')  # at the top
    assert "Import of students.csv: 1 of 4 lines imported" in page
    assert ("Line 2: id “S020” is also on line 4 of this file: none of them is imported"
            in page)
    assert "Line 4: id “S020” is also on line 2" in page
    assert "Line 5: id “bad id!” may use only letters" in page
    assert "should match pattern" not in page and "String" not in page
    with sessions() as session:
        assert session.get(Student, "S020") is None  # neither of the two S020 lines
        assert session.get(Student, "S021") is not None
    page = _import(world, token, "schedules",
                   "course_id,room_id,weekday,start_time,end_time\n"
                   "PH1,LAB-302,Tues,13:00,14:00\nPH1,LAB-302,Thrusday,13:00,14:00\n"
                   "PH1,LAB-302,Fri,1pm,14:00\n")
    assert "1 of 3 lines imported" in page
    assert "Line 3: weekday “Thrusday” is not a weekday (did you mean Thu?)" in page
    assert "Line 4: start time “1pm” is not a time of day: write HH:MM" in page
    assert "valid integer" not in page


def test_csv_consent_column(world: World, sessions: Any) -> None:
    """Issue 25 item 7: consent for a whole class from the students CSV's consent column."""
    token = _office(world, sessions)
    page = _import(world, token, "students",
                   "id,name,consent\nS030,Ann,granted\nS031,Bob,\nS032,Cy,maybe\n"
                   "S001,Student 1,withdrawn\n")
    assert "3 of 4 lines imported" in page
    assert "Line 4: consent “maybe” is not granted (or yes), withdrawn, or empty" in page
    with sessions() as session:
        assert session.get(Student, "S030").consent == "granted"
        assert session.get(Student, "S031").consent is None
        assert session.get(Student, "S001").consent == "withdrawn"
        audit = session.scalars(select(AuditLog.actor).where(
            AuditLog.action == "consent.grant", AuditLog.subject.contains("S030"))).all()
    assert audit == ["console:office"]

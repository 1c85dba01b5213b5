"""Reports: present / late / absent per class, percentages, CSV."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

from tests.cloud_sync.aggregator.conftest import World, batch, record


def _seed(world: World) -> None:
    last_week = world.monday - timedelta(days=7)
    recs = [
        record(world, "S001", world.at(0, 8, 55)),   # early arrival: present
        record(world, "S001", world.at(0, 9, 40)),   # second sighting, ignored
        record(world, "S002", world.at(0, 9, 25)),   # late (> 10 min)
        record(world, "S004", world.at(0, 9, 5)),    # present in CS101 ...
        record(world, "S004", world.at(0, 11, 2)),   # ... and in MA201
        record(world, "S003", last_week + timedelta(hours=9, minutes=1)),  # last week only
    ]
    r = world.client.post("/api/v1/attendance", json=batch(world, recs), headers=world.device)
    assert r.json()["accepted"] == 6


def test_course_day(world: World) -> None:
    _seed(world)
    day = world.at(0, 0).date().isoformat()
    r = world.client.get("/api/v1/attendance/course/CS101", params={"date": day},
                         headers=world.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    [session] = body["sessions"]
    status = {s["student_id"]: s["status"] for s in session["students"]}
    assert status == {"S001": "present", "S002": "late", "S003": "absent", "S004": "present"}
    assert (session["present"], session["late"], session["absent"]) == (2, 1, 1)
    assert body["late_after_min"] == 10.0
    as_csv = world.client.get("/api/v1/attendance/course/CS101",
                              params={"date": day, "format": "csv"}, headers=world.admin)
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert {r["student_id"]: r["status"] for r in rows} == status
    accept = world.client.get("/api/v1/attendance/course/CS101", params={"date": day},
                              headers={**world.admin, "Accept": "text/csv"})
    assert accept.text == as_csv.text


def test_percentages(world: World) -> None:
    _seed(world)
    start = (world.monday - timedelta(days=7)).date().isoformat()
    end = world.at(0, 0).date().isoformat()
    r = world.client.get("/api/v1/attendance/course/CS101", params={"from": start, "to": end},
                         headers=world.admin)
    assert r.status_code == 200, r.text
    pct = {p["student_id"]: p for p in r.json()["students"]}
    assert {p["held"] for p in pct.values()} == {2}  # two Mondays in range
    assert pct["S001"]["percentage"] == 50.0 and pct["S003"]["percentage"] == 50.0
    assert (pct["S002"]["late"], pct["S002"]["present"], pct["S002"]["absent"]) == (1, 0, 1)
    assert pct["S004"]["percentage"] == 50.0
    student = world.client.get("/api/v1/attendance/student/S004",
                               params={"from": start, "to": end}, headers=world.admin)
    assert student.status_code == 200
    courses = {c["course_id"]: c for c in student.json()["courses"]}
    assert set(courses) == {"CS101", "MA201"}
    assert len(student.json()["records"]) == 2
    summary_csv = world.client.get(
        "/api/v1/attendance/student/S004",
        params={"from": start, "to": end, "format": "csv", "view": "summary"},
        headers=world.admin,
    )
    assert {r["course_id"] for r in csv.DictReader(io.StringIO(summary_csv.text))} == {
        "CS101", "MA201"}
    records_csv = world.client.get("/api/v1/attendance/student/S004",
                                   params={"format": "csv"}, headers=world.admin)
    assert len(list(csv.DictReader(io.StringIO(records_csv.text)))) == 2


def test_reports_need_admin_and_valid_input(world: World) -> None:
    url = "/api/v1/attendance/course/CS101"
    assert world.client.get(url, headers=world.device).status_code == 403
    assert world.client.get(url).status_code == 401
    assert world.client.get("/api/v1/attendance/course/NOPE", headers=world.admin
                            ).status_code == 404
    assert world.client.get(url, params={"date": "yesterday"}, headers=world.admin
                            ).status_code == 422
    assert world.client.get(url, params={"from": "2020-01-01", "to": "2026-01-01"},
                            headers=world.admin).status_code == 400

from __future__ import annotations

from tests.aggregator.conftest import World, batch, record


def test_roundtrip(world: World) -> None:
    c = world.client
    recs = [record(world, "S001", world.at(0, 9, 2)), record(world, "S002", world.at(0, 9, 20))]
    r = c.post("/api/v1/attendance", json=batch(world, recs), headers=world.device)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 2
    r = c.post("/api/v1/attendance", json=batch(world, recs), headers=world.device)
    assert r.json()["accepted"] == 0 and r.json()["duplicate"] == 2
    r = c.get("/api/v1/schedule", params={"room_id": "LAB-301", "at": world.at(0, 9, 5).isoformat()},
              headers=world.device)
    assert r.status_code == 200, r.text
    assert r.json()["current_course_id"] == "CS101"
    r = c.get("/api/v1/attendance/course/CS101", params={"date": world.at(0, 0).date().isoformat()},
              headers=world.admin)
    assert r.status_code == 200, r.text
    print(r.json())

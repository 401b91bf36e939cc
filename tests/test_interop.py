"""Interoperability: peers written with another WebSocket library (simple-websocket)
against docs/protocol.rst alone, talking to the hub and to this library's clients."""

from __future__ import annotations

import json
from typing import Any

import pytest
import simple_websocket
from conftest import WAIT, key_of


class ForeignPeer:
    """A taskhub client in ~30 lines of simple-websocket and JSON, as documented."""

    def __init__(self, url: str, name: str) -> None:
        self.ws = simple_websocket.Client.connect(url + "/")
        self.send({"type": "hello", "v": 1, "name": name, "key": key_of(name), "concurrency": 1})
        self.welcome = self.recv()
        assert self.welcome["type"] == "welcome", self.welcome

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def recv(self) -> dict[str, Any]:
        text = self.ws.receive(timeout=WAIT)
        assert text is not None, "nothing from the hub in time"
        return json.loads(text)

    def close(self) -> None:
        if self.ws.connected:
            self.ws.close()
        self.ws.thread.join(WAIT)


@pytest.fixture
def foreign(hub):
    peers: list[ForeignPeer] = []

    def make(name: str) -> ForeignPeer:
        peers.append(ForeignPeer(hub.url, name))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def test_foreign_worker_serves_a_taskhub_publisher(foreign, make_client):
    """A worker speaking the documented protocol claims, updates and answers a task
    published with taskhub_sync; the handle sees the update and the result."""
    worker = foreign("geocoder")
    worker.send({"type": "sub", "id": 1, "pattern": "googlemaps:geocode"})
    assert worker.recv() == {"type": "reply", "id": 1}
    publisher = make_client("publisher")
    handle = publisher.pub("googlemaps:geocode", {"address": "Lisbon"})
    task = worker.recv()
    assert task["type"] == "task"
    assert (task["topic"], task["payload"], task["publisher"]) == (
        "googlemaps:geocode",
        {"address": "Lisbon"},
        "publisher",
    )
    worker.send({"type": "start", "task": task["task"]})
    worker.send({"type": "update", "task": task["task"], "data": {"looking": True}})
    worker.send({"type": "result", "task": task["task"], "result": {"lat": 38.72}})
    assert handle.get_result(timeout=WAIT) == {"lat": 38.72}
    assert handle.updates == [{"looking": True}]
    assert handle.results["geocoder"].status == "ok"


def test_foreign_publisher_gets_updates_and_done_from_a_taskhub_worker(foreign, make_client):
    """A publisher speaking the documented protocol gets update and done messages from
    a taskhub_sync worker."""

    def geocode(task):
        task.start()
        task.update("working")
        return {"address": task.get_payload()}

    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", geocode)
    publisher = foreign("publisher")
    task_id = f"{publisher.welcome['session']}.1"
    publisher.send(
        {"type": "pub", "task": task_id, "topic": "googlemaps:geocode", "payload": "Oslo"}
    )
    assert publisher.recv() == {
        "type": "update",
        "task": task_id,
        "data": "working",
        "service": "geocoder",
    }
    done = publisher.recv()
    assert done["type"] == "done" and done["task"] == task_id
    assert done["winner"] == "geocoder"
    assert done["outcomes"] == {"geocoder": {"status": "ok", "result": {"address": "Oslo"}}}


def test_foreign_peer_breaking_the_protocol_is_closed_with_4000(foreign, hub, make_client):
    """A message the protocol does not allow closes that peer with 4000; others go on."""
    peer = foreign("publisher")
    peer.send({"type": "start", "task": "nobody.1"})
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        peer.ws.receive(timeout=WAIT)
    assert closed.value.reason == 4000
    assert "not held by this connection" in closed.value.message
    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", lambda task: task.get_payload())
    assert make_client("publisher").pub("googlemaps:geocode", 5).get_result(timeout=WAIT) == 5

"""Does the cost of a task grow with the number of subscribed topics or instances?

Two measurements per size, each printed as microseconds per task:

* ``router``: publish + start + result straight through ``Router.receive`` (no
  sockets, no threads): the routing algorithm alone, with a stable clock.
* ``e2e``: sequential round trips through a real hub on loopback, with the worker
  and the publisher in this process (so absolute numbers include their threads;
  compare sizes with each other, not with the three-process W1 benchmark).

Sizes: 1 to 10,000 exact topics subscribed by one worker (tasks go to topics chosen
at random among them); 1 to 50 instances of one service (round robin).

    .venv/bin/python bench/scaling.py               # ~1 minute
    .venv/bin/python bench/scaling.py --tasks 500   # quicker

Loopback only; every loop is bounded by a count; everything started is stopped.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from taskhub_sync import Client, Server
from taskhub_sync import protocol as p
from taskhub_sync.router import Credential, Router

TOPIC_SIZES = (1, 100, 1_000, 10_000)
INSTANCE_SIZES = (1, 10, 50)
CRED = Credential("svc", sub_permissions=("*",), pub_permissions=("*",), max_instances=100)


def router_us(topics: int, instances: int, tasks: int) -> float:
    """µs per task through Router.receive (publish, start, result)."""
    router = Router(task_start_timeout=5.0, task_finish_timeout=60.0, max_subscriptions=topics + 10)
    names = [f"t:{i}" for i in range(topics)]
    workers = [f"w{i}" for i in range(instances)]
    for w in workers:
        router.connect(w, CRED, 1)
        for i, name in enumerate(names):
            router.receive(w, p.Subscribe(i, name), 0.0)
    router.connect("pub", CRED, 1)
    rng = random.Random(1)
    chosen = [rng.choice(names) for _ in range(tasks)]
    t0 = time.perf_counter()
    for n, topic in enumerate(chosen):
        task_id = f"pub.{n}"
        [out] = router.receive("pub", p.Publish(task_id, topic, n), 1.0)
        router.receive(out.conn_id, p.Start(task_id), 1.0)
        router.receive(out.conn_id, p.Result(task_id, n), 1.0)
    return (time.perf_counter() - t0) / tasks * 1e6


def e2e_us(topics: int, instances: int, tasks: int) -> float:
    """µs per sequential round trip through a real hub, median of 3 batches."""
    hub = Server(port=0, task_start_timeout=5.0, max_subscriptions=topics + 10)
    hub.add_credential(
        "svc", key="k", sub_permissions=["*"], pub_permissions=["*"], max_instances=instances + 1
    )
    clients: list[Client] = []
    try:
        hub.start()
        names = [f"t:{i}" for i in range(topics)]
        for _ in range(instances):
            worker = Client(hub.url, name="svc", key="k", max_workers=1)
            clients.append(worker)
            for name in names:
                worker.sub(name, lambda task: task.get_payload())
        publisher = Client(hub.url, name="svc", key="k")
        clients.append(publisher)
        rng = random.Random(1)
        for _ in range(min(200, tasks)):  # warm-up
            publisher.pub(rng.choice(names), 0).get_result(timeout=10)
        batches = []
        for _ in range(3):
            t0 = time.perf_counter()
            for n in range(tasks // 3):
                assert publisher.pub(rng.choice(names), n).get_result(timeout=10) == n
            batches.append((time.perf_counter() - t0) / (tasks // 3) * 1e6)
        return statistics.median(batches)
    finally:
        for client in clients:
            client.close()
        hub.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per measurement")
    args = parser.parse_args(argv)
    print(f"{'what':<28}{'router µs/task':>16}{'e2e µs/task':>14}")
    rows = [(f"{n:,} topic{'s' * (n != 1)}, 1 instance", n, 1) for n in TOPIC_SIZES]
    rows += [(f"1 topic, {m} instance{'s' * (m != 1)}", 1, m) for m in INSTANCE_SIZES]
    for label, topics, instances in rows:
        r = router_us(topics, instances, args.tasks)
        e = e2e_us(topics, instances, args.tasks)
        print(f"{label:<28}{r:>16.1f}{e:>14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

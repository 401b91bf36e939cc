"""The seed's publisher: sends a bulk mail, prints live progress, then the result.

Start examples/server.py and examples/mailer.py first, then::

    python examples/publisher.py

It connects to ``$TASKHUB_URL`` (default ws://127.0.0.1:9999) as ``publisher`` with
``$PUBLISHER_KEY`` (default: the server example's development key). Exits 0 once
the result is in, 1 if the task failed (e.g. NoSubscribers when no mailer runs).
"""

from __future__ import annotations

import os
import sys

from taskhub_sync import Client, TaskHubError

URL = os.environ.get("TASKHUB_URL", "ws://127.0.0.1:9999")
KEY = os.environ.get("PUBLISHER_KEY", "publisher-dev-key")

EMAILS = [
    {"to": "ada@example.com", "subject": "Your order has shipped"},
    {"to": "grace@example.com", "subject": "Your order has shipped"},
    {"to": "linus@example.com", "subject": "Your order has shipped"},
]


def main() -> int:
    with Client(URL, name="publisher", key=KEY) as client:
        handle = client.pub("mail:send-bulk", EMAILS, timeout=1800)  # this task's finish timeout
        handle.on("update", lambda progress: print("progress:", progress, flush=True))
        try:
            result = handle.get_result()  # blocks; raises a taskhub_sync error on failure
        except TaskHubError as exc:
            print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print("result:", result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

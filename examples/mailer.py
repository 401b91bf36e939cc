"""The seed's worker: serves ``mail:send-bulk``, reporting progress per email.

Start examples/server.py first, then::

    python examples/mailer.py

It connects to ``$TASKHUB_URL`` (default ws://127.0.0.1:9999) as ``mailer`` with
``$MAILER_KEY`` (default: the server example's development key), prints ``ready``
once subscribed, and serves until Ctrl-C (or SIGTERM). It does not really send mail:
see ``taskhub-sync demo`` for a mailer talking SMTP.
"""

from __future__ import annotations

import logging
import os
import signal

from taskhub_sync import Client, Task

URL = os.environ.get("TASKHUB_URL", "ws://127.0.0.1:9999")
KEY = os.environ.get("MAILER_KEY", "---super-secret-key---")


def send_bulk(task: Task) -> dict[str, int]:
    """Handle one bulk mail: the payload is a list of {"to": ..., "subject": ...}."""
    task.start()  # claim it: the hub now waits for this worker's result
    emails = task.get_payload()
    for i, email in enumerate(emails):
        if task.cancelled:  # the hub gave up on this task (e.g. its timeout passed)
            break
        print(f"sending to {email['to']}", flush=True)
        task.update({"sent": i + 1, "to": email["to"]})  # streamed to the publisher in order
    return {"sent": len(emails)}  # the publisher's result; an exception becomes its error


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    with Client(URL, name="mailer", key=KEY) as client:
        client.sub("mail:send-bulk", send_bulk)
        print("mailer ready: serving mail:send-bulk (Ctrl-C to stop)", flush=True)
        client.run_forever()  # until Ctrl-C or SIGTERM


if __name__ == "__main__":
    main()

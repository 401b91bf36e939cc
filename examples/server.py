"""The seed's hub: a mailer service and a publisher allowed to send it bulk mail.

Run it, then the mailer, then the publisher, each in its own terminal::

    python examples/server.py
    python examples/mailer.py
    python examples/publisher.py

Settings come from environment variables, with development defaults:

    TASKHUB_HOST    interface to listen on (default 127.0.0.1)
    TASKHUB_PORT    port (default 9999; 0 picks a free one, printed at start)
    MAILER_KEY      the mailer's key (default "---super-secret-key---")
    PUBLISHER_KEY   the publisher's key (default "publisher-dev-key")

Set real keys before listening anywhere but on 127.0.0.1. Stop with Ctrl-C (or
SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal

from taskhub_sync import Server

DEV_MAILER_KEY = "---super-secret-key---"
DEV_PUBLISHER_KEY = "publisher-dev-key"


def make_hub() -> Server:
    """The hub with the seed's credentials, not started yet."""
    hub = Server(
        host=os.environ.get("TASKHUB_HOST", "127.0.0.1"),
        port=int(os.environ.get("TASKHUB_PORT", "9999")),
        task_start_timeout=0.1,  # seconds: no subscriber answered in time -> the task fails
        task_finish_timeout=60.0,  # seconds: default cap on a task's run time
    )
    hub.add_credential(
        "mailer",
        key=os.environ.get("MAILER_KEY", DEV_MAILER_KEY),
        sub_permissions=["mail:send-bulk"],  # what it may listen to
        pub_permissions=["log:error", "log:warn", "googlemaps"],  # what it may emit
        max_instances=1,  # simultaneous connections allowed
    )
    hub.add_credential(
        "publisher",
        key=os.environ.get("PUBLISHER_KEY", DEV_PUBLISHER_KEY),
        pub_permissions=["mail:send-bulk"],
        max_instances=4,
    )
    return hub


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    hub = make_hub()
    hub.start()
    print(f"hub listening on {hub.url} (Ctrl-C to stop)", flush=True)
    hub.serve_forever()  # until Ctrl-C or SIGTERM; stops the hub cleanly


if __name__ == "__main__":
    main()

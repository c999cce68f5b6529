"""An S3-compatible object store on 127.0.0.1 for tests (moto's server, in a thread of this process).

    with S3Server() as s3:
        uri = s3.uri("runs")      # s3://safedpo-test/runs?endpoint_override=http://127.0.0.1:PORT&region=us-east-1

Credentials are fake (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY = "testing", set in os.environ
while it runs); a process that talks to it needs them too (e.g. `submit --env AWS_ACCESS_KEY_ID`).
"""

from __future__ import annotations

import logging
import os

BUCKET = "safedpo-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __enter__(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
        self._saved = {k: os.environ.get(k) for k in CREDENTIALS}
        os.environ.update(CREDENTIALS)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        from safedpo_ray.runtime.storage import resolve

        fs, _ = resolve(self.uri("") + "&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        return self

    def uri(self, prefix: str) -> str:
        path = f"{BUCKET}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&region=us-east-1"

    def __exit__(self, *exc) -> None:
        self._server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

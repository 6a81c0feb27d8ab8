"""A real S3 server for the remote tests: moto's standalone server (`moto_server`, from
the `moto[server]` test dependency) on 127.0.0.1, behind a TCP proxy the tests can cut.

Why a proxy: moto keeps its buckets in memory and has no persistence option, so
stopping the server process would lose what a first push uploaded. To test "the server
stops in the middle of a push", the proxy in front of it is what stops: at a chosen
number of uploaded bytes it shuts every open connection down mid-request and closes
its listening socket, so the client sees what it sees when the server dies
(connections dropped, then refused); `resume()` listens again on the same port (the "restart"), and
moto behind it still holds whatever the interrupted push managed to store.

moto checks credentials only when `INITIAL_NO_AUTH_ACTION_COUNT` is set: the first N
requests are allowed unsigned, every later one must be signed by a known IAM access
key. `S3Server.start()` uses those N requests to create an IAM user with an access key
and an allow-all policy, and the bucket; from then on wrong credentials are refused
(`InvalidAccessKeyId`, `SignatureDoesNotMatch`) as AWS refuses them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BUCKET = "my-bucket"  # the bucket of docs/cache.md, "Sharing the cache between machines"
REGION = "us-east-1"
_SETUP_REQUESTS = 4  # create_user, create_access_key, put_user_policy, create_bucket


def clear_aws_env(monkeypatch) -> None:
    """Remove every AWS_* variable (a profile, a session token, real credentials)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class CuttableProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`. `cut_after(n)` arms a cut once
    `n` more client->server bytes have been forwarded; `cut()` cuts now: every open
    connection is shut down mid-request and the port stops listening (connections are
    refused) until `resume()`."""

    def __init__(self, target: int, port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.uploaded = 0  # client -> server bytes forwarded since start
        self.cut_at: int | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def start(self) -> CuttableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    resume = start

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self.cut_at = self.uploaded + nbytes

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self.cut_at = None
            self.cuts += 1
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            # shutdown first: close() alone would not wake the thread blocked in recv()
            # on it, and the connection would stay open
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(65536):
                if upload:
                    with self._lock:
                        self.uploaded += len(data)
                        trip = self.cut_at is not None and self.uploaded >= self.cut_at
                    if trip:
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class S3Server:
    """moto_server in a subprocess with credential checks on, one IAM user and BUCKET;
    `endpoint` is the proxy's URL. Context manager."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.moto_port = free_port()
        self.proxy: CuttableProxy | None = None
        self.access_key_id = ""
        self.secret_access_key = ""
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.port}"

    def env(self, **changes: str) -> dict[str, str]:
        """The environment a DVC client needs for this server: credentials, region and
        endpoint (botocore reads AWS_ENDPOINT_URL), and no AWS config or credentials file
        (callers clear any other AWS_* variable: see `clear_aws_env`)."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }
        env.update(changes)
        return env

    def start(self) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        moto_server = Path(sys.executable).with_name("moto_server")
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_REQUESTS))
        with (self.workdir / "moto.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [str(moto_server), "-H", "127.0.0.1", "-p", str(self.moto_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        _wait_for_port(self.moto_port)
        self.proxy = CuttableProxy(self.moto_port).start()
        self._setup()
        return self

    def _setup(self) -> None:
        import boto3

        def client(service: str):
            return boto3.client(
                service,
                endpoint_url=f"http://127.0.0.1:{self.moto_port}",
                region_name=REGION,
                aws_access_key_id="setup",
                aws_secret_access_key="setup",
            )

        iam = client("iam")
        iam.create_user(UserName="tierquant")
        key = iam.create_access_key(UserName="tierquant")["AccessKey"]
        iam.put_user_policy(
            UserName="tierquant",
            PolicyName="all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}',
        )
        client("s3").create_bucket(Bucket=BUCKET)
        self.access_key_id = key["AccessKeyId"]
        self.secret_access_key = key["SecretAccessKey"]

    def s3(self):
        """A boto3 S3 client with the valid credentials, straight to moto (not proxied)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.moto_port}",
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix` in BUCKET: key -> bytes."""
        s3 = self.s3()
        out: dict[str, bytes] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

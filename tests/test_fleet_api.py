"""``hotproxy fleet serve``: apply and status over HTTP for CI pipelines (issue 20).

A real etcd (``ci/etcd.sh``), three real ``hotproxy run`` instances of one
fleet (``test_fleet.Fleet``) under byte-checked traffic, and a real
``hotproxy fleet serve`` process on a 127.0.0.1 port; the requests go over
real sockets (a small HTTP/1.1 client here, and ``curl`` where installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import eventually, free_port, run
from helpers_program import Program, Traffic
from test_fleet import HOSTS, Etcd, Fleet, check_traffic, etcd  # noqa: F401  (etcd: the fixture)
from test_fleet_tls import pki  # noqa: F401  (the fixture)

Start = Callable[..., Program]
TOKEN = "t0k3n-for-ci"


class Server:
    """A running ``hotproxy fleet serve``; ``stop()`` (SIGTERM) or killed at the end."""

    def __init__(self, url: str, env: dict[str, str], tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.scheme = "https" if "--tls-cert" in args else "http"
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.log_path = tmp / "serve.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hotproxy.cli", "fleet", "serve", "--listen", f"127.0.0.1:{self.port}",
                 "--etcd", url, "--token-file", str(self.token_file), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        await eventually(lambda: f"listening on {self.scheme}://127.0.0.1:{self.port}" in self.log(), timeout=60)

    async def request(self, method: str, path: str, body: bytes = b"", *, token: str | None = TOKEN,
                      headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None,
                      ) -> tuple[int, dict[str, str], Any]:
        """One request over a new connection (*tls*: HTTPS): (status, headers, the JSON body)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=tls)
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", "Connection: close"]
            if token is not None:
                head.append(f"Authorization: Bearer {token}")
            if method == "POST":
                head.append(f"Content-Length: {len(body)}")
            head += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            raw = await asyncio.wait_for(reader.read(), 120)
        finally:
            writer.close()
        head_raw, _, data = raw.partition(b"\r\n\r\n")
        lines = head_raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        got = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert got["content-type"] == "application/json" and int(got["content-length"]) == len(data), raw
        return status, got, json.loads(data)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()
        print(f"---- log of fleet serve ----\n{server.log()}")


def test_a_ci_pipeline_applies_and_reads_status_over_http_with_a_bearer_token(
        start: Start, etcd: Etcd, tmp_path: Path, traffic: Callable[..., Traffic], servers: list[Server]) -> None:
    """``POST /fleet/apply`` commits on all three instances (200, the CLI's lines and one
    line per instance); a config that fails on one instance is applied by none (409, the
    instance and why); a bad config is refused before any proposal (422); no token or a
    wrong one, a wrong path, method or parameter: 401/404/405/400 with one line; ``GET
    /fleet/status`` is ``fleet status --json``; SIGTERM stops the server (exit 0)."""
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path)
        await fleet.start()
        server = Server(fleet.url, fleet.any.env, tmp_path)
        servers.append(server)
        await server.wait_ready()

        status, headers, body = await server.request("POST", "/fleet/apply", fleet.text("v1").encode())
        print(f"POST /fleet/apply -> {status}: {json.dumps(body['lines'])}")
        assert status == 200 and body["ok"] is True and body["error"] is None, body
        # (from the first config on, under traffic: every later request is checked against it)
        load = fleet.traffic(traffic)
        rev = body["revision"]
        assert body["lines"][0] == f"fleet apply: proposal {body['proposal']} committed as revision {rev}", body
        assert body["instances"] == {iid: f"committed revision {rev}" for iid in HOSTS}, body
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        status, _, st = await server.request("GET", "/fleet/status")
        assert status == 200 and st["ok"] is True and st["revision"] == rev, st
        assert {iid: r["applied"] for iid, r in st["instances"].items()} == {iid: rev for iid in HOSTS}, st
        assert {k: v for k, v in st.items() if k != "ok"}.keys() == (await fleet.status()).keys()

        # fails on i3 only (its address holds the new port): none applies it, 409 names it
        new = free_port()
        with socket.socket() as held:
            held.bind((HOSTS["i3"], new))
            held.listen()
            status, _, body = await server.request("POST", "/fleet/apply?deadline=20",
                                                   fleet.text("v2", {"new": new}).encode())
        print(f"POST /fleet/apply (port held on i3) -> {status}: {body['error']}")
        assert status == 409 and body["ok"] is False and body["revision"] == 0, body
        assert body["error"].startswith("instance i3 failed") and "address already in use" in body["error"], body
        assert body["lines"][0] == f"fleet apply: proposal {body['proposal']} aborted: {body['error']}", body
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        st = (await server.request("GET", "/fleet/status"))[2]
        assert st["revision"] == rev and st["decision"]["outcome"] == "abort", st
        proposal = st["proposal"]

        # refused before anything is proposed
        for method, path, data, kw, code, why in (
                ("POST", "/fleet/apply", b"[services\n", {}, 422, "POST /fleet/apply: TOML syntax error"),
                ("POST", "/fleet/apply", b"[runtime]\nworkers = 1\n", {}, 422, "runtime: not allowed in a fleet"),
                ("POST", "/fleet/apply", fleet.text("v3").encode(), {"token": None}, 401,
                 "missing Authorization: Bearer TOKEN"),
                ("POST", "/fleet/apply", fleet.text("v3").encode(), {"token": "nope"}, 401, "wrong token"),
                # (a big body the server does not read: its answer still arrives, no reset)
                ("POST", "/fleet/apply", b"#" * 2_000_000, {"token": "nope"}, 401, "wrong token"),
                ("GET", "/fleet/status", b"", {"token": TOKEN + "x"}, 401, "wrong token"),
                ("POST", "/fleet/apply?deadline=soon", fleet.text("v3").encode(), {}, 400, "deadline: expected"),
                ("POST", "/fleet/apply?force=1", fleet.text("v3").encode(), {}, 400, "unknown parameter 'force'"),
                ("GET", "/fleet/apply", b"", {}, 405, "/fleet/apply takes POST, got GET"),
                ("GET", "/", b"", {}, 404, "no / here"),
                ("POST", "/fleet/apply", b"\xff\xfe", {}, 400, "not UTF-8"),
        ):
            status, headers, body = await server.request(method, path, data, **kw)
            print(f"{method} {path} ({kw or 'token'}, {len(data)} bytes) -> {status}: {body['error']}")
            assert status == code and body == {"ok": False, "error": body["error"]} and why in body["error"], body
            assert "\n" not in body["error"]
            if code == 401:
                assert headers["www-authenticate"].startswith("Bearer"), headers
        assert (await server.request("GET", "/fleet/status"))[2]["proposal"] == proposal
        assert "Traceback" not in server.log()

        if shutil.which("curl"):
            # what a pipeline runs: curl, a body over 1 KiB (curl asks "Expect: 100-continue")
            path = tmp_path / "ci.toml"
            path.write_text(fleet.text("v4") + "# " + "x" * 2000 + "\n")
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {TOKEN}", "--data-binary",
                f"@{path}", f"http://127.0.0.1:{server.port}/fleet/apply", stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, out + err
            assert json.loads(out)["ok"] is True
            assert await fleet.greetings() == {iid: b"v4" for iid in HOSTS}

        check_traffic(await load.finish(), "fleet serve")
        assert server.stop() == 0
        assert "fleet serve: stopped" in server.log()

    run(main(), timeout=240)


def test_an_http_apply_and_a_cli_apply_that_both_read_before_either_writes_exactly_one_wins(
        start: Start, etcd: Etcd, tmp_path: Path, servers: list[Server]) -> None:
    """The server is a proposer like the CLI: an HTTP apply and a CLI apply held
    between their read and their write until both have read (the test-only
    ``HOTPROXY_TEST_FLEET_BARRIER``) -- one is committed, the other is told
    which proposal won (409 over HTTP, exit 1 from the CLI)."""
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path)
        await fleet.start()
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        env = {"HOTPROXY_TEST_FLEET_BARRIER": f"{barrier}:2"}
        server = Server(fleet.url, {**fleet.any.env, **env}, tmp_path)
        servers.append(server)
        await server.wait_ready()

        async def cli() -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.cli", *fleet.apply_cmd(fleet.text("vc")), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**fleet.any.env, **env})
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        (status, _, body), (code, out, err) = await asyncio.gather(
            server.request("POST", "/fleet/apply", fleet.text("vh").encode()), cli())
        assert len(os.listdir(barrier)) == 2
        print(f"HTTP -> {status}: {body.get('error')}; CLI -> {code}: {err.strip()}")
        assert sorted([status == 200, code == 0]) == [False, True], (body, out + err)
        if status == 200:
            assert code == 1 and "another fleet apply proposed first" in err and "(fleet serve, for" in err, err
            version = b"vh"
        else:
            assert status == 409 and body["error"].startswith("another fleet apply proposed first"), body
            version = b"vc"
        assert await fleet.greetings() == {iid: version for iid in HOSTS}

    run(main(), timeout=240)


def test_fleet_serve_bad_options_are_one_line(tmp_path: Path) -> None:
    """A missing or empty token file, a bad --listen, half of --tls-cert/--tls-key: exit 1
    in one line before anything is served."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    url = f"etcd://127.0.0.1:{free_port()}/hp"
    for args, expect in (
            (["--listen", "127.0.0.1:1", "--token-file", str(tmp_path / "none")], "--token-file: No such file"),
            (["--listen", "127.0.0.1:1", "--token-file", str(empty)], "empty (it holds the bearer token"),
            (["--listen", "unix:/tmp/x", "--token-file", str(token)], "--listen: expected HOST:PORT"),
            (["--listen", "127.0.0.1:1", "--token-file", str(token), "--tls-cert", str(token)], "--tls-key: missing"),
    ):
        proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "fleet", "serve", "--etcd", url, *args],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and expect in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_fleet_serve_over_https_answers_503_in_one_line_while_etcd_is_unreachable(
        pki: Path, tmp_path: Path, servers: list[Server]) -> None:  # noqa: F811  (pki: the fixture)
    """``--tls-cert``/``--tls-key``: the API over HTTPS (the client verifies the
    server's certificate); with no etcd listening, status and apply answer 503
    with one line and the server serves on."""
    async def main() -> None:
        url = f"etcd://127.0.0.1:{free_port()}/hp"
        env = dict(os.environ)
        server = Server(url, env, tmp_path, "--tls-cert", str(pki / "etcd.pem"), "--tls-key", str(pki / "etcd.key"))
        servers.append(server)
        await server.wait_ready()
        tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        for method, path, data in (("GET", "/fleet/status", b""),
                                   ("POST", "/fleet/apply", b'[services.e]\nkind = "echo"\nlisten = "127.0.0.1:1"\n')):
            status, _, body = await server.request(method, path, data, tls=tls)
            print(f"HTTPS {method} {path}, etcd down -> {status}: {body['error']}")
            assert status == 503 and body["ok"] is False and body["error"].startswith("etcd unreachable"), body
            assert "\n" not in body["error"]
        with pytest.raises(ssl.SSLCertVerificationError):   # a client that does not trust its certificate
            await server.request("GET", "/fleet/status", tls=ssl.create_default_context())
        assert server.stop() == 0

    run(main(), timeout=120)

"""A fleet talks to etcd over TLS, with client certificates or a user and password (issue 20).

A real etcd server (``ci/etcd.sh``) started with ``--cert-file``/``--key-file``
and, for client certificates, ``--trusted-ca-file``/``--client-cert-auth``;
the certificates (a CA, etcd's for 127.0.0.1, a client's, and another CA that
signed none of them) are made by the test with the ``openssl`` CLI.  The
instances are real ``hotproxy run`` processes whose local ``[runtime]`` says
``config_source = "etcds://..."`` and ``etcd_ca``/``etcd_cert``/``etcd_key``;
``fleet apply``/``status`` take ``--etcd-ca``/``--etcd-cert``/``--etcd-key``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import echo_roundtrip, eventually, free_port, run
from helpers_program import Program, Traffic, toml
from helpers_tls import make_ca, make_cert
from test_fleet import HOSTS, Etcd, Fleet, _need, check_traffic, committed_revision, started_etcd

Start = Callable[..., Program]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; etcd.pem/key (SAN IP:127.0.0.1, signed by ca); client.pem/key (signed by ca);
    other-ca.pem (a CA that signed nothing here).  EC P-256, 2 days, ``openssl`` CLI."""
    _need(shutil.which("openssl") is not None, "no openssl CLI (ci/peers.sh)")
    d = tmp_path_factory.mktemp("etcd-pki")
    for ca in ("ca", "other-ca"):
        make_ca(d, ca, f"hotproxy test {ca}")
    make_cert(d, "ca", "etcd", "etcd", "extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1")
    make_cert(d, "ca", "client", "root", "extendedKeyUsage=clientAuth")
    return d


def _tls_etcd(tmp_path: Path, pki: Path, *, client_certs: bool) -> Iterator[Etcd]:
    tls_args = ["--cert-file", str(pki / "etcd.pem"), "--key-file", str(pki / "etcd.key")]
    if client_certs:
        tls_args += ["--trusted-ca-file", str(pki / "ca.pem"), "--client-cert-auth"]
    yield from started_etcd(tmp_path, tls_args)


@pytest.fixture
def mtls_etcd(tmp_path: Path, pki: Path) -> Iterator[Etcd]:
    """A started etcd that speaks only TLS and asks every client for a certificate signed by ca.pem."""
    yield from _tls_etcd(tmp_path, pki, client_certs=True)


@pytest.fixture
def tls_etcd(tmp_path: Path, pki: Path) -> Iterator[Etcd]:
    """A started etcd that speaks only TLS (no client certificates)."""
    yield from _tls_etcd(tmp_path, pki, client_certs=False)


def files(pki: Path, ca: str = "ca", client: bool = True) -> dict[str, str]:
    out = {"etcd_ca": str(pki / f"{ca}.pem")}
    if client:
        out.update(etcd_cert=str(pki / "client.pem"), etcd_key=str(pki / "client.key"))
    return out


def cli_args(tls: dict[str, str]) -> tuple[str, ...]:
    return tuple(x for key, path in tls.items() for x in (f"--{key.replace('_', '-')}", path))


def test_apply_over_tls_with_client_certificates_commits_on_every_instance_and_a_wrong_ca_is_refused(
        start: Start, mtls_etcd: Etcd, pki: Path, tmp_path: Path, traffic: Callable[..., Traffic]) -> None:
    """Three instances (``etcd_ca``/``etcd_cert``/``etcd_key`` in their files) join an
    etcd that asks for client certificates; ``fleet apply --etcd etcds://... --etcd-ca
    --etcd-cert --etcd-key`` commits on all three under byte-checked traffic.  A wrong CA,
    no client certificate, or plaintext to the TLS port: ``fleet status`` exits 1 in one
    line saying why, and an instance started so keeps retrying (its log says why) and
    never joins."""
    async def main() -> None:
        tls = files(pki)
        fleet = Fleet(start, mtls_etcd, tmp_path, cli_args=cli_args(tls), **tls)
        assert fleet.url.startswith("etcds://127.0.0.1:")
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        load = fleet.traffic(traffic)
        code, out, err = await fleet.apply(fleet.text("v2"))
        assert code == 0, out + err
        print(f"fleet apply over TLS (client certificates):\n{out.strip()}")
        rev = committed_revision(out)
        for iid in HOSTS:
            assert f"{iid}: committed revision {rev}" in out, out
        st = await fleet.status()
        assert st["source"] == fleet.url and st["revision"] == rev, st
        assert {iid: r["applied"] for iid, r in st["instances"].items()} == {iid: rev for iid in HOSTS}, st
        assert await fleet.greetings() == {iid: b"v2" for iid in HOSTS}
        check_traffic(await load.finish(), "apply over TLS")

        async def status(*args: str) -> tuple[int, str, str]:
            return await fleet.any.cli("fleet", "status", *args, timeout=60)

        plain = fleet.url.replace("etcds://", "etcd://")
        for args, why in (
                (cli_args(files(pki, "other-ca")), "etcd's certificate is not trusted (unable to get local issuer "
                                                   "certificate): etcd_ca / --etcd-ca names the CA that signed it"),
                (cli_args(files(pki, client=False)), "etcd asks for a client certificate"),
                ((), "etcd's certificate is not trusted"),   # etcd's CA is not among the system's
        ):
            code, out, err = await status("--etcd", fleet.url, *args)
            print(f"fleet status {' '.join(a if '/' not in a else os.path.basename(a) for a in args)}: "
                  f"{err.strip()}")
            assert code == 1 and out == "" and err.count("\n") == 1, (args, out, err)
            assert err.startswith(f"hotproxy: error: etcd {fleet.url}: TLS: ") and why in err, (args, err)
            assert "Traceback" not in err
        code, out, err = await status("--etcd", plain)
        print(f"fleet status over plaintext to the TLS port: {err.strip()}")
        assert code == 1 and err.count("\n") == 1 and err.startswith("hotproxy: error: etcd unreachable"), err
        assert err.endswith("(if etcd serves TLS only, use etcds://)\n"), err
        # an instance with the wrong CA serves nothing new, says why in its log, never joins
        wrong = start(toml({}, workers=1, admin="w.sock", config_source=fleet.url, instance_id="wrong-ca",
                           listen_host="127.0.0.9", **files(pki, "other-ca")), name="w.toml")
        await wrong.wait_ready()
        await eventually(lambda: "etcd's certificate is not trusted" in wrong.log(), timeout=30)
        line = next(x for x in wrong.log().splitlines() if "etcd's certificate is not trusted" in x)
        print(f"an instance with the wrong CA logs: {line}")
        assert "wrong-ca" not in (await fleet.status())["instances"]

    run(main(), timeout=240)


def test_an_instance_started_with_etcd_tls_options_keeps_them_through_an_upgrade(
        start: Start, mtls_etcd: Etcd, pki: Path, tmp_path: Path) -> None:
    """``run --etcd etcds://... --etcd-ca --etcd-cert --etcd-key`` (nothing about etcd in
    the file): the instance joins; ``hotproxy upgrade`` passes the options on, so the
    new master rejoins over TLS and commits the next ``fleet apply``."""
    async def main() -> None:
        tls = files(pki)
        url = mtls_etcd.url()
        args = ["-c", str(tmp_path / "u.toml"), "--etcd", url, *cli_args(tls)]
        prog = start(toml({}, workers=1, admin="u.sock", instance_id="u"), name="u.toml", args=args)
        await prog.wait_ready()
        port = free_port()

        async def apply(version: str) -> str:
            path = tmp_path / f"{version}.toml"
            path.write_text(f'[services.e]\nkind = "echo"\nlisten = "127.0.0.1:{port}"\ngreeting = "{version}\\n"\n')
            code, out, err = await prog.cli("fleet", "apply", "-c", str(path), "--etcd", url, *cli_args(tls),
                                            timeout=120)
            assert code == 0, out + err
            return out

        async def member_pid() -> int:
            code, out, err = await prog.cli("fleet", "status", "--etcd", url, *cli_args(tls), "--json")
            assert code == 0, out + err
            return int(json.loads(out)["instances"].get("u", {}).get("pid", 0))

        async def member_pid_is(pid: int) -> bool:
            return await member_pid() == pid

        before = await prog.follow()
        await eventually(lambda: member_pid_is(before["pid"]), timeout=60, interval=0.2)
        assert "u: committed revision" in await apply("v1")
        code, out, err = await prog.cli("upgrade", "-c", str(prog.config), timeout=120)
        assert code == 0, out + err
        after = await prog.follow()
        assert after["pid"] != before["pid"]
        await eventually(lambda: member_pid_is(after["pid"]), timeout=60, interval=0.2)
        assert "u: committed revision" in await apply("v2")
        assert (await echo_roundtrip("127.0.0.1", port, b"x", greeting=3))[:3] == b"v2\n"

    run(main(), timeout=240)


def test_user_and_password_inside_tls_against_etcd_with_auth_enabled(
        start: Start, tls_etcd: Etcd, pki: Path, tmp_path: Path) -> None:
    """etcd over TLS with authentication on (user root, role root): an instance and
    ``fleet apply`` given ``HOTPROXY_ETCD_USER``/``HOTPROXY_ETCD_PASSWORD`` commit; a
    wrong password or none: one line, exit 1, nothing proposed."""
    async def main() -> None:
        from hotproxy import fleet as fleet_mod

        source = fleet_mod.with_tls(fleet_mod.parse_source(tls_etcd.url()), str(pki / "ca.pem"), None, None)
        client = await fleet_mod.connect(source)
        try:
            rpc: Any = __import__("aetcd.rpc", fromlist=["rpc"])
            auth = rpc.AuthStub(client.channel)
            await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="s3cret"), timeout=10)
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=10)
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
            await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)
        finally:
            await client.close()
        env = {"HOTPROXY_ETCD_USER": "root", "HOTPROXY_ETCD_PASSWORD": "s3cret"}
        url = tls_etcd.url()
        port = free_port()
        prog = start(toml({}, workers=1, admin="a.sock", config_source=url, instance_id="a",
                          etcd_ca=str(pki / "ca.pem")), name="a.toml", env=env)
        await prog.wait_ready()
        path = tmp_path / "fleet.toml"
        path.write_text(f'[services.e]\nkind = "echo"\nlisten = "127.0.0.1:{port}"\ngreeting = "au\\n"\n')
        cmd = ["fleet", "apply", "-c", str(path), "--etcd", url, "--etcd-ca", str(pki / "ca.pem")]

        async def cli(extra_env: dict[str, str]) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.cli", *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env={**prog.env, **extra_env})
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        for bad_env, why in (({"HOTPROXY_ETCD_PASSWORD": "wrong"}, "authentication failed"),
                             ({"HOTPROXY_ETCD_USER": "", "HOTPROXY_ETCD_PASSWORD": ""},
                              "user name is empty (the user and password: environment HOTPROXY_ETCD_USER and "
                              "HOTPROXY_ETCD_PASSWORD)")):
            code, out, err = await cli({**env, **bad_env})
            print(f"fleet apply with {bad_env}: {err.strip()}")
            assert code == 1 and err.count("\n") == 1 and why in err, out + err

        async def joined() -> bool:
            code, out, err = await cli(env)
            assert code in (0, 1), out + err
            return code == 0 and "a: committed revision" in out

        # (the instance joins within its first connect: the apply sees it as a member)
        await eventually(joined, timeout=60, interval=0.5)
        assert (await echo_roundtrip("127.0.0.1", port, b"x", greeting=3))[:3] == b"au\n"

    run(main(), timeout=240)


def test_bad_tls_options_are_one_line_and_nothing_starts_or_is_proposed(
        start: Start, pki: Path, tmp_path: Path) -> None:
    """TLS files with a plaintext etcd:// URL, a certificate without its key, a file that
    is missing or is not PEM: ``run`` and ``fleet apply`` exit 1 in one line naming the
    option or the file's key, before any connection to etcd."""
    async def main() -> None:
        prog = start(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{free_port()}"}}, workers=1))
        url = f"etcds://127.0.0.1:{free_port()}/hp"
        fleet_file = tmp_path / "f.toml"
        fleet_file.write_text(f'[services.e]\nkind = "echo"\nlisten = "127.0.0.1:{free_port()}"\n')
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n")
        ca, cert, key = str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
        for args, expect in (
                (["--etcd", url.replace("etcds", "etcd"), "--etcd-ca", ca],
                 "--etcd-ca: TLS to etcd needs an etcds:// URL"),
                (["--etcd", url, "--etcd-cert", cert], "--etcd-key: missing"),
                (["--etcd", url, "--etcd-ca", str(tmp_path / "nope.pem")], "--etcd-ca: No such file"),
                (["--etcd", url, "--etcd-ca", str(junk)], "--etcd-ca: not a PEM certificate"),
                (["--etcd", url, "--etcd-cert", ca, "--etcd-key", key], "--etcd-cert/--etcd-key: not a PEM"),
                (["--etcd", url.replace("etcds", "etcdz")], "not an etcd:// or etcds:// URL"),
        ):
            code, out, err = await prog.cli("fleet", "apply", "-c", str(fleet_file), *args)
            assert code == 1 and out == "" and err.count("\n") == 1 and expect in err, (args, err)
        for runtime, args, expect in (
                ({"config_source": url, "etcd_ca": "missing.pem"}, [], "f1.toml: runtime.etcd_ca: No such file"),
                ({"config_source": url.replace("etcds", "etcd"), "etcd_key": key}, [],
                 "f2.toml: runtime.etcd_key: TLS to etcd needs an etcds:// URL"),
                ({"config_source": url, "etcd_cert": cert}, [], "f3.toml: runtime.etcd_key: missing"),
                ({}, ["--etcd", url, "--etcd-ca", str(junk)], "--etcd-ca: not a PEM certificate"),
                ({}, ["--etcd-ca", ca], "--etcd-ca: only for a fleet instance"),
        ):
            name = f"f{len(list(tmp_path.glob('f?.toml'))) + 1}.toml"
            (tmp_path / name).write_text(toml({}, workers=1, admin=f"{name}.sock", **runtime))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.cli", "run", "-c", str(tmp_path / name), *args,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=prog.env)
            out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
            err = err_b.decode()
            assert proc.returncode == 1 and err.count("\n") == 1 and expect in err, (runtime, args, err)
            assert not (tmp_path / f"{name}.sock").exists()

    run(main(), timeout=120)

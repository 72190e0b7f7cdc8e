"""Certificates for the TLS tests, made by the ``openssl`` CLI: EC P-256, valid 2 days."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _key_args(d: Path) -> list[str]:
    cnf = d / "req.cnf"
    if not cnf.exists():
        cnf.write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = x\n")
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-config", str(cnf)]


def make_ca(d: Path, name: str, cn: str) -> None:
    """``d/NAME.pem`` and ``d/NAME.key``: a self-signed CA."""
    openssl("req", "-x509", *_key_args(d), "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"),
            "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")


def make_cert(d: Path, ca: str, name: str, cn: str, *addext: str) -> None:
    """``d/NAME.pem`` and ``d/NAME.key``: a leaf certificate signed by CA *ca*,
    with each of *addext* (``"subjectAltName=..."``) as an extension."""
    ext = [arg for value in addext for arg in ("-addext", value)]
    openssl("req", "-x509", *_key_args(d), "-CA", str(d / f"{ca}.pem"), "-CAkey", str(d / f"{ca}.key"),
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"), "-subj", f"/CN={cn}",
            "-addext", "basicConstraints=critical,CA:FALSE", *ext)

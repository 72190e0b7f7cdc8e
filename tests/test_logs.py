"""Log lines as an operator's tools read them: text, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from conftest import eventually, free_port, run
from helpers_program import Program, roundtrip, toml
from hotproxy.logs import JsonFormatter


def test_json_lines_carry_the_keys_and_the_service_fields() -> None:
    record = logging.LogRecord("hotproxy.access", logging.INFO, __file__, 1, "a %s line", ("quoted \"x\"",), None)
    record.__dict__.update(service="web", generation=3, client="127.0.0.1:5", bytes_in=10, private="left out")
    line = json.loads(JsonFormatter("worker[1]").format(record))
    assert line["msg"] == 'a quoted "x" line' and line["level"] == "info" and line["logger"] == "hotproxy.access"
    assert line["ts"].endswith("Z") and line["process"] == "worker[1]"
    assert (line["service"], line["generation"], line["client"], line["bytes_in"]) == ("web", 3, "127.0.0.1:5", 10)
    assert "private" not in line


def test_log_format_json_from_start_and_back_to_text_on_reload(tmp_path: Path) -> None:
    e, p = free_port(), free_port()
    services = {"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"},
                "p": {"kind": "proxy", "listen": f"127.0.0.1:{p}", "upstreams": [f"127.0.0.1:{e}"],
                      "access_log": True}}
    cfg = tmp_path / "hotproxy.toml"
    cfg.write_text(toml(services, log_format="json"))
    prog = Program(cfg, tmp_path / "hotproxy.log")
    try:
        async def main() -> None:
            await prog.wait_ready()
            assert await roundtrip(p, 0, b"json") == b"json"

            def access_lines() -> list[dict[str, object]]:
                out = []
                for line in prog.log().splitlines():
                    if line.startswith("{"):
                        doc = json.loads(line)
                        if doc["logger"] == "hotproxy.access":
                            out.append(doc)
                return out

            await eventually(access_lines)
            # every line hotproxy wrote is a JSON object with the four keys
            lines = [line for line in prog.log().splitlines() if line.strip()]
            docs = [json.loads(line) for line in lines]
            assert all({"ts", "level", "logger", "msg"} <= doc.keys() for doc in docs)
            assert {doc["process"] for doc in docs} >= {"master", "worker[0]"} or \
                {doc["process"] for doc in docs} >= {"master", "worker[1]"}
            line = access_lines()[0]
            assert "in=4 out=4" in line["msg"] and line["msg"].startswith("service p: ")
            # the access line's fields, as keys of their own
            assert (line["service"], line["upstream"], line["bytes_in"], line["bytes_out"], line["end"]) == \
                ("p", f"127.0.0.1:{e}", 4, 4, "eof"), line
            assert line["client"].startswith("127.0.0.1:") and line["duration"] >= 0
            # the connect time and the version's generation (the first commit is 1)
            assert line["generation"] == 1 and 0 <= line["connect_time"] <= line["duration"], line
            assert " connect=" in line["msg"] and " gen=1 time=" in line["msg"], line["msg"]
            assert line["msg"].endswith(" end=eof"), line["msg"]

            cfg.write_text(toml(services))   # log_format = "text" (the default)
            code, out, err = await prog.cli("reload", "-c", str(cfg))
            assert code == 0, out + err
            assert await roundtrip(p, 0, b"plain!") == b"plain!"

            def text_access() -> bool:
                return any("hotproxy.access: service p: 127.0.0.1:" in line and "in=6 out=6 connect=" in line
                           and re.search(r" connect=\d+\.\d{3}s gen=\d+ time=\d+\.\d{3}s end=eof$", line)
                           and not line.startswith("{")
                           for line in prog.log().splitlines())

            await eventually(text_access)

        run(main(), 60)
    finally:
        prog.kill()
        print(prog.log())

"""What a page on another site could make a user's browser send is refused before any handler (issue #33 items
2, 3 and 12): cross-site writes, DNS-rebinding hosts, writes from anonymous GETs; the Bearer scheme in any case."""
import pytest

from bitalloc.service.guard import refusal
from bitalloc.service.security import authorized


def _h(**headers):
    return {k.replace("_", "-").encode(): v.encode() for k, v in headers.items()}


@pytest.mark.parametrize("method,headers,loopback,status", [
    ("POST", _h(host="127.0.0.1:8321", content_type="text/plain"), True, 415),
    ("POST", _h(host="127.0.0.1:8321", content_type="application/x-www-form-urlencoded"), True, 415),
    ("POST", _h(host="127.0.0.1:8321"), True, 415),
    ("POST", _h(host="127.0.0.1:8321", content_type="application/json", origin="http://attacker.example"), True, 403),
    ("POST", _h(host="127.0.0.1:8321", content_type="application/json; charset=utf-8",
                origin="http://127.0.0.1:8321"), True, None),
    ("POST", _h(host="127.0.0.1:8321", content_type="application/json"), True, None),
    ("GET", _h(host="attacker.example:8321"), True, 403),
    ("GET", _h(host="localhost:8321"), True, None),
    ("GET", _h(host="[::1]:8321"), True, None),
    ("GET", _h(host="plans.team.example"), False, None),
    ("DELETE", _h(host="plans.team.example", origin="http://evil.example"), False, 403),
    ("DELETE", _h(host="127.0.0.1:8321"), True, None),
], ids=["text-plain", "form", "untyped", "foreign-origin", "own-origin", "json", "rebinding-host", "localhost",
        "ipv6-loopback", "team-host", "foreign-origin-delete", "delete-without-body"])
def test_the_guard_refuses_cross_site_requests(method, headers, loopback, status):
    refused = refusal(method, headers, loopback)
    assert (refused[0] if refused else None) == status
    if refused:
        assert "\n" not in refused[1]


def test_the_bearer_scheme_is_case_insensitive():
    assert authorized("bearer tok", "tok") and authorized("BEARER tok", "tok") and authorized("Bearer  tok ", "tok")
    assert not authorized("Basic tok", "tok") and not authorized("bearer other", "tok") and not authorized(None, "tok")


def test_a_real_server_refuses_them_and_a_get_never_writes(server, small_plan):
    from bitalloc.service.store import ExportRow, Store
    body = b'{"model": "refllama-s", "budget_bits": 3.0, "refine": 3600}'
    status, _, raw = server.call("POST", "/v1/plans", raw=body, headers={"Content-Type": "text/plain",
                                                                        "Origin": "http://attacker.example"})
    assert status == 415 and b"Content-Type: application/json" in raw
    status, _, _ = server.call("POST", "/v1/plans", raw=body, headers={"Content-Type": "application/json",
                                                                      "Origin": "http://attacker.example"})
    assert status == 403
    status, _, _ = server.call("GET", "/v1/models", headers={"Host": "rebound.example"})
    assert status == 403
    store = Store(f"sqlite:///{server.home}/store.db")
    with store.session() as s:
        before = s.query(ExportRow).count()
    for _ in range(3):
        status, _, _ = server.call("GET", f"/v1/plans/{small_plan[2]}/export/gptqmodel", token=None)
        assert status == 200
    with store.session() as s:
        assert s.query(ExportRow).count() == before


def test_serve_on_a_port_in_use_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    import socket

    from bitalloc.cli import main
    monkeypatch.setenv("BITALLOC_HOME", str(tmp_path / "home"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--port", str(port), "--models-root", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    assert "bitalloc serve:" not in out and not (tmp_path / "home").exists()       # no banner, no store made

"""The HTTP injection API (``POST /api/v1/inject``) and its OpenAPI
description, against a running ``impetus serve`` (issue 7)."""
from __future__ import annotations

import json
import pathlib
import socket

import pytest
import requests
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from impetus.http_api import OPENAPI, openapi_text
from tests.mta import MTA, free_port, wait_until

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent


class ApiMTA(MTA):
    def __init__(self, workdir, resolv_conf, body: str = "", **kw):
        self.http_port = free_port()
        body = f'HTTP_Listener {{ Listen "127.0.0.1:{self.http_port}" {{ }} }}\n' + body
        super().__init__(workdir, resolv_conf, body, **kw)
        self.base = f"http://127.0.0.1:{self.http_port}"

    def inject(self, **kw) -> requests.Response:
        return requests.post(self.base + "/api/v1/inject", timeout=30, **kw)

    def receptions(self) -> list[list[str]]:
        return self.mainlog.records("R")


MESSAGE = "From: <a@src.test>\nTo: <x@example.test>\nSubject: via HTTP\n\nHello over REST.\n"


def test_inject_json_is_spooled_delivered_and_logged_as_rest(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    with ApiMTA(tmp_path / "mta", dns_server.resolv_conf,
                f'Gateway = "127.0.0.5:{sink.port}"') as m:
        r = m.inject(json={"mail_from": "a@src.test",
                           "rcpt_to": ["x@example.test", "y@example.test"],
                           "content": MESSAGE})
        assert r.status_code == 202, r.text
        doc = r.json()
        assert [a["recipient"] for a in doc["accepted"]] == ["x@example.test", "y@example.test"]
        assert doc["rejected"] == []
        [msg] = sink.wait_for(1)
        assert sorted(msg["rcpt_tos"]) == ["x@example.test", "y@example.test"]
        assert msg["mail_from"] == "a@src.test"
        data = msg["data"]
        assert data.startswith(b"Received: from 127.0.0.1 ([127.0.0.1])")
        assert f"with HTTP id {doc['batch_id']}".encode() in data
        assert b"Subject: via HTTP\r\n\r\nHello over REST.\r\n" in data   # LF -> CRLF
        recs = m.receptions()
        assert len(recs) == 2
        assert all(rec[11] == "rest" for rec in recs)
        assert {rec[1] for rec in recs} == {a["message_id"] for a in doc["accepted"]}
        assert all(rec[2] == doc["batch_id"] for rec in recs)
        m.mainlog.wait_for("D", 2)
        # 8-bit content as base64, null sender
        raw = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode("latin-1")
        import base64
        r = m.inject(json={"mail_from": "", "rcpt_to": ["z@example.test"],
                           "content_base64": base64.b64encode(raw).decode()})
        assert r.status_code == 202, r.text
        msgs = sink.wait_for(2)
        assert msgs[1]["data"].endswith(raw)
        assert msgs[1]["mail_from"] in ("", "<>")


def test_inject_rfc822_envelope_from_query_or_headers(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    message = (b"From: Alice <alice@src.test>\r\nTo: Bob <bob@example.test>\r\n"
               b"Cc: carol@example.test\r\nSubject: rfc822\r\n\r\nbody\r\n")
    with ApiMTA(tmp_path / "mta", dns_server.resolv_conf,
                f'Gateway = "127.0.0.5:{sink.port}"') as m:
        r = m.inject(data=message, headers={"Content-Type": "message/rfc822"})
        assert r.status_code == 202, r.text
        assert [a["recipient"] for a in r.json()["accepted"]] == ["bob@example.test",
                                                                 "carol@example.test"]
        [msg] = sink.wait_for(1)
        assert msg["mail_from"] == "alice@src.test"
        r = m.inject(data=message, headers={"Content-Type": "message/rfc822"},
                     params={"mail_from": "bounces@src.test", "rcpt_to": ["dave@example.test"]})
        assert r.status_code == 202, r.text
        msgs = sink.wait_for(2)
        assert msgs[1]["mail_from"] == "bounces@src.test"
        assert msgs[1]["rcpt_tos"] == ["dave@example.test"]


def test_relay_denied_is_403_and_queues_nothing(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    body = f'Gateway = "127.0.0.5:{sink.port}"\nRelay_Domains = ( "ours.test" )\n'
    with ApiMTA(tmp_path / "mta", dns_server.resolv_conf, body,
                relay_hosts='"192.0.2.0/24"') as m:
        # SMTP and HTTP agree: 127.0.0.1 may not relay
        refused = m.send("a@src.test", ["x@example.test", "y@ours.test"])
        assert refused["x@example.test"][0] == 550
        r = m.inject(json={"mail_from": "a@src.test", "rcpt_to": ["x@example.test"],
                           "content": MESSAGE})
        assert r.status_code == 403
        assert r.headers["Content-Type"] == "application/json"
        doc = r.json()
        assert doc["status"] == 403 and "relaying denied" in doc["error"]
        assert doc["rejected"] == [{"recipient": "x@example.test",
                                    "reply": "550 5.7.1 relaying denied"}]
        # a Relay_Domains recipient is accepted, the other one listed as rejected
        r = m.inject(json={"mail_from": "a@src.test", "rcpt_to": ["x@example.test",
                                                                 "y@ours.test"],
                           "content": MESSAGE})
        assert r.status_code == 202, r.text
        assert [a["recipient"] for a in r.json()["accepted"]] == ["y@ours.test"]
        assert r.json()["rejected"][0]["recipient"] == "x@example.test"
        msgs = sink.wait_for(2)  # the SMTP one and the HTTP one, both for y@ours.test only
        assert [x["rcpt_tos"] for x in msgs] == [["y@ours.test"], ["y@ours.test"]]
        recs = m.receptions()
        assert [(rec[5], rec[11]) for rec in recs] == [("y", "esmtp"), ("y", "rest")]
        assert sum("relaying denied" in ln for ln in m.rejectlog.lines()) >= 3


def test_malformed_requests_get_4xx_json_and_queue_nothing(tmp_path, dns_server):
    with ApiMTA(tmp_path / "mta", dns_server.resolv_conf, 'Gateway = "127.0.0.9:1"') as m:
        good = {"mail_from": "a@src.test", "rcpt_to": ["x@example.test"], "content": MESSAGE}
        cases = [
            (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400,
             "not valid JSON"),
            (dict(data=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400,
             "not valid JSON"),
            (dict(json=["a list"]), 400, "must be an object"),
            (dict(json={**good, "rcpt_to": []}), 400, "rcpt_to"),
            (dict(json={**good, "rcpt_to": "x@example.test"}), 400, "rcpt_to"),
            (dict(json={k: v for k, v in good.items() if k != "content"}), 400, "exactly one"),
            (dict(json={**good, "content_base64": "eA=="}), 400, "exactly one"),
            (dict(json={**good, "extra": 1}), 400, "unknown field"),
            (dict(json={**good, "mail_from": 5}), 400, "mail_from"),
            (dict(json={**good, "rcpt_to": ["not an address"]}), 400, "bad recipient"),
            (dict(json={**good, "mail_from": "a@@b"}), 400, "bad mail_from"),
            (dict(json={**good, "content": "no header here\n\nbody"}), 400, "RFC 5322"),
            (dict(json={**good, "content": ""}), 400, "empty"),
            (dict(json={**good, "content": "Subject: x\n\n\x00"}), 400, "NUL"),
            (dict(json={k: v for k, v in good.items() if k != "content"} |
                  {"content_base64": "!!!"}), 400, "base64"),
            (dict(data=b"Subject: x\r\n\r\nno envelope\r\n",
                  headers={"Content-Type": "message/rfc822"}), 400, "no mail_from"),
            (dict(data=b"From: a@src.test\r\n\r\nno rcpt\r\n",
                  headers={"Content-Type": "message/rfc822"}), 400, "no rcpt_to"),
            (dict(data=b"From: a@src.test\r\n\r\nx\r\n", params={"bogus": "1"},
                  headers={"Content-Type": "message/rfc822"}), 400, "unknown query"),
            (dict(data=MESSAGE.encode(), headers={"Content-Type": "text/plain"}), 415,
             "unsupported media type"),
            (dict(data=MESSAGE.encode()), 415, "unsupported media type"),
            (dict(json=good, auth=("user", "pass")), 401, "authentication"),
        ]
        for kwargs, status, text in cases:
            r = m.inject(**kwargs)
            assert r.status_code == status, (kwargs, r.status_code, r.text)
            assert r.headers["Content-Type"] == "application/json"
            doc = r.json()
            assert doc["status"] == status and text in doc["error"], (kwargs, doc)
        assert 'Basic realm="impetus"' in r.headers["WWW-Authenticate"]
        # other resources and methods
        assert requests.get(m.base + "/api/v1/inject", timeout=10).status_code == 405
        assert requests.get(m.base + "/nothing", timeout=10).json()["status"] == 404
        # a request that is not HTTP at all
        with socket.create_connection(("127.0.0.1", m.http_port), timeout=10) as s:
            s.sendall(b"EHLO me\r\n\r\n")
            assert s.recv(200).startswith(b"HTTP/1.1 400")
        # nothing was queued
        assert m.receptions() == []
        metrics = requests.get(m.base + "/metrics", timeout=10).text
        assert "impetus_messages_received_total{" not in metrics


def test_openapi_document_is_served_and_kept_in_docs(tmp_path, dns_server):
    assert (ROOT / "docs" / "openapi.json").read_text() == openapi_text(), \
        "docs/openapi.json is stale: python -m impetus.http_api > docs/openapi.json"
    with ApiMTA(tmp_path / "mta", dns_server.resolv_conf) as m:
        r = requests.get(m.base + "/api/v1/openapi.json", timeout=10)
        assert r.status_code == 200
        assert r.json() == json.loads(openapi_text())


# ---------------------------------------------------------------------------
# schemathesis against the OpenAPI description: no 5xx, responses as documented

_rfc822 = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda subject, body: f"From: a@src.test\r\nTo: x@example.test\r\n"
                                    f"Subject: {subject}\r\n\r\n{body}\r\n".encode(),
              st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
              st.text(max_size=200)))
schemathesis.openapi.media_type("message/rfc822", _rfc822)

schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def api_mta(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    resolv = work / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1#{free_port()}\noptions timeout:1 attempts:1\n")
    # Suspend_Delivery: whatever gets queued stays queued (no DNS, no peers).
    m = ApiMTA(work / "mta", str(resolv), 'Suspend_Delivery = true\nGateway = "127.0.0.9:1"\n'
                                          'Relay_Domains = ( "example.test" )')
    m.start()
    yield m
    m.stop()


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error(case, api_mta):
    response = case.call(base_url=api_mta.base)
    assert response.status_code < 500, (response.status_code, response.text)
    # Every default check (status codes, content types and response bodies as
    # documented, schema-invalid requests refused with 4xx) except
    # positive_data_acceptance: the schema cannot say which strings are
    # mailbox addresses or RFC 5322 messages, and those are 400s by design.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


def test_schemathesis_left_the_server_healthy(api_mta):
    r = requests.get(api_mta.base + "/metrics", timeout=10)
    assert r.status_code == 200
    assert api_mta.proc.poll() is None
    wait_until(lambda: "impetus starting" in "\n".join(api_mta.paniclog.lines()), 5)
    assert "internal error" not in "\n".join(api_mta.paniclog.lines())


def test_basic_auth_over_https_relays_like_smtp_auth(tmp_path, dns_server, smtp_sinks, certs):
    from impetus.auth import set_password
    pwfile = tmp_path / "smtp.passwd"
    set_password(str(pwfile), "alice", "wonderland")
    sink = smtp_sinks(("127.0.0.5",))
    https = free_port()
    body = (f'Gateway = "127.0.0.5:{sink.port}"\n'
            f'ESMTP_Listener {{ Auth_Password_File = "{pwfile}" }}\n'
            f'HTTP_Listener {{ Listen "127.0.0.1:{https}" {{ TLS_Certificate = '
            f'"{certs.server_crt}" TLS_Key = "{certs.server_key}" }} }}\n')
    with ApiMTA(tmp_path / "mta", dns_server.resolv_conf, body,
                relay_hosts='"192.0.2.0/24"') as m:
        url = f"https://127.0.0.1:{https}/api/v1/inject"
        msg = {"mail_from": "a@src.test", "rcpt_to": ["x@example.test"], "content": MESSAGE}
        # no credentials: relaying denied, as for an unauthenticated SMTP client
        r = requests.post(url, json=msg, verify=certs.ca_pem, timeout=30)
        assert r.status_code == 403
        # wrong password
        r = requests.post(url, json=msg, verify=certs.ca_pem, timeout=30,
                          auth=("alice", "looking-glass"))
        assert r.status_code == 401 and r.json()["error"] == "authentication credentials invalid"
        # good credentials over HTTPS: may relay
        r = requests.post(url, json=msg, verify=certs.ca_pem, timeout=30,
                          auth=("alice", "wonderland"))
        assert r.status_code == 202, r.text
        [got] = sink.wait_for(1)
        assert got["rcpt_tos"] == ["x@example.test"]
        # the same credentials over plain HTTP are refused, as AUTH without TLS is
        r = m.inject(json=msg, auth=("alice", "wonderland"))
        assert r.status_code == 401 and "plain HTTP" in r.json()["error"]
        assert [rec[11] for rec in m.receptions()] == ["rest"]

"""The ``HTTP_Listener``: Prometheus ``/metrics`` and the injection API.

Endpoints (described for machines in :data:`OPENAPI`, served at
``/api/v1/openapi.json`` and kept in ``docs/openapi.json``)::

    GET  /metrics                 Prometheus text format (impetus.metrics)
    GET  /api/v1/openapi.json     the OpenAPI 3.0 description
    POST /api/v1/inject           queue one message

``POST /api/v1/inject`` takes either

* ``Content-Type: application/json``:
  ``{"mail_from": "a@example.com", "rcpt_to": ["b@example.net"], "content": "<RFC 5322 message>"}``
  (``mail_from`` ``""`` is the null sender; ``content_base64`` may replace
  ``content`` for 8-bit messages), or
* ``Content-Type: message/rfc822`` with the message as the body and the
  envelope in the query (``?mail_from=a@example.com&rcpt_to=b@example.net``,
  ``rcpt_to`` repeatable); without them the envelope comes from the
  ``From:`` and ``To:``/``Cc:``/``Bcc:`` headers.

Relay control and authentication are the SMTP listener's (the first
``ESMTP_Listener`` ``Listen``, or the global ``Relay_Hosts`` when there is
none): the same policy object decides, for a session whose client is the
HTTP client's address. HTTP Basic credentials are checked like SMTP AUTH
PLAIN (the listener's ``Auth_Password_File``) and, when they are good,
relay like an authenticated SMTP client; like SMTP AUTH they are accepted
only under TLS: an HTTPS ``Listen`` (``TLS_Certificate``/``TLS_Key`` in the
``HTTP_Listener`` or its ``Listen``). The
message gets our ``Received:`` header (``with HTTP``), the binding headers
and policy hook apply (D3), it is committed to the spool before the reply,
and the mainlog ``R`` line has protocol ``rest``.

Replies are JSON: ``202`` ``{"batch_id", "accepted": [{"recipient",
"message_id"}], "rejected": [{"recipient", "reply"}]}``; errors
``{"error": "...", "status": N}`` with 400 (malformed), 401 (bad
credentials), 403 (relaying denied), 404, 405, 413 (too large), 415 (media
type), 431 (request line or headers over 64 KiB), 503 (temporarily refused: spool or ``Default_Binding = none``).
Nothing is queued unless the reply is 202.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import email.utils
import json
import logging
import os
import re
import sys
import time
from urllib.parse import parse_qs, urlsplit

import h11

from .smtp.crlf import to_crlf

log = logging.getLogger("impetus.http")

READ_TIMEOUT = 30.0
DEFAULT_MAX_BODY = 64 << 20
MAX_RECIPIENTS = 1000

OPENAPI: dict = {
    "openapi": "3.0.3",
    "info": {
        "title": "Impetus HTTP API",
        "version": "1",
        "description": "Message injection and metrics of the Impetus MTA (HTTP_Listener). "
                       "Relay control and authentication are those of its SMTP listener.",
    },
    "paths": {
        "/api/v1/inject": {
            "post": {
                "operationId": "inject",
                "summary": "Queue one message for delivery",
                "description": "The message is committed to the spool before the reply. "
                               "Recipients the relay policy refuses are listed in `rejected`; "
                               "when every recipient is refused nothing is queued (403).",
                "security": [{}, {"basicAuth": []}],
                "parameters": [
                    {"name": "mail_from", "in": "query", "required": False,
                     "description": "Envelope sender for message/rfc822 bodies "
                                    "(empty: null sender). Default: the From: header.",
                     "schema": {"type": "string", "maxLength": 320}},
                    {"name": "rcpt_to", "in": "query", "required": False,
                     "description": "Envelope recipients for message/rfc822 bodies. "
                                    "Default: the To:, Cc: and Bcc: headers.",
                     "style": "form", "explode": True,
                     "schema": {"type": "array", "maxItems": 100,
                                "items": {"type": "string", "maxLength": 320}}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/InjectRequest"}},
                        "message/rfc822": {
                            "schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "202": {"description": "Queued",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/InjectResult"}}}},
                    "400": {"$ref": "#/components/responses/Error"},
                    "401": {"$ref": "#/components/responses/Error"},
                    "403": {"$ref": "#/components/responses/Error"},
                    "413": {"$ref": "#/components/responses/Error"},
                    "415": {"$ref": "#/components/responses/Error"},
                    "431": {"$ref": "#/components/responses/Error"},
                    "503": {"$ref": "#/components/responses/Error"},
                },
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This OpenAPI description",
                "responses": {"200": {"description": "OpenAPI 3.0 document",
                                      "content": {"application/json": {
                                          "schema": {"type": "object"}}}}},
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "responses": {"200": {"description": "Metrics",
                                      "content": {"text/plain": {
                                          "schema": {"type": "string"}}}}},
            },
        },
    },
    "components": {
        "securitySchemes": {
            "basicAuth": {"type": "http", "scheme": "basic",
                          "description": "Checked like SMTP AUTH PLAIN by the SMTP listener "
                                         "(Auth_Password_File), only over HTTPS as SMTP AUTH "
                                         "only under TLS; an authenticated client may relay."},
        },
        "schemas": {
            "InjectRequest": {
                "type": "object",
                "required": ["mail_from", "rcpt_to"],
                "additionalProperties": False,
                "description": "Exactly one of content and content_base64.",
                "properties": {
                    "mail_from": {"type": "string", "maxLength": 320,
                                  "description": "Envelope sender; empty for the null sender."},
                    "rcpt_to": {"type": "array", "minItems": 1, "maxItems": MAX_RECIPIENTS,
                                "items": {"type": "string", "maxLength": 320}},
                    "content": {"type": "string",
                                "description": "The RFC 5322 message (headers, blank line, body)."},
                    "content_base64": {"type": "string",
                                       "description": "The message, base64 (for 8-bit data)."},
                },
            },
            "InjectResult": {
                "type": "object",
                "required": ["batch_id", "accepted", "rejected"],
                "properties": {
                    "batch_id": {"type": "string"},
                    "accepted": {"type": "array", "items": {
                        "type": "object", "required": ["recipient", "message_id"],
                        "properties": {"recipient": {"type": "string"},
                                       "message_id": {"type": "string"}}}},
                    "rejected": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Rejection"}},
                },
            },
            "Rejection": {
                "type": "object", "required": ["recipient", "reply"],
                "properties": {"recipient": {"type": "string"}, "reply": {"type": "string"}},
            },
            "Error": {
                "type": "object", "required": ["error", "status"],
                "properties": {
                    "error": {"type": "string"},
                    "status": {"type": "integer"},
                    "rejected": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Rejection"}},
                },
            },
        },
        "responses": {
            "Error": {"description": "Refused; nothing was queued",
                      "content": {"application/json": {
                          "schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    },
}


def openapi_text() -> str:
    return json.dumps(OPENAPI, indent=2, sort_keys=False) + "\n"


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, headers=(), **extra):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.extra = extra


_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")


def normalise_message(data: bytes) -> bytes:
    """CRLF line ends (bare CR/LF become CRLF, as at SMTP reception), a
    final CRLF; checks the message starts with a header field."""
    if not data.strip():
        raise HttpError(400, "the message is empty")
    if b"\x00" in data:
        raise HttpError(400, "the message contains NUL bytes")
    data = to_crlf(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if not _HEADER_LINE.match(data):
        raise HttpError(400, "the content is not an RFC 5322 message: it must start with a "
                             "header field (Name: value)")
    return data


def server_tls_context(lc):
    """HTTPS when the ``HTTP_Listener`` or its ``Listen`` sets
    ``TLS_Certificate`` (and ``TLS_Key`` unless the key is in the same file).
    A global ``TLS_Certificate`` is the outbound client certificate: it does
    not count here."""
    def own(name):
        for sc in (lc.scope, lc.listener_scope):
            value = sc.get(name)
            if value is not None:
                return value
        return None
    cert = own("tls_certificate")
    if not cert or cert == "none":
        return None
    key = own("tls_key")
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, None if not key or key == "none" else key)
    return ctx


class _GlobalRelayPolicy:
    """Relay control when there is no ESMTP listener to borrow it from:
    the global ``Relay_Hosts`` and ``Relay_Domains``; no AUTH."""

    def __init__(self, config, rejectlog, connids):
        self.relay_hosts = list(config.lookup("Relay_Hosts") or [])
        self.relay_domains = list(config.lookup("Relay_Domains") or [])
        self.rejectlog = rejectlog
        self.connids = connids

    def check_connect(self, session):
        session.conn_id = self.connids.next()

    def check_mail(self, session, addr, params):
        return None

    def check_rcpt(self, session, addr, params):
        import ipaddress
        from .listener import RELAYING_DENIED, domain_matches
        try:
            ip = ipaddress.ip_address(session.peer_ip)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if any(ip.version == n.version and ip in n for n in self.relay_hosts):
                return None
        except ValueError:
            pass
        if addr.domain and any(domain_matches(addr.domain, p) for p in self.relay_domains):
            return None
        return RELAYING_DENIED

    def on_reject(self, session, reply, phase):
        self.rejectlog.reject(remote=(session.peer_ip, session.peer_port),
                              local=(session.local_ip, session.local_port),
                              connid=session.conn_id, code=reply.code, text=str(reply),
                              phase=phase, module="http_listener")


async def close_sessions(sessions: dict) -> None:
    """Close the connections of running session tasks and let them end
    (cancelling a ``start_server`` callback task makes asyncio log it)."""
    for writer in list(sessions.values()):
        transport = writer.transport
        if transport is not None:
            transport.abort()
    pending = list(sessions)
    if pending:
        done, still = await asyncio.wait(pending, timeout=2)
        for t in still:
            t.cancel()


class HttpServer:
    """HTTP/1.1 (h11) on every enabled ``HTTP_Listener`` ``Listen``."""

    def __init__(self, server):
        self.server = server
        self.servers: list = []
        self.paths: list[str] = []
        self.tasks: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._shadow = None   # (config, Listener) for the relay policy in split mode
        from .spool import IdGenerator
        self.connids = IdGenerator(shard=97)

    async def start(self, listeners) -> None:
        for lc in listeners:
            handler = lambda r, w, lc=lc: self._connection(r, w)  # noqa: E731
            try:
                if lc.path is not None:
                    from .control import ControlServer
                    ControlServer._remove_stale(lc.path)
                    srv = await asyncio.start_unix_server(handler, lc.path)
                    mode = lc.lookup("File_Mode")
                    os.chmod(lc.path, 0o660 if mode is None else mode)
                    self.paths.append(lc.path)
                else:
                    ctx = server_tls_context(lc)
                    tls = {"ssl": ctx, "ssl_handshake_timeout": READ_TIMEOUT} if ctx else {}
                    srv = await asyncio.start_server(handler, lc.host, lc.port,
                                                     reuse_address=True, **tls)
            except OSError as exc:
                raise OSError(f"HTTP_Listener Listen \"{lc.address}\": "
                              f"{exc.strerror or exc}") from None
            self.servers.append(srv)
            print(f"impetus: http listening on {lc.address}", flush=True)

    async def stop(self) -> None:
        for srv in self.servers:
            srv.close()
        await close_sessions(self.tasks)
        for p in self.paths:
            try:
                os.unlink(p)
            except OSError:
                pass

    # -- HTTP plumbing -----------------------------------------------------------
    def _max_body(self) -> int:
        limit = self._settings().max_message_size or 0
        if limit <= 0:
            return DEFAULT_MAX_BODY
        return limit * 4 // 3 + (1 << 20)  # base64/JSON overhead

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self.tasks[task] = writer
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("sockname")
        peer = peer if isinstance(peer, tuple) else ("127.0.0.1", 0)
        tls = writer.get_extra_info("ssl_object") is not None
        sock = sock if isinstance(sock, tuple) else ("127.0.0.1", 0)
        try:
            while True:
                try:
                    request, body = await self._read_request(conn, reader, writer)
                except HttpError as exc:
                    await self._send(conn, writer, exc.status,
                                     *self._json_error(exc.status, str(exc)), close=True)
                    return
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        status = exc.error_status_hint or 400
                        await self._send(conn, writer, status,
                                         *self._json_error(status, f"bad HTTP request: {exc}"),
                                         close=True)
                    return
                if request is None:
                    return
                try:
                    status, headers, payload = await self._dispatch(request, body, peer, sock,
                                                                    tls)
                except HttpError as exc:
                    status, (headers, payload) = exc.status, self._json_error(
                        exc.status, str(exc), **exc.extra)
                    headers += exc.headers
                except Exception:  # never answer a client with a traceback
                    log.exception("HTTP request failed")
                    self.server.logs.paniclog.panic("HTTP API: internal error (see stderr)")
                    status, (headers, payload) = 500, self._json_error(500, "internal error")
                await self._send(conn, writer, status, headers, payload,
                                 head=request.method == b"HEAD")
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self.tasks.pop(task, None)
            writer.close()

    async def _read_request(self, conn, reader, writer):
        request = None
        chunks: list[bytes] = []
        size = 0
        limit = self._max_body()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100,
                                                                     headers=[])))
                data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None, b""
            if isinstance(event, h11.Request):
                request = event
                for name, value in event.headers:
                    if name == b"content-length" and value.isdigit() and int(value) > limit:
                        raise HttpError(413, f"request body larger than {limit} bytes")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(413, f"request body larger than {limit} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(chunks)
            elif event is h11.PAUSED:
                return None, b""

    @staticmethod
    def _json_error(status: int, message: str, **extra):
        doc = {"error": message, "status": status, **extra}
        headers = [("content-type", "application/json")]
        if status == 401:
            headers.append(("www-authenticate", 'Basic realm="impetus"'))
        return headers, json.dumps(doc).encode()

    async def _send(self, conn, writer, status, headers, payload, *, close=False, head=False):
        headers = list(headers) + [("content-length", str(len(payload))),
                                   ("server", "impetus")]
        if close:
            headers.append(("connection", "close"))
        try:
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            if payload and not head:
                writer.write(conn.send(h11.Data(data=payload)))
            writer.write(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            return
        await writer.drain()

    # -- routing ---------------------------------------------------------------------
    async def _dispatch(self, req, body: bytes, peer, sock, tls: bool = False):
        target = req.target.decode("ascii", "replace")
        parts = urlsplit(target)
        path = parts.path
        method = req.method.decode("ascii", "replace").upper()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        routes = {"/metrics": ("GET",), "/api/v1/openapi.json": ("GET",),
                  "/api/v1/inject": ("POST",)}
        allowed = routes.get(path)
        if allowed is None:
            raise HttpError(404, f"no such resource: {path}")
        if method == "HEAD" and "GET" in allowed:
            method = "GET"
        if method not in allowed:
            allow = ", ".join(("GET", "HEAD") if "GET" in allowed else allowed)
            raise HttpError(405, f"method {method} not allowed on {path}; use {allow}",
                            headers=[("allow", allow)])
        if path == "/metrics":
            from .metrics import CONTENT_TYPE
            payload = self.server.metrics.render() if self.server.metrics else b""
            return 200, [("content-type", CONTENT_TYPE)], payload
        if path == "/api/v1/openapi.json":
            return 200, [("content-type", "application/json")], openapi_text().encode()
        result = await self.inject(headers, parts.query, body, peer, sock, tls)
        return 202, [("content-type", "application/json")], json.dumps(result).encode()

    # -- the SMTP listener's policy --------------------------------------------------
    def _listener(self):
        """The ESMTP listener whose relay policy and AUTH apply."""
        if self.server.listeners:
            return self.server.listeners[0]
        config = self.server.config
        if self._shadow is None or self._shadow[0] is not config:
            from .listener import Listener
            shadow = None
            if config.listeners:
                shadow = Listener(config.listeners[0], config, self.server.spool,
                                  self.server.logs, lambda *a: None,
                                  hostname=self.server.hostname, assigner=self.server.assigner)
            self._shadow = (config, shadow)
        return self._shadow[1]

    def _settings(self):
        lst = self._listener()
        if lst is not None:
            return lst.settings
        from .smtp.server import ServerSettings
        return ServerSettings(hostname=self.server.hostname,
                              max_message_size=self.server.config.lookup("Max_Message_Size") or 0)

    def _policy(self):
        lst = self._listener()
        if lst is not None:
            return lst.policy
        return _GlobalRelayPolicy(self.server.config, self.server.logs.rejectlog, self.connids)

    # -- POST /api/v1/inject -----------------------------------------------------------
    def _envelope(self, headers: dict, query: str, body: bytes):
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                doc = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise HttpError(400, f"the body is not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise HttpError(400, "the JSON body must be an object")
            unknown = set(doc) - {"mail_from", "rcpt_to", "content", "content_base64"}
            if unknown:
                raise HttpError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
            sender = doc.get("mail_from")
            rcpts = doc.get("rcpt_to")
            if not isinstance(sender, str):
                raise HttpError(400, "mail_from must be a string (\"\" for the null sender)")
            if not isinstance(rcpts, list) or not rcpts or not all(
                    isinstance(r, str) for r in rcpts):
                raise HttpError(400, "rcpt_to must be a non-empty list of addresses")
            has_c, has_b = "content" in doc, "content_base64" in doc
            if has_c == has_b:
                raise HttpError(400, "give exactly one of content and content_base64")
            if has_c:
                if not isinstance(doc["content"], str):
                    raise HttpError(400, "content must be a string")
                try:
                    data = doc["content"].encode("utf-8")
                except UnicodeEncodeError:
                    raise HttpError(400, "content is not valid Unicode text") from None
            else:
                if not isinstance(doc["content_base64"], str):
                    raise HttpError(400, "content_base64 must be a string")
                try:
                    data = base64.b64decode(doc["content_base64"], validate=True)
                except (binascii.Error, ValueError):
                    raise HttpError(400, "content_base64 is not valid base64") from None
            return sender, rcpts, normalise_message(data)
        if ctype == "message/rfc822":
            data = normalise_message(body)
            q = parse_qs(query, keep_blank_values=True)
            unknown = set(q) - {"mail_from", "rcpt_to"}
            if unknown:
                raise HttpError(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")
            if len(q.get("mail_from", [])) > 1:
                raise HttpError(400, "mail_from given more than once")
            head = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
            if "mail_from" in q:
                sender = q["mail_from"][0]
            else:
                found = email.utils.getaddresses(head.get_all("from", []))
                sender = next((a for _, a in found if a), None)
                if sender is None:
                    raise HttpError(400, "no mail_from parameter and no From: address")
            if "rcpt_to" in q:
                rcpts = q["rcpt_to"]
            else:
                fields = []
                for name in ("to", "cc", "bcc"):
                    fields += head.get_all(name, [])
                rcpts = [a for _, a in email.utils.getaddresses(fields) if a]
                if not rcpts:
                    raise HttpError(400, "no rcpt_to parameter and no To:/Cc:/Bcc: addresses")
            return sender, rcpts, data
        raise HttpError(415, f"unsupported media type {ctype or '(none)'}: use "
                             "application/json or message/rfc822")

    @staticmethod
    def _parse(addr: str, what: str, null_ok: bool = False):
        from .smtp.address import AddressError, parse_path
        if null_ok and addr in ("", "<>"):
            return None
        try:
            return parse_path(addr.strip(), allow_null=False, smtputf8=True)
        except AddressError as exc:
            raise HttpError(400, f"bad {what} {addr[:100]!r}: {exc}") from None

    async def _authenticate(self, headers, policy, session, settings) -> None:
        auth = headers.get("authorization")
        if auth is None:
            return
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            raise HttpError(401, "only Basic authentication is supported")
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise HttpError(401, "malformed Basic credentials") from None
        if not sep or not user:
            raise HttpError(401, "malformed Basic credentials")
        mechs = [m.upper() for m in (getattr(settings, "auth_mechanisms", ()) or ())]
        if "PLAIN" not in mechs:
            raise HttpError(401, "authentication is not enabled (the SMTP listener offers no "
                                 "AUTH PLAIN)")
        plaintext_ok = (not getattr(settings, "require_tls_for_auth", True)
                        or getattr(settings, "auth_without_tls", False))
        if not session.tls and not plaintext_ok:
            raise HttpError(401, "authentication over plain HTTP is refused, as SMTP AUTH "
                                 "without TLS is: use an HTTPS Listen (TLS_Certificate)")
        check = getattr(policy, "check_auth", None)
        result = check(session, "PLAIN", user, password) if check else False
        if asyncio.iscoroutine(result):
            result = await result
        if result is not True:
            raise HttpError(401, "authentication credentials invalid")
        session.authenticated = user
        session.auth_mechanism = "PLAIN"

    async def inject(self, headers: dict, query: str, body: bytes, peer, sock,
                     tls: bool = False) -> dict:
        from .smtp.reply import Reply
        from .smtp.server import Session
        from .spool import SpoolError, Submission
        sender_text, rcpt_texts, data = self._envelope(headers, query, body)
        if len(rcpt_texts) > MAX_RECIPIENTS:
            raise HttpError(400, f"more than {MAX_RECIPIENTS} recipients")
        sender = self._parse(sender_text, "mail_from", null_ok=True)
        rcpt_addrs = [self._parse(r, "recipient") for r in rcpt_texts]
        settings = self._settings()
        if settings.max_message_size and len(data) > settings.max_message_size:
            raise HttpError(413, f"message size {len(data)} exceeds the limit of "
                                 f"{settings.max_message_size} bytes")
        policy = self._policy()
        session = Session(peer_ip=peer[0], peer_port=peer[1], local_ip=sock[0],
                          local_port=sock[1], helo="", protocol="rest")
        if tls:
            session.set_tls({})
        refused = policy.check_connect(session)
        if isinstance(refused, Reply):
            raise HttpError(403, str(refused))
        await self._authenticate(headers, policy, session, settings)
        from .smtp.address import NULL_ADDRESS
        refused = policy.check_mail(session, sender or NULL_ADDRESS, {})
        if isinstance(refused, Reply):
            policy.on_reject(session, refused, "mail")
            raise HttpError(403, str(refused))
        accepted, rejected = [], []
        for text, addr in zip(rcpt_texts, rcpt_addrs):
            reply = policy.check_rcpt(session, addr, {})
            if isinstance(reply, Reply):
                policy.on_reject(session, reply, "rcpt")
                rejected.append({"recipient": text, "reply": str(reply)})
            elif str(addr) not in accepted:
                accepted.append(str(addr))
        if not accepted:
            raise HttpError(403, "relaying denied for every recipient", rejected=rejected)
        server = self.server
        spool = server.spool
        batch_id = spool.ids.next()
        mail_from = str(sender) if sender is not None else ""
        for_clause = f"\r\n\tfor <{accepted[0]}>" if len(accepted) == 1 else ""
        received = (f"Received: from {peer[0]} ([{peer[0]}])\r\n"
                    f"\tby {server.hostname} (Impetus) with HTTP id {batch_id}{for_clause};"
                    f" {email.utils.formatdate(time.time())}\r\n")
        data, binding = server.assigner.assign(data, mail_from, accepted, peer[0], "")
        if binding == "default" and server.config.lookup("Default_Binding") == "none":
            raise HttpError(503, "no binding assigned to this message (Default_Binding = none)")
        data = received.encode("utf-8", "surrogateescape") + data
        sub = Submission(sender=mail_from, recipients=accepted, body=data, peer_ip=peer[0],
                         proto="rest", helo="", binding=binding,
                         group=server.config.group_of(binding), batch_id=batch_id)
        try:
            msgs = await spool.accept(sub)
        except SpoolError as exc:
            server.logs.paniclog.panic(f"HTTP injection from {peer[0]} failed: {exc}")
            raise HttpError(503, "temporary failure writing the message to the spool") from None
        for m in msgs:
            server.logs.mainlog.reception(m.msgid, m.batch_id, session.conn_id, m.rcpt, m.sender,
                                          m.peer_ip, m.size, "rest", m.group, m.binding)
        server.scheduler.submit(msgs, data)
        return {"batch_id": batch_id,
                "accepted": [{"recipient": m.rcpt, "message_id": m.msgid} for m in msgs],
                "rejected": rejected}


def main(argv=None) -> int:
    """``python -m impetus.http_api > docs/openapi.json``."""
    sys.stdout.write(openapi_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

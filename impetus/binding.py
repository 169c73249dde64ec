"""Binding assignment at reception (spec §2.5, decisions D2 and D3).

Order, as Momentum's policy phases run: the ``X-Binding-Group`` /
``X-Binding`` headers (group wins, D3), then the operator's policy hook
``set_binding(message)`` from ``Policy_Module``, which may override. A group
resolves to one of its bindings round-robin over the non-suspended ones
(D2). Both headers are removed from the stored message, so they are never
relayed. Unknown names leave the message on ``default`` with a warning.

The hook API mirrors Momentum's Lua ``msg:binding()``/``msg:binding_group()``::

    # policy.py, named by  Policy_Module = "policy.py"
    def set_binding(message):
        if message.mail_from.endswith("@customer1.example"):
            message.binding("customer-1")          # True if it exists
        elif message.headers.get("X-Campaign") == "bulk":
            message.binding_group("pool-a")

``message`` has ``mail_from``, ``rcpt_to`` (list), ``headers`` (an
``email.message.Message`` of the header block), ``peer_ip``, ``helo`` and
``current_binding``. A hook that raises is logged to the paniclog and the
message keeps the assignment it had.
"""
from __future__ import annotations

import email.parser
import email.policy
import importlib.util
import itertools
import logging
import re

log = logging.getLogger("impetus.binding")

_HEADER_RE = re.compile(rb"^(x-binding|x-binding-group)[ \t]*:", re.I)


def header_block_end(body: bytes) -> int:
    """Index just past the blank line ending the header block (or len)."""
    i = body.find(b"\r\n\r\n")
    return len(body) if i < 0 else i + 4


def strip_binding_headers(body: bytes) -> tuple[bytes, str | None, str | None]:
    """Remove X-Binding/X-Binding-Group (with continuation lines) from the
    header block; returns (new body, binding, group)."""
    end = header_block_end(body)
    head = body[:end]
    if b"x-binding" not in head.lower():
        return body, None, None
    lines = head.split(b"\r\n")
    out, binding, group = [], None, None
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        m = _HEADER_RE.match(line)
        if m:
            value = line[m.end():].strip().decode("utf-8", "replace")
            if m.group(1).lower() == b"x-binding":
                binding = binding or value
            else:
                group = group or value
            skipping = True
            continue
        out.append(line)
    return b"\r\n".join(out) + body[end:], binding, group


class PolicyMessage:
    """What the ``set_binding`` hook sees and can change."""

    def __init__(self, assigner: "BindingAssigner", mail_from, rcpt_to, head: bytes, peer_ip,
                 helo, binding):
        self._assigner = assigner
        self.mail_from = mail_from
        self.rcpt_to = list(rcpt_to)
        self.peer_ip = peer_ip
        self.helo = helo
        self.current_binding = binding
        self._head = head
        self._headers = None

    @property
    def headers(self):
        if self._headers is None:
            self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                self._head)
        return self._headers

    def binding(self, name: str) -> bool:
        if name not in self._assigner.config.bindings:
            return False
        self.current_binding = name
        return True

    def binding_group(self, name: str) -> bool:
        chosen = self._assigner.pick_from_group(name)
        if chosen is None:
            return False
        self.current_binding = chosen
        return True


class BindingAssigner:
    def __init__(self, config, paniclog, policy_path: str | None = None):
        self.config = config
        self.paniclog = paniclog
        self._rr: dict[str, itertools.count] = {}
        self.hook = load_policy_hook(policy_path) if policy_path else None

    def suspended(self, binding: str) -> bool:
        return bool(self.config.lookup("Suspend_Delivery", binding=binding))

    def pick_from_group(self, group: str) -> str | None:
        """D2: round-robin over non-suspended bindings; all suspended -> all."""
        members = self.config.groups.get(group)
        if not members:
            return None
        live = [b for b in members if not self.suspended(b)] or members
        counter = self._rr.setdefault(group, itertools.count())
        return live[next(counter) % len(live)]

    def assign(self, body: bytes, mail_from: str, rcpt_to, peer_ip: str, helo: str):
        """Returns (body without binding headers, binding name)."""
        body, hdr_binding, hdr_group = strip_binding_headers(body)
        binding = "default"
        if hdr_group is not None:
            chosen = self.pick_from_group(hdr_group)
            if chosen is None:
                self.paniclog.panic(f"X-Binding-Group: unknown binding group {hdr_group!r}; "
                                    f"message stays on binding 'default'")
            else:
                binding = chosen
        elif hdr_binding is not None:
            if hdr_binding in self.config.bindings:
                binding = hdr_binding
            else:
                self.paniclog.panic(f"X-Binding: unknown binding {hdr_binding!r}; "
                                    f"message stays on binding 'default'")
        if self.hook is not None:
            msg = PolicyMessage(self, mail_from, rcpt_to, body[:header_block_end(body)], peer_ip,
                                helo, binding)
            try:
                self.hook(msg)
                binding = msg.current_binding
            except Exception as exc:  # an operator's bug must not lose mail
                log.exception("set_binding hook failed")
                self.paniclog.panic(f"Policy_Module set_binding failed: {exc!r}; "
                                    f"message keeps binding {binding!r}")
        return body, binding


def load_policy_hook(path: str):
    spec = importlib.util.spec_from_file_location("impetus_policy", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"Policy_Module {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hook = getattr(module, "set_binding", None)
    if not callable(hook):
        raise ValueError(f"Policy_Module {path}: defines no set_binding(message) function")
    return hook

"""Property tests: arbitrary input never escapes as anything but ConfigError."""

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impetus.config import Config, ConfigError, load_config, load_config_string

# Token-ish fragments, so random text gets deep into the parser and validator
# ('include' is left out on purpose: random include paths could read anything).
FRAGMENTS = [
    " ", "\n", "\t", "=", "{", "}", "(", ")", "[", "]", '"', "'", "\\", "#", "/*", "*/", "/",
    "\x00", "Binding", "Binding_Group", "Domain", "Host", "ESMTP_Listener", "Listen", "Peer",
    "Control_Listener", "ec_logger", "bounce_logger", "mxip", "Retry_Interval", "Max_Retries",
    "Relay_Hosts", "Relay_Domains", "Use_IPv6", "Min_DNS_TTL", "Max_DNS_TTL", "Gateway",
    "Enable", "mainlog", "mainlog_mode", "Remote_SMTP_Port", "Max_Outbound_Connections",
    "Bounces_Inline_Original", "Outbound_Throttle_Messages", "Context", '"b"', '"g"',
    '"/^a(/"', '"/x/"', '"example.com"', '":25"', '"[::1]:25"', '"/tmp/s"', '"10.0.0.0/8"',
    "0", "1", "-1", "0644", "0999", "70000", "auto", "true", "maybe", "5/0", "::1", "é",
    "\ufeff", "\u2028", "\ud7ff",
    "Routes", "Delivery_Method", "LMTP_Port", "Prohibited_Hosts", "Skip_Hosts",
    "MX_Failures_Fallback_To_A", '"__mx__"', '"smtp://a?pref=1&ttl=2"', '"smtp://[::1]:25"',
    '"lmtp://h?port=24"', '"smtp://fe80::1"', '"apn://x"', "?", "&", "pref=", "lmtp", "ecstream",
]

fragments = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)


def check_text(text: str) -> None:
    try:
        result = load_config_string(text, "fuzz.conf")
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            s = str(issue)
            assert s.startswith(f"{issue.file}:{issue.line}:{issue.col}: ")
            assert issue.line >= 1 and issue.col >= 1
    else:
        assert isinstance(result, Config)
        # lookups on whatever was accepted must work too
        result.lookup("Retry_Interval", domain="example.com", binding="b")
        for lc in result.listeners:
            lc.lookup("Relay_Hosts")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fragments)
def test_token_soup_raises_only_config_error(text):
    check_text(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_raises_only_config_error(text):
    check_text(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_config_error(data):
    fd, path = tempfile.mkstemp(suffix=".conf")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.issues
    finally:
        os.unlink(path)


def test_deeply_nested_arrays_and_braces():
    for text in ("(" * 5000, "{" * 5000, "a = " + "(" * 5000, "}" * 5000, "[" * 5000,
                 'Binding "b" {' * 5000, "a = [ " + "k = ( " * 2000):
        check_text(text)


def test_long_lines_and_many_statements():
    check_text("Retry_Interval = 5\n" * 20000)
    check_text("x" * 200000)
    check_text('"' + "a" * 200000)

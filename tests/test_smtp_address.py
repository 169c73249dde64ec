import pytest

from impetus.smtp.address import (
    AddressError,
    domain_of,
    parse_address,
    parse_params,
    parse_path,
    split_argument,
)


@pytest.mark.parametrize(
    "path, address, domain",
    [
        ("<user@Example.COM>", "user@example.com", "example.com"),
        ("<User.Name+tag@example.com>", "User.Name+tag@example.com", "example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com', "example.com"),
        ('<"john.doe"@example.com>', "john.doe@example.com", "example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com', "example.com"),
        ("<@relay1.example,@relay2.example:user@Final.example>", "user@final.example", "final.example"),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]", "[192.0.2.1]"),
        ("<user@[IPv6:2001:DB8::0:1]>", "user@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("user@example.com", "user@example.com", "example.com"),
        ("<a_b@sub_domain.example>", "a_b@sub_domain.example", "sub_domain.example"),
    ],
)
def test_paths(path, address, domain):
    a = parse_path(path)
    assert a.address == address
    assert a.domain == domain
    assert str(a) == address


def test_ipv6_literal_domain_is_canonical():
    # the "IPv6:" tag keeps its RFC 5321 spelling; the address is compressed, lower-case
    a = parse_path("<user@[ipv6:2001:DB8:0:0:0:0:0:1]>")
    assert a.domain == "[IPv6:2001:db8::1]"


def test_null_path():
    a = parse_path("<>")
    assert a.is_null and a.address == "" and a.domain == ""
    with pytest.raises(AddressError):
        parse_path("<>", allow_null=False)


def test_smtputf8():
    with pytest.raises(AddressError):
        parse_path("<ü@bücher.de>")
    a = parse_path("<Ü@Bücher.DE>", smtputf8=True)
    assert a.address == "Ü@bücher.de"
    assert a.domain == "bücher.de"


def test_unqualified():
    with pytest.raises(AddressError):
        parse_path("<postmaster>")
    a = parse_path("<postmaster>", allow_unqualified=True)
    assert a.address == "postmaster" and a.domain == ""


@pytest.mark.parametrize(
    "bad",
    [
        "<", "<a@b", "a@b>", "<@>", "<a@>", "<@b>", "<a b@c>", "<a@b c>", "<a@-b.com>",
        "<a@b..com>", "<a@[1.2.3]>", "<a@[IPv6:zz]>", "<a@[foo:bar]>", "<\"unterminated@x>",
        "<a@b@c>", "<@a:>", "<@a,b:c@d>", "<a\x00@b>", "<a@b\x7f>", "<(comment)a@b>",
        "<\"x\"y@b>", "<a@" + "x" * 64 + ".com>", "<a@" + ("abc." * 70) + "com>",
    ],
)
def test_garbage(bad):
    with pytest.raises(AddressError):
        parse_path(bad)


def test_require_brackets():
    with pytest.raises(AddressError):
        parse_path("a@b", require_brackets=True)


def test_parse_address_direct():
    assert parse_address("x@Y.org").domain == "y.org"
    with pytest.raises(AddressError):
        parse_address("")


def test_split_argument():
    assert split_argument("<a@b> SIZE=10 BODY=8BITMIME") == ("<a@b>", "SIZE=10 BODY=8BITMIME")
    assert split_argument(" <a@b>") == ("<a@b>", "")
    assert split_argument('<"x> y"@b> SIZE=1') == ('<"x> y"@b>', "SIZE=1")
    assert split_argument("a@b SIZE=1") == ("a@b", "SIZE=1")
    for bad in ("", "<a@b", "<a@b>junk"):
        with pytest.raises(AddressError):
            split_argument(bad)


def test_params():
    assert parse_params("SIZE=123 BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "123", "BODY": "8BITMIME", "SMTPUTF8": None}
    assert parse_params("size=1  body=7bit") == {"SIZE": "1", "BODY": "7bit"}
    assert parse_params("") == {}
    for bad in ("SIZE=", "=1", "SIZE=1 SIZE=2", "A_B=1", "-X=1", "K=a=b", "K=\x01"):
        with pytest.raises(AddressError):
            parse_params(bad)
    with pytest.raises(AddressError):
        parse_params("ENVID=ü")
    assert parse_params("ENVID=ü", smtputf8=True) == {"ENVID": "ü"}


def test_domain_of():
    assert domain_of("a@B.com") == "b.com"
    assert domain_of("postmaster") == ""

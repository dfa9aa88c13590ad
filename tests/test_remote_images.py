"""Remote images without server-side request forgery (server/remote.py, server/media.py), against HTTP(S)
servers on 127.0.0.1 only: the address guard in every spelling, the allow-list, redirects, the deadline, the
byte cap, TLS against the host name, concurrent loads. The guard's override (allow_private_hosts) lets the
positive cases reach 127.0.0.1; every refusal checks that the target server saw no request. Names that would
need DNS go through a stubbed resolver: no test sends anything to an address other than loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import subprocess
import threading
import time

import pytest

from idefics2.server.errors import APIError
from idefics2.server.media import LOADS_AT_ONCE, UNUSABLE_URL, MediaPolicy, load_images
from idefics2.server.remote import (
    RemoteImageError,
    RemotePolicy,
    address_refusal,
    checked_addresses,
    domain_pattern,
    fetch_remote,
    host_allowed,
)
from server_utils import TargetServer, answer, redirect

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
DEADLINE = 0.5


def private_ok(**changes) -> RemotePolicy:
    """The guard's override, so that the 127.0.0.1 test servers can be reached; a short deadline."""
    return RemotePolicy(allow_private_hosts=True, deadline_s=DEADLINE, **changes)


def fetch(url: str, policy: RemotePolicy) -> bytes:
    return asyncio.run(fetch_remote(url, policy))


def refused(url: str, policy: RemotePolicy) -> RemoteImageError:
    with pytest.raises(RemoteImageError) as error:
        fetch(url, policy)
    return error.value


def stub_resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host in table:
            return table[host]
        try:
            return [str(ipaddress.ip_address(host))]  # a literal address is its own answer
        except ValueError:
            raise OSError(f"stub: no address for {host}") from None

    return resolve


# ---------------------------------------------------------------------------------------- the address guard
REFUSED_ADDRESSES = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "100.127.255.254", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",
    "192.0.2.1", "198.18.0.1", "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1",
    "ff0e::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:db8::1",
]  # fmt: skip
GLOBAL_ADDRESSES = ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_the_guard_refuses_every_internal_range_and_the_ipv6_forms_that_carry_one(address):
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", GLOBAL_ADDRESSES)
def test_the_guard_lets_public_unicast_addresses_through(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_names_are_resolved_once_and_refused_if_any_address_is_internal():
    calls: list[str] = []
    resolve = stub_resolver({
        "metadata.internal.test": ["169.254.169.254"],
        "rebind.test": ["93.184.215.14", "10.0.0.7"],  # one public address does not make it safe
        "mapped.test": ["::ffff:192.168.0.1"],
        "public.test": ["93.184.215.14", "2606:4700::1111"],
    }, calls)  # fmt: skip
    policy = RemotePolicy(resolver=resolve)
    for host in ("metadata.internal.test", "rebind.test", "mapped.test"):
        with pytest.raises(RemoteImageError) as error:
            asyncio.run(checked_addresses(host, 80, policy))
        assert error.value.reason == "forbidden_address"
    for host in ("localhost", "api.localhost"):  # loopback by definition: not looked up
        with pytest.raises(RemoteImageError):
            asyncio.run(checked_addresses(host, 80, policy))
    addresses = asyncio.run(checked_addresses("public.test", 443, policy))
    assert [str(a) for a in addresses] == ["93.184.215.14", "2606:4700::1111"]
    assert calls == ["metadata.internal.test", "rebind.test", "mapped.test", "public.test"]
    with pytest.raises(RemoteImageError) as error:
        asyncio.run(checked_addresses("nowhere.test", 80, policy))
    assert error.value.reason == "name_not_resolved"
    override = RemotePolicy(resolver=resolve, allow_private_hosts=True)
    assert [str(a) for a in asyncio.run(checked_addresses("rebind.test", 80, override))] == [
        "93.184.215.14", "10.0.0.7",
    ]  # fmt: skip


@pytest.fixture
def target():
    with TargetServer({"/img.png": answer(PNG), "/admin/delete": answer(b"deleted", "text/plain")}) as server:
        yield server


SPELLINGS = ["127.0.0.1", "localhost", "LocalHost.", "2130706433", "0x7f.1", "0x7f000001", "017700000001",
             "0177.0.0.1", "127.1", "0.0.0.0", "0", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
             "[0:0:0:0:0:ffff:127.0.0.1]", "[::]"]  # fmt: skip


@pytest.mark.parametrize("host", SPELLINGS)
def test_every_spelling_of_loopback_is_refused_before_any_connection(target, host):
    error = refused(f"http://{host}:{target.port}/img.png", RemotePolicy(deadline_s=DEADLINE))
    assert error.reason == "forbidden_address"
    assert target.requests == []


def test_the_override_reaches_the_internal_host_and_sends_its_name(target):
    assert fetch(f"http://127.0.0.1:{target.port}/img.png", private_ok()) == PNG
    resolve = stub_resolver({"images.test": ["127.0.0.1"]})
    assert fetch(f"http://images.test:{target.port}/img.png", private_ok(resolver=resolve)) == PNG
    assert target.requests == [
        ("/img.png", f"127.0.0.1:{target.port}"),
        ("/img.png", f"images.test:{target.port}"),
    ]


# ------------------------------------------------------------------------------------------- the allow-list
def test_allow_list_patterns():
    assert domain_pattern("Images.Example.COM.") == "images.example.com"
    assert domain_pattern("*.example.com") == "*.example.com"
    assert domain_pattern("[::1]") == "::1" and domain_pattern("bücher.example") == "xn--bcher-kva.example"
    for bad in ("", "*", "*.", "a.*.com", "exa mple.com", "http://example.com", "example.com/x", "-a.com"):
        with pytest.raises(ValueError):
            domain_pattern(bad)
    patterns = ("example.com", "*.cdn.example.net")
    assert host_allowed("example.com", patterns) and host_allowed("a.b.cdn.example.net", patterns)
    for host in ("www.example.com", "cdn.example.net", "evilcdn.example.net", "example.com.evil.test"):
        assert not host_allowed(host, patterns)


def test_allow_list_on_the_first_hop_and_on_every_redirect():
    with TargetServer({"/img.png": answer(PNG)}) as internal:
        internal_url = f"http://127.0.0.1:{internal.port}/img.png"  # not the allowed host name
        resolve = stub_resolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        with TargetServer({"/img.png": answer(PNG), "/away": redirect(internal_url),
                           "/elsewhere": redirect("http://other.test:1/img.png")}) as images:  # fmt: skip
            policy = private_ok(allowed_domains=("images.test",), resolver=resolve)
            assert fetch(f"http://images.test:{images.port}/img.png", policy) == PNG
            assert refused(f"http://127.0.0.1:{images.port}/img.png", policy).reason == "domain_not_allowed"
            assert refused(f"http://other.test:{images.port}/img.png", policy).reason == "domain_not_allowed"
            assert refused(f"http://images.test:{images.port}/away", policy).reason == "domain_not_allowed"
            assert (
                refused(f"http://images.test:{images.port}/elsewhere", policy).reason == "domain_not_allowed"
            )
            assert [path for path, _ in images.requests] == ["/img.png", "/away", "/elsewhere"]
        assert internal.requests == []


# ---------------------------------------------------------------------------------------------- redirects
def test_redirects_are_followed_at_most_max_redirects_times():
    hops = {f"/r{i}": redirect(f"/r{i + 1}") for i in range(5)}
    hops["/r5"] = redirect("/img.png", 307)
    hops["/img.png"] = answer(PNG)
    with TargetServer(hops) as images:
        assert fetch(f"{images.base}/r3", private_ok()) == PNG  # 3 redirects
        error = refused(f"{images.base}/r2", private_ok())  # 4
        assert error.reason == "too_many_redirects"
        assert refused(f"{images.base}/r5", private_ok(max_redirects=0)).reason == "too_many_redirects"
        assert fetch(f"{images.base}/r5", private_ok(max_redirects=1)) == PNG
        assert [path for path, _ in images.requests] == [
            "/r3", "/r4", "/r5", "/img.png", "/r2", "/r3", "/r4", "/r5", "/r5", "/r5", "/img.png",
        ]  # fmt: skip


def test_a_redirect_to_an_internal_address_is_refused_at_that_hop(target, monkeypatch):
    """The issue's attack: a public host redirects to an internal service. The first hop stands in for the
    public host (the guard is told its loopback address is public, once); the redirect names 127.0.0.1 and
    is refused at that hop: the internal service sees nothing."""
    from idefics2.server import remote

    seen: list[str] = []
    guard = remote.address_refusal

    def first_hop_public(address):
        seen.append(str(address))
        return None if len(seen) == 1 else guard(address)

    monkeypatch.setattr(remote, "address_refusal", first_hop_public)
    with TargetServer({"/go": redirect(f"http://127.0.0.1:{target.port}/admin/delete?x=1")}) as hop:
        resolve = stub_resolver({"public.test": ["127.0.0.1"]})
        error = refused(
            f"http://public.test:{hop.port}/go", RemotePolicy(deadline_s=DEADLINE, resolver=resolve)
        )
        assert error.reason == "forbidden_address" and seen == ["127.0.0.1", "127.0.0.1"]
        assert [path for path, _ in hop.requests] == ["/go"]
    assert target.requests == []


def test_redirects_to_other_schemes_are_refused():
    routes = {"/file": redirect("file:///etc/passwd"), "/gopher": redirect("gopher://x/"),
              "/broken": redirect("http://[::1/x")}  # fmt: skip
    with TargetServer(routes) as hop:
        for path in ("/file", "/gopher", "/broken"):
            assert refused(hop.base + path, private_ok()).reason == "redirect_refused"


# -------------------------------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for images.test and 127.0.0.1 (the openssl command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
               "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.test",
               "-addext", "subjectAltName=DNS:images.test,IP:127.0.0.1"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


@pytest.fixture
def https_images(certificate, target):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    routes = {"/img.png": answer(PNG), "/down": redirect(f"http://127.0.0.1:{target.port}/img.png")}
    with TargetServer(routes, tls=context) as server:
        yield server, ssl.create_default_context(cafile=str(cert))


def test_https_is_verified_against_the_host_name_at_the_checked_address(https_images, target):
    server, trusting = https_images
    resolve = stub_resolver({"images.test": ["127.0.0.1"], "impostor.test": ["127.0.0.1"]})
    policy = private_ok(resolver=resolve, tls=trusting)
    assert fetch(f"https://images.test:{server.port}/img.png", policy) == PNG
    assert fetch(f"https://127.0.0.1:{server.port}/img.png", policy) == PNG
    assert refused(f"https://impostor.test:{server.port}/img.png", policy).reason == "tls_failed"
    untrusted = private_ok(resolver=resolve)  # the system's trust store: a self-signed certificate fails
    assert refused(f"https://images.test:{server.port}/img.png", untrusted).reason == "tls_failed"
    assert len(server.requests) == 2


def test_an_https_to_http_redirect_is_refused(https_images, target):
    server, trusting = https_images
    error = refused(f"https://127.0.0.1:{server.port}/down", private_ok(tls=trusting))
    assert error.reason == "redirect_refused"
    assert [path for path, _ in server.requests] == ["/down"] and target.requests == []


# ------------------------------------------------------------------------------- deadline and the byte cap
def drip(headers_first: bool):
    """A route that sends one byte every 0.1 s for 5 s: after its headers, or the status line itself."""

    def respond(handler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 50\r\n\r\n"
        if headers_first:
            handler.wfile.write(head)
            head = b""
        try:
            for byte in head + b"x" * 50:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            handler.server.cut_at = time.monotonic()
            raise

    return respond


@pytest.mark.parametrize("headers_first", [True, False])
def test_a_dripping_server_is_cut_at_the_deadline(headers_first):
    with TargetServer({"/drip": drip(headers_first)}) as server:
        server.httpd.cut_at = None
        start = time.monotonic()
        error = refused(f"{server.base}/drip", private_ok())
        elapsed = time.monotonic() - start
        assert error.reason == "timeout" and DEADLINE <= elapsed < DEADLINE + 0.3
        deadline = time.monotonic() + 2
        while server.httpd.cut_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # the connection was closed at the deadline: the server's next byte (0.1 s later at most) failed
        assert server.httpd.cut_at is not None and server.httpd.cut_at - start < DEADLINE + 0.5


def test_the_byte_cap_before_and_while_reading():
    def endless(handler) -> None:  # no Content-Length: the body goes on until the client stops reading
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        for _ in range(1000):
            handler.wfile.write(b"x" * 4096)

    def announced(handler) -> None:  # a Content-Length above the cap, then a body that comes slowly
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        for _ in range(50):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    with TargetServer({"/endless": endless, "/announced": announced, "/img.png": answer(PNG)}) as server:
        policy = private_ok(max_bytes=len(PNG))
        assert fetch(f"{server.base}/img.png", policy) == PNG
        assert refused(f"{server.base}/img.png", private_ok(max_bytes=len(PNG) - 1)).reason == "too_large"
        assert refused(f"{server.base}/endless", policy).reason == "too_large"
        start = time.monotonic()
        assert refused(f"{server.base}/announced", policy).reason == "too_large"
        assert time.monotonic() - start < 0.3  # on the headers, not after the body


def test_answers_that_are_not_images():
    routes = {"/page": answer(b"<html>", "text/html"), "/gone": answer(b"", "image/png", 404),
              "/garbage": lambda handler: handler.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")}  # fmt: skip
    with TargetServer(routes) as server:
        assert refused(f"{server.base}/page", private_ok()).reason == "not_an_image"
        assert refused(f"{server.base}/gone", private_ok()).reason == "http_status"
        assert refused(f"{server.base}/garbage", private_ok()).reason == "bad_response"
    from idefics2.server.process import free_port

    assert refused(f"http://127.0.0.1:{free_port()}/x.png", private_ok()).reason == "connect_failed"
    for url in ("http://:80/x", "http://127.0.0.1:99999/x", "ftp://127.0.0.1/x", "http://[::1/x"):
        assert refused(url, private_ok()).reason == "bad_url"


# ------------------------------------------------------------------------------- a request's images at once
def test_the_images_of_a_request_load_concurrently_a_few_at_a_time():
    busy, most, lock = 0, 0, threading.Lock()

    def slow(handler) -> None:
        nonlocal busy, most
        with lock:
            busy += 1
            most = max(most, busy)
        time.sleep(0.2)
        with lock:
            busy -= 1
        answer(PNG)(handler)

    with TargetServer({"/slow.png": slow, "/img.png": answer(PNG)}) as server:
        policy = MediaPolicy(remote=RemotePolicy(allow_private_hosts=True, deadline_s=5))
        urls = [(f"{server.base}/slow.png?{i}", f"images[{i}]") for i in range(2 * LOADS_AT_ONCE)]
        start = time.monotonic()
        images = asyncio.run(load_images(urls, policy, lambda reason: None))
        elapsed = time.monotonic() - start
        assert images == [PNG] * len(urls) and most == LOADS_AT_ONCE
        assert elapsed < 0.2 * len(urls) / 2  # one at a time would take 0.2 s each
        failures: list[str] = []
        bad = [(f"{server.base}/img.png", "a"), ("http://127.0.0.1:1/x.png", "b")]
        with pytest.raises(APIError) as error:
            asyncio.run(load_images(bad, MediaPolicy(remote=RemotePolicy()), failures.append))
        assert error.value.message == UNUSABLE_URL and error.value.param in ("a", "b")
        assert failures == ["forbidden_address"] * len(failures) and failures

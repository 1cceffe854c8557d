"""Remote media fetched safely (`imagine.api.remote`), against real HTTP servers on loopback: every refused address
class, as a literal and as a name resolving to it (names are mapped by patching `socket.getaddrinfo`: real DNS
cannot be steered here), and behind a redirect from an allowed host, is refused with a 400 naming the field and
without connecting; an allowed host serves images and videos; limits on size, time, redirects; sniffing; pinning
(one lookup per hop, the connection to the checked address, the Host header the name)."""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import threading
import time

import pytest
from PIL import Image

from imagine.api.errors import ApiError
from imagine.api.intake import IMAGE, VIDEO
from imagine.api.remote import check_address, fetch_media
from imagine.config import RemoteMediaConfig

REFUSED = [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "169.254.1.1",
    "100.64.1.1", "100.100.100.200", "192.0.0.192", "0.0.0.0", "0.1.2.3", "224.0.0.1", "255.255.255.255",
    "198.18.0.1", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "fec0::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "::127.0.0.1", "2001::1", "2001:db8::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED)
def test_refused_address_classes(address):
    assert check_address(ipaddress.ip_address(address)) is not None, address


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address):
    assert check_address(ipaddress.ip_address(address)) is None, address


class Media(http.server.BaseHTTPRequestHandler):
    """path -> (status, headers, body, delay_s); records each request's path and Host."""

    routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}
    seen: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802
        Media.seen.append((self.path, self.headers.get("Host", "")))
        status, headers, body, delay = Media.routes.get(self.path, (404, {}, b"", 0.0))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if headers.get("Transfer-Encoding") == "chunked":
            for i in range(0, len(body), 4096):
                piece = body[i:i + 4096]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        for i in range(0, len(body), 1024):
            if delay:
                time.sleep(delay)
            try:
                self.wfile.write(body[i:i + 1024])
            except (BrokenPipeError, ConnectionResetError):
                return

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Media)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def names(monkeypatch):
    """Map host names to addresses (and count lookups) by patching the resolver."""
    table: dict[str, list[str]] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in table:
            lookups.append(host)
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    Media.seen.clear()
    return table, lookups


def _png(size=(32, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 2000


def _config(**overrides) -> RemoteMediaConfig:
    return RemoteMediaConfig(**{"allow_http": True, "total_timeout_s": 5.0, **overrides})


def _refused(url: str, config: RemoteMediaConfig, code: str = "remote_url_forbidden", kind=IMAGE) -> ApiError:
    with pytest.raises(ApiError) as caught:
        fetch_media(url, "image.url", kind, 1 << 20, config)
    assert caught.value.param == "image.url" and caught.value.code == code, caught.value.body
    assert 400 <= caught.value.status < 500
    return caught.value


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254", "[::ffff:127.0.0.1]", "10.0.0.1",
                                  "localhost", "[64:ff9b::7f00:1]"])
def test_literal_and_local_hosts_are_refused_without_connecting(server, names, host):
    Media.routes["/x.png"] = (200, {}, _png(), 0.0)
    error = _refused(f"http://{host}:{server}/x.png", _config())
    assert "10.0.0.1" not in error.message or host == "10.0.0.1"  # names an address only where the user gave it
    assert Media.seen == []


def test_names_resolving_to_refused_addresses_are_refused(server, names):
    table, _ = names
    Media.routes["/x.png"] = (200, {}, _png(), 0.0)
    table.update({"evil.test": ["127.0.0.1"], "rebind.test": ["93.184.215.14", "127.0.0.1"],
                  "meta.test": ["169.254.169.254"], "v6.test": ["::ffff:10.0.0.1"]})
    for host in table:
        error = _refused(f"http://{host}:{server}/x.png", _config())
        assert "resolves to" in error.message and "127.0.0.1" not in error.message
    assert Media.seen == []


def test_an_allowed_host_serves_images_and_videos_pinned_to_its_checked_address(server, names):
    table, lookups = names
    table["media.test"] = ["127.0.0.1"]
    png = _png()
    Media.routes.update({"/a.png": (200, {"Content-Type": "image/png"}, png, 0.0),
                         "/a.mp4": (200, {"Content-Type": "text/plain"}, MP4, 0.0)})  # sniffed, not the header
    config = _config(allow_hosts=["MEDIA.test"])
    assert fetch_media(f"http://media.test:{server}/a.png", "image.url", IMAGE, 1 << 20, config) == png
    assert fetch_media(f"http://media.test:{server}/a.mp4", "video.url", VIDEO, 1 << 20, config) == MP4
    assert lookups == ["media.test", "media.test"]  # once per fetch
    assert Media.seen == [("/a.png", f"media.test:{server}"), ("/a.mp4", f"media.test:{server}")]


def test_redirects_are_checked_again_and_bounded(server, names):
    table, _ = names
    table.update({"media.test": ["127.0.0.1"], "inner.test": ["10.0.0.7"]})
    config = _config(allow_hosts=["media.test"], max_redirects=2)
    Media.routes.update({
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"", 0.0),
        "/to-inner": (301, {"Location": f"http://inner.test:{server}/x.png"}, b"", 0.0),
        "/to-loopback-literal": (307, {"Location": f"http://127.0.0.1:{server}/x.png"}, b"", 0.0),
        "/loop": (302, {"Location": "/loop"}, b"", 0.0),
        "/hop1": (302, {"Location": "/hop2"}, b"", 0.0),
        "/hop2": (302, {"Location": "/x.png"}, b"", 0.0),
        "/x.png": (200, {}, _png(), 0.0),
    })
    for path in ("/to-metadata", "/to-inner", "/to-loopback-literal"):
        _refused(f"http://media.test:{server}{path}", config)
    _refused(f"http://media.test:{server}/loop", config, code="remote_fetch_failed")
    assert fetch_media(f"http://media.test:{server}/hop1", "image.url", IMAGE, 1 << 20, config) == _png()
    assert ("/x.png", f"127.0.0.1:{server}") not in Media.seen  # the refused literal hop never connected


def test_size_time_and_content_limits(server, names):
    table, _ = names
    table["media.test"] = ["127.0.0.1"]
    big = _png() + b"\x00" * 300_000
    Media.routes.update({
        "/html.png": (200, {"Content-Type": "image/png"}, b"<!doctype html><html>hello</html>", 0.0),
        "/big-chunked.png": (200, {"Transfer-Encoding": "chunked"}, big, 0.0),
        "/big-declared.png": (200, {"Content-Length": str(10**9)}, _png(), 0.0),
        "/slow.png": (200, {}, _png() + b"\x00" * 20_000, 0.2),
        "/missing.png": (404, {}, b"", 0.0),
    })
    config = _config(allow_hosts=["media.test"], total_timeout_s=1.0)
    base = f"http://media.test:{server}"
    _refused(f"{base}/html.png", config, code="invalid_image")
    for path in ("/big-chunked.png", "/big-declared.png"):
        with pytest.raises(ApiError) as caught:
            fetch_media(base + path, "image.url", IMAGE, 100_000, config)
        assert caught.value.status == 413 and caught.value.param == "image.url"
    began = time.monotonic()
    _refused(f"{base}/slow.png", config, code="remote_fetch_failed")
    assert time.monotonic() - began < 3.0
    error = _refused(f"{base}/missing.png", config, code="remote_fetch_failed")
    assert "404" in error.message


def test_schemes_credentials_and_switches(server, names):
    _refused("ftp://example.test/x.png", _config(), code="unsupported_image_url")
    _refused("http://example.test/x.png", _config(allow_http=False), code="unsupported_image_url")
    _refused("https://user:pw@example.test/x.png", _config(), code="invalid_image_url")
    _refused("https://:99999999/x.png", _config(), code="invalid_image_url")


def test_https_verifies_the_certificate_of_the_name(names):
    """A TLS server on loopback with a self-signed certificate: the fetch fails verification (400), it does not
    accept whatever answers at the pinned address."""
    import ssl
    import subprocess

    table, _ = names
    table["tls.test"] = ["127.0.0.1"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    listener.settimeout(5)
    cert_dir = __import__("tempfile").mkdtemp()
    proc = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=tls.test",
                           "-keyout", f"{cert_dir}/k.pem", "-out", f"{cert_dir}/c.pem", "-days", "1"],
                          capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        pytest.fail(f"openssl could not make a test certificate: {proc.stderr[-300:]}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(f"{cert_dir}/c.pem", f"{cert_dir}/k.pem")

    def serve_once():
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    error = _refused(f"https://tls.test:{port}/x.png", _config(allow_hosts=["tls.test"]), code="remote_fetch_failed")
    assert "SSL" in error.message or "Connect" in error.message
    thread.join(5)
    listener.close()

"""The read-only range reader: local files, blobs in Azurite through SAS URLs, and HTTP failure modes."""

from __future__ import annotations

import datetime as dt
import http.server
import io
import random
import threading
import urllib.parse

import pytest

from scripts.base import rangeio
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangeio import open_source

DATA = random.Random(1).randbytes(300 * 1024 + 123)  # not a multiple of the block size


@pytest.fixture
def local(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    return path


# -- local files ----------------------------------------------------------------------------------


def test_random_reads_match_the_file(local):
    rng = random.Random(2)
    with open_source(str(local)) as reader:
        assert reader.size == len(DATA) and reader.readable() and reader.seekable() and not reader.writable()
        for _ in range(200):
            offset = rng.randrange(len(DATA) + 100)
            size = rng.choice([1, 7, 4096, 5000, 70000])
            assert reader.read_at(offset, size) == DATA[offset:offset + size]


def test_file_object_semantics(local):
    with open_source(local) as reader:
        assert reader.seek(-10, io.SEEK_END) == len(DATA) - 10
        assert reader.read() == DATA[-10:]
        assert reader.read(5) == b""  # at EOF
        reader.seek(100)
        buffer = bytearray(50)
        assert reader.readinto(buffer) == 50 and bytes(buffer) == DATA[100:150]
        assert reader.tell() == 150
        reader.seek(10, io.SEEK_CUR)
        assert reader.read(3) == DATA[160:163]
        with pytest.raises(ValueError):
            reader.seek(-1)
        with pytest.raises(io.UnsupportedOperation):
            reader.write(b"x")
        # a library wrapping it in the standard buffered reader gets the same bytes
        reader.seek(0)
        assert io.BufferedReader(reader).read() == DATA
    with pytest.raises(ValueError):
        reader.read_at(0, 1)


def test_only_missing_blocks_are_fetched(local):
    with open_source(str(local), block_size=4096) as reader:
        reader.read_at(5000, 10)  # block 1
        assert (reader.bytes_read, reader.requests) == (4096, 1)
        reader.read_at(4096, 4096)  # same block: from the cache
        assert (reader.bytes_read, reader.requests) == (4096, 1)
        reader.read_at(0, 3 * 4096)  # blocks 0 and 2 are missing: two requests, block 1 is reused
        assert (reader.bytes_read, reader.requests) == (3 * 4096, 3)
        reader.read_at(len(DATA) - 1, 10)  # the short last block
        assert reader.bytes_read == 3 * 4096 + len(DATA) % 4096


def test_cache_is_bounded(local):
    with open_source(str(local), block_size=4096, cache_bytes=8192) as reader:
        reader.read_at(0, 4096)
        reader.read_at(4096, 4096)
        reader.read_at(8192, 4096)  # evicts block 0
        reader.read_at(0, 10)
        assert reader.requests == 4


def test_missing_file_directory_and_unsupported_scheme(tmp_path):
    with pytest.raises(CrashcartError) as missing:
        open_source(str(tmp_path / "nope.dmp"))
    assert missing.value.exit_code == ExitCode.USAGE and "no such file" in missing.value.message
    assert "blob URL" in missing.value.hint
    with pytest.raises(CrashcartError, match="is a directory") as directory:
        open_source(str(tmp_path))
    assert directory.value.exit_code == ExitCode.USAGE
    with pytest.raises(CrashcartError, match="only local paths and http"):
        open_source("ftp://example.com/x.dmp?sig=secret")


def test_pipes_sockets_and_devices_are_refused_before_they_are_opened(tmp_path):
    """Opening a FIFO for reading waits for a writer: before #13 open_source(fifo) never returned."""
    import os
    import socket

    fifo = tmp_path / "fifo.dmp"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(_refusal(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert outcome, "open_source(<fifo>) was still waiting after 10 s"
    assert outcome[0].exit_code == ExitCode.USAGE and "is a named pipe (FIFO), not a dump file" in outcome[0].message
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        assert "is a socket" in _refusal(tmp_path / "sock").message
    finally:
        server.close()
    assert "is a character device" in _refusal("/dev/null").message


def _refusal(path) -> CrashcartError:
    with pytest.raises(CrashcartError) as caught:
        open_source(str(path))
    assert caught.value.exit_code == ExitCode.USAGE
    return caught.value


@pytest.mark.parametrize("path, said", [
    ("/etc/passwd/x.dmp", "cannot open /etc/passwd/x.dmp: Not a directory"),  # NotADirectoryError: exit 70
    ("x" * 5000 + ".dmp", "File name too long"),
    ("a\0b.dmp", "NUL character"),  # ValueError: exit 70
    ("", "no dump path or URL was given"),  # "." is a directory
])
def test_every_way_a_path_fails_is_a_usage_error(path, said):
    assert said in _refusal(path).message


@pytest.mark.parametrize("url, said", [
    ("http://[::1/c/b", "is not a valid URL"), ("https://h:99999/c/b?sig=s3cr3t", "is not a valid URL"),
    ("https://", "names no host"),
])
def test_a_url_that_is_not_one_is_a_usage_error(url, said):
    err = _refusal(url)
    assert said in err.message and "s3cr3t" not in err.message


def test_a_network_failure_names_the_reason_never_the_sas():
    """requests names the request URL, query string included, in its connection errors: before #13 the SAS
    signature reached the message (and the log)."""
    import requests

    text = ("HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /c/MEMORY.DMP?sv=1&sig=s3cr3t "
            "(Caused by NewConnectionError('<urllib3.connection.HTTPConnection object>: Failed to establish a new "
            "connection: [Errno 111] Connection refused'))")
    assert rangeio._network_reason(requests.exceptions.ConnectionError(text)) == "Connection refused"
    resolved = rangeio._network_reason(requests.exceptions.ConnectionError(
        text.replace("NewConnectionError", "NameResolutionError").replace("[Errno 111] Connection refused", "x")))
    assert resolved == "the host name could not be resolved"
    assert "s3cr3t" not in rangeio._network_reason(requests.exceptions.ConnectionError("odd: /p?sig=s3cr3t"))
    assert rangeio._redact("https://user:pa55@h/c/b?sig=s3cr3t") == "https://h/c/b (SAS)"
    assert rangeio._redact("http://[::1/c/b?sig=s3cr3t") == "http://[::1/c/b (SAS)"


# -- blobs in Azurite -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container(azurite):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    service = azurite.service_client()
    client = service.create_container(f"rangeio{random.Random().randrange(10**8)}")
    client.upload_blob("dumps/MEMORY.DMP", DATA)
    client.upload_blob("empty.bin", b"")

    def sas_url(blob: str, expiry: dt.datetime | None = None, permission: str = "r") -> str:
        sas = generate_container_sas(
            azurite.account, client.container_name, account_key=azurite.key,
            permission=ContainerSasPermissions.from_string(permission),
            expiry=expiry or dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
        )
        return f"{azurite.blob_endpoint}/{client.container_name}/{blob}?{sas}"

    client.sas_url = sas_url
    yield client
    client.delete_container()


@pytest.mark.slow  # Azurite
def test_blob_reads_match_and_cost_what_they_read(container):
    rng = random.Random(3)
    with open_source(container.sas_url("dumps/MEMORY.DMP")) as reader:
        assert reader.size == len(DATA)
        assert reader.requests == 1 and reader.bytes_read == rangeio.FIRST_READ  # the opening probe
        assert reader.read_at(0, 0x2080) == DATA[:0x2080]  # served by the probe
        assert reader.requests == 1
        for _ in range(30):
            offset, size = rng.randrange(len(DATA)), rng.choice([16, 4096, 20000])
            assert reader.read_at(offset, size) == DATA[offset:offset + size]
        assert reader.bytes_read <= len(DATA)
        assert "sig=" not in reader.name and "sig=" not in repr(reader)
        assert reader.name.endswith("/dumps/MEMORY.DMP (SAS)")


@pytest.mark.slow  # Azurite
def test_empty_blob(container):
    with open_source(container.sas_url("empty.bin")) as reader:
        assert reader.size == 0 and reader.read() == b""


@pytest.mark.slow  # Azurite
def test_missing_blob_is_not_found(container):
    with pytest.raises(CrashcartError) as caught:
        open_source(container.sas_url("dumps/nope.dmp"))
    assert caught.value.exit_code == ExitCode.AZURE_NOT_FOUND and "was not found" in caught.value.message
    assert "sig=" not in caught.value.message


@pytest.mark.slow  # Azurite
def test_bad_or_expired_sas_is_an_auth_error(container):
    url = container.sas_url("dumps/MEMORY.DMP")
    tampered = url.replace("sig=", "sig=AAAA")
    with pytest.raises(CrashcartError) as caught:
        open_source(tampered)
    assert caught.value.exit_code == ExitCode.AZURE_AUTH and "403" in caught.value.message
    expired = container.sas_url("dumps/MEMORY.DMP", expiry=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
    with pytest.raises(CrashcartError) as caught:
        open_source(expired)
    assert caught.value.exit_code == ExitCode.AZURE_AUTH and "expired" in caught.value.hint


@pytest.mark.slow  # Azurite
def test_blob_replaced_while_reading(container):
    container.upload_blob("changing.bin", DATA, overwrite=True)
    with open_source(container.sas_url("changing.bin")) as reader:
        container.upload_blob("changing.bin", DATA[::-1], overwrite=True)
        with pytest.raises(CrashcartError, match="changed while it was being read") as caught:
            reader.read_at(100_000, 10)
    assert caught.value.exit_code == ExitCode.AZURE_FAILED


# -- authentication -------------------------------------------------------------------------------


def test_tokens_only_go_to_azure_storage_over_https():
    with pytest.raises(CrashcartError, match="refusing to send an Azure AD token over plain HTTP") as caught:
        open_source("http://evil.example.com/c/MEMORY.DMP")
    assert caught.value.exit_code == ExitCode.USAGE
    with pytest.raises(CrashcartError, match="not an Azure Storage endpoint") as caught:
        open_source("https://evil.example.com/c/MEMORY.DMP", FakeCredential())
    assert caught.value.exit_code == ExitCode.USAGE and "SAS" in caught.value.hint


class FakeCredential:
    def __init__(self, lifetime: int = 3600):
        self.calls, self.lifetime = [], lifetime

    def get_token(self, *scopes):
        from azure.core.credentials import AccessToken

        self.calls.append(scopes)
        return AccessToken(f"token-{len(self.calls)}", int(dt.datetime.now().timestamp()) + self.lifetime)


def test_bearer_token_for_storage_when_there_is_no_sas(monkeypatch):
    monkeypatch.setattr(rangeio._HttpBackend, "_probe", lambda self: None)
    credential = FakeCredential()
    backend = rangeio._HttpBackend("https://acct.blob.core.windows.net/c/MEMORY.DMP", credential)
    headers = backend._headers(0, 4096)
    assert headers["Authorization"] == "Bearer token-1" and headers["Range"] == "bytes=0-4095"
    assert headers["x-ms-version"] == rangeio.STORAGE_API_VERSION
    backend._headers(4096, 4096)
    assert credential.calls == [("https://storage.azure.com/.default",)]  # cached
    short = FakeCredential(lifetime=60)  # expires within the 5-minute margin: refreshed every time
    backend = rangeio._HttpBackend("https://acct.blob.core.windows.net/c/MEMORY.DMP", short)
    backend._headers(0, 1)
    backend._headers(0, 1)
    assert len(short.calls) == 2
    sas = rangeio._HttpBackend("https://acct.blob.core.windows.net/c/MEMORY.DMP?sv=1&sig=abc", credential)
    assert "Authorization" not in sas._headers(0, 1)


def test_sign_in_failure_is_an_auth_error(monkeypatch):
    from azure.core.exceptions import ClientAuthenticationError

    class Failing:
        def get_token(self, *scopes):
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")

    monkeypatch.setattr(rangeio._HttpBackend, "_probe", lambda self: None)
    backend = rangeio._HttpBackend("https://acct.blob.core.windows.net/c/MEMORY.DMP", Failing())
    with pytest.raises(CrashcartError) as caught:
        backend._headers(0, 1)
    assert caught.value.exit_code == ExitCode.AZURE_AUTH and "az login" in caught.value.hint


# -- misbehaving servers --------------------------------------------------------------------------


class Server(http.server.ThreadingHTTPServer):
    """Serves DATA with Range support, with scripted misbehaviour."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.failures_left = 0
        self.mode = "ok"
        self.hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/c/MEMORY.DMP?sv=x&sig=secret"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server: Server = self.server  # type: ignore[assignment]
        server.hits += 1
        if server.failures_left:
            server.failures_left -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        spec = self.headers["Range"].split("=")[1]
        start, end = (int(x) for x in spec.split("-"))
        body = DATA[start:end + 1]
        if server.mode == "shrunk" and start > 0:
            self.send_response(416)
            self.send_header("Content-Range", "bytes */4096")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if server.mode == "ignore-range":
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"0x1"')
        self.end_headers()
        if server.mode == "short" and start > 0:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(rangeio, "_BACKOFF", 0.01)
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_transient_errors_are_retried(server):
    server.failures_left = 2
    with open_source(server.url) as reader:
        assert reader.read_at(200_000, 100) == DATA[200_000:200_100]
    assert server.hits == 4


def test_persistent_errors_give_up(server):
    server.failures_left = 100
    with pytest.raises(CrashcartError, match=r"failed \(503\)") as caught:
        open_source(server.url)
    assert caught.value.exit_code == ExitCode.AZURE_FAILED and server.hits == rangeio._RETRIES + 1
    assert "secret" not in caught.value.message


def test_server_without_range_support_is_refused(server):
    server.mode = "ignore-range"
    with pytest.raises(CrashcartError, match="does not support range requests"):
        open_source(server.url)


def test_short_response_is_an_error(server):
    server.mode = "short"
    with open_source(server.url) as reader:
        with pytest.raises(CrashcartError, match="short read|connection broke") as caught:
            reader.read_at(100_000, 8192)
    assert caught.value.exit_code == ExitCode.AZURE_FAILED


def test_blob_shorter_than_when_opened(server):
    with open_source(server.url) as reader:
        server.mode = "shrunk"
        with pytest.raises(CrashcartError, match="beyond the end of the blob") as caught:
            reader.read_at(200_000, 10)
    assert caught.value.exit_code == ExitCode.AZURE_FAILED and "416" in caught.value.message


def test_url_redaction():
    assert rangeio._redact("https://a.blob.core.windows.net/c/b?sv=1&sig=xyz") == "https://a.blob.core.windows.net/c/b (SAS)"
    assert rangeio._redact("/local/path.dmp") == "/local/path.dmp"
    assert "sig" not in urllib.parse.urlsplit(rangeio._redact("https://h/p?sig=1")).path


# -- concurrent range requests (scripts.base.rangereader fetches in parallel over HTTP) --------------


def test_concurrent_reads_are_retried_and_match(server):
    with open_source(server.url) as reader:
        server.failures_left = 3  # spread over whichever requests come first
        spots = [(i * 20_000 + 7, 300) for i in range(15)]
        assert reader.read_many(spots) == [DATA[o:o + n] for o, n in spots]
        assert server.hits == reader.requests  # every attempt counted, retries included
        assert reader.requests == 1 + 14 + 3  # the probe (holds the first spot), 14 blocks, 3 retries


def test_concurrent_reads_translate_errors_and_short_answers(server):
    with open_source(server.url) as reader:
        server.mode = "short"
        with pytest.raises(CrashcartError, match="short read|connection broke") as caught:
            reader.read_many([(50_000, 10), (150_000, 10), (250_000, 10)])
        assert caught.value.exit_code == ExitCode.AZURE_FAILED
        server.mode = "shrunk"
        with pytest.raises(CrashcartError, match="beyond the end of the blob") as caught:
            reader.read_many([(60_000, 10), (160_000, 10)])
        assert "416" in caught.value.message and "secret" not in caught.value.message


def test_a_stop_request_ends_the_retries(server):
    class Stop:
        reason, is_deadline = None, False

    from scripts.base.stop import StopRun

    stop = Stop()
    with open_source(server.url, stop=stop) as reader:
        server.failures_left = 100
        stop.reason = "the run's --timeout was reached"
        hits = server.hits
        with pytest.raises(StopRun, match="timeout"):
            reader.read_at(200_000, 10)
        assert server.hits == hits  # no request was sent after the stop


def test_one_token_for_all_threads(monkeypatch):
    """Eight fetch threads finding the token missing at once sign in once (before: a lock-free check)."""
    import time as _time

    monkeypatch.setattr(rangeio._HttpBackend, "_probe", lambda self: None)

    class Slow(FakeCredential):
        def get_token(self, *scopes):
            _time.sleep(0.05)
            return super().get_token(*scopes)

    credential = Slow()
    backend = rangeio._HttpBackend("https://acct.blob.core.windows.net/c/MEMORY.DMP", credential)
    threads = [threading.Thread(target=backend._headers, args=(0, 1)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(credential.calls) == 1

"""Media by URL: http(s) fetched only with --allow-media-url, file:// only under --allow-local-media DIR,
both capped in size; failures are MediaErrors (the server's 400)."""

import functools
import http.server
import threading

import pytest

from omnilm.errors import MediaError
from omnilm.serve.media import MediaPolicy


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "digit.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "big.bin").write_bytes(b"x" * 5000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_media_is_fetched_only_when_allowed(site, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the test server is local
    root, base = site
    url = f"{base}/digit.png"
    with pytest.raises(MediaError, match="--allow-media-url"):
        MediaPolicy().image_bytes(url, "messages[0].content[0]")
    assert MediaPolicy(allow_url=True).image_bytes(url, "x") == (root / "digit.png").read_bytes()
    with pytest.raises(MediaError, match="over the limit of 4096 bytes"):
        MediaPolicy(allow_url=True, max_bytes=4096).image_bytes(f"{base}/big.bin", "x")
    with pytest.raises(MediaError, match="cannot fetch"):
        MediaPolicy(allow_url=True).image_bytes(f"{base}/missing.png", "x")


def test_local_media_only_under_the_allowed_directory(site, tmp_path):
    root, _ = site
    with pytest.raises(MediaError, match="--allow-local-media"):
        MediaPolicy().image_bytes(f"file://{root}/digit.png", "x")
    policy = MediaPolicy(local_dir=root)
    assert policy.image_bytes(f"file://{root}/digit.png", "x") == (root / "digit.png").read_bytes()
    (tmp_path / "secret.png").write_bytes(b"no")
    with pytest.raises(MediaError, match="is not a file under"):
        policy.image_bytes(f"file://{root}/../{tmp_path.name}/secret.png", "x")
    with pytest.raises(MediaError, match="is not a file under"):
        policy.image_bytes(f"file://{tmp_path}/secret.png", "x")

"""The loopback symbol server the symbol tests use: what it serves, refuses and records."""

from __future__ import annotations

import requests

from scripts.devkit.symserver import SymbolServer


def test_serves_the_symstore_layout_and_records_requests(tmp_path):
    (tmp_path / "secret").write_bytes(b"outside the store")
    with SymbolServer(tmp_path / "root") as server:
        server.publish("a.pdb", "ABC1", b"pdb bytes")
        assert requests.get(f"{server.url}/a.pdb/ABC1/a.pdb", timeout=5).content == b"pdb bytes"
        assert requests.get(f"{server.url}/a.pdb/abc1/a.pdb", timeout=5).status_code == 404  # keys are exact
        assert requests.get(f"{server.url}/a.pdb/ABC1/..%2F..%2F..%2Fsecret", timeout=5).status_code == 404
        assert requests.get(f"{server.url}/../a.pdb/ABC1/a.pdb", timeout=5).status_code == 404
        server.fail_status, server.fail_matching = 503, "a.pdb"
        assert requests.get(f"{server.url}/a.pdb/ABC1/a.pdb", timeout=5).status_code == 503
        assert [status for _, status in server.requests] == [200, 404, 404, 404, 503]
        assert server.paths[0] == "/download/symbols/a.pdb/ABC1/a.pdb"

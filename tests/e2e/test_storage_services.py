"""The embedded services and the storage seam, against the real SeaweedFS S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
import urllib.request

import pytest

from ditforge import services, storage


def test_services_bind_loopback_and_are_reused(embedded):
    again = services.up()  # second `up` reuses what runs: same endpoints, same pids
    assert again == embedded
    before = {s["service"]: s["pid"] for s in services.status()}
    services.up()
    after = {s["service"]: s["pid"] for s in services.status()}
    assert before == after and all(before.values())
    for url in (embedded.s3, embedded.mlflow, embedded.ray_dashboard):
        assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(embedded.mlflow + "/health", timeout=5) as r:
        assert r.status == 200


def test_credentials_file_is_private_and_keys_are_enforced(embedded):
    path = storage.home() / "s3" / "credentials.json"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    creds = json.loads(path.read_text())
    assert creds["access_key_id"] and creds["secret_access_key"]

    import s3fs

    wrong = s3fs.S3FileSystem(
        key=creds["access_key_id"],
        secret="not-the-secret",
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": embedded.s3, "region_name": "us-east-1"},
    )
    with pytest.raises((PermissionError, OSError)):
        wrong.ls("ditforge")


def test_s3_roundtrip_listing_and_overwrite(s3_prefix):
    uri = storage.join(s3_prefix, "a", "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    storage.write_bytes(uri, b"world")
    assert storage.read_bytes(uri) == b"world"
    assert storage.listdir(storage.join(s3_prefix, "a")) == ["b.bin"]
    assert storage.exists(uri)
    storage.remove(storage.join(s3_prefix, "a"))
    assert not storage.exists(uri)
    assert storage.listdir(storage.join(s3_prefix, "missing")) == []


def test_file_uris_work_too(tmp_path):
    uri = storage.absolute(f"file://{tmp_path}/x/y.txt")
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc"
    assert not any(p.name.startswith("y.txt.tmp") for p in (tmp_path / "x").iterdir())  # atomic rename


def test_environment_credentials_win_over_the_file(monkeypatch, embedded):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", embedded.s3)
    opts = storage.s3_options()
    assert opts["key"] == "AKIAFROMENV" and opts["client_kwargs"]["endpoint_url"] == embedded.s3
    with pytest.raises((PermissionError, OSError)):
        storage.read_bytes("s3://ditforge/anything")  # the env keys are wrong: the server says no


@pytest.mark.serial  # stops the session's S3 server
def test_restart_keeps_data(s3_prefix, embedded):
    """The S3 server keeps its data on disk under .ditforge/: a stop/start loses nothing."""
    uri = storage.join(s3_prefix, "persist.txt")
    storage.write_bytes(uri, b"still here")
    services.stop_process("s3")
    assert not services.http_ok(embedded.s3 + "/")
    services.start_s3()
    assert storage.read_bytes(uri) == b"still here"
    assert os.path.isdir(storage.home() / "s3" / "data")

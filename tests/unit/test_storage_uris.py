"""URIs at every door: unknown schemes are one-line errors, and gs:// goes through the optional
gcsfs with credentials from the environment. No GCS server is reachable here: these tests check
the filesystem class, the credential plumbing and the errors, not real GCS traffic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ditforge import spec, storage

from ..conftest import REPO


def _one_line_error(r, *needles: str) -> None:
    code = r.returncode if hasattr(r, "returncode") else r.exit_code
    lines = r.stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_scheme_is_one_line_exit_2_wherever_a_uri_enters(tmp_path):
    from typer.testing import CliRunner

    from ditforge.cli import app

    out = tmp_path / "o"
    calls = [  # (argv, the URI the message must name)
        (["data", "ingest", "ftp2://x/photos", "--out", f"file://{out}"], "ftp2://x/photos"),
        (["data", "ingest", "ftp2://x/{000..003}.tar", "--out", f"file://{out}"], "ftp2://x/{000..003}.tar"),
        (["data", "ingest", "shapes", "--limit", "4", "--out", "ftp2://x/out"], "ftp2://x/out"),
        (["data", "encode", "ftp2://x/pixels", "--out", f"file://{out}"], "ftp2://x/pixels"),
        (["data", "encode", f"file://{tmp_path}/pixels", "--out", "ftp2://x/lat"], "ftp2://x/lat"),
        (["data", "verify", "ftp2://x/lat"], "ftp2://x/lat"),
        (["submit", str(REPO / "jobs" / "demo-image.yaml"), "--set", "data.train=ftp2://x/lat"], "data.train"),
        (["submit", str(REPO / "jobs" / "demo-image.yaml"), "--set", "checkpoint.uri=ftp2://x/runs"], "checkpoint.uri"),
        (["submit", str(REPO / "jobs" / "demo-image.yaml"), "--set", "train.resume=ftp2://x/runs/r"], "train.resume"),
        (
            [
                "submit",
                str(REPO / "jobs" / "demo-image.yaml"),
                "--set",
                "vae.kind=own",
                "--set",
                "vae.path=ftp2://x/vae",
            ],
            "vae.path",
        ),
    ]
    for argv, uri in calls:  # in-process (a subprocess per call costs seconds of imports)
        _one_line_error(CliRunner().invoke(app, argv), uri, "unknown URI scheme 'ftp2://'")
    assert not out.exists()  # nothing written


def test_spec_and_storage_know_the_same_schemes():
    assert spec.URI_SCHEMES == storage.SCHEMES


def _service_account(path, email: str) -> str:
    """A service-account key file as Google issues them (a fresh RSA key, never used online)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "proj",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": email,
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return str(path)


def test_gs_uses_gcsfs_with_credentials_from_the_environment(tmp_path, monkeypatch):
    import gcsfs

    for k in ("DITFORGE_GCS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    adc = _service_account(tmp_path / "adc.json", "adc@proj.iam.gserviceaccount.com")
    named = _service_account(tmp_path / "named.json", "named@proj.iam.gserviceaccount.com")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", adc)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj-7")
    fs, path = storage.filesystem("gs://bucket/data/shard-000000.tar")
    assert isinstance(fs, gcsfs.GCSFileSystem) and path == "bucket/data/shard-000000.tar"
    assert fs.credentials.credentials.service_account_email == "adc@proj.iam.gserviceaccount.com"
    assert fs.project == "proj-7"
    # A named token file wins over the application-default one.
    monkeypatch.setenv("DITFORGE_GCS_TOKEN", named)
    fs2, _ = storage.filesystem("gs://bucket/data")
    assert fs2 is not fs and fs2.credentials.credentials.service_account_email == "named@proj.iam.gserviceaccount.com"
    # The key file's path is in the options, its contents never are.
    assert "PRIVATE KEY" not in json.dumps(storage.gcs_options())


def test_gs_without_gcsfs_names_the_uri_and_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # what `import gcsfs` meets when it is not installed
    with pytest.raises(storage.URIError, match=r"gs://b/x: gs:// needs gcsfs.*pip install 'ditforge\[gcs\]'"):
        storage.filesystem("gs://b/x")
    # The CLI, in a process where gcsfs cannot be imported: exit 2, one line, nothing written.
    code = (
        "import sys; sys.modules['gcsfs'] = None; from ditforge.cli import main; "
        "sys.argv = ['ditforge', 'data', 'ingest', 'shapes', '--limit', '4', '--out', 'gs://b/out']; main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _one_line_error(r, "gs://b/out", "pip install 'ditforge[gcs]'")
    assert list(tmp_path.iterdir()) == []

"""The narrow storage seam: fsspec filesystems from URIs, with credentials from the environment.

Paths stay `str` because `pathlib.Path` mangles `s3://`. S3 credentials come, in order, from the
named AWS profile in `DITFORGE_S3_PROFILE`, from the `AWS_*` environment variables, from the file
named by `DITFORGE_S3_CREDENTIALS`, or from the embedded SeaweedFS server's key file under
`$DITFORGE_HOME` — never from a spec, so they never reach MLflow params or logs. `gs://` needs
the optional `gcsfs` (`pip install 'ditforge[gcs]'`); its credentials come from the token file
named by `DITFORGE_GCS_TOKEN`, else `GOOGLE_APPLICATION_CREDENTIALS`, else gcsfs's own chain.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec

_T = TypeVar("_T")

SCHEMES = ("file", "s3", "gs")  # spec.URI_SCHEMES must say the same (tests check)


class URIError(Exception):
    """A URI this platform cannot open: unknown scheme, or its filesystem is not installed. The
    CLI prints it as one line and exits 2."""


def home() -> Path:
    """Where the embedded services keep their state (`.ditforge/` in the working directory)."""
    return Path(os.environ.get("DITFORGE_HOME") or Path.cwd() / ".ditforge").resolve()


def credentials_file() -> Path:
    return Path(os.environ.get("DITFORGE_S3_CREDENTIALS") or home() / "s3" / "credentials.json")


def s3_options() -> dict[str, Any]:
    """s3fs keyword arguments: endpoint and keys, never logged."""
    env = os.environ
    profile = env.get("DITFORGE_S3_PROFILE")
    if profile:
        # A named profile from ~/.aws/{credentials,config}: botocore reads keys and region there.
        opts: dict[str, Any] = {"profile": profile}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    else:
        path = credentials_file()
        if not path.exists():
            return {}
        creds = json.loads(path.read_text())
        opts = {"key": creds["access_key_id"], "secret": creds["secret_access_key"]}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or creds.get("endpoint_url")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint, "region_name": env.get("AWS_REGION", "us-east-1")}
    # Listings must be fresh: another rank may have just written the file we look for.
    opts["use_listings_cache"] = False
    # One retry loop, ours (`retry` below): botocore's and s3fs's own loops nested inside it turned
    # a 5-attempt retry into minutes of hanging on a store that is down.
    opts["config_kwargs"] = {
        "retries": {"max_attempts": 1, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 120,
    }
    opts["skip_instance_cache"] = True
    return opts


def gcs_options() -> dict[str, Any]:
    """gcsfs keyword arguments, never logged. `token` is a service-account / authorized-user JSON
    file, or one of gcsfs's words (`google_default`, `cloud`, `anon`); without one gcsfs tries
    them in turn (and on a machine outside GCP waits for the metadata server first)."""
    env = os.environ
    opts: dict[str, Any] = {"skip_instance_cache": True}
    token = env.get("DITFORGE_GCS_TOKEN") or env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if token:
        opts["token"] = token
    if env.get("GOOGLE_CLOUD_PROJECT"):
        opts["project"] = env["GOOGLE_CLOUD_PROJECT"]
    return opts


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def check(uri: str) -> None:
    """Raise URIError unless `uri` can be opened here (before anything is read or written)."""
    sch = scheme(uri)
    if sch not in SCHEMES:
        raise URIError(f"{uri}: unknown URI scheme '{sch}://' (known: {', '.join(s + '://' for s in SCHEMES)})")
    if sch == "gs":
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise URIError(f"{uri}: gs:// needs gcsfs, which is not installed: pip install 'ditforge[gcs]'") from None


def absolute(uri: str) -> str:
    """Make `file://relative/path` absolute, so that workers with another cwd find it."""
    if uri.startswith("file://"):
        return "file://" + str(Path(uri[len("file://") :]).expanduser().resolve())
    return uri.rstrip("/")


_FS: dict = {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    check(uri)
    sch = scheme(uri)
    opts = s3_options() if sch == "s3" else gcs_options() if sch == "gs" else {}
    # One client per process and settings: building an S3 client costs ~0.1 s, more than a small
    # PUT. Keyed by pid so a forked child never shares its parent's event loop.
    key = (os.getpid(), sch, json.dumps(opts, sort_keys=True, default=str))
    fs = _FS.get(key)
    if fs is None:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
        if sch == "s3":
            fs.retries = 1  # s3fs's own retry loop (see s3_options)
        _FS[key] = fs
        return fs, path
    return fs, fs._strip_protocol(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _transient() -> tuple[type[BaseException], ...]:
    errors: tuple = (OSError, TimeoutError, ConnectionError)
    try:  # botocore's connection errors are not OSErrors (EndpointConnectionError, ReadTimeout...)
        from botocore.exceptions import BotoCoreError

        errors += (BotoCoreError,)
    except ImportError:
        pass
    return errors


class StorageUnavailable(OSError):
    """The store did not answer through all retries."""


def retry(
    fn: Callable[..., _T],
    *args: Any,
    attempts: int = 6,
    base_delay: float = 0.5,
    deadline_s: float | None = None,
    on_retry: Callable[[BaseException, float], object] | None = None,
    **kwargs: Any,
) -> _T:
    """Object stores blip: retry with exponential backoff, then raise StorageUnavailable (an
    OSError, so callers need to know only one kind of failure). `deadline_s`: keep trying for
    that many seconds instead of `attempts` times (waits capped at 10 s, so a store that comes
    back is noticed soon). `on_retry(error, wait_s)`: called before each wait, to log the fault."""
    start = time.monotonic()
    for i in itertools.count():
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise  # answers, not blips: retrying them only delays the caller by seconds
        except _transient() as e:
            wait = min(base_delay * 2**i, 10.0)
            if i == attempts - 1 if deadline_s is None else time.monotonic() - start + wait > deadline_s:
                if isinstance(e, OSError):
                    raise
                raise StorageUnavailable(f"{type(e).__name__}: {e}") from e
            if on_retry is not None:
                on_retry(e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # itertools.count() never ends


def read_bytes(uri: str, attempts: int = 6) -> bytes:
    fs, path = filesystem(uri)
    return retry(fs.cat_file, path, attempts=attempts)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        # Local files: write next to the target, then rename, so readers never see half a file.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    retry(fs.pipe_file, path, data)  # an S3 PUT is atomic: the object appears whole or not at all


def exists(uri: str, attempts: int = 5) -> bool:
    fs, path = filesystem(uri)
    return retry(fs.exists, path, attempts=attempts)


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; empty when it does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = retry(fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    s3 = "s3" in fs.protocol
    folders = []
    if retry(fs.exists, path):
        if s3:
            found = retry(fs.find, path, withdirs=True, detail=True)
            folders = [k for k, v in found.items() if v.get("type") == "directory"]
        retry(fs.rm, path, recursive=True)
    if s3:
        # SeaweedFS (like other filer-backed stores) keeps each emptied folder, nested ones too
        # (a step's `_ranks/`), as a "dir/" entry, which would still list as a step folder.
        for d in sorted({*folders, path}, key=len, reverse=True):  # deepest first
            try:
                fs.rm_file(d.rstrip("/") + "/")
            except (FileNotFoundError, OSError):
                pass
        fs.invalidate_cache(path)


def put_file(local: str | Path, uri: str) -> None:
    fs, path = filesystem(uri)
    if "file" in fs.protocol:
        write_bytes(uri, Path(local).read_bytes())
        return
    retry(fs.put_file, str(local), path)


def get_file(uri: str, local: str | Path) -> None:
    fs, path = filesystem(uri)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    retry(fs.get_file, path, str(local))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""Where secrets come from, and the one place that scrubs them from text.

Credentials are read from the environment or from a named file, never from a spec:
  S3        `storage.s3_options` (AWS_* variables, DITFORGE_S3_CREDENTIALS, the embedded key file)
  MLflow    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or the JSON file named by
            DITFORGE_MLFLOW_CREDENTIALS ({"username": ..., "password": ...}), or
            $DITFORGE_HOME/mlflow/credentials.json
  Ray       RAY_AUTH_TOKEN, or the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (Ray's own)

`redact(text)` replaces every secret value this process knows of (variables named *SECRET*,
*PASSWORD*, *TOKEN*, *_KEY, the S3 and MLflow credential files, the Ray token), and the password part of any
`scheme://user:password@host` URL, with `***`. Everything that leaves the process as text (MLflow
params and tags, saved specs, error lines) goes through it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

MLFLOW_CREDENTIALS_ENV = "DITFORGE_MLFLOW_CREDENTIALS"
MASK = "***"
# Environment variables whose values are secrets whatever they hold (…_PATH / …_FILE name files;
# so do …_CREDENTIALS here, e.g. DITFORGE_S3_CREDENTIALS, GOOGLE_APPLICATION_CREDENTIALS).
# `*_KEY` (WANDB_API_KEY, OPENAI_API_KEY, …) is a secret too; AWS_ACCESS_KEY_ID (an id) is not.
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN)(?!_PATH|_FILE|_ENV)|_KEY$", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@", re.I)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _home() -> Path:
    from . import storage

    return storage.home()


def mlflow_credentials() -> tuple[str, str] | None:
    env = os.environ
    if env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD"):
        return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    path = Path(env.get(MLFLOW_CREDENTIALS_ENV) or _home() / "mlflow" / "credentials.json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return str(data["username"]), str(data["password"])
    except (OSError, ValueError, KeyError, TypeError):
        # name the file, never its content
        raise ValueError(f"{path}: expected a JSON object with 'username' and 'password'") from None


def use_mlflow_credentials() -> None:
    """MLflow clients read MLFLOW_TRACKING_USERNAME/PASSWORD from the environment: when the
    credentials come from a file, put them there for this process (never into a Ray runtime_env)."""
    creds = mlflow_credentials() if not os.environ.get("MLFLOW_TRACKING_PASSWORD") else None
    if creds:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", creds[0])
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", creds[1])


def ray_token() -> str | None:
    env = os.environ
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"]
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ensure_ray_token() -> str:
    """Ray's token, made once (random, 0600) where Ray looks for it when there is none yet."""
    token = ray_token()
    if token:
        return token
    import secrets

    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:  # another process made it first: use theirs
        pass
    return path.read_text().strip()


def use_ray_token(create: bool = False) -> str | None:
    """Every Ray client of this process and of its children presents the token: Ray's own clients
    (ray.init, the state API, the Jobs SDK) send it when RAY_AUTH_MODE is `token`. The platform's
    Ray clusters (embedded head, local cluster, joined hosts) always run with token auth, loopback
    included: Ray's core ports listen beyond loopback whatever address it is given."""
    token = ensure_ray_token() if create else ray_token()
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config per process: make an already-loaded Ray see the new mode
            from ray._raylet import Config  # type: ignore[attr-defined]  # missing from ray's stub

            Config.initialize("")
        except Exception:
            pass
    return token


def ray_auth_headers() -> dict[str, str]:
    token = ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _known_secrets() -> set[str]:
    found = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and v}
    try:
        from . import storage

        f = storage.credentials_file()
        if f.is_file():
            found.add(json.loads(f.read_text()).get("secret_access_key", ""))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        creds = mlflow_credentials()
        if creds:
            found.add(creds[1])
    except ValueError:
        pass
    token = ray_token()
    if token:
        found.add(token)
    # very short values ("1", "true") would mangle ordinary text and are no secrets worth the name
    return {s for s in found if len(s) >= 8}


def redact(text: str) -> str:
    """`text` without any secret this process knows of, nor URL passwords."""
    if not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for s in sorted(_known_secrets(), key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


def redact_obj(obj: Any) -> Any:
    """Redact every string inside nested dicts / lists (a spec dump, a params dict)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def has_userinfo_password(uri: str) -> bool:
    return bool(_URL_USERINFO.search(uri or ""))

"""What one installation keeps in its data directory: the local tenant's API key and the key set the
gateway accepts (the installation secret is `memlong.rpc.internal.installation_token`).

The data directory is `$MEMLONG_DATA`, default `~/.local/share/memlong`.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from memlong.atomic import write_atomic
from memlong.errors import InvalidArgument
from memlong.services.gateway.config import load_key_file, parse_keys

LOCAL_TENANT = "local"
KEY_FILE = "api_keys.json"


def default_data_dir() -> Path:
    return Path(os.environ.get("MEMLONG_DATA", Path.home() / ".local" / "share" / "memlong"))


def local_api_key(data_dir: Path) -> str:
    """The local tenant's key, created on first use (owner-only); InvalidArgument naming the file when
    the file has none."""
    path = data_dir / KEY_FILE
    if path.is_file():
        load_key_file(path)  # the file's shape, checked (InvalidArgument otherwise)
        keys = json.loads(path.read_text())["keys"]
        local = [k for k, t in keys.items() if t == LOCAL_TENANT]
        if not local:
            raise InvalidArgument(
                str(path),
                f"no key for the {LOCAL_TENANT!r} tenant, which `memlong up` and the client verbs use: "
                f'add one, as in {{"keys": {{"<key>": "{LOCAL_TENANT}"}}}}, or move the file away to '
                "have a new key made",
            )
        return str(local[0])
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "ml-" + secrets.token_urlsafe(24)
    write_atomic(path, json.dumps({"keys": {key: LOCAL_TENANT}}).encode(), mode=0o600)
    return key


def key_hashes(data_dir: Path, given: str = "", *, local: bool = True) -> dict[str, str]:
    """The keys the gateway accepts (sha256 -> tenant): `given` ("key=tenant,...") and, with `local`,
    the data directory's key file (made with a local tenant's key on first use)."""
    keys = parse_keys(given)
    if local:
        local_api_key(data_dir)
        keys.update(load_key_file(data_dir / KEY_FILE))
    return keys

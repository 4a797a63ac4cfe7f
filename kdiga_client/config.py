"""Where the CLI finds the server URL and API key: flags, then environment, then a config file.

The config file is TOML (`~/.config/kdiga/config.toml`, or the path in `KDIGA_CONFIG`):

    url = "http://127.0.0.1:8000"
    api_key = "kdg_..."

`kdiga login` writes it with mode 0600 because it holds a secret.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    source: str  # where the key came from: flag | env | file | none


def config_path() -> Path:
    """KDIGA_CONFIG, else $XDG_CONFIG_HOME/kdiga/config.toml, else ~/.config/kdiga/config.toml."""
    explicit = os.environ.get("KDIGA_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kdiga" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, str]:
    """The config file's url/api_key (an empty dict when there is no file)."""
    path = path or config_path()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"The kdiga config file {path} is not valid TOML: {exc}.") from exc
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key") and v}


def write_config(url: str, api_key: str, path: Path | None = None) -> Path:
    """Write url + api_key to the config file, readable by its owner only (0600)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps of a str is a valid TOML basic string (same escapes for these characters).
    text = f"url = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def resolve(url: str | None = None, api_key: str | None = None) -> Settings:
    """Flags win over KDIGA_URL / KDIGA_API_KEY, which win over the config file."""
    file = read_config()
    resolved_url = url or os.environ.get("KDIGA_URL") or file.get("url") or DEFAULT_URL
    if api_key:
        return Settings(resolved_url, api_key, "flag")
    if os.environ.get("KDIGA_API_KEY"):
        return Settings(resolved_url, os.environ["KDIGA_API_KEY"], "env")
    if file.get("api_key"):
        return Settings(resolved_url, file["api_key"], "file")
    return Settings(resolved_url, None, "none")

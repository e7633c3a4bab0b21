"""Secrets: where a config's secrets come from, how offered ones are checked, and the key that
guards a node's Triton.

A secret may be written into a config as itself (`token = "…"`), as the name of an environment
variable that holds it (`token_env = "NAME"`) or as a file that holds it (`token_file = PATH`,
relative to the config file), so configs can be committed without their secrets. Gateway API
keys may also be given as SHA-256 digests (`api_key_sha256`), so the gateway's host never holds
them at all. Offered secrets are compared in constant time, against every candidate.

**Triton's key.** A node's tritonserver accepts a request on any protocol but health only with
the HTTP header `cortex-triton-key` (`--http-restricted-api`) or the gRPC metadata
`triton-grpc-protocol-cortex-triton-key` (`--grpc-restricted-protocol`; Triton adds the
prefix). Its value is derived from the neuron's bearer token, so a gateway that
holds the token knows it and nothing else has to be configured or sent around; the token itself
never reaches Triton's command line, which every local user can read. A neuron without a token
(loopback only, see `neuron_agent.triton`) makes a random key per start for its own HTTP calls
and leaves gRPC, which only loopback clients reach then, open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TRITON_KEY_HEADER = "cortex-triton-key"
# Triton's gRPC server looks for a restricted protocol's key under this prefix.
TRITON_GRPC_KEY_METADATA = f"triton-grpc-protocol-{TRITON_KEY_HEADER}"
# Every protocol Triton can restrict but health, which probes need without a key.
TRITON_RESTRICTED = (
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
_TRITON_KEY_CONTEXT = b"cortex triton key v1"


def triton_key(token: str) -> str:
    """The key a node's Triton takes, derived from its neuron's bearer token."""
    return hmac.new(token.encode(), _TRITON_KEY_CONTEXT, hashlib.sha256).hexdigest()


def random_key() -> str:
    return secrets.token_hex(32)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read_secret(value: str | None, env: str | None, file: str | None) -> str | None:
    """The secret one of the three spellings gives (at most one may be set), or None.

    Raises ValueError naming what is wrong: an unset or empty variable, an unreadable or empty
    file. The secret itself is never part of a message."""
    given = [spelling for spelling in (value, env, file) if spelling is not None]
    if len(given) > 1:
        raise ValueError("set only one of the secret, its _env and its _file")
    if value is not None:
        if not value.strip():
            raise ValueError("the secret is empty")
        return value
    if env is not None:
        found = os.environ.get(env, "").strip()
        if not found:
            raise ValueError(f"environment variable {env} is not set or empty")
        return found
    if file is not None:
        return read_secret_file(file)[0]
    return None


def read_secret_file(path: str) -> list[str]:
    """The secrets a file holds, one a line (blank lines and `#` comments skipped)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise ValueError(f"{path} holds no secret")
    return found


def absolute_beside(path: str | None, base_dir: object) -> str | None:
    """A secret file's path made absolute against the config file's folder, where known."""
    if path is None or not isinstance(base_dir, str | Path):
        return path
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else Path(base_dir) / resolved)


class KeyDigests:
    """A set of accepted keys, held as SHA-256 digests; `accepts` compares an offered key with
    every one of them in constant time (no early exit that would tell how many matched)."""

    def __init__(self, digests: frozenset[str]) -> None:
        self._digests = tuple(bytes.fromhex(digest) for digest in sorted(digests))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, offered: str) -> bool:
        return self.match(offered) is not None

    def match(self, offered: str) -> str | None:
        """The digest (hex) the offered key matches, or None; every digest is compared."""
        candidate = hashlib.sha256(offered.encode()).digest()
        matched: bytes | None = None
        for digest in self._digests:
            if hmac.compare_digest(candidate, digest):
                matched = digest
        return None if matched is None else matched.hex()


def secret_matches(offered: str, expected: str) -> bool:
    return hmac.compare_digest(offered.encode(), expected.encode())

"""Ed25519 signing keys: files in the formats of docs/contract.md §1 and the key id of §4.

The private key is the gateway's identity toward every consumer, so the file is checked before
it is used, the same way by `check-config` and by `run` (`key_file_problems`): a regular file,
owned by the user that runs the agent, with no permission for group or others, in a directory
that others cannot write (where anyone could replace it). Rotation (docs/security.md): `keygen
--next` writes a new pair named by its key id beside the current one and never replaces a file.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """The first 8 bytes of SHA-256 over the raw public key: derivable by any consumer."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8]


def write_keypair(directory: Path, *, force: bool = False) -> bytes:
    """Create `signing.key` (PKCS8 PEM, 0600) and `signing.pub` (SPKI PEM); return the key id."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not force and (private_path.exists() or public_path.exists()):
        raise FileExistsError(f"{private_path} exists; pass --force to replace the key pair")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    return key_id(key.public_key())


def write_next_keypair(directory: Path) -> tuple[bytes, Path]:
    """A new pair beside the current one, named by its key id: `signing-{kid}.key` and `.pub`.

    For rotation: nothing existing is replaced (the current key keeps signing until the agent
    is pointed at the new file). Returns the key id and the private key's path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    private_path = directory / f"signing-{kid.hex()}.key"
    public_path = directory / f"signing-{kid.hex()}.pub"
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )
    return kid, private_path


def key_file_problems(path: Path) -> list[str]:
    """Why `path` must not be used as the signing key; empty when it may be.

    The rules (docs/security.md, IEC 62443-4-2 CR 1.5): a regular file; owned by the user this
    process runs as (another user could read or replace it); no permission for group or others;
    and neither its directory nor, for a symbolic link, the target's directory writable by
    others (anyone could put another key in its place). Nothing of the file's content is read.
    OSError propagates when the file cannot be examined at all.
    """
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return [f"{path} is not a regular file"]
    problems = []
    euid = os.geteuid()
    if info.st_uid != euid:
        problems.append(
            f"{path} is owned by {pwd_name(info.st_uid)} (uid {info.st_uid}), not by the user "
            f"running edge-agent, {pwd_name(euid)} (uid {euid}); run: chown {pwd_name(euid)} {path}"
        )
    mode = info.st_mode & 0o777
    if mode & 0o077:
        problems.append(f"{path} is readable by others (mode {mode:03o}); run: chmod 600 {path}")
    directories = {path.absolute().parent, path.resolve().parent}
    problems.extend(
        f"{path} is in a directory anyone may write ({directory}): another key could be put "
        "in its place; move it to a directory only its owner can write"
        for directory in sorted(directories)
        if directory.stat().st_mode & stat.S_IWOTH
    )
    return problems


def pwd_name(uid: int) -> str:
    """The user name of `uid`, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key after `key_file_problems`; refuse one that is not Ed25519.

    Raises PermissionError naming every problem of the file, ValueError for another kind of key
    or a file that is not a PEM private key (the message never quotes the file's content).
    """
    problems = key_file_problems(path)
    if problems:
        raise PermissionError("; ".join(problems))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a trusted public key (PEM SPKI); a private key file is accepted and reduced."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if isinstance(private, Ed25519PrivateKey):
            return private.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


MAX_KEY_FILE_BYTES = 64 * 1024


def load_consumer_key(path: Path) -> Ed25519PublicKey:
    """Load a consumer's public key (`mqtt.ack_keys`, PEM SPKI) for acknowledgements.

    A private key is refused, not reduced: the consumer's private key belongs to the consumer
    alone (docs/security.md), and a copy on every gateway would be a copy to steal. Raises
    OSError when the file cannot be read, ValueError naming the file otherwise (never quoting
    its content).
    """
    with path.open("rb") as handle:
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is larger than a key file")
    if b"PRIVATE KEY" in data:
        raise ValueError(
            f"{path} is a private key: give the consumer's public key (the .pub that "
            "`edge-agent keygen` wrote); the private key stays with the consumer"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key

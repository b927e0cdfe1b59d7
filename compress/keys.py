"""The Ed25519 key pair that signs bundles: made once, kept central; edge boxes hold only the public key."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.bundle import key_id, load_public_key
from edge_runtime.errors import UserInputError
from edge_runtime.fileio import atomic_write_bytes

PRIVATE_NAME = "bundle_signing_key.pem"
PUBLIC_NAME = "bundle_signing_key.pub.pem"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str


def init_keys(directory: str | Path) -> KeyPair:
    """Write a new key pair into ``directory`` (private key mode 0600); refuse to overwrite either file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    for p in (private, public):
        if p.exists():
            raise UserInputError(
                f"{p} already exists: refusing to overwrite a signing key (bundles signed with it would no longer "
                "verify on the edge boxes). Pass another --dir, or move the old key away yourself."
            )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the temporary file is private from its first byte
    try:
        atomic_write_bytes(private, pem)
    finally:
        os.umask(old_umask)
    os.chmod(private, 0o600)
    atomic_write_bytes(public, pub)
    os.chmod(public, 0o644)
    return KeyPair(private=private, public=public, key_id=key_id(key.public_key()))


def load_private_key(path: str | Path):
    """The Ed25519 private key in a PEM file written by :func:`init_keys`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read the signing key {path}: {exc.strerror}; make one with 'defectkit keys init'") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UserInputError(f"{path} is not an unencrypted PEM private key ({exc}); make one with 'defectkit keys init'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserInputError(f"{path} holds a {type(key).__name__}; bundles are signed with Ed25519 keys ('defectkit keys init')")
    return key


__all__ = ["KeyPair", "init_keys", "load_private_key", "load_public_key", "PRIVATE_NAME", "PUBLIC_NAME"]

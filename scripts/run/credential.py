"""The rescue VM's admin credential: generated for each run, handed to Terraform only in its environment.

Nobody logs in to the rescue VM (it is driven by Run Command), so the value is never shown, never
written and never put on a command line; a Linux private key is dropped as soon as its public half
exists.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

PASSWORD_VARIABLE = "rescue_admin_password"
SSH_KEY_VARIABLE = "rescue_admin_ssh_public_key"
_PASSWORD_SPECIALS = "-_.!#%+@~^"  # no quote, backslash, $ or backtick: safe in any shell it is pasted into


@dataclass(frozen=True, repr=False)
class RescueCredential:
    """One Terraform variable of the repair stack and its value; reaches Terraform as TF_VAR_<variable>."""

    variable: str
    value: str

    def __repr__(self) -> str:
        return f"RescueCredential({self.variable}=<redacted>)"

    @property
    def env(self) -> dict[str, str]:
        return {f"TF_VAR_{self.variable}": self.value}

    @classmethod
    def generate(cls, rescue_os: str) -> "RescueCredential":
        if rescue_os == "linux":
            return cls(SSH_KEY_VARIABLE, _ssh_public_key())
        return cls(PASSWORD_VARIABLE, _password())


def _password(length: int = 32) -> str:
    """Azure wants 12-123 characters from at least three of lower, upper, digit, special: we use all four."""
    alphabet = string.ascii_letters + string.digits + _PASSWORD_SPECIALS
    classes = (string.ascii_lowercase, string.ascii_uppercase, string.digits, _PASSWORD_SPECIALS)
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(length))
        if all(any(c in cls for c in candidate) for cls in classes):
            return candidate


def _ssh_public_key() -> str:
    """An RSA-3072 public key in OpenSSH form (RSA: every azurerm version and Azure API accepts it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode("ascii") + " crashcart-rescue"

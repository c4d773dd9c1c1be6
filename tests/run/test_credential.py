"""The rescue VM's per-run credential (scripts/run/credential.py)."""

from __future__ import annotations

from scripts.run.credential import RescueCredential


def test_rescue_credentials():
    password = RescueCredential.generate("windows")
    assert password.variable == "rescue_admin_password" and len(password.value) == 32
    assert all(any(c in cls for c in password.value)
               for cls in ("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "-_.!#%+@~^"))
    assert password.value not in repr(password) and "redacted" in repr(password)
    assert RescueCredential.generate("windows").value != password.value
    key = RescueCredential.generate("linux")
    assert key.variable == "rescue_admin_ssh_public_key" and key.value.startswith("ssh-rsa AAAA")
    assert set(key.env) == {"TF_VAR_rescue_admin_ssh_public_key"}

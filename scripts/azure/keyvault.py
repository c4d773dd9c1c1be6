"""The BitLocker key of an Azure Disk Encryption (ADE) disk, read from the VM's Key Vault.

ADE on a Windows VM keeps each encrypted volume's BitLocker external key (the .BEK file) as a Key Vault
secret and writes where it is into the disk's `encryptionSettingsCollection` (single pass; the VM's
`storageProfile.osDisk.encryptionSettings` for the older dual-pass ADE):
`encryptionSettings[].diskEncryptionKey.secretUrl` + `.sourceVault.id`, and, when a key encryption key
(KEK) protects it, `keyEncryptionKey.keyUrl` + `.sourceVault.id`. The secret:

- without a KEK: its value is the .BEK file in base64 (contentType "BEK");
- with a KEK: its value is the .BEK file wrapped with the KEK (RSA-OAEP unless the tag
  DiskEncryptionKeyEncryptionAlgorithm says RSA-OAEP-256 or RSA1_5), base64url, contentType "Wrapped BEK";
  the Key Vault unwraps it (POST keys/{name}/{version}/unwrapkey: the private key never leaves the vault);
- tags: DiskEncryptionKeyFileName (`<guid>.BEK`), MachineName, VolumeLetter, and with a KEK
  DiskEncryptionKeyEncryptionKeyURL / DiskEncryptionKeyEncryptionAlgorithm.

The SDK clients (azure-keyvault-secrets SecretClient, azure-keyvault-keys CryptographyClient) do Key
Vault's challenge authentication: a first request without a token, a 401 naming the tenant and the
resource, then the token. A token goes only to a Key Vault host (KEYVAULT_HOSTS) or to a loopback double
(the tests'), for which the check that the challenge's resource matches the host is off. Whoever reads the
key needs "Key Vault Secrets User" on the vault (secrets/getSecret), and "Key Vault Crypto User" for the KEK
(keys/unwrap), or a vault access policy with secret get / key unwrapKey: a refusal is exit 3 naming the
vault and the role. The key is returned as bytes for one use and never logged or written.
"""

from __future__ import annotations

import base64
import binascii
import struct
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from scripts.azure.errors import translate_azure_error
from scripts.azure.roles import RoleDefinition
from scripts.base.endpoints import is_loopback_host
from scripts.base.errors import CrashcartError, ExitCode, first_line

KEYVAULT_HOSTS = (".vault.azure.net", ".vault.usgovcloudapi.net", ".vault.azure.cn", ".managedhsm.azure.net")
GET_SECRET = "Microsoft.KeyVault/vaults/secrets/getSecret/action"
UNWRAP_KEY = "Microsoft.KeyVault/vaults/keys/unwrap/action"
# the built-in roles that grant them (Azure built-in roles, "Security" section)
SECRETS_USER = RoleDefinition(
    "Key Vault Secrets User", (), data_actions=(GET_SECRET, "Microsoft.KeyVault/vaults/secrets/readMetadata/action"),
    id="4633458b-17de-408a-b874-0445c86b69e6", description="Read secret contents.")
CRYPTO_USER = RoleDefinition(
    "Key Vault Crypto User", ("Microsoft.Authorization/*/read",),
    data_actions=tuple(f"Microsoft.KeyVault/vaults/keys/{a}" for a in (
        "read", "update/action", "backup/action", "encrypt/action", "decrypt/action", "wrap/action",
        "unwrap/action", "sign/action", "verify/action")),
    id="12338af0-0e69-4776-bea7-57ae8d297424", description="Perform cryptographic operations using keys.")
WRAP_ALGORITHMS = ("RSA-OAEP", "RSA-OAEP-256", "RSA1_5")
BEK_VERSION = 1  # a .BEK file is an FVE metadata block: size, version 1, header size, size again


@dataclass(frozen=True)
class AdeKeyReference:
    """Where ADE keeps one volume's key (from the disk's or the VM's encryption settings)."""

    secret_url: str
    vault_id: str = ""  # the vault's resource ID (sourceVault.id)
    kek_url: str = ""
    kek_vault_id: str = ""

    @property
    def vault_name(self) -> str:
        return vault_name(self.secret_url, self.vault_id)


@dataclass(frozen=True)
class Bek:
    """A volume's BitLocker external key file, read from Key Vault."""

    data: bytes = field(repr=False)  # the .BEK file: a secret, never logged
    secret_url: str
    file_name: str = ""  # tag DiskEncryptionKeyFileName
    machine_name: str = ""  # tag MachineName
    volume_letter: str = ""  # tag VolumeLetter
    wrapped_with: str = ""  # the KEK's URL when the secret was wrapped

    def describe(self) -> dict[str, Any]:
        """What a report may show: where the key came from, never the key."""
        return {"secret": self.secret_url.split("?")[0], "file_name": self.file_name, "machine": self.machine_name,
                "volume": self.volume_letter, "kek": self.wrapped_with or None, "bytes": len(self.data)}


def _get(obj: Any, *names: str) -> Any:
    """A property of an SDK model or of its JSON (camelCase or snake_case), None when absent."""
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def references(disk: Any = None, vm: Any = None) -> list[AdeKeyReference]:
    """The ADE key references of a managed disk (encryptionSettingsCollection) or, failing that, of the VM's
    OS disk (storageProfile.osDisk.encryptionSettings); [] when neither names one (not ADE-encrypted)."""
    found: list[AdeKeyReference] = []
    collection = _get(disk, "encryption_settings_collection", "encryptionSettingsCollection") if disk is not None else None
    if collection is not None and _get(collection, "enabled") is not False:
        for element in _get(collection, "encryption_settings", "encryptionSettings") or []:
            found += _reference(element)
    if not found and vm is not None:
        profile = _get(vm, "storage_profile", "storageProfile")
        os_disk = _get(profile, "os_disk", "osDisk") if profile is not None else None
        settings = _get(os_disk, "encryption_settings", "encryptionSettings") if os_disk is not None else None
        if settings is not None and _get(settings, "enabled") is not False:
            found += _reference(settings)
    return found


def _reference(element: Any) -> list[AdeKeyReference]:
    dek = _get(element, "disk_encryption_key", "diskEncryptionKey")
    url = _get(dek, "secret_url", "secretUrl") if dek is not None else None
    if not url:
        return []
    kek = _get(element, "key_encryption_key", "keyEncryptionKey")
    return [AdeKeyReference(str(url), _vault_id(dek), str(_get(kek, "key_url", "keyUrl") or "") if kek else "",
                            _vault_id(kek) if kek else "")]


def _vault_id(reference: Any) -> str:
    vault = _get(reference, "source_vault", "sourceVault")
    return str(_get(vault, "id") or "") if vault is not None else ""


def vault_name(url: str, vault_id: str = "") -> str:
    if vault_id:
        return vault_id.rstrip("/").rsplit("/", 1)[-1]
    host = urllib.parse.urlsplit(url).hostname or url
    return host.split(".")[0] if not is_loopback_host(url) else host


def _vault_url(url: str, what: str) -> tuple[str, str, str | None]:
    """(vault URL, object name, version) of a Key Vault object URL; refuses a host that is no Key Vault (a token
    for the vault must not go anywhere else)."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    host = (parts.hostname or "").lower()
    vault_host = parts.scheme == "https" and host.endswith(KEYVAULT_HOSTS)
    if not (vault_host or (is_loopback_host(url) and parts.scheme == "https")) or len(segments) not in (2, 3):
        raise CrashcartError(f"the {what} URL {url!r} is not a Key Vault object URL "
                             f"(https://<vault>.vault.azure.net/{segments[0] if segments else '<kind>'}/<name>/<version>)",
                             "check the disk's encryption settings (az disk show --query encryptionSettingsCollection); "
                             "crashcart sends its token only to Key Vault hosts", ExitCode.USAGE)
    return f"{parts.scheme}://{parts.netloc}", segments[1], segments[2] if len(segments) == 3 else None


def _client_options(url: str) -> dict[str, Any]:
    # a loopback double cannot be a subdomain of the challenge's resource (vault.azure.net)
    return {"verify_challenge_resource": False} if is_loopback_host(url) else {}


def _auth_hints(reference: AdeKeyReference, role: str, permission: str, scope_id: str) -> dict[str, str]:
    vault = reference.vault_name
    scope = scope_id or f"<the resource ID of Key Vault {vault}>"
    return {"auth": f"the identity needs '{role}' on Key Vault {vault} (az role assignment create --role \"{role}\" "
                    f"--assignee <object id> --scope {scope}); for a vault with access policies: az keyvault set-policy "
                    f"-n {vault} --object-id <object id> {permission}; or collect with repair.strategy = \"rescue-vm\" "
                    "after unlocking the copy yourself",
            "not_found": f"the secret or key named in the disk's encryption settings is not in Key Vault {vault} "
                         "(deleted or purged?): check `az keyvault secret list --vault-name " + vault + "`"}


def read_bek(reference: AdeKeyReference, credential: Any, **client_kwargs: Any) -> Bek:
    """The .BEK file of `reference`: the secret read, unwrapped with the KEK when it is wrapped, checked to be a
    BEK file. Raises CrashcartError: exit 3 (no access: names the vault and the role), 4 (no such secret or
    key), 2 (not a Key Vault URL), 11 (the secret is not a BitLocker key)."""
    from azure.keyvault.secrets import SecretClient

    vault_url, name, version = _vault_url(reference.secret_url, "disk encryption key secret")
    what = f"the BitLocker key secret {name} in Key Vault {reference.vault_name}"
    client = SecretClient(vault_url, credential, **_client_options(vault_url), **client_kwargs)
    try:
        secret = client.get_secret(name, version)
    except Exception as err:  # noqa: BLE001 - every SDK error becomes the operator's error
        raise _translated(err, what, reference, SECRETS_USER.name, "--secret-permissions get",
                          reference.vault_id) from None
    finally:
        client.close()
    tags = dict(secret.properties.tags or {})
    kek_url = reference.kek_url or tags.get("DiskEncryptionKeyEncryptionKeyURL", "")
    value = secret.value or ""
    wrapped = bool(kek_url) or "DiskEncryptionKeyEncryptionAlgorithm" in tags or \
        (secret.properties.content_type or "").lower() == "wrapped bek"
    if wrapped:
        if not kek_url:
            raise CrashcartError(f"{what} is wrapped with a key encryption key, but neither the disk's encryption "
                                 "settings nor the secret's tags name it", "check `az vm encryption show` for the "
                                 "KEK's URL", ExitCode.DISK_NOT_FOUND)
        algorithm = tags.get("DiskEncryptionKeyEncryptionAlgorithm") or "RSA-OAEP"
        data = unwrap(reference, kek_url, algorithm, _b64(value, what), credential, **client_kwargs)
    else:
        data = _b64(value, what)
    _check_bek(data, what)
    return Bek(data, reference.secret_url, tags.get("DiskEncryptionKeyFileName", ""), tags.get("MachineName", ""),
               tags.get("VolumeLetter", ""), kek_url if wrapped else "")


def unwrap(reference: AdeKeyReference, kek_url: str, algorithm: str, wrapped: bytes, credential: Any,
           **client_kwargs: Any) -> bytes:
    """The BEK unwrapped by the vault with the KEK (the private key stays in Key Vault)."""
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

    if algorithm not in WRAP_ALGORITHMS:
        raise CrashcartError(f"the BitLocker key is wrapped with {algorithm!r}, which crashcart does not unwrap "
                             f"(ADE uses {', '.join(WRAP_ALGORITHMS)})", "unlock the disk copy on a rescue VM "
                             "yourself", ExitCode.DISK_NOT_FOUND)
    vault_url, name, _ = _vault_url(kek_url, "key encryption key")
    kek_ref = AdeKeyReference(reference.secret_url, reference.kek_vault_id or reference.vault_id)
    what = f"the key encryption key {name} in Key Vault {vault_name(kek_url, reference.kek_vault_id)}"
    client = CryptographyClient(kek_url, credential, **_client_options(vault_url), **client_kwargs)
    try:
        return client.unwrap_key(KeyWrapAlgorithm(algorithm), wrapped).key
    except Exception as err:  # noqa: BLE001
        raise _translated(err, what, kek_ref, CRYPTO_USER.name, "--key-permissions unwrapKey",
                          reference.kek_vault_id) from None
    finally:
        client.close()


def _translated(err: BaseException, what: str, reference: AdeKeyReference, role: str, permission: str,
                scope_id: str) -> CrashcartError:
    if isinstance(err, CrashcartError):
        return err
    if getattr(err, "status_code", None) is None and not type(err).__module__.startswith("azure"):
        return CrashcartError(f"could not read {what}: {first_line(err)}", "re-run with -v and report it if it "
                              "persists", ExitCode.AZURE_FAILED)
    return translate_azure_error(err, what, doing=f"read {what}",
                                 hints=_auth_hints(reference, role, permission, scope_id))


def _b64(value: str, what: str) -> bytes:
    text = "".join(value.split())
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CrashcartError(f"{what} does not hold base64 (a BEK secret is the .BEK file in base64)",
                             "check that the disk's encryption settings name ADE's secret", ExitCode.DISK_NOT_FOUND) from None


def _check_bek(data: bytes, what: str) -> None:
    """A .BEK file starts with its own size and version 1 (an FVE metadata block); anything else (a Linux ADE
    passphrase, a wrong unwrap) is refused before it reaches the disk."""
    if len(data) < 16 or struct.unpack_from("<II", data) != (len(data), BEK_VERSION):
        raise CrashcartError(f"{what} is not a BitLocker external key (.BEK) file ({len(data)} bytes)",
                             "a Linux VM's ADE secret is a passphrase for dm-crypt, not a BitLocker key: crashcart "
                             "reads Windows disks only; else check the secret named in the disk's encryption settings",
                             ExitCode.DISK_NOT_FOUND)

"""A loopback Key Vault for the real SDK clients (azure-keyvault-secrets, azure-keyvault-keys): the secrets and the
key encryption keys Azure Disk Encryption keeps, served over HTTPS the way Key Vault answers.

- HTTPS only, with a self-signed certificate for 127.0.0.1 made at start (`ca_file`: point the client at it,
  e.g. REQUESTS_CA_BUNDLE or connection_verify): the SDK sends no token over plain HTTP.
- Challenge authentication, as Key Vault does it: a request without a bearer token is answered 401 with
  `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"`
  (and AKV10000 in the body); the SDK then asks its credential for a token for that resource and sends again.
  A token is a JWT whose claims the double reads without a signature (`token_for` makes one; the `oid` names
  the caller, `aud` must be the vault resource, else 401 AKV10022).
- RBAC, as a vault with the Azure RBAC permission model: every request is a data action (secrets/getSecret,
  keys/read, keys/unwrap, ...) on the object's scope (`<vault id>/secrets/<name>`), decided by
  scripts.devkit.arm_rbac over role assignments made with `grant`; a caller without it gets Key Vault's 403
  (`Forbidden`, innererror `ForbiddenByRbac`, the message naming caller, action and resource).
- Routes: GET secrets/{name}[/{version}], GET keys/{name}[/{version}] (the public JWK), POST
  keys/{name}/{version}/unwrapkey (RSA-OAEP, RSA-OAEP-256, RSA1_5 with the private key that never leaves the
  double); anything else 404/400 in Key Vault's error shape. `requests` records what was asked (method, path,
  whether it carried a token).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scripts.azure import keyvault as kv
from scripts.azure.roles import RoleDefinition
from scripts.devkit.arm_rbac import SUBSCRIPTION, Rbac

RESOURCE = "https://vault.azure.net"
TENANT = "72f988bf-0000-0000-0000-00000000beef"
LOCATION = "westeurope"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_for(principal_id: str, audience: str = RESOURCE, tenant: str = TENANT) -> str:
    """An unsigned JWT with the claims Key Vault reads (the double does not check signatures)."""
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    now = int(time.time())
    claims = {"aud": audience, "oid": principal_id, "tid": tenant, "appid": principal_id,
              "iss": f"https://sts.windows.net/{tenant}/", "iat": now, "exp": now + 3600}
    return f"{header}.{_b64url(json.dumps(claims).encode())}."


class Credential:
    """A TokenCredential for the double: a token for `principal_id` with the scope's resource as audience;
    `scopes` keeps what the SDK asked for (the challenge's resource + /.default)."""

    def __init__(self, principal_id: str):
        self.principal_id, self.scopes = principal_id, []

    def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        audience = scopes[0].removesuffix("/.default") if scopes else RESOURCE
        return AccessToken(token_for(self.principal_id, audience), int(time.time()) + 3600)


@dataclass
class _Key:
    name: str
    version: str
    private: Any  # cryptography RSAPrivateKey


@dataclass
class KeyVaultDouble:
    """One vault. Use as a context manager: `url`, `ca_file`, `resource_id`."""

    name: str = "crashcart-ade-kv"
    resource_group: str = "source-rg"
    rbac: Rbac = field(default_factory=lambda: Rbac(grants=[]))
    secrets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> versions (last = current)
    keys: dict[str, list[_Key]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resource_id(self) -> str:
        return (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{self.resource_group}/providers/Microsoft.KeyVault/"
                f"vaults/{self.name}")

    # ---- what the world holds -----------------------------------------------------------------------------
    def grant(self, principal_id: str, role: RoleDefinition = kv.SECRETS_USER, scope: str | None = None) -> None:
        self.rbac.add(principal_id, role, scope or self.resource_id)

    def set_secret(self, name: str, value: str, *, content_type: str | None = None,
                   tags: dict[str, str] | None = None) -> str:
        version = uuid.uuid4().hex
        self.secrets.setdefault(name, []).append({"value": value, "contentType": content_type, "tags": tags or {},
                                                  "version": version})
        return f"{self.url}/secrets/{name}/{version}"

    def add_rsa_key(self, name: str) -> str:
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = _Key(name, uuid.uuid4().hex, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.keys.setdefault(name, []).append(key)
        return f"{self.url}/keys/{name}/{key.version}"

    def wrap(self, key_url: str, data: bytes, algorithm: str = "RSA-OAEP") -> str:
        """`data` wrapped with the key's public half, base64url: what ADE stores as a wrapped BEK."""
        key = self._key(*[s for s in urllib.parse.urlsplit(key_url).path.split("/") if s][1:3])
        assert key is not None
        return _b64url(key.private.public_key().encrypt(data, _padding(algorithm)))

    # ---- the server ---------------------------------------------------------------------------------------
    def __enter__(self) -> "KeyVaultDouble":
        self._dir = tempfile.TemporaryDirectory(prefix="crashcart-kv-")
        cert, key = _self_signed(Path(self._dir.name))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.ca_file = str(cert)
        double = self

        class Handler(_Handler):
            vault = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._dir.cleanup()

    def _key(self, name: str, version: str | None) -> _Key | None:
        versions = self.keys.get(name, [])
        if version:
            return next((k for k in versions if k.version == version), None)
        return versions[-1] if versions else None

    def answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
               body: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        segments = [urllib.parse.unquote(s) for s in path.split("/") if s]
        token = (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        self.requests.append({"method": method, "path": path, "token": bool(token)})
        if not token:
            return 401, {"WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                                             f'resource="{RESOURCE}"'}, \
                _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        claims = _claims(token)
        if claims is None or claims.get("aud") not in (RESOURCE, RESOURCE + "/"):
            return 401, {}, _error("Unauthorized", f"AKV10022: Invalid audience. Expected {RESOURCE}, found: "
                                                   f"{(claims or {}).get('aud')}.")
        if not query.get("api-version"):
            return 400, {}, _error("BadParameter", "The request URI contains an invalid api-version parameter.")
        if len(segments) not in (2, 3, 4) or segments[0] not in ("secrets", "keys"):
            return 404, {}, _error("NotFound", "The requested resource was not found.")
        kind, name = segments[0], segments[1]
        version = segments[2] if len(segments) > 2 else None
        operation = segments[3] if len(segments) > 3 else None
        if kind == "secrets" and method == "GET" and operation is None:
            return self._secret(claims, name, version)
        if kind == "keys" and method == "GET" and operation is None:
            return self._get_key(claims, name, version)
        if kind == "keys" and method == "POST" and operation == "unwrapkey":
            return self._unwrap(claims, name, version, body)
        return 405, {}, _error("BadParameter", f"{method} {path} is not supported by this vault.")

    def _forbidden(self, claims: dict[str, Any], action: str, scope: str) -> tuple[int, dict[str, str], dict] | None:
        decision = self.rbac.decide_data(str(claims.get("oid", "")), action, scope)
        if decision.allowed:
            return None
        caller = f"appid={claims.get('appid')};oid={claims.get('oid')};iss={claims.get('iss')}"
        message = ("Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments "
                   "or role definitions were changed recently, please observe propagation time.\r\n"
                   f"Caller: {caller}\r\nAction: '{action}'\r\nResource: '{scope.lower()}'\r\n"
                   f"Assignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\n"
                   f"Vault: {self.name};location={LOCATION}\r\n")
        return 403, {}, _error("Forbidden", message, inner="ForbiddenByRbac")

    def _secret(self, claims: dict[str, Any], name: str, version: str | None) -> tuple[int, dict[str, str], dict]:
        refused = self._forbidden(claims, kv.GET_SECRET, f"{self.resource_id}/secrets/{name}")
        if refused:
            return refused
        versions = self.secrets.get(name, [])
        found = next((s for s in versions if s["version"] == version), None) if version else \
            (versions[-1] if versions else None)
        if found is None:
            return 404, {}, _error("SecretNotFound", f"A secret with (name/id) {name}/{version or ''} was not found "
                                                     "in this key vault. If you recently deleted this secret you may "
                                                     "be able to recover it using the correct recovery command.")
        now = int(time.time())
        body = {"value": found["value"], "id": f"{self.url}/secrets/{name}/{found['version']}",
                "attributes": {"enabled": True, "created": now, "updated": now,
                               "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
                "tags": found["tags"]}
        if found["contentType"]:
            body["contentType"] = found["contentType"]
        return 200, {}, body

    def _readable_key(self, claims: dict[str, Any], action: str, name: str,
                      version: str | None) -> tuple[Any, tuple[int, dict[str, str], dict] | None]:
        """The key `action` is asked on, or the answer refusing it: the RBAC decision first (as the vault
        answers 403 before it says whether the key exists), then 404 KeyNotFound."""
        refused = self._forbidden(claims, action, f"{self.resource_id}/keys/{name}")
        if refused:
            return None, refused
        key = self._key(name, version)
        if key is None:
            return None, (404, {}, _error("KeyNotFound", f"A key with (name/id) {name}/{version or ''} was not found "
                                                         "in this key vault."))
        return key, None

    def _get_key(self, claims: dict[str, Any], name: str, version: str | None) -> tuple[int, dict[str, str], dict]:
        key, refused = self._readable_key(claims, "Microsoft.KeyVault/vaults/keys/read", name, version)
        if refused:
            return refused
        numbers = key.private.public_key().public_numbers()
        jwk = {"kid": f"{self.url}/keys/{name}/{key.version}", "kty": "RSA",
               "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
               "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
               "e": _b64url(numbers.e.to_bytes(3, "big"))}
        now = int(time.time())
        return 200, {}, {"key": jwk, "attributes": {"enabled": True, "created": now, "updated": now,
                                                    "recoveryLevel": "Recoverable+Purgeable"}}

    def _unwrap(self, claims: dict[str, Any], name: str, version: str | None,
                body: bytes) -> tuple[int, dict[str, str], dict]:
        key, refused = self._readable_key(claims, kv.UNWRAP_KEY, name, version)
        if refused:
            return refused
        try:
            request = json.loads(body or b"{}")
            algorithm, value = request["alg"], _unb64url(request["value"])
            plain = key.private.decrypt(value, _padding(algorithm))
        except (ValueError, KeyError, TypeError):
            return 400, {}, _error("BadParameter", "Invalid algorithm or ciphertext for unwrapKey.")
        return 200, {}, {"kid": f"{self.url}/keys/{name}/{key.version}", "value": _b64url(plain)}


class _Handler(BaseHTTPRequestHandler):
    vault: KeyVaultDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, payload = self.vault.answer(self.command, parts.path, urllib.parse.parse_qs(parts.query),
                                                     self.headers, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json; charset=utf-8", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


def _error(code: str, message: str, inner: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return {"error": error}


def _claims(token: str) -> dict[str, Any] | None:
    try:
        return json.loads(_unb64url(token.split(".")[1]))
    except (ValueError, IndexError):
        return None


def _padding(algorithm: str) -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    if algorithm == "RSA1_5":
        return padding.PKCS1v15()
    digest = {"RSA-OAEP": hashes.SHA1, "RSA-OAEP-256": hashes.SHA256}[algorithm]()
    return padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (PEM files in `folder`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crashcart Key Vault double")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path

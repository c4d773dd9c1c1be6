"""Preflight's reads from Azure: GETs only (and one storage read), in seconds, nothing created or changed.

What it reads, in checklist order: the caller's effective permissions at each scope crashcart works in
(Microsoft.Authorization permissions API) against scripts/azure/roles/*.json; the resource providers the
stacks need; the source OS disk's export policy (networkAccessPolicy, publicNetworkAccess,
dataAccessAuthMode); its encryption (Azure Disk Encryption on the VM or the disk, a disk encryption set);
the rescue size in the zone (resource SKUs) and the vCPU quota of its family in the region (compute usages);
the evidence container from this machine (its firewall); then the names and TTL the run will use. Each
check that cannot read what it needs becomes a finding of its own (the error's message, hint and exit
code): one refusal never hides the other checks. scripts.run.preflight_checks judges the findings.

The permissions API has no subscription scope (Permissions_ListForResourceGroup / _ListForResource): the
operator role, assigned on the subscription, is read at the repair resource group when it exists, else at
the source VM's group, where subscription assignments are inherited.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from scripts.azure import ids, keyvault, roles
from scripts.azure.clients import AzureClients
from scripts.azure.errors import azure_call
from scripts.azure.identity import vm_key
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.model import Config
from scripts.run import preflight_capacity
from scripts.run.preflight_checks import (ALL, EXIT_CODES, EXPORT, Finding, allowed, assignment_needs,
                                          operator_needs, permission_finding)

PROVIDERS = ("Microsoft.Compute", "Microsoft.Network", "Microsoft.Storage")
ADE_TYPES = ("azurediskencryption", "azurediskencryptionforlinux")
ADE_PUBLISHER = "microsoft.azure.security"
DISK_DOWNLOAD = "Microsoft.Compute/snapshots/download/action"  # Data Operator for Managed Disks
DATA_OPERATOR = "Data Operator for Managed Disks"


def _text(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def _not_signed_in(err: CrashcartError) -> bool:
    """The error translated a credential's failure to get a token (no status: nothing reached Azure), not a
    refusal by Azure (scripts.azure.errors.translate_azure_error raises it from the SDK's exception)."""
    from azure.core.exceptions import ClientAuthenticationError

    cause = err.__cause__ or err.__context__
    return isinstance(cause, ClientAuthenticationError) and getattr(cause, "status_code", None) is None


def _props(obj: Any, name: str) -> Any:
    """A flattened SDK attribute, or the same under `properties` (the SDK's newer models nest it)."""
    value = getattr(obj, name, None)
    if value is None:
        value = getattr(getattr(obj, "properties", None), name, None)
    return value


class AzurePreflight:
    """The reads for one config; `findings()` runs them all."""

    def __init__(self, config: Config, *, evidence_endpoint: str = "", now: dt.datetime | None = None):
        self.config = config
        self.source = config.source
        self.clients = AzureClients(config.source.subscription_id)
        self.authz = self.clients.authorization
        self.evidence_endpoint = evidence_endpoint or config.evidence_blob_endpoint
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self.disk_id = ids.parse(config.source.os_disk_id, "disk")
        self.subscription_permissions: list[dict[str, Any]] | None = None
        self.subscription_read_at = ""
        self.disk: Any = None

    def findings(self) -> list[Finding]:
        """Every check's findings; when this machine is not signed in to Azure, that one finding alone (every
        other check would fail the same way)."""
        out: list[Finding] = []
        for check, subject, func in (
                ("permissions", "subscription (operator role)", self.operator),
                ("permissions", f"source resource group {self.source.resource_group}", self.source_group),
                ("permissions", f"source OS disk {self.disk_id.name}", self.source_disk_permissions),
                ("permissions", f"evidence container {self.config.evidence.container}", self.evidence_permissions),
                ("permissions", "Terraform state container", self.state_permissions),
                ("providers", ", ".join(PROVIDERS), self.providers),
                ("source disk", f"export policy of {self.disk_id.name}", self.export_policy),
                ("encryption", f"{self.source.vm_name} and its OS disk", self.encryption),
                ("rescue size", f"{self.config.rescue.size} in {self.source.location}", self.rescue_size),
                ("evidence", f"container {self.config.evidence.container} from this machine", self.evidence),
                ("run", "names and TTL", self.names)):
            try:
                out += func()
            except CrashcartError as err:
                if _not_signed_in(err):
                    return [Finding("sign-in", "Azure credential of this machine", False, err.message, err.hint,
                                    int(err.exit_code), ALL)]
                out.append(Finding(check, subject, False, err.message, err.hint, int(err.exit_code), ALL))
        return out

    # ---- permissions ----------------------------------------------------------------------------------------
    def _permissions(self, call: Callable[[], Any], what: str) -> list[dict[str, Any]]:
        found = azure_call(lambda: list(call()), f"the permissions on {what}",
                           doing=f"list this identity's permissions on {what} (Microsoft.Authorization/"
                                 "permissions/read)")
        return [{"actions": list(p.actions or ()), "notActions": list(p.not_actions or ()),
                 "dataActions": list(p.data_actions or ()), "notDataActions": list(p.not_data_actions or ())}
                for p in found]

    def _group_permissions(self, group: str) -> list[dict[str, Any]]:
        return self._permissions(lambda: self.authz.permissions.list_for_resource_group(group), f"resource group {group}")

    def operator(self) -> list[Finding]:
        repair = self.config.repair_resource_group
        try:
            permissions, where = self._group_permissions(repair), f"the repair resource group {repair}"
        except CrashcartError as err:
            if err.exit_code != ExitCode.AZURE_NOT_FOUND:
                raise
            group = self.source.resource_group
            permissions = self._group_permissions(group)
            where = (f"the source resource group {group}, which inherits the subscription's assignments: the repair "
                     "group does not exist yet")
        self.subscription_permissions, self.subscription_read_at = permissions, where
        return [permission_finding("subscription (operator role)", f"/subscriptions/{self.source.subscription_id}",
                                   operator_needs(), permissions, where=where, custom_role=True)]

    def source_group(self) -> list[Finding]:
        group = self.source.resource_group
        scope = f"/subscriptions/{self.source.subscription_id}/resourceGroups/{group}"
        return [permission_finding(f"source resource group {group}", scope,
                                   assignment_needs("source", "source-resource-group"), self._group_permissions(group))]

    def source_disk_permissions(self) -> list[Finding]:
        disk = self.disk_id
        permissions = self._permissions(lambda: self.authz.permissions.list_for_resource(
            disk.resource_group, "Microsoft.Compute", "", "disks", disk.name), f"OS disk {disk.name}")
        return [permission_finding(f"source OS disk {disk.name}", disk.id, assignment_needs("source", "source-os-disk"),
                                   permissions)]

    def _container_permissions(self, group: str, account: str, container: str) -> list[dict[str, Any]]:
        return self._permissions(lambda: self.authz.permissions.list_for_resource(
            group, "Microsoft.Storage", f"storageAccounts/{account}/blobServices/default", "containers", container),
            f"container {account}/{container}")

    def evidence_permissions(self) -> list[Finding]:
        config = self.config
        group, account, container = (config.evidence_account_resource_group, config.evidence_account_name,
                                     config.evidence.container)
        scope = f"{config.evidence_account_id}/blobServices/default/containers/{container}"
        subject = f"evidence container {account}/{container}"
        try:
            permissions = self._container_permissions(group, account, container)
        except CrashcartError as err:
            if err.exit_code != ExitCode.AZURE_NOT_FOUND or not config.evidence.create_account:
                raise
            return [Finding("permissions", subject, False, "the evidence stack is not deployed yet",
                            "repair-run deploys it (or `npx cdktf deploy evidence` as a person with Contributor on "
                            f"{group}); run preflight again afterwards to check the roles on its container")]
        needs = assignment_needs("evidence", "evidence-container") + assignment_needs("evidence", "evidence-account")
        return [permission_finding(subject, scope, needs, permissions)]

    def state_permissions(self) -> list[Finding]:
        backend = self.config.backend
        if backend.kind != "azurerm":
            return [Finding("permissions", "Terraform state container", True, "local state files: no role needed",
                            status="info")]
        scope = (ids.build("storage_account", self.source.subscription_id, backend.resource_group,
                           backend.storage_account) + f"/blobServices/default/containers/{backend.container}")
        permissions = self._container_permissions(backend.resource_group, backend.storage_account, backend.container)
        return [permission_finding(f"Terraform state container {backend.storage_account}/{backend.container}", scope,
                                   assignment_needs("evidence", "state-container"), permissions)]

    # ---- providers ------------------------------------------------------------------------------------------
    def providers(self) -> list[Finding]:
        states = {}
        for namespace in PROVIDERS:
            found = azure_call(lambda ns=namespace: self.clients.resource.providers.get(ns), f"resource provider {namespace}",
                               doing=f"read the registration of {namespace} (Microsoft.Resources/subscriptions/"
                                     "providers/read)")
            states[namespace] = _text(getattr(found, "registration_state", "")) or "unknown"
        missing = [ns for ns, state in states.items() if state.lower() != "registered"]
        detail = ", ".join(f"{ns} {state}" for ns, state in states.items())
        if not missing:
            return [Finding("providers", ", ".join(PROVIDERS), True, detail, data=states)]
        commands = "; ".join(f"az provider register --namespace {ns}" for ns in missing)
        return [Finding("providers", ", ".join(PROVIDERS), False, detail,
                        f"register them once on the subscription ({commands}; the stacks never register providers "
                        "themselves), wait until `az provider show -n <namespace>` says Registered, then re-run",
                        EXIT_CODES["providers"], ALL, states)]

    # ---- the source disk ------------------------------------------------------------------------------------
    def _read_disk(self) -> Any:
        if self.disk is None:
            disk = self.disk_id
            self.disk = azure_call(lambda: self.clients.compute.disks.get(disk.resource_group, disk.name),
                                   f"OS disk {disk.id}")
        return self.disk

    def export_policy(self) -> list[Finding]:
        disk = self._read_disk()
        policy = _text(_props(disk, "network_access_policy")) or "AllowAll"
        public = _text(_props(disk, "public_network_access")) or "Enabled"
        mode = _text(_props(disk, "data_access_auth_mode")) or "None"
        values = {"networkAccessPolicy": policy, "publicNetworkAccess": public, "dataAccessAuthMode": mode}
        detail = ", ".join(f"{k} {v}" for k, v in values.items())
        subject = f"export policy of {self.disk_id.name}"
        refusals, fixes = [], []
        if policy == "DenyAll":
            refusals.append("networkAccessPolicy DenyAll forbids any export")
        elif policy == "AllowPrivate":
            refusals.append("networkAccessPolicy AllowPrivate allows export only through a private endpoint of its "
                            "disk access")
        if public == "Disabled":
            refusals.append("publicNetworkAccess Disabled")
        if refusals:
            fixes.append("rescue-vm needs no export; to allow snapshot-export the disk's owner runs `az disk update -g "
                         f"{self.disk_id.resource_group} -n {self.disk_id.name} --network-access-policy AllowAll "
                         "--public-network-access Enabled` (crashcart never changes the source)")
        if mode == "AzureActiveDirectory" and not self._may_download():
            refusals.append(f"dataAccessAuthMode AzureActiveDirectory and no '{DATA_OPERATOR}' here")
            fixes.append(f"assign '{DATA_OPERATOR}' to this identity on the repair resource group "
                         f"{self.config.repair_resource_group} or the subscription")
        if not refusals:
            return [Finding("source disk", subject, True, f"{detail}: snapshot-export is allowed", data=values)]
        return [Finding("source disk", subject, False, f"{'; '.join(refusals)} ({detail})", "; ".join(fixes),
                        EXIT_CODES["source disk"], EXPORT, values)]

    def _may_download(self) -> bool:
        if self.subscription_permissions is None:
            return False
        return allowed(self.subscription_permissions, DISK_DOWNLOAD, data=True)

    def encryption(self) -> list[Finding]:
        disk = self._read_disk()
        source = self.source
        extensions = azure_call(lambda: list(self.clients.compute.virtual_machine_extensions.list(
            source.resource_group, source.vm_name).value or ()), f"the extensions of VM {source.vm_name}",
            doing=f"list the extensions of VM {source.vm_name} (Microsoft.Compute/virtualMachines/extensions/read)")
        ade = [e.name for e in extensions if _text(_props(e, "publisher")).lower() == ADE_PUBLISHER
               and _text(getattr(getattr(e, "properties", None), "type", None) or _props(e, "type_properties_type"))
               .lower() in ADE_TYPES]
        settings = _props(disk, "encryption_settings_collection")
        disk_ade = bool(getattr(settings, "enabled", False))
        encryption = _props(disk, "encryption")
        des = _text(getattr(encryption, "disk_encryption_set_id", None))
        kind = _text(getattr(encryption, "type", None)) or "EncryptionAtRestWithPlatformKey"
        out = []
        subject = f"{source.vm_name} and its OS disk"
        references = keyvault.references(disk=disk)
        linux = any("linux" in n.lower() for n in ade) or any(
            "linux" in _text(getattr(getattr(e, "properties", None), "type", None) or _props(e, "type_properties_type"))
            .lower() for e in extensions if e.name in ade)
        if (ade or disk_ade) and references and not linux:
            vaults = sorted({r.vault_name for r in references})
            kek = any(r.kek_url for r in references)
            roles = "'Key Vault Secrets User'" + (" and 'Key Vault Crypto User' (the BEK is wrapped with a KEK)" if kek else "")
            out.append(Finding(
                "encryption", subject, False, f"Azure Disk Encryption (BitLocker) is on (the disk's encryptionSettingsCollection "
                f"names its key in Key Vault {', '.join(vaults)}): crashcart reads the BEK from Key Vault and unlocks the "
                "volume; with snapshot-export it decrypts in the kit, so the dump's bytes pass through this machine "
                "(read over the export URL, decrypted, uploaded: no server-side copy); rescue-vm unlocks the copy on "
                "the rescue VM (the key as a protected parameter, wiped after use)",
                f"the identity that runs crashcart needs {roles} on Key Vault {', '.join(vaults)}; without it the "
                "collection stops with exit 3 naming the vault and the role", data={
                    "ade_extensions": ade, "disk_encryption_settings": disk_ade, "key_vaults": vaults, "kek": kek,
                    "snapshot_export": "decrypted in the kit: the dump's bytes pass through this machine"}))
        elif ade or disk_ade:
            where = f"extension {', '.join(ade)}" if ade else "the disk's encryptionSettingsCollection"
            why = ("a Linux VM's ADE (dm-crypt) is not a Windows volume crashcart reads" if linux else
                   "the disk's encryption settings name no key in Key Vault, so crashcart cannot read the BEK")
            out.append(Finding(
                "encryption", subject, False, f"Azure Disk Encryption (BitLocker) is on ({where}): the copy's Windows "
                f"volume is locked and {why}", "collect by hand on a rescue VM with the BEK from the VM's Key Vault "
                "(`az vm repair create --unlock-encrypted-vm`), or decrypt the VM first (`az vm encryption disable`) "
                "if policy allows", EXIT_CODES["encryption"], ALL,
                {"ade_extensions": ade, "disk_encryption_settings": disk_ade}))
        if des:
            out.append(Finding(
                "encryption", f"disk encryption set of {self.disk_id.name}", False,
                f"{kind} with disk encryption set {des}: the snapshot and the copy are encrypted with the same key",
                f"keep the set's Key Vault key enabled during the run; the identity needs "
                f"Microsoft.Compute/diskEncryptionSets/read on {des}", data={"disk_encryption_set_id": des}))
        if not out:
            out.append(Finding("encryption", subject, True, f"no Azure Disk Encryption; {kind}", data={"type": kind}))
        return out

    # ---- capacity and the evidence container (scripts.run.preflight_capacity) -----------------------------
    def rescue_size(self) -> list[Finding]:
        return preflight_capacity.rescue_size(self.clients.compute, self.config)

    def evidence(self) -> list[Finding]:
        return preflight_capacity.evidence(self.config, self.evidence_endpoint)

    # ---- what the run will be called ------------------------------------------------------------------------
    def names(self) -> list[Finding]:
        config, key = self.config, vm_key(self.source.vm_id)
        ttl = config.repair.ttl_hours
        expires = (self.now + dt.timedelta(hours=ttl)).strftime("%Y-%m-%dT%H:%M:%SZ")
        state = (f"{config.backend.key_prefix}/{key}/repair.tfstate in {config.backend.storage_account}/"
                 f"{config.backend.container}" if config.backend.kind == "azurerm" else f"terraform.repair.{key}.tfstate")
        names = {"vm_key": key, "repair_resource_group": config.repair_resource_group, "evidence_prefix": f"{key}/",
                 "lock_blob": f"locks/{key}", "repair_state": state, "ttl_hours": ttl, "expires_at_if_started_now": expires,
                 "snapshot": f"{self.source.vm_name}-crashcart-snapshot"[:80],
                 "disk_copy": f"{self.source.vm_name}-crashcart-copy"[:80], "operator_role": roles.operator().name}
        detail = (f"repair group {names['repair_resource_group']} (expires {ttl}h after creation: {expires} if now), "
                  f"evidence prefix {key}/, lock locks/{key}, state {state}")
        return [Finding("run", "names and TTL", True, detail, data=names, status="info")]

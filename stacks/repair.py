"""The `repair` stack: everything a repair needs for minutes, and nothing that must outlive it.

`cdktf deploy repair` creates it; `cdktf destroy repair` (or repair-run's guaranteed teardown) removes
every trace. It reads the source disk (snapshot) and writes only to resources it created, plus one role
assignment on the evidence container: blobs under the source VM's prefix (`<vm key>/`, the key being
scripts.azure.identity.vm_key of its resource ID), read and written, never deleted.

Its state is per VM as well (stacks.common.state_backend): `terraform.repair.<vm key>.tfstate`.
"""

from __future__ import annotations

from cdktf import (Fn, TerraformOutput, TerraformResourceLifecycle, TerraformStack, TerraformVariable,
                   TerraformVariableValidationConfig)
from cdktf_cdktf_provider_azurerm.provider import (
    AzurermProviderFeaturesResourceGroup,
    AzurermProviderFeaturesVirtualMachine,
)
from cdktf_cdktf_provider_azurerm.resource_group import ResourceGroup
from cdktf_cdktf_provider_azurerm.role_assignment import RoleAssignment
from constructs import Construct

from scripts.azure import roles
from scripts.azure.identity import vm_key
from scripts.config.model import Config
from stacks.common import azurerm_provider, state_backend
from stacks.disk_copy import DiskCopy
from stacks.evidence import EvidenceStack
from stacks.network import RescueNetwork
from stacks.rescue_vm import DISK_COPY_LUN, RescueVm

EXPIRES_AT_TAG = "crashcart-expires-at"
ADMIN_PASSWORD_VARIABLE = "rescue_admin_password"
ADMIN_SSH_KEY_VARIABLE = "rescue_admin_ssh_public_key"
BLOB_WRITER_ROLE = "Storage Blob Data Contributor"


class RepairStack(TerraformStack):
    def __init__(self, scope: Construct, id: str, config: Config, evidence: EvidenceStack):
        super().__init__(scope, id)
        azurerm_provider(
            self, config,
            # The group is the kit's own: delete whatever Run Command or the platform added to it.
            resource_group=[AzurermProviderFeaturesResourceGroup(prevent_deletion_if_contains_resources=False)],
            virtual_machine=[AzurermProviderFeaturesVirtualMachine(
                delete_os_disk_on_deletion=True, skip_shutdown_and_force_delete=True)],
        )
        state_backend(self, config, id)
        source = config.source
        tags = config.kit_tags("repair")

        group = ResourceGroup(
            self, "repair_group", name=config.repair_resource_group, location=source.location,
            # Evaluated by Terraform at apply and then frozen: synth stays a pure function of the config.
            tags={**tags, EXPIRES_AT_TAG: Fn.timeadd(Fn.timestamp(), f"{config.repair.ttl_hours}h")},
            lifecycle=TerraformResourceLifecycle(ignore_changes=[f'tags["{EXPIRES_AT_TAG}"]']),
        )
        key = vm_key(source.vm_id)  # the evidence prefix of this VM's runs (collection.contract.run_prefix)
        admin_secret = self._admin_secret_variable(config)
        disk = DiskCopy(self, "disk_copy", config, group.name, tags)
        network = RescueNetwork(self, "network", config, group.name, tags)
        vm = RescueVm(self, "rescue", config, group.name, network.nic_id, disk.disk_id, admin_secret, tags)
        _keep_vm_across_credentials(vm, config)
        RoleAssignment(
            self, "evidence_writer",
            scope=evidence.container_scope_id,
            role_definition_name=BLOB_WRITER_ROLE,
            principal_id=vm.principal_id,
            principal_type="ServicePrincipal",
            skip_service_principal_aad_check=True,
            condition=roles.vm_condition(f"{key}/"),
            condition_version="2.0",
            description=f"crashcart: rescue VM of {source.vm_name} reads and writes only its own dumps ({key}/)",
        )

        for name, value in (
            ("subscription_id", source.subscription_id),
            ("resource_group_name", group.name),
            ("rescue_vm_id", vm.vm_id),
            ("rescue_vm_name", vm.vm_name),
            ("rescue_vm_principal_id", vm.principal_id),
            ("rescue_os", config.rescue.os),
            ("disk_copy_id", disk.disk_id),
            ("disk_copy_lun", DISK_COPY_LUN),
            ("snapshot_id", disk.snapshot_id),
            ("source_vm_id", source.vm_id),
            ("source_os_disk_id", source.os_disk_id),
            ("evidence_account_name", evidence.account_name),
            ("evidence_blob_endpoint", evidence.blob_endpoint),
            ("evidence_container", evidence.container_name),
        ):
            TerraformOutput(self, name, value=value, static_id=True)

    def _admin_secret_variable(self, config: Config) -> str:
        """Windows gets a password, Linux an SSH public key; both arrive as TF_VAR_* at deploy time."""
        if config.rescue.os == "windows":
            variable = TerraformVariable(
                self, ADMIN_PASSWORD_VARIABLE, type="string", sensitive=True, nullable=False,
                description="Rescue VM admin password (TF_VAR_rescue_admin_password); repair-run generates one",
                validation=[TerraformVariableValidationConfig(
                    condition=f"${{length(var.{ADMIN_PASSWORD_VARIABLE}) >= 12}}",
                    error_message="The admin password must be at least 12 characters.")],
            )
        else:
            variable = TerraformVariable(
                self, ADMIN_SSH_KEY_VARIABLE, type="string", nullable=False,
                description="Rescue VM SSH public key (TF_VAR_rescue_admin_ssh_public_key); nobody logs in",
            )
        variable.override_logical_id(variable.node.id)
        return variable.string_value


# The admin credential is generated afresh for every run (scripts.run.credential) and forces a new VM when it
# changes. Nobody logs in (Run Command only), so a kept stack re-applied by a later run keeps its VM and the
# credential it was created with, instead of being replaced (and its disk copy detached) for a new one.
CREDENTIAL_ATTRIBUTES = {"windows": ("admin_password",), "linux": ("admin_ssh_key",)}


def _keep_vm_across_credentials(vm: Construct, config: Config) -> None:
    resource = vm.node.find_child("vm")
    resource.add_override("lifecycle.ignore_changes", list(CREDENTIAL_ATTRIBUTES[config.rescue.os]))  # type: ignore[attr-defined]

"""The `evidence` stack: where dumps land and stay. Long-lived; no repair teardown ever touches it.

The account is private and Azure AD only (shared keys off), keeps deleted and overwritten blobs
(soft delete + versioning) and can hold them under time-based immutability. `prevent_destroy` makes
even a deliberate `cdktf destroy evidence` stop and ask for a code change first.
"""

from __future__ import annotations

from cdktf import TerraformOutput, TerraformResourceLifecycle, TerraformStack
from cdktf_cdktf_provider_azurerm.data_azurerm_storage_account import DataAzurermStorageAccount
from cdktf_cdktf_provider_azurerm.resource_group import ResourceGroup
from cdktf_cdktf_provider_azurerm.storage_account import (
    StorageAccount,
    StorageAccountBlobProperties,
    StorageAccountBlobPropertiesContainerDeleteRetentionPolicy,
    StorageAccountBlobPropertiesDeleteRetentionPolicy,
    StorageAccountNetworkRules,
    StorageAccountSasPolicy,
)
from cdktf_cdktf_provider_azurerm.storage_container import StorageContainer
from cdktf_cdktf_provider_azurerm.storage_container_immutability_policy import StorageContainerImmutabilityPolicy
from constructs import Construct

from scripts.config.model import Config
from stacks.common import azurerm_provider, state_backend

KEEP = TerraformResourceLifecycle(prevent_destroy=True)


class EvidenceStack(TerraformStack):
    """Exposes `account_id`, `account_name`, `blob_endpoint`, `container_name` and `container_scope_id`
    (the ARM scope a role assignment on the container uses) to the repair stack."""

    def __init__(self, scope: Construct, id: str, config: Config):
        super().__init__(scope, id)
        self.config = config
        azurerm_provider(self, config)
        state_backend(self, config, id)
        tags = config.kit_tags("evidence")
        evidence = config.evidence

        if evidence.create_account:
            group = ResourceGroup(self, "evidence_group", name=evidence.resource_group,
                                  location=config.evidence_location, tags=tags, lifecycle=KEEP)
            account = self._storage_account(group.name, tags)
            self.account_id, self.account_name = account.id, account.name
            self.blob_endpoint = account.primary_blob_endpoint
            group_name = group.name
        else:
            group_name = config.evidence_account_resource_group
            existing = DataAzurermStorageAccount(self, "evidence_account", name=config.evidence_account_name,
                                                 resource_group_name=group_name)
            self.account_id, self.account_name = existing.id, existing.name
            self.blob_endpoint = existing.primary_blob_endpoint

        # Created through ARM (storage_account_id, not the data plane) so it works with shared keys off
        # and behind the account firewall.
        container = StorageContainer(self, "dumps", name=evidence.container, storage_account_id=self.account_id,
                                     container_access_type="private", lifecycle=KEEP)
        self.container_name = container.name
        self.container_scope_id = f"{self.account_id}/blobServices/default/containers/{evidence.container}"
        container_rm_id = self.container_scope_id
        if evidence.immutability_days:
            StorageContainerImmutabilityPolicy(
                self, "retention", storage_container_resource_manager_id=container_rm_id,
                immutability_period_in_days=evidence.immutability_days,
                # Unlocked: an operator can still shorten it while testing; lock it in the portal for legal hold.
                locked=False,
                # Protected append writes (allowProtectedAppendWritesAll): new blocks may still be added to
                # append blobs (Run Command's output/error logs) and block blobs, existing ones never change
                # nor go away. Without it the policy refuses every append, so the run's logs and anything
                # written in blocks fail. The two flags exclude each other; "All" covers append blobs too.
                protected_append_writes_all_enabled=True, protected_append_writes_enabled=False,
                depends_on=[container])

        for name, value, description in (
            ("account_id", self.account_id, "evidence storage account resource ID"),
            ("account_name", self.account_name, "evidence storage account name"),
            ("blob_endpoint", self.blob_endpoint, "blob service endpoint of the evidence account"),
            ("container_name", self.container_name, "container the dumps are written to"),
            ("container_scope_id", container_rm_id, "ARM scope of the container, for role assignments"),
            ("resource_group_name", group_name, "resource group of the evidence account"),
        ):
            TerraformOutput(self, name, value=value, description=description, static_id=True)

    def _storage_account(self, group_name: str, tags: dict[str, str]) -> StorageAccount:
        config, evidence = self.config, self.config.evidence
        network_rules = None
        if evidence.firewall:
            subnets = list(evidence.allowed_subnet_ids)
            if config.network.subnet_id and config.network.subnet_id not in subnets:
                subnets.append(config.network.subnet_id)
            network_rules = StorageAccountNetworkRules(
                default_action="Deny", bypass=["AzureServices"], ip_rules=list(evidence.allowed_ip_ranges),
                virtual_network_subnet_ids=subnets)
        return StorageAccount(
            self, "evidence_account",
            name=config.evidence_account_name,
            resource_group_name=group_name,
            location=config.evidence_location,
            account_kind="StorageV2",
            account_tier="Standard",
            account_replication_type=evidence.replication,
            https_traffic_only_enabled=True,
            min_tls_version="TLS1_2",
            allow_nested_items_to_be_public=False,
            shared_access_key_enabled=False,
            default_to_oauth_authentication=True,
            local_user_enabled=False,
            sftp_enabled=False,
            cross_tenant_replication_enabled=False,
            infrastructure_encryption_enabled=True,
            # Read links for support tickets are user-delegation SAS of at most 30 days.
            sas_policy=StorageAccountSasPolicy(expiration_period="30.00:00:00", expiration_action="Log"),
            blob_properties=StorageAccountBlobProperties(
                versioning_enabled=True,
                change_feed_enabled=True,
                delete_retention_policy=StorageAccountBlobPropertiesDeleteRetentionPolicy(
                    days=evidence.soft_delete_days),
                container_delete_retention_policy=StorageAccountBlobPropertiesContainerDeleteRetentionPolicy(
                    days=evidence.soft_delete_days),
            ),
            network_rules=network_rules,
            tags=tags,
            lifecycle=KEEP,
        )

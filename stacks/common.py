"""What both stacks set up the same way: the azurerm provider and where Terraform keeps state (per VM for
the repair stack)."""

from __future__ import annotations

from typing import Any

from cdktf import AzurermBackend, LocalBackend, TerraformStack
from cdktf_cdktf_provider_azurerm.provider import (AzurermProvider, AzurermProviderFeatures,
                                                   AzurermProviderFeaturesStorage)

from scripts.azure.identity import vm_key
from scripts.config.model import Config


def azurerm_provider(stack: TerraformStack, config: Config, **features: Any) -> AzurermProvider:
    """The provider both stacks use. Storage is managed through ARM only:

    - `storage_use_azuread`: the evidence account has shared keys disabled, so the provider never fetches
      an account key;
    - `features.storage.data_plane_available = false`: azurerm 4.x otherwise reads the account's queue
      properties and static website and polls the blob endpoint (data-plane calls, which need *data*
      roles such as Storage Queue/Blob Data Contributor and a path through the account firewall), so a
      deployer with only Contributor could not deploy the evidence stack. Nothing here needs the data
      plane: the container and its immutability policy are ARM resources (storage_account_id).

    `features` are the stack's own other feature blocks (AzurermProviderFeatures keyword arguments).
    """
    return AzurermProvider(
        stack, "azurerm",
        subscription_id=config.source.subscription_id,
        storage_use_azuread=True,
        # Registering resource providers needs rights on the whole subscription; the README lists the
        # three providers to register once instead (Compute, Network, Storage).
        resource_provider_registrations="none",
        features=[AzurermProviderFeatures(
            **features, storage=[AzurermProviderFeaturesStorage(data_plane_available=False)])],
    )


def state_backend(stack: TerraformStack, config: Config, name: str) -> None:
    """Local state files by default (in the project folder), an azurerm blob, reached with Azure AD, for
    pipelines where the runner's disk does not survive the run. The evidence stack has one state; the
    repair stack one per source VM, named by its key (scripts.azure.identity.vm_key: readable name + hash
    of the resource ID), so a repair of web-02 never resumes or destroys web-01's, nor a same-named VM's
    in another resource group:

        local    terraform.evidence.tfstate          terraform.repair.<vm key>.tfstate
        azurerm  <key_prefix>/evidence.tfstate       <key_prefix>/<vm key>/repair.tfstate

    The local path is relative to cdktf.out/stacks/<stack>/, where Terraform runs, so it points at the
    project folder on every machine and cdk.tf.json holds no absolute path."""
    backend = config.backend
    if backend.kind == "azurerm":
        AzurermBackend(
            stack,
            resource_group_name=backend.resource_group,
            storage_account_name=backend.storage_account,
            container_name=backend.container,
            key=state_key(config, name),
            use_azuread_auth=True,
        )
    else:
        LocalBackend(stack, path=f"../../../{state_file(config, name)}")


def state_file(config: Config, name: str) -> str:
    """The local state file of stack `name` (in the project folder)."""
    if name == "evidence":
        return f"terraform.{name}.tfstate"
    return f"terraform.{name}.{vm_key(config.source.vm_id)}.tfstate"


def state_key(config: Config, name: str) -> str:
    """The azurerm backend's blob name of stack `name`'s state."""
    prefix = config.backend.key_prefix
    if name == "evidence":
        return f"{prefix}/{name}.tfstate"
    return f"{prefix}/{vm_key(config.source.vm_id)}/{name}.tfstate"

"""What both stacks set up the same way: the azurerm provider and where Terraform keeps state (per VM for
the repair stack)."""

from __future__ import annotations

from cdktf import AzurermBackend, LocalBackend, TerraformStack
from cdktf_cdktf_provider_azurerm.provider import AzurermProvider, AzurermProviderFeatures

from scripts.azure.identity import vm_key
from scripts.config.model import Config


def azurerm_provider(stack: TerraformStack, config: Config,
                     features: AzurermProviderFeatures | None = None) -> AzurermProvider:
    # storage_use_azuread: the evidence account has shared keys disabled, so the provider must use
    # Azure AD for the container's data plane calls (and never fetch an account key).
    return AzurermProvider(
        stack, "azurerm",
        subscription_id=config.source.subscription_id,
        storage_use_azuread=True,
        # Registering resource providers needs rights on the whole subscription; the README lists the
        # three providers to register once instead (Compute, Network, Storage).
        resource_provider_registrations="none",
        features=[features or AzurermProviderFeatures()],
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

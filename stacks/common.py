"""What both stacks set up the same way: the azurerm provider and where Terraform keeps state."""

from __future__ import annotations

from cdktf import AzurermBackend, LocalBackend, TerraformStack
from cdktf_cdktf_provider_azurerm.provider import AzurermProvider, AzurermProviderFeatures

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
    """Local state files by default (terraform.<stack>.tfstate in the project folder); an azurerm blob,
    reached with Azure AD, for pipelines where the runner's disk does not survive the run.

    The local path is relative to cdktf.out/stacks/<stack>/, where Terraform runs, so it points at the
    project folder on every machine and cdk.tf.json holds no absolute path."""
    backend = config.backend
    if backend.kind == "azurerm":
        key = f"{backend.key_prefix}/{name}.tfstate" if name == "evidence" else (
            f"{backend.key_prefix}/{config.source.vm_name}/{name}.tfstate")
        AzurermBackend(
            stack,
            resource_group_name=backend.resource_group,
            storage_account_name=backend.storage_account,
            container_name=backend.container,
            key=key,
            use_azuread_auth=True,
        )
    else:
        LocalBackend(stack, path=f"../../../terraform.{name}.tfstate")

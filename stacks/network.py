"""RescueNetwork: where the rescue VM's NIC lives. No public IP anywhere, nothing allowed in.

Either an isolated vnet/subnet/NSG created for the repair (and destroyed with it), or an existing
subnet named in the config (for sites that must route through their own firewall or reach a
storage firewall that allows that subnet).
"""

from __future__ import annotations

from cdktf_cdktf_provider_azurerm.network_interface import NetworkInterface, NetworkInterfaceIpConfiguration
from cdktf_cdktf_provider_azurerm.network_security_group import (
    NetworkSecurityGroup,
    NetworkSecurityGroupSecurityRule,
)
from cdktf_cdktf_provider_azurerm.subnet import Subnet
from cdktf_cdktf_provider_azurerm.subnet_network_security_group_association import (
    SubnetNetworkSecurityGroupAssociation,
)
from cdktf_cdktf_provider_azurerm.virtual_network import VirtualNetwork
from constructs import Construct

from scripts.config.model import Config


class RescueNetwork(Construct):
    """Exposes `nic_id`: the rescue VM's only network interface (private IP only)."""

    def __init__(self, scope: Construct, id: str, config: Config, group_name: str, tags: dict[str, str]):
        super().__init__(scope, id)
        location = config.source.location
        subnet_id = config.network.subnet_id
        if config.network.create:
            vnet = VirtualNetwork(self, "vnet", name="crashcart-vnet", resource_group_name=group_name,
                                  location=location, address_space=[config.network.address_space], tags=tags)
            subnet = Subnet(
                self, "subnet", name="rescue", resource_group_name=group_name,
                virtual_network_name=vnet.name, address_prefixes=[config.network.address_space],
                # The dump goes to Blob storage over the Azure backbone, not the internet.
                service_endpoints=[config.storage_service_endpoint],
            )
            nsg = NetworkSecurityGroup(
                self, "nsg", name="crashcart-rescue-nsg", resource_group_name=group_name, location=location,
                tags=tags,
                security_rule=[NetworkSecurityGroupSecurityRule(
                    name="deny-all-inbound", priority=4000, direction="Inbound", access="Deny",
                    protocol="*", source_port_range="*", destination_port_range="*",
                    source_address_prefix="*", destination_address_prefix="*",
                    description="Nothing connects to the rescue VM: it is driven by Run Command only",
                )],
            )
            SubnetNetworkSecurityGroupAssociation(self, "nsg_association", subnet_id=subnet.id,
                                                  network_security_group_id=nsg.id)
            subnet_id = subnet.id
        nic = NetworkInterface(
            self, "nic", name="crashcart-rescue-nic", resource_group_name=group_name, location=location,
            ip_configuration=[NetworkInterfaceIpConfiguration(
                name="private", subnet_id=subnet_id, private_ip_address_allocation="Dynamic")],
            tags=tags,
        )
        self.nic_id = nic.id

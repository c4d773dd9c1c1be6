"""Azure public-cloud regions crashcart knows, and which of them have availability zones.

Synth never calls Azure, so config validation needs this list offline. It is the public cloud's
physical regions as of 2026 (`az account list-locations --query "[?metadata.regionType=='Physical']"`);
a region added later can be allowed without a release through CRASHCART_EXTRA_REGIONS
(comma-separated, optionally `name:zones`, e.g. `newregion:3`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from scripts.base.errors import ConfigError
from scripts.config.shown import shown

_EXTRA = re.compile(r"[a-z][a-z0-9]{1,40}", re.ASCII)

# region name -> number of availability zones (0: the region has none)
REGIONS: dict[str, int] = {
    "australiacentral": 0, "australiacentral2": 0, "australiaeast": 3, "australiasoutheast": 0,
    "austriaeast": 3, "belgiumcentral": 3, "brazilsouth": 3, "brazilsoutheast": 0,
    "canadacentral": 3, "canadaeast": 0, "centralindia": 3, "centralus": 3, "chilecentral": 3,
    "eastasia": 3, "eastus": 3, "eastus2": 3, "francecentral": 3, "francesouth": 0,
    "germanynorth": 0, "germanywestcentral": 3, "indonesiacentral": 3, "israelcentral": 3,
    "italynorth": 3, "japaneast": 3, "japanwest": 3, "jioindiacentral": 0, "jioindiawest": 0,
    "koreacentral": 3, "koreasouth": 0, "malaysiawest": 3, "mexicocentral": 3, "newzealandnorth": 3,
    "northcentralus": 0, "northeurope": 3, "norwayeast": 3, "norwaywest": 0, "polandcentral": 3,
    "qatarcentral": 3, "southafricanorth": 3, "southafricawest": 0, "southcentralus": 3,
    "southeastasia": 3, "southindia": 0, "spaincentral": 3, "swedencentral": 3, "swedensouth": 0,
    "switzerlandnorth": 3, "switzerlandwest": 0, "uaecentral": 0, "uaenorth": 3, "uksouth": 3,
    "ukwest": 0, "westcentralus": 0, "westeurope": 3, "westindia": 0, "westus": 0, "westus2": 3,
    "westus3": 3,
}


def known_regions(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """REGIONS plus CRASHCART_EXTRA_REGIONS from `env` (os.environ when None); a malformed entry is a
    ConfigError naming the variable, never a traceback."""
    env = os.environ if env is None else env
    raw = env.get("CRASHCART_EXTRA_REGIONS", "")
    regions = dict(REGIONS)
    for item in filter(None, (s.strip(" ") for s in raw.split(","))):
        name, colon, zones = item.partition(":")
        name = normalize(name)
        if not _EXTRA.fullmatch(name) or (colon and not re.fullmatch(r"[0-3]", zones, re.ASCII)):
            raise ConfigError("CRASHCART_EXTRA_REGIONS", shown(raw),
                              "comma-separated region names (lowercase letters and digits), each optionally "
                              "with its number of availability zones 0-3, e.g. newregion:3",
                              "fix or unset the environment variable CRASHCART_EXTRA_REGIONS")
        regions[name] = int(zones or 0)
    return regions


def normalize(location: str) -> str:
    """'West Europe' and 'westeurope' are the same region to ARM."""
    return location.strip().lower().replace(" ", "")

"""CDKTF stacks: infrastructure only, pure functions of the config (same config, same cdk.tf.json).

Nothing here calls Azure or reads the environment beyond the Config it is given.
"""

from stacks.evidence import EvidenceStack
from stacks.repair import RepairStack

__all__ = ["EvidenceStack", "RepairStack"]

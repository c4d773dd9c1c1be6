"""The crashcart CDKTF app: two stacks built from one config. `npx cdktf synth` runs this file.

    evidence  long-lived storage for the dumps           (cdktf deploy evidence, once)
    repair    snapshot, disk copy, network, rescue VM    (cdktf deploy repair / cdktf destroy repair)

The config is repair.toml (or CRASHCART_CONFIG) plus CRASHCART_* overrides; see README.md.
"""

import os

from scripts.config.model import Config, load_or_exit

# Node 20 runs jsii fine; its end-of-life banner would only drown the synth output.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")


def build_app(config: Config, outdir: str | None = None):
    # Imported here, not at the top: a config error is reported in a blink, not after the 15 s it
    # takes jsii to load the azurerm bindings.
    from cdktf import App

    from stacks import EvidenceStack, RepairStack

    app = App(outdir=outdir) if outdir else App()
    evidence = EvidenceStack(app, "evidence", config)
    RepairStack(app, "repair", config, evidence)
    return app


if __name__ == "__main__":
    build_app(load_or_exit()).synth()

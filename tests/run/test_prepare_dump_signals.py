"""prepare-dump --swap: the rollback that puts the source VM back on its original OS disk is a cleanup no
Ctrl-C cuts short (scripts.base.signals). Before, a Ctrl-C during the rollback ended it half-way: the VM
was left on the prepared copy ("ROLLBACK FAILED")."""

from __future__ import annotations

import os
import signal

import pytest

from tests.nodump.test_prepare import (FAST, container, image, pristine_image, run_verb,  # noqa: F401
                                       setup_world)

pytestmark = [pytest.mark.slow, pytest.mark.root]


def test_ctrl_c_during_the_rollback_waits_for_it(arm, azurite, container, image, tmp_path, capsys):  # noqa: F811
    world, _, base = setup_world(arm, azurite, container, image, tmp_path, crash_after=2)
    sent: list[int] = []

    def ctrl_c_once_the_rollback_starts() -> None:
        if world.sim.dumps_on and not sent:  # the guest crashed: the next change to the VM is the rollback's
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                sent.append(signal.SIGINT)

    world.ops.write_probe = ctrl_c_once_the_rollback_starts
    code, _, err = run_verb([*base, *FAST, "--swap", "--dump-wait-minutes", "0", "--nmi-after-minutes", "-1",
                             "--no-collect"], capsys)
    assert sent, "the rollback never started"
    assert code == 130, err  # the interrupt acts - after the rollback
    assert "SIGINT received: finishing the rollback" in err and "ROLLBACK FAILED" not in err
    assert world.os_disk() == world.original_disk_id  # the VM is on its own disk again
    assert world.rescue_data_disks() == [world.copy_id]

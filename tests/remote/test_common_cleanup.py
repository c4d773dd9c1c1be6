"""The bash scripts' shared cleanup (_common.sh.j2): what it undoes, in which order."""

from __future__ import annotations

import subprocess

from scripts import remote


def test_cleanup_unmounts_and_detaches_newest_first(tmp_path):
    """NTFS mounted from dislocker's decrypted file sits on the dislocker mount (and a loop device on a file of an
    earlier loop's volume): the newer one must go first, or the older stays busy until a lazy unmount."""
    script = tmp_path / "cleanup.sh"
    script.write_text(remote.render_template("_common.sh.j2") + """
trap - EXIT
mountpoint() { [[ ! -e "$ORDER.gone.${2//\\//_}" ]]; }
umount() { echo "umount $1" >> "$ORDER"; touch "$ORDER.gone.${1//\\//_}"; }
losetup() { echo "losetup $*" >> "$ORDER"; }
MOUNTS=(/mnt/dislocker /mnt/ntfs)
LOOPS=(/dev/loop0 /dev/loop1)
cleanup
echo cleaned
""")
    order = tmp_path / "order"
    proc = subprocess.run(["bash", str(script)], env={"ORDER": str(order), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip() == "cleaned", proc.stderr
    assert order.read_text().splitlines() == [
        "umount /mnt/ntfs", "umount /mnt/dislocker", "losetup -d /dev/loop1", "losetup -d /dev/loop0"]

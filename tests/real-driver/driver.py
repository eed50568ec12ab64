"""Runs a test script under the NixOS test driver's own machine and vlan code, from a
checkout of nixpkgs' nixos/lib/test-driver/src (NIXVM_TEST_DRIVER), as its Driver runs one:
a VLan (vde_switch, $QEMU_VDE_SOCKET_<n>) per vlan, a QemuMachine per start script (sorted by
name), the script run with the machines (and `machine` when there is one), `start_all`,
`retry`, `log`, `os` as symbols; then every machine released and every vlan stopped.

usage: driver.py OUT_DIR TEST_SCRIPT START_SCRIPT...
"""

import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, os.environ["NIXVM_TEST_DRIVER"])

from test_driver.errors import RequestedAssertionFailed  # noqa: E402
from test_driver.logger import TerminalLogger  # noqa: E402
from test_driver.machine import QemuMachine, retry  # noqa: E402
from test_driver.vlan import VLan  # noqa: E402


def main() -> int:
    out_dir = Path(sys.argv[1])
    tests = Path(sys.argv[2]).read_text()
    scripts = sys.argv[3:]
    tmp_dir = Path(tempfile.gettempdir())
    logger = TerminalLogger()
    vlans = [VLan(1, tmp_dir, logger)]
    machines = [
        QemuMachine(
            out_dir=out_dir,
            tmp_dir=tmp_dir,
            start_command=script,
            logger=logger,
            callbacks=[],
        )
        for script in scripts
    ]
    machines.sort(key=lambda m: m.name)

    def start_all() -> None:
        for m in machines:
            m.start()

    symbols = dict(start_all=start_all, retry=retry, log=logger, os=os, out_dir=out_dir)
    symbols.update({m.name: m for m in machines})
    if len(machines) == 1:
        symbols["machine"] = machines[0]
    status = 0
    try:
        exec(tests, symbols, None)
    except RequestedAssertionFailed:
        traceback.print_exc()
        status = 1
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        for m in machines:
            try:
                m.release()
            except Exception as e:
                logger.error(f"Error during cleanup of {m.name}: {e}")
        for v in vlans:
            v.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())

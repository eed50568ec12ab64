# The test script tests/real-driver/check.sh runs under nixpkgs' test driver code: what a
# NixOS test asks of its machines, on two nixvm machines (a, b) sharing vlan 1. Each check
# prints "real-driver: NAME ok"; the first failure ends the script (as in a NixOS test).
import hashlib
import time
from pathlib import Path


def ok(name: str) -> None:
    print(f"real-driver: {name} ok", flush=True)


# One machine boots at a time, a's reboots first. On the nested route here the second
# machine's boot has often ended in a triple fault (nixvm then exits, as QEMU with
# -no-reboot does, and the driver says "Shell disconnected"): run the check again then.
t0 = time.monotonic()
a.start()
a.succeed("true")
print(f"real-driver: a: start to the first succeed: {time.monotonic() - t0:.1f} s", flush=True)
a.wait_for_unit("multi-user.target")
ok("start, wait_for_unit")

assert a.succeed("echo hello") == "hello\n"
status, out = a.execute("echo out; echo err >&2; exit 3")
assert (status, out) == (3, "out\n"), (status, out)
a.fail("false")
a.wait_until_succeeds("test -e /etc/hostname", timeout=60)
a.wait_until_fails("test -e /nonexistent", timeout=60)
ok("succeed, execute, fail, wait_until_succeeds, wait_until_fails")

# eth0: the driver's user network (nixvm's --net local): a DHCP lease, the gateway answers.
a.wait_until_succeeds("ip -4 -o addr show eth0 | grep -q 'inet 10.0.2.15/24'", timeout=300)
a.succeed("ping -c 1 -W 5 10.0.2.2")
ok("eth0 DHCP lease and gateway")

# reboot() wants a machine started with allow_reboot (no -no-reboot).
a.shutdown()
ok("shutdown")
a.start(allow_reboot=True)
a.wait_for_unit("multi-user.target")
boot_id = a.succeed("cat /proc/sys/kernel/random/boot_id")
a.reboot()
a.wait_for_unit("multi-user.target")
assert a.succeed("cat /proc/sys/kernel/random/boot_id") != boot_id
ok("start(allow_reboot=True), reboot")
a.send_key("ctrl-alt-delete")
a.connected = False
a.wait_for_unit("multi-user.target")
ok("send_key ctrl-alt-delete")

start_all()
b.wait_for_unit("multi-user.target")
ok("start_all")

# vlan 1: the two machines' eth1, by the MACs the test network gives.
assert "52:54:00:12:01:01" in a.succeed("cat /sys/class/net/eth1/address")
assert "52:54:00:12:01:02" in b.succeed("cat /sys/class/net/eth1/address")
a.succeed("ip addr add 192.168.1.1/24 dev eth1", "ip link set eth1 up")
b.succeed("ip addr add 192.168.1.2/24 dev eth1", "ip link set eth1 up")
a.wait_until_succeeds("ping -c 1 -W 2 192.168.1.2", timeout=300)
b.succeed("ping -c 1 -W 2 192.168.1.1")
ok("vlan ping both ways")

b.succeed("setsid nc -l -k 192.168.1.2 8000 < /dev/null > /dev/null 2>&1 &")
b.wait_for_open_port(8000, "192.168.1.2", timeout=60)
a.wait_for_open_port(8000, "192.168.1.2", timeout=60)
b.wait_for_closed_port(8001, timeout=60)
ok("wait_for_open_port, wait_for_closed_port")

a.block()
a.fail("ping -c 1 -W 2 192.168.1.2")
a.unblock()
a.wait_until_succeeds("ping -c 1 -W 2 192.168.1.2", timeout=120)
ok("block, unblock")

src = out_dir / "from-host.bin"
src.write_bytes(bytes((i * 7 + i // 977) % 256 for i in range(1 << 20)))
a.copy_from_host(str(src), "/root/from-host.bin")
got = a.succeed("sha256sum /root/from-host.bin").split()[0]
assert got == hashlib.sha256(src.read_bytes()).hexdigest(), got
a.succeed("head -c 1048576 /dev/urandom > /root/from-vm.bin")
want = a.succeed("sha256sum /root/from-vm.bin").split()[0]
a.copy_from_machine("/root/from-vm.bin", "copied")
assert hashlib.sha256((out_dir / "copied" / "from-vm.bin").read_bytes()).hexdigest() == want
ok("copy_from_host, copy_from_machine")

a.succeed(
    "setsid sh -c 'timeout 120 head -n 1 /dev/ttyS0 | sed s/^/serial-got:/ > /dev/ttyS0'"
    " < /dev/null > /dev/null 2>&1 &",
    "sleep 2",
)
a.send_console("send-console-42\n")
# Without a timeout: with one, the driver takes one queued console line a second, and a
# machine that has booted three times has queued hundreds since start().
a.wait_for_console_text("serial-got:send-console-42")
ok("send_console, wait_for_console_text")

try:
    a.screenshot("screen")
except Exception as e:
    print(f"real-driver: screenshot fails: {e}", flush=True)
else:
    raise AssertionError("screenshot succeeded without a display")
answer = a.send_monitor_command("screendump /tmp/x.ppm")
assert "display" in answer, answer
print(f"real-driver: the monitor on screendump: {answer.strip()!r}", flush=True)
ok("screenshot fails, saying why")

b.crash()
ok("crash")
a.shutdown()
ok("shutdown")
ok("all")

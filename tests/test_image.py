"""The appliance image (`make image`, image/README.md), booted as it is
under qemu's software emulation (TCG: this machine's KVM does not work)
with Debian's OVMF: three NICs on taps in the test's namespaces, the
configuration handed in as the systemd credential tpb.toml, commands run in
the guest through its qemu guest agent.

    pc  192.0.2.10 --tap-- [eth2  the image  eth3] --tap-- pop: 192.0.2.1 (pc's gateway),
                                    mgmt0                   198.51.100.34 (the POP)
                                      |
                                     tap-- mgmt: 198.18.0.1, DHCP server (dnsmasq)

One boot serves the tests in order (module scope): the metrics on the
management port, frames both ways byte for byte, a selected flow in GRE at
the POP, tpb killed and restarted by systemd, reloads good and bad, the
console login and SSH off; then a power cut and a second boot from the same
disk, with the edited configuration still in force. The times (power-on to
the first forwarded frame, the outage of a restart, ...) are printed at the
end of the module.

Skipped, with the reason, when the image is not built or is stale: `make
test-image` builds it and runs this.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import image_vm  # noqa: E402
import kgre  # noqa: E402
import rawsock  # noqa: E402
import wire  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from tpb import lab as labmod  # noqa: E402

# make test-asan loads the sanitized helper into the processes on this
# host (TPB_C_DIR); the image's TPB is its own build, inside the guest.
_reason = ("make test-asan: the image runs its own TPB, not the sanitized helper"
           if os.environ.get("TPB_C_DIR") else image_vm.available())
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

LAB_PREFIX = "tpbi"
PC_MAC, GW_MAC, MGMT_HOST_MAC = "02:00:00:00:0a:10", "02:00:00:00:0a:20", "02:00:00:00:0a:30"
# the guest's NICs, in the PCI slots the image's .link files name eth2, eth3, mgmt0
ETH2_MAC, ETH3_MAC, MGMT0_MAC = "02:00:00:00:0b:02", "02:00:00:00:0b:03", "02:00:00:00:0b:05"
PC, GW, POP, TPB_LOCAL, SERVER = "192.0.2.10", "192.0.2.1", "198.51.100.34", "198.51.100.3", \
    "203.0.113.10"
MGMT_HOST, MGMT_GUEST = "198.18.0.1", "198.18.0.10"
METRICS = f"http://{MGMT_GUEST}:9547/metrics"
BOOT_TIMEOUT = 420  # seconds, power-on to forwarding, under TCG on a busy machine

CONFIG = f"""\
# tests/test_image.py: handed to the image as the systemd credential tpb.toml
[ports]
in = "eth2"
out = "eth3"

[tunnel]
local = "{TPB_LOCAL}"
remote = ["{POP}"]

[select]
match = ["ip daddr 203.0.113.0/24"]

[bridge]
low_latency = false      # under emulation, idle vCPUs that poll cost the host's CPUs
metrics_listen = "0.0.0.0:9547"
"""
# The edit an operator makes: UDP to port 5000 goes into the tunnel too.
EDITED = CONFIG.replace('match = ["ip daddr 203.0.113.0/24"]',
                        'match = ["ip daddr 203.0.113.0/24", "udp dport 5000"]')
assert EDITED != CONFIG

TIMES: dict[str, float] = {}


def ends(lb: labmod.Lab) -> tuple[wire.End, wire.End]:
    return (wire.End("pc", "tpbi-in", PC_MAC, PC, "2001:db8:1::10", "in"),
            wire.End("pop", "tpbi-out", GW_MAC, GW, "2001:db8:1::1", "out"))


@pytest.fixture(scope="module")
def lab():
    nodes = {n: labmod.Node(n) for n in ("pc", "pop", "mgmt")}
    lb = labmod.Lab(LAB_PREFIX, nodes, [])
    with lb:
        yield lb


@pytest.fixture(scope="module")
def vm(lab, tmp_path_factory, request):
    """The image booted once for the module, the heartbeat crossing it from
    before power-on; the times are printed at the end."""
    work = tmp_path_factory.mktemp("image-vm")
    v = image_vm.ApplianceVM(work, [
        image_vm.Nic(lab.ns("pc"), "tpbi-in", ETH2_MAC, image_vm.SLOT_IN),
        image_vm.Nic(lab.ns("pop"), "tpbi-out", ETH3_MAC, image_vm.SLOT_OUT),
        image_vm.Nic(lab.ns("mgmt"), "tpbi-mgmt", MGMT0_MAC, image_vm.SLOT_MGMT),
    ], credentials={"tpb.toml": CONFIG.encode()})
    v.create_taps()
    for node, tap, mac, addrs in (("pc", "tpbi-in", PC_MAC, [f"{PC}/24"]),
                                  ("pop", "tpbi-out", GW_MAC, [f"{GW}/24", f"{POP}/24"]),
                                  ("mgmt", "tpbi-mgmt", MGMT_HOST_MAC, [f"{MGMT_HOST}/24"])):
        lab.sysctl(node, f"net.ipv6.conf.{tap}.disable_ipv6", "1")
        lab.run(node, ["ip", "link", "set", "dev", tap, "address", mac])
        for a in addrs:
            lab.run(node, ["ip", "addr", "add", a, "dev", tap])
    lab.run("pc", ["ip", "route", "add", "default", "via", GW])
    lab.spawn("mgmt", [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--port=0", "--interface=tpbi-mgmt", "--bind-dynamic", "--user=root", "--group=root",
        f"--dhcp-range={MGMT_HOST},static,255.255.255.0,1h",
        f"--dhcp-host={MGMT0_MAC},{MGMT_GUEST}", f"--dhcp-leasefile={work}/leases",
        "--pid-file", "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hb = image_vm.Heartbeat((lab.ns("pc"), "tpbi-in"), (lab.ns("pop"), "tpbi-out"),
                            PC_MAC, GW_MAC).start()
    v.heartbeat = hb
    try:
        v.start()
        yield v
    finally:
        v.kill()
        hb.stop()
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None and TIMES:
            tr.write_line("")
            for k, val in TIMES.items():
                tr.write_line(f"image: {k}: {val:.1f}")
        if os.environ.get("TPB_IMAGE_KEEP_CONSOLE"):
            print(v.console(this_boot=False))


def scrape(timeout: float = 5.0) -> str:
    return image_vm.http_get(f"{LAB_PREFIX}-mgmt", METRICS, timeout)


def wait_metrics(vm, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(2.0)
        except OSError as e:
            if not vm.running:
                raise AssertionError(vm.why("qemu exited")) from None
            if time.monotonic() > deadline:
                raise AssertionError(vm.why(f"no metrics at {METRICS} within {timeout}s: {e}")) \
                    from None
            time.sleep(0.5)


def main_pid(agent) -> int:
    return int(agent.sh("systemctl show -P MainPID tpb").strip())


def journal(agent, unit: str = "tpb", since: str = "") -> str:
    return agent.sh(f"journalctl -b -o cat --no-pager -u {unit} {since}")


def udp_frame(dst_ip: str, dport: int, marker: bytes, size: int = 200) -> bytes:
    return wire.sized(bytes(Ether(src=PC_MAC, dst=GW_MAC) / IP(src=PC, dst=dst_ip) /
                            UDP(sport=40000, dport=dport) / Raw(wire.payload(marker))), size)


def arrives_in_gre(lab, frame: bytes, timeout: float = 5.0) -> dict | None:
    """Sends `frame` from the pc; the GRE packet from TPB that the POP's
    stack received with it inside, or None."""
    inner = frame[14:]
    with kgre.GreEndpoint(lab.ns("pop"), POP, TPB_LOCAL) as pop, \
            rawsock.Port(lab.ns("pc"), "tpbi-in") as tx:
        pop.drain()
        tx.send(frame)
        return pop.recv(timeout, match=lambda g: g["payload"] == inner)


def arrives_plain(lab, frame: bytes, timeout: float = 5.0) -> bool:
    with rawsock.Port(lab.ns("pop"), "tpbi-out", capture=True) as rx, \
            rawsock.Port(lab.ns("pc"), "tpbi-in") as tx:
        tx.send(frame)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            f = rx.recv(left)
            if f is not None and f.data == frame:
                return True
    return False


# ---- the first boot --------------------------------------------------------------


def test_boots_and_forwards_with_metrics_on_the_management_port(vm, lab):
    """Power-on to the first frame across the bridge, and to the metrics on
    the management port's DHCP address."""
    first = vm.wait_forwarding(vm.t0, BOOT_TIMEOUT)
    TIMES["power-on to first forwarded frame (s)"] = first - vm.t0
    text = wait_metrics(vm, 120)
    TIMES["power-on to metrics on mgmt0 (s)"] = time.monotonic() - vm.t0
    assert image_vm.metric(text, "tpb_build_info") == 1.0
    assert image_vm.metric(text, "tpb_port_transmit_frames_total", port="out",
                           device="eth3") >= 1
    agent = vm.agent(60)
    up = float(agent.sh("cut -d' ' -f1 /proc/uptime"))
    TIMES["guest uptime when first asked (s)"] = up
    assert agent.sh("systemctl is-active tpb").strip() == "active"


def test_the_ports_are_named_by_pci_path(vm):
    """The .link files gave the NIC in PCI slot 3 the name eth2, slot 4 eth3
    and slot 5 mgmt0, which got its address by DHCP; the bridge ports carry
    no address of the host."""
    import json

    links = {i["ifname"]: i for i in json.loads(vm.agent().sh("ip -j addr show"))}
    assert links["eth2"]["address"] == ETH2_MAC
    assert links["eth3"]["address"] == ETH3_MAC
    assert links["mgmt0"]["address"] == MGMT0_MAC
    assert [a["local"] for a in links["eth2"]["addr_info"]] == []
    assert [a["local"] for a in links["eth3"]["addr_info"]] == []
    assert MGMT_GUEST in [a["local"] for a in links["mgmt0"]["addr_info"]]
    for port in ("eth2", "eth3"):
        assert "UP" in links[port]["flags"] and "NOARP" in links[port]["flags"]


def test_a_kernel_update_goes_to_the_esp(vm):
    """The ESP is mounted at /boot/efi and systemd-boot is installed there,
    so Debian's kernel hooks (zz-systemd-boot) hand a new kernel to
    kernel-install; doing it for the running kernel gives the same entry."""
    agent = vm.agent()
    assert agent.sh("findmnt -n -o FSTYPE /boot/efi").strip() == "vfat"
    agent.sh("bootctl is-installed --quiet")
    kver = agent.sh("uname -r").strip()
    entry = f"/boot/efi/loader/entries/tpb-{kver}.conf"
    before = agent.sh(f"cat {entry}")
    agent.sh(f"kernel-install add {kver} /boot/vmlinuz-{kver} /boot/initrd.img-{kver}",
             timeout=120)
    assert agent.sh(f"cat {entry}") == before
    assert f"linux      /tpb/{kver}/linux" in before


def test_the_credential_became_the_configuration(vm):
    agent = vm.agent()
    assert agent.sh("cat /etc/tpb/tpb.toml") == CONFIG
    assert "installed as /etc/tpb/tpb.toml" in journal(agent, "tpb-provision")
    # the image's own default, kept beside it
    assert 'metrics_listen = "0.0.0.0:9547"' in agent.sh(
        "cat /etc/tpb/tpb.toml.before-credential")
    agent.sh("/opt/tpb/bin/tpb check --offline --config /etc/tpb/tpb.toml.before-credential")


def test_frames_cross_byte_for_byte_both_ways(vm, lab):
    pc, gw = ends(lab)
    for src, dst in ((pc, gw), (gw, pc)):
        m = [os.urandom(8) for _ in range(8)]
        frames = [
            bytes(Ether(src=src.mac, dst=dst.mac) / IP(src=src.ip4, dst=dst.ip4) /
                  UDP(sport=40000, dport=9) / Raw(wire.payload(m[0]))),
            wire.sized(bytes(Ether(src=src.mac, dst=dst.mac) / IP(src=src.ip4, dst=dst.ip4) /
                             UDP(sport=40000, dport=9) / Raw(wire.payload(m[1]))), 1514),
            bytes(Ether(src=src.mac, dst="ff:ff:ff:ff:ff:ff") /
                  ARP(hwsrc=src.mac, psrc="192.0.2.99", pdst="192.0.2.98") / Raw(m[2])),
            bytes(Ether(src=src.mac, dst=dst.mac) / IPv6(src=src.ip6, dst=dst.ip6) /
                  UDP(sport=40000, dport=9) / Raw(wire.payload(m[3]))),
            bytes(Ether(src=src.mac, dst=dst.mac) / Dot1Q(vlan=100) /
                  IP(src=src.ip4, dst=dst.ip4) / UDP(dport=9) / Raw(wire.payload(m[4]))),
            bytes(Ether(src=src.mac, dst=dst.mac) / Dot1AD(vlan=200) / Dot1Q(vlan=100) /
                  IP(src=src.ip4, dst=dst.ip4) / UDP(dport=9) / Raw(wire.payload(m[5]))),
            bytes(Ether(src=src.mac, dst="01:80:c2:00:00:0e", type=0x88CC) /
                  Raw(wire.payload(m[6], 46))),
            bytes(Ether(src=src.mac, dst=dst.mac, type=wire.LOCAL_EXPERIMENTAL) /
                  Raw(wire.payload(m[7], 47))),
        ]
        with vm.heartbeat.paused():
            got = wire.cross(lab, src, dst, frames, m)
        wire.check_crossed(frames, m, got)


def test_a_selected_flow_arrives_in_gre_at_the_pop(vm, lab):
    frame = udp_frame(SERVER, 9, os.urandom(8))
    g = arrives_in_gre(lab, frame)
    assert g is not None, "no GRE from TPB at the POP"
    assert (g["src"], g["dst"], g["proto"]) == (TPB_LOCAL, POP, 0x0800)
    assert g["payload"] == frame[14:]
    text = scrape()
    assert image_vm.metric(text, "tpb_tunnel_packets_total", direction="encap") >= 1
    # not selected: bridged as it is
    assert arrives_plain(lab, udp_frame(GW, 5000, os.urandom(8)))


def test_the_host_sends_nothing_on_the_bridge_ports(vm, lab):
    """Over a quiet stretch, nothing on either tap comes from the guest's
    own NICs (no IPv6, ARP, LLDP, DHCP of the host on the wire TPB bridges);
    TPB's own answers for its tunnel address would be the only exception."""
    own = []
    with vm.heartbeat.paused(), rawsock.Port(lab.ns("pc"), "tpbi-in", capture=True) as a, \
            rawsock.Port(lab.ns("pop"), "tpbi-out", capture=True) as b:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for p in (a, b):
                f = p.recv(0.05)
                if f is not None and f.data[6:12].hex(":") in (ETH2_MAC, ETH3_MAC):
                    pkt = Ether(f.data)
                    if not (ARP in pkt and pkt[ARP].psrc == TPB_LOCAL):
                        own.append(pkt.summary())
    assert own == []


def test_killed_tpb_is_restarted_by_systemd(vm):
    """kill -9 of tpb in the guest: systemd starts it again (Restart=on-failure,
    RestartSec=2s) and frames cross again; the outage is measured with the
    heartbeat (one frame every 10 ms)."""
    agent, hb = vm.agent(), vm.heartbeat
    before = main_pid(agent)
    hb.wait_arrival(time.monotonic(), 10)
    t_kill = time.monotonic()
    agent.sh(f"kill -9 {before}")
    deadline = time.monotonic() + 180
    while True:
        pid = main_pid(agent)
        state = agent.sh("systemctl is-active tpb; true").strip()
        if pid not in (0, before) and state == "active":
            break
        assert time.monotonic() < deadline, f"tpb not active again: {state}, {journal(agent)}"
        time.sleep(0.5)
    vm.wait_forwarding(time.monotonic(), 60)
    time.sleep(1)
    gap, lost = hb.longest_gap(t_kill - 1, time.monotonic())
    TIMES["outage when tpb is killed (s)"] = gap
    TIMES["frames lost in it (of one every 10 ms)"] = lost
    assert gap >= 2.0  # RestartSec=2s: it was really down, and came back
    assert agent.sh("systemctl show -P NRestarts tpb").strip() == "1"
    assert "Main process exited, code=killed, status=9/KILL" in journal(agent)


def test_reload_applies_an_edited_configuration(vm, lab):
    """/etc/tpb/tpb.toml edited, `systemctl reload tpb`: the new match rule
    selects UDP to port 5000 from then on, in the same process."""
    agent = vm.agent()
    frame = udp_frame(GW, 5000, os.urandom(8))
    assert arrives_plain(lab, frame)
    pid = main_pid(agent)
    agent.write_file("/etc/tpb/tpb.toml", EDITED.encode())
    t = time.monotonic()
    agent.sh("systemctl reload tpb")
    deadline = time.monotonic() + 60
    while "configuration reloaded" not in journal(agent):
        assert time.monotonic() < deadline, journal(agent)
        time.sleep(0.5)
    TIMES["systemctl reload, to the reload logged (s)"] = time.monotonic() - t
    g = arrives_in_gre(lab, udp_frame(GW, 5000, os.urandom(8)))
    assert g is not None and g["dst"] == POP
    assert main_pid(agent) == pid
    assert image_vm.metric(scrape(), "tpb_config_last_reload_successful") == 1.0


def test_a_broken_file_leaves_the_running_bridge_as_it_was(vm, lab):
    """A file with mistakes fails `systemctl reload` (its check) and the
    daemon is not touched; a file whose settings are fine but cannot apply
    to the running bridge (another port) is refused by the daemon itself.
    Either way the bridge goes on as it was; the good file reloads again."""
    agent = vm.agent()
    pid = main_pid(agent)
    agent.write_file("/etc/tpb/tpb.toml", EDITED.replace('out = "eth3"', 'out = eth3').encode())
    rc, out, err = agent.run("systemctl reload tpb")
    assert rc != 0
    assert "tpb.toml" in journal(agent)  # the check's line, with the file's name
    assert main_pid(agent) == pid
    assert arrives_in_gre(lab, udp_frame(GW, 5000, os.urandom(8))) is not None
    assert arrives_plain(lab, udp_frame(GW, 9, os.urandom(8)))

    agent.write_file("/etc/tpb/tpb.toml", EDITED.replace('in = "eth2"', 'in = "eth9"').encode())
    agent.sh("systemctl reload tpb")
    deadline = time.monotonic() + 60
    while "ports.in cannot change on reload" not in journal(agent):
        assert time.monotonic() < deadline, journal(agent)
        time.sleep(0.5)
    assert image_vm.metric(scrape(), "tpb_config_last_reload_successful") == 0.0
    assert main_pid(agent) == pid
    assert arrives_in_gre(lab, udp_frame(GW, 5000, os.urandom(8))) is not None
    assert arrives_plain(lab, udp_frame(GW, 9, os.urandom(8)))

    agent.write_file("/etc/tpb/tpb.toml", EDITED.encode())
    agent.sh("systemctl reload tpb")
    deadline = time.monotonic() + 60
    while image_vm.metric(scrape(), "tpb_config_last_reload_successful") != 1.0:
        assert time.monotonic() < deadline, journal(agent)
        time.sleep(0.5)
    assert main_pid(agent) == pid


def test_console_login_and_ssh_off(vm, lab):
    """root logs in on the serial console (no password in the default
    image); SSH is installed but not enabled: nothing listens on port 22."""
    vm.console_chat([("", "tpb login:"), ("root", "root@tpb:~#"),
                     ("echo TPB-CONSOLE-$((6*7))", "TPB-CONSOLE-42"), ("exit", "tpb login:")])
    agent = vm.agent()
    assert agent.sh("systemctl is-enabled ssh; true").strip() == "disabled"
    assert agent.sh("systemctl is-active ssh; true").strip() == "inactive"
    with rawsock.netns(lab.ns("mgmt")):
        s = socket.socket()
    s.settimeout(5)
    with pytest.raises(ConnectionRefusedError):
        s.connect((MGMT_GUEST, 22))
    s.close()


# ---- a power cut, and the second boot ----------------------------------------------


def test_the_configuration_survives_a_power_cut(vm, lab):
    """qemu killed (a power cut) a few seconds after the last edit, powered
    on again from the same disk with the same credential: the edited
    /etc/tpb/tpb.toml is what TPB runs (the credential, applied once, is
    not applied again), and it forwards."""
    agent = vm.agent()
    assert agent.sh("cat /etc/tpb/tpb.toml") == EDITED
    time.sleep(2)
    vm.kill()
    vm.start()
    first = vm.wait_forwarding(vm.t0, BOOT_TIMEOUT)
    TIMES["second boot: power-on to first forwarded frame (s)"] = first - vm.t0
    wait_metrics(vm, 120)
    agent = vm.agent(60)
    assert agent.sh("cat /etc/tpb/tpb.toml") == EDITED
    assert "was applied before" in journal(agent, "tpb-provision")
    assert arrives_in_gre(lab, udp_frame(GW, 5000, os.urandom(8))) is not None
    assert arrives_plain(lab, udp_frame(GW, 9, os.urandom(8)))

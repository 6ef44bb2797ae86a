"""The relaunch analysis (pure): command lines written the way libvirt, Proxmox and Incus write
them, in keyval and JSON form; every argument a re-exec cannot reproduce is found, named, and
given a remedy, and a reproducible command line has no finding."""

from __future__ import annotations

import pytest

from forgeqmp.core.relaunch import describe_findings, relaunch_findings

QEMU = "/usr/bin/qemu-system-x86_64"

#: The harness's own command line (abridged): everything by path, nothing inherited.
PLAIN = [
    QEMU, "-machine", "q35", "-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults",
    "-no-user-config", "-display", "none", "-nic", "none", "-kernel", "/g/vmlinuz",
    "-initrd", "/g/initrd", "-append", "console=ttyS0 fd=3 /dev/fd/4 quiet",
    "-chardev", "socket,id=console,path=/w/console.sock,server=on,wait=off,logfile=/w/c.log",
    "-serial", "chardev:console",
    "-qmp", "unix:/w/qmp.sock,server=on,wait=off", "-pidfile", "/w/qemu.pid",
    "-blockdev", "driver=file,filename=/w/d0.qcow2,node-name=d0-file",
    "-blockdev", "driver=qcow2,file=d0-file,node-name=d0-fmt",
    "-device", "virtio-blk-pci,id=d0,drive=d0-fmt,serial=d0,bootindex=1",
]  # fmt: skip


def items(argv: list[str]) -> list[tuple[str, str]]:
    return [(f.option, f.item) for f in relaunch_findings(argv)]


def test_a_plain_command_line_is_reproducible() -> None:
    assert relaunch_findings(PLAIN) == ()
    # -daemonize, -S, -incoming and -loadvm are reproducible (handled or replaced by forgeqmp);
    # a kernel command line is free text, not options.
    extra = ["-daemonize", "-S", "-incoming", "fd:3", "-loadvm", "snap1", "-name", "fd=3"]
    assert relaunch_findings([*PLAIN, *extra]) == ()
    assert relaunch_findings([*PLAIN, "-incoming", "defer"]) == ()


def test_libvirt_monitor_passed_as_an_inherited_fd() -> None:
    argv = [
        *PLAIN,
        "-chardev", "socket,id=charmonitor,fd=33,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
    ]  # fmt: skip
    findings = relaunch_findings(argv)
    assert len(findings) == 1
    (f,) = findings
    assert f.option == "-chardev"
    assert f.item == "fd=33"
    assert f.argument == "-chardev socket,id=charmonitor,fd=33,server=on,wait=off"
    assert "path=" in f.remedy
    assert "--launcher" in f.remedy
    message = describe_findings(findings)
    assert "-chardev socket,id=charmonitor,fd=33,server=on,wait=off" in message
    assert "--launcher PATH" in message


def test_tap_with_fd_and_vhostfd_in_keyval_and_json() -> None:
    argv = [
        *PLAIN,
        "-netdev", "tap,fd=30,id=hostnet0,vhost=on,vhostfd=31",
        "-device", "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:12:34:56",
        "-netdev", '{"type":"tap","fd":"40","vhost":true,"vhostfd":"41","id":"hostnet1"}',
        "-netdev", "tap,fds=50:51,vhostfds=52:53,id=hostnet2",
    ]  # fmt: skip
    assert items(argv) == [
        ("-netdev", "fd=30, vhostfd=31"),
        ("-netdev", "fd=40, vhostfd=41"),
        ("-netdev", "fds=50:51, vhostfds=52:53"),
    ]
    assert all("ifname=" in f.remedy for f in relaunch_findings(argv))


def test_fd_sets_and_descriptor_paths() -> None:
    argv = [
        *PLAIN,
        "-add-fd", "set=3,fd=20,opaque=rdonly:/var/lib/disk.img",
        "-blockdev", '{"driver":"file","filename":"/dev/fdset/3","node-name":"libvirt-1-storage"}',
        "-drive", "file=/dev/fdset/4,if=none,id=drive-scsi0,format=raw",
        "-chardev", "file,id=log,path=/dev/fd/7",
        "-object", '{"qom-type":"secret","id":"s0","file":"/proc/self/fd/9"}',
    ]  # fmt: skip
    assert items(argv) == [
        ("-add-fd", "fd set 3 (fd=20)"),
        ("-blockdev", "/dev/fdset/3"),
        ("-drive", "/dev/fdset/4"),
        ("-chardev", "/dev/fd/7"),
        ("-object", "/proc/self/fd/9"),
    ]


def test_other_descriptor_options() -> None:
    argv = [
        *PLAIN,
        "-device", '{"driver":"vhost-vsock-pci","id":"vsock0","guest-cid":3,"vhostfd":"28"}',
        "-tpmdev", "passthrough,id=tpm0,path=/dev/tpm0,cancel-fd=12,fd=11",
        "-netdev", "socket,id=n1,fd=13",
        "-netdev", "stream,id=n2,server=off,addr.type=fd,addr.str=14",
        "-netdev", '{"type":"stream","id":"n3","addr":{"type":"fd","str":"15"}}',
        "-object", "iommufd,id=iommufd0,fd=16",
        "-device", "vfio-pci,host=0000:01:00.0,fd=17",
    ]  # fmt: skip
    assert items(argv) == [
        ("-device", "vhostfd=28"),
        ("-tpmdev", "cancel-fd=12, fd=11"),
        ("-netdev", "fd=13"),
        ("-netdev", "addr.type=fd"),
        ("-netdev", "addr.type=fd"),
        ("-object", "fd=16"),
        ("-device", "fd=17"),
    ]


@pytest.mark.parametrize(
    "extra",
    [
        ["-qmp", "stdio"],
        ["-monitor", "stdio"],
        ["-serial", "mon:stdio"],
        ["-chardev", "stdio,id=char0,mux=on", "-mon", "chardev=char0,mode=control"],
        ["-chardev", '{"backend":"stdio","id":"char1"}'],
    ],
)
def test_stdio_is_not_reproducible(extra: list[str]) -> None:
    (f,) = relaunch_findings([*PLAIN, *extra])
    assert f.item == "stdio"
    assert "standard input" in f.reason
    assert "unix socket" in f.remedy


def test_incus_and_proxmox_style_lines() -> None:
    # Incus: a config file by path and fds for its monitor and tap; Proxmox: everything by path.
    incus = [
        QEMU, "-S", "-name", "c1", "-uuid", "2d0e", "-daemonize", "-cpu", "host", "-nographic",
        "-serial", "chardev:console", "-nodefaults", "-no-user-config",
        "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny",
        "-readconfig", "/run/incus/c1/qemu.conf", "-spice", "unix=on,disable-ticketing=on,addr=/run/incus/c1/qemu.spice",
        "-pidfile", "/run/incus/c1/qemu.pid", "-D", "/var/log/incus/c1/qemu.log",
        "-chroot", "/run/incus/c1", "-runas", "incus",
        "-chardev", "socket,id=monitor,fd=3,server=on,wait=off", "-mon", "chardev=monitor,mode=control",
        "-netdev", "tap,id=eth0,fd=4,vhost=on,vhostfd=5",
    ]  # fmt: skip
    assert items(incus) == [("-chardev", "fd=3"), ("-netdev", "fd=4, vhostfd=5")]
    proxmox = [
        QEMU, "-id", "100", "-name", "vm100,debug-threads=on", "-no-shutdown",
        "-chardev", "socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-pidfile", "/var/run/qemu-server/100.pid",
        "-daemonize", "-smbios", "type=1,uuid=7b3c", "-drive",
        "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/pve-edk2-firmware/OVMF_CODE.fd",
        "-drive", "if=pflash,unit=1,id=drive-efidisk0,format=raw,file=/dev/pve/vm-100-disk-0",
        "-vnc", "unix:/var/run/qemu-server/100.vnc,password=on", "-m", "2048",
        "-netdev", "type=tap,id=net0,ifname=tap100i0,script=/var/lib/qemu-server/pve-bridge,"
        "downscript=/var/lib/qemu-server/pve-bridgedown,vhost=on",
        "-drive", "file=/var/lib/vz/images/100/vm-100-disk-0.qcow2,if=none,id=drive-scsi0,"
        "discard=on,format=qcow2,cache=none,aio=io_uring,detect-zeroes=unmap",
        "-machine", "type=q35+pve0",
    ]  # fmt: skip
    assert relaunch_findings(proxmox) == ()


def test_option_spellings_and_escapes() -> None:
    # --option and --option=value are QEMU spellings too; ",," is a literal comma in a value.
    assert items([QEMU, "--chardev", "socket,id=m,fd=9"]) == [("-chardev", "fd=9")]
    assert items([QEMU, "--netdev=tap,id=n,fd=8"]) == [("-netdev", "fd=8")]
    assert relaunch_findings([QEMU, "-chardev", "file,id=f,path=/tmp/a,,fd=3"]) == ()
    # An unknown flag does not swallow the option after it.
    assert items([QEMU, "-some-new-flag", "-chardev", "socket,id=m,fd=9"]) == [("-chardev", "fd=9")]
    # A -drive whose image path happens to contain "fd=" is no finding.
    assert relaunch_findings([QEMU, "-drive", "file=/srv/fd=1.img,format=raw"]) == ()

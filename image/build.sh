#!/bin/bash
# image/build.sh — builds TPB's appliance disk image from Debian packages
# (image/README.md says what is in it and why). `make image` runs it, as root.
#
#   image/build.sh [--force]
#
# mmdebstrap makes the root file system (Debian 12, the kernel from
# bookworm-backports); TPB goes in with `make install DESTDIR=...`; the
# image's own files (image/files/) and a few generated ones (the .link files,
# fstab, the kernel command line, /etc/tpb/tpb.toml) are added; systemd-boot
# and the kernel go on an EFI system partition through kernel-install, as a
# kernel update inside the image will put them later. The disk is then put
# together without mounting anything: mkfs.vfat + mtools for the ESP,
# mkfs.ext4 -d for the root, sfdisk for the GPT.
#
# Out: $TPB_IMAGE_OUT (image/out): tpb.img (raw, sparse) and manifest.json.
# A second run with the same inputs (image/stamp.py) only says so.
#
# Settings (environment; `make image VAR=...` passes them):
#   TPB_IMAGE_IN_MATCH    [Match] of the `in` port, named eth2 (default Path=pci-0000:00:03.0)
#   TPB_IMAGE_OUT_MATCH   [Match] of the `out` port, named eth3 (default Path=pci-0000:00:04.0)
#   TPB_IMAGE_MGMT_MATCH  [Match] of the management port, named mgmt0 (default Path=pci-0000:00:05.0)
#                         each one systemd.link [Match] line: Path=..., MACAddress=...,
#                         PermanentMACAddress=...
#   TPB_IMAGE_ROOT_SIZE   root partition in MiB (default 2048)
#   TPB_IMAGE_ROOT_PASSWORD  root's password on the console (default: none, empty)
#   TPB_IMAGE_KERNEL      the kernel package (default linux-image-amd64/bookworm-backports)
#   TPB_IMAGE_MIRROR, TPB_IMAGE_SECURITY_MIRROR  Debian mirrors (default: the ones
#                         this machine's apt uses for bookworm and bookworm-security)
#   TPB_IMAGE_OUT         where the image goes (default image/out)
#   TPB_IMAGE_CACHE       downloaded .debs kept for the next build (default /var/cache/tpb-image)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SUITE=bookworm

export TPB_IMAGE_IN_MATCH=${TPB_IMAGE_IN_MATCH:-Path=pci-0000:00:03.0}
export TPB_IMAGE_OUT_MATCH=${TPB_IMAGE_OUT_MATCH:-Path=pci-0000:00:04.0}
export TPB_IMAGE_MGMT_MATCH=${TPB_IMAGE_MGMT_MATCH:-Path=pci-0000:00:05.0}
export TPB_IMAGE_ROOT_SIZE=${TPB_IMAGE_ROOT_SIZE:-2048}
export TPB_IMAGE_KERNEL=${TPB_IMAGE_KERNEL:-linux-image-amd64/bookworm-backports}
TPB_IMAGE_OUT=${TPB_IMAGE_OUT:-$HERE/out}
TPB_IMAGE_CACHE=${TPB_IMAGE_CACHE:-/var/cache/tpb-image}

# Fixed identifiers: the kernel command line and fstab name the partitions by
# them, and two builds of the same sources give the same ones.
DISK_UUID=f466b9e8-8bea-4c79-a49b-d5576625e6e7
ESP_PARTUUID=947201cc-3b02-4a23-842c-fefbd08ca9cc
ROOT_PARTUUID=b0d389cc-f69f-4b20-b081-60c6072a9609
ROOT_FSUUID=edd54683-3b75-4629-8c73-9b02f07bb58a
ESP_VOLID=ABF5FFF5
ESP_MIB=256
export ESP_PARTUUID ROOT_PARTUUID

# What the image is made of, beyond Debian's minbase (essential packages + apt).
# Recommends are not installed: every package here is wanted by name.
PACKAGES=(
    # boot: systemd as init, udev, the kernel's initramfs, systemd-boot
    systemd systemd-sysv udev dbus libpam-systemd systemd-boot initramfs-tools
    systemd-timesyncd e2fsprogs dosfstools kmod
    # TPB: Debian's python3 (the venv in /opt/tpb names /usr/bin/python3), ip, nft
    python3 iproute2 nftables
    # operating it: a guest agent for hypervisors (starts only when its port
    # exists), SSH (disabled), and the tools to look at a link
    qemu-guest-agent openssh-server ca-certificates
    procps iputils-ping tcpdump ethtool less nano vim-tiny
)

log() { printf 'image: %s\n' "$*"; }
die() { printf 'image: %s\n' "$*" >&2; exit 1; }

# ---- hooks, run by mmdebstrap with the root file system's path -----------------

# After the essential packages, before the rest: what the packages' own
# scripts read when they install (initramfs-tools copies the .link files
# and reads fstab; kernel-install reads /etc/kernel).
hook_essential() {
    local root=$1
    cp -a "$HERE/files/." "$root/"
    link_file "$root" 10-tpb-in.link "$TPB_IMAGE_IN_MATCH" eth2 "TPB's in port (faces the enterprise gateway)"
    link_file "$root" 10-tpb-out.link "$TPB_IMAGE_OUT_MATCH" eth3 "TPB's out port (faces the ISP)"
    link_file "$root" 10-tpb-mgmt.link "$TPB_IMAGE_MGMT_MATCH" mgmt0 "the management port (DHCP)"
    cat >"$root/etc/fstab" <<EOF
# The appliance image's partitions, by the fixed GPT partition UUIDs of image/build.sh.
PARTUUID=$ROOT_PARTUUID  /          ext4  errors=remount-ro         0 1
PARTUUID=$ESP_PARTUUID  /boot/efi  vfat  umask=0077,nofail         0 2
EOF
    # console=ttyS0 last: /dev/console (boot messages, emergency shell) is the
    # serial port; a login prompt on the screen (tty1) and on ttyS0.
    echo "root=PARTUUID=$ROOT_PARTUUID ro console=tty0 console=ttyS0,115200n8" \
        >"$root/etc/kernel/cmdline"
    echo tpb >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\ttpb\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$root/etc/hosts"
    mkdir -p "$root/boot/efi"
}

link_file() {
    local root=$1 name=$2 match=$3 ifname=$4 what=$5
    [[ $match =~ ^(Path|MACAddress|PermanentMACAddress|OriginalName|Driver)=[^[:space:]]+$ ]] ||
        die "the match for $ifname must be one systemd.link [Match] setting (Path=..., MACAddress=...): '$match'"
    cat >"$root/etc/systemd/network/$name" <<EOF
# $ifname: $what. Written by image/build.sh from its
# TPB_IMAGE_*_MATCH setting; change [Match] to fit the hardware (Path= is the
# port's PCI path, \`udevadm info /sys/class/net/NAME | grep ID_PATH=\` shows it;
# MACAddress= its address), then \`update-initramfs -u\` (the initramfs names
# the ports too) and reboot.
[Match]
$match

[Link]
Name=$ifname
EOF
}

# After every package is installed.
hook_customize() {
    local root=$1
    local kver
    kver=$(cd "$root/lib/modules" && ls)
    [[ $(wc -w <<<"$kver") == 1 ]] || die "expected one kernel in the image, found: $kver"
    log "kernel $kver"

    # TPB, the units and the default configurations, exactly as `make install`
    # puts them on any machine (the venv is built here with Debian's
    # /usr/bin/python3, the same python3.11 as the image's).
    make --no-print-directory -C "$REPO" install DESTDIR="$root"

    # The image's configuration: the shipped default with the metrics on every
    # address, i.e. the management port (the bridge ports have none).
    local conf=$root/etc/tpb/tpb.toml
    grep -qx 'metrics_listen = "127.0.0.1:9547"' "$conf" ||
        die "appliance/tpb.toml has no line metrics_listen = \"127.0.0.1:9547\" to change"
    sed -i 's|^metrics_listen = "127.0.0.1:9547"$|metrics_listen = "0.0.0.0:9547"  # the image: every address, i.e. the management port mgmt0 (eth2/eth3 have none)|' "$conf"
    chroot "$root" /opt/tpb/bin/tpb check --offline --config /etc/tpb/tpb.toml
    install -D -m 0644 "$HERE/README.md" "$root/usr/local/share/tpb-image/README.md"

    # The user tpb now, so that udev applies 70-tpb.rules at the first boot.
    chroot "$root" systemd-sysusers
    chroot "$root" systemctl enable systemd-networkd.service tpb.service tpb-provision.service \
        tpb-ifnames.service
    chroot "$root" systemctl disable ssh.service
    rm -f "$root"/etc/ssh/ssh_host_*

    if [[ -n ${TPB_IMAGE_ROOT_PASSWORD:-} ]]; then
        echo "root:$TPB_IMAGE_ROOT_PASSWORD" | chroot "$root" chpasswd
    else
        chroot "$root" passwd --delete root >/dev/null
    fi

    # systemd-boot and the kernel on the ESP (a plain directory here, copied
    # into the FAT file system later), the way a kernel update will do it.
    # bootctl and kernel-install want the ESP to be a file system of its own
    # (kernel-install names the files relative to its mount point): a tmpfs
    # there for the time being, its content kept in the directory below it.
    # It is not FAT yet, which SYSTEMD_RELAX_ESP_CHECKS allows.
    local esp=$root/boot/efi staged
    staged=$(mktemp -d)
    mount -t tmpfs -o mode=0755 tpb-esp "$esp"
    local rc=0
    (
        set -e
        SYSTEMD_RELAX_ESP_CHECKS=1 chroot "$root" bootctl install --esp-path=/boot/efi \
            --no-variables --entry-token=literal:tpb --make-machine-id-directory=no
        printf 'timeout 0\neditor yes\n' >"$esp/loader/loader.conf"
        SYSTEMD_RELAX_ESP_CHECKS=1 chroot "$root" kernel-install add "$kver" \
            "/boot/vmlinuz-$kver" "/boot/initrd.img-$kver"
        cp -a "$esp/." "$staged/"
    ) || rc=$?
    umount "$esp"
    [[ $rc == 0 ]] || die "bootctl install / kernel-install failed ($rc)"
    cp -a "$staged/." "$esp/"
    rm -rf "$staged"
    rm -f "$root/boot/efi/loader/random-seed"
    local entry=$root/boot/efi/loader/entries/tpb-$kver.conf
    [[ -f $entry ]] || die "kernel-install wrote no boot entry $entry"
    grep -qx "linux      /tpb/$kver/linux" "$entry" || die "$entry: unexpected linux line"
}

# ---- the build ------------------------------------------------------------------

mirror_of() {  # the URI this machine's apt uses for a suite (bookworm, bookworm-security)
    apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null |
        awk -v s="$1" '$1 == s { print $2; exit }'
}

build() {
    local force=${1:-}
    [[ $(id -u) == 0 ]] || die "needs root (mmdebstrap, chroot): sudo $0"
    local stamp t0
    stamp=$(python3 "$HERE/stamp.py")
    if [[ $force != --force && -f $TPB_IMAGE_OUT/tpb.img && -f $TPB_IMAGE_OUT/manifest.json ]] &&
        python3 - "$TPB_IMAGE_OUT/manifest.json" "$stamp" <<'EOF'
import json, os, sys
m = json.load(open(sys.argv[1]))
same = m.get("stamp") == sys.argv[2] and all(
    m["settings"].get(k) == os.environ.get(k, "") for k in m["settings"])
sys.exit(0 if same else 1)
EOF
    then
        log "up to date: $TPB_IMAGE_OUT/tpb.img (inputs $stamp)"
        return 0
    fi
    t0=$(date +%s)

    local mirror=${TPB_IMAGE_MIRROR:-$(mirror_of $SUITE)}
    local security=${TPB_IMAGE_SECURITY_MIRROR:-$(mirror_of $SUITE-security)}
    [[ -n $mirror ]] || die "this machine's apt has no $SUITE source: set TPB_IMAGE_MIRROR"
    [[ -n $security ]] || die "this machine's apt has no $SUITE-security source: set TPB_IMAGE_SECURITY_MIRROR"
    mirror=${mirror%/} security=${security%/}

    mkdir -p "$TPB_IMAGE_OUT" "$TPB_IMAGE_CACHE/debs"
    # The work folder stays after a failure, to look into; the next build
    # starts it anew.
    local work=$TPB_IMAGE_OUT/work
    rm -rf "$work"
    mkdir -p "$work"
    local root=$work/root

    log "root file system: mmdebstrap $SUITE (+ $SUITE-backports for the kernel)"
    local include
    include=$(IFS=,; echo "${PACKAGES[*]},$TPB_IMAGE_KERNEL")
    mmdebstrap --variant=minbase --mode=root --format=directory \
        --include="$include" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
        --setup-hook="sync-in $TPB_IMAGE_CACHE/debs /var/cache/apt/archives/" \
        --essential-hook="$HERE/build.sh hook-essential \"\$1\"" \
        --customize-hook="$HERE/build.sh hook-customize \"\$1\"" \
        --customize-hook="sync-out /var/cache/apt/archives $TPB_IMAGE_CACHE/debs" \
        --customize-hook='rm -f "$1/etc/resolv.conf"' \
        $SUITE "$root" \
        "deb $mirror $SUITE main" \
        "deb $mirror $SUITE-updates main" \
        "deb $security $SUITE-security main" \
        "deb $mirror $SUITE-backports main"
    local kver
    kver=$(cd "$root/lib/modules" && ls)

    log "disk: GPT, ESP ${ESP_MIB} MiB (systemd-boot, kernel $kver), root ${TPB_IMAGE_ROOT_SIZE} MiB (ext4)"
    local esp=$work/esp.fat rootfs=$work/root.ext4 disk=$work/tpb.img
    local esp_dir=$work/esp
    mv "$root/boot/efi" "$esp_dir"
    mkdir -m 0755 "$root/boot/efi"
    mkfs.vfat -C -F 32 -n TPB-ESP -i "$ESP_VOLID" "$esp" $((ESP_MIB * 1024)) >/dev/null
    MTOOLS_SKIP_CHECK=1 mcopy -s -Q -m -i "$esp" "$esp_dir"/* ::/
    # Extent tree and journal as Debian's mke2fs.conf makes them; the files,
    # owners, modes, links and xattrs (file capabilities) from the tree.
    mkfs.ext4 -q -F -L tpb-root -U "$ROOT_FSUUID" -d "$root" "$rootfs" "${TPB_IMAGE_ROOT_SIZE}M"
    local total=$((1 + ESP_MIB + TPB_IMAGE_ROOT_SIZE + 1))
    truncate -s "${total}M" "$disk"
    sfdisk --quiet "$disk" <<EOF
label: gpt
label-id: $DISK_UUID
unit: sectors
start=$((1 * 2048)), size=$((ESP_MIB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$ESP_PARTUUID, name="ESP"
start=$(((1 + ESP_MIB) * 2048)), size=$((TPB_IMAGE_ROOT_SIZE * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$ROOT_PARTUUID, name="tpb-root"
EOF
    dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
    dd if="$rootfs" of="$disk" bs=1M seek=$((1 + ESP_MIB)) conv=notrunc,sparse status=none

    local used t1
    used=$(du -sm "$root" | cut -f1)
    t1=$(date +%s)
    mv -f "$disk" "$TPB_IMAGE_OUT/tpb.img"
    rm -rf "$work"
    python3 - "$TPB_IMAGE_OUT" <<EOF
import json, os, sys
out = sys.argv[1]
img = os.path.join(out, "tpb.img")
st = os.stat(img)
m = {
    "stamp": "$stamp",
    "built": $t1,
    "build_seconds": $((t1 - t0)),
    "kernel": "$kver",
    "disk_uuid": "$DISK_UUID", "esp_partuuid": "$ESP_PARTUUID",
    "root_partuuid": "$ROOT_PARTUUID",
    "image_bytes": st.st_size, "image_allocated_bytes": st.st_blocks * 512,
    "root_files_mib": $used,
    "settings": {k: os.environ.get(k, "") for k in (
        "TPB_IMAGE_IN_MATCH", "TPB_IMAGE_OUT_MATCH", "TPB_IMAGE_MGMT_MATCH",
        "TPB_IMAGE_ROOT_SIZE", "TPB_IMAGE_KERNEL")},
    "password_set": bool(os.environ.get("TPB_IMAGE_ROOT_PASSWORD")),
}
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(m, f, indent=1)
    f.write("\n")
EOF
    log "built $TPB_IMAGE_OUT/tpb.img in $((t1 - t0)) s: $((total)) MiB, $(du -m "$TPB_IMAGE_OUT/tpb.img" | cut -f1) MiB allocated, files ${used} MiB"
}

case ${1:-} in
    hook-essential) hook_essential "$2" ;;
    hook-customize) hook_customize "$2" ;;
    "" | --force) build "${1:-}" ;;
    *) die "usage: $0 [--force]" ;;
esac

#!/usr/bin/env bash
# run-qemu.sh PROFILE SOCKET INITRAMFS SCENARIOS LOG [TIMEOUT_S]
# Boots the guest kernel under QEMU 10.0 (TCG) with vhost-user-gpu-pci on
# SOCKET, runs SCENARIOS (comma separated) and writes the serial console to
# LOG. Returns QEMU's status (124 on timeout).
#
# PROFILE picks the QEMU and tells the guest what to expect (nc.profile=):
#   compat  the installed Debian QEMU, which masks CONTEXT_INIT and
#           RESOURCE_BLOB;
#   native  the patched QEMU of build-qemu.sh ($NC_NATIVE_QEMU if set,
#           otherwise the cached build), firmware from the installed QEMU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
profile=${1:?profile (compat|native)}
sock=${2:?socket}
initrd=${3:?initramfs}
scenarios=${4:?scenarios}
log=${5:?log}
limit=${6:-900}
case "$profile" in
    compat) qemu=(qemu-system-x86_64) ;;
    native)
        bin=${NC_NATIVE_QEMU:-$("$here/build-qemu.sh" --cached)}
        qemu=("$bin" -L /usr/share/qemu -L /usr/share/seabios) ;;
    *) echo "run-qemu: unknown profile $profile" >&2; exit 2 ;;
esac
timeout --foreground -k 10 "$limit" "${qemu[@]}" \
    -accel tcg -cpu max -smp 2 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -machine q35,memory-backend=mem \
    -chardev "socket,id=vgpu,path=$sock" \
    -device vhost-user-gpu-pci,chardev=vgpu \
    -display none -nodefaults -no-reboot \
    -serial "file:$log" -monitor none \
    -kernel "$here/work/kernel/vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 loglevel=4 nc.profile=$profile nc.scenarios=$scenarios ${NC_KERNEL_APPEND:-}"

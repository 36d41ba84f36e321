#!/usr/bin/env bash
# run-qemu.sh SOCKET INITRAMFS SCENARIOS LOG [TIMEOUT_S]
# Boots the guest kernel under QEMU 10.0 (TCG) with vhost-user-gpu-pci on
# SOCKET, runs SCENARIOS (comma separated) and writes the serial console to
# LOG. Returns QEMU's status (124 on timeout).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sock=${1:?socket}
initrd=${2:?initramfs}
scenarios=${3:?scenarios}
log=${4:?log}
limit=${5:-900}
timeout --foreground -k 10 "$limit" qemu-system-x86_64 \
    -accel tcg -cpu max -smp 2 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -machine q35,memory-backend=mem \
    -chardev "socket,id=vgpu,path=$sock" \
    -device vhost-user-gpu-pci,chardev=vgpu \
    -display none -nodefaults -no-reboot \
    -serial "file:$log" -monitor none \
    -kernel "$here/work/kernel/vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 loglevel=4 nc.scenarios=$scenarios ${NC_KERNEL_APPEND:-}"

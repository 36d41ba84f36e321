#!/usr/bin/env bash
# run.sh [DEB] [GUEST_BIN]
# The package and the libvirt launch path, for real:
#   1. builds the .deb (packaging/build-deb.sh) unless DEB is given and
#      installs it into a scratch root with dpkg --root;
#   2. checks the discovery contract on the installed tree (contract.py:
#      descriptor found, binary there, --print-capabilities parses, type gpu);
#   3. runs Debian's libvirtd (11.3, bookworm-backports) as an unprivileged
#      session daemon, with the installed descriptor in the per-user override
#      directory ($XDG_CONFIG_HOME/qemu/vhost-user, its "binary" pointing into
#      the scratch root), defines a TCG domain whose video device is
#      <model type='virtio'/><driver name='vhostuser'/> with memfd shared
#      memory and direct kernel boot of the QEMU suite's kernel and
#      initramfs, starts it, and checks that libvirt launched the daemon from
#      the descriptor (--fd=N, sandboxed) and that the guest's scenarios pass.
# Prints one line per check and a final "N passed, N failed" line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
deb=${1:-}
guest=${2:-}
scenarios=discovery,binds,unified,isolation
start=$(date +%s)

"$here/setup.sh"
[ -f tests/qemu/work/kernel/vmlinuz ] || tests/qemu/setup.sh
if [ -z "$deb" ]; then
    deb=$(packaging/build-deb.sh | tail -n1)
fi
if [ -z "$guest" ]; then
    cargo build --release --locked -p nc-guest --target x86_64-unknown-linux-musl
    guest="$root/target/x86_64-unknown-linux-musl/release/nc-guest"
fi

# Everything the unprivileged libvirtd reads or writes lives here.
work=$(mktemp -d /tmp/vhost-gpu-nc-libvirt.XXXXXX)
chmod 755 "$work"
user=nobody
group=$(id -gn "$user")
libvirtd_pid=
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
user_cmd=(setpriv --reuid="$user" --regid="$group" --clear-groups
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$work/home"
    XDG_CONFIG_HOME="$work/config" XDG_RUNTIME_DIR="$work/run"
    XDG_CACHE_HOME="$work/cache")
[ "$(id -u)" = 0 ] || user_cmd=(sudo "${user_cmd[@]}")
as_user() { "${user_cmd[@]}" "$@"; }
virsh_() { as_user virsh -q -c qemu:///session "$@"; }
cleanup() {
    if [ -n "$libvirtd_pid" ]; then
        virsh_ destroy vgnc-libvirt >/dev/null 2>&1 || true
        kill "$libvirtd_pid" 2>/dev/null || true
        wait "$libvirtd_pid" 2>/dev/null || true
    fi
    sudo_ rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
check() { # name ok detail
    if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "PASS $1: $3"
    else failed=$((failed + 1)); echo "FAIL $1: $3"; fi
}

echo "== package: $(basename "$deb") into a scratch root"
scratch="$work/root"
mkdir -p "$scratch/var/lib/dpkg/info" "$scratch/var/lib/dpkg/updates"
touch "$scratch/var/lib/dpkg/status"
# --force-depends: the scratch root has no libc6 of its own.
rc=0
dpkg --root="$scratch" --force-not-root --force-depends --log=/dev/null -i "$deb" \
    >"$work/dpkg.log" 2>&1 || rc=$?
check dpkg-install $rc "$(dpkg-query --admindir="$scratch/var/lib/dpkg" -W -f='${Package} ${Version} ${Status}' vhost-gpu-nc 2>&1)"
for f in usr/bin/vhost-gpu-nc usr/share/qemu/vhost-user/40-vhost-gpu-nc.json \
    lib/systemd/system/vhost-gpu-nc.service lib/systemd/system/vhost-gpu-nc.socket \
    usr/share/man/man1/vhost-gpu-nc.1.gz usr/share/doc/vhost-gpu-nc/qemu.md; do
    [ -e "$scratch/$f" ] || { check package-files 1 "$f missing"; }
done
rc=0; zcat "$scratch/usr/share/man/man1/vhost-gpu-nc.1.gz" | grep -q '^\.SH "EXIT STATUS"' || rc=$?
check man-page $rc "vhost-gpu-nc(1) with EXAMPLES, DEFAULTS, EXIT STATUS, ENVIRONMENT"

echo "== discovery contract on the installed tree"
while read -r line; do
    case "$line" in
        "RESULT "*) set -- $line; name=$2; verdict=$3; shift 3
                    check "contract-$name" "$([ "$verdict" = PASS ] && echo 0 || echo 1)" "$*" ;;
        *) echo "    $line" ;;
    esac
done < <(python3 "$here/contract.py" "$scratch" 2>&1 || true)

echo "== libvirt: $(/usr/sbin/libvirtd --version)"
mkdir -p "$work"/{home,config/qemu/vhost-user,run,cache}
chmod 700 "$work/run"
# The installed descriptor, its binary inside the scratch root. Same file
# name: in this per-user directory it would also override the one a real
# installation puts in /usr/share/qemu/vhost-user.
python3 - "$scratch" "$work/config/qemu/vhost-user/40-vhost-gpu-nc.json" <<'PY'
import json, sys
scratch, out = sys.argv[1], sys.argv[2]
d = json.load(open(f"{scratch}/usr/share/qemu/vhost-user/40-vhost-gpu-nc.json"))
d["binary"] = scratch + d["binary"]
json.dump(d, open(out, "w"), indent=2)
PY
cp tests/qemu/work/kernel/vmlinuz "$work/vmlinuz"
tests/qemu/build-initramfs.sh "$guest" "$work/initrd.gz" >/dev/null
cat >"$work/domain.xml" <<EOF
<domain type='qemu'>
  <name>vgnc-libvirt</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$work/vmlinuz</kernel>
    <initrd>$work/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 nc.scenarios=$scenarios</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path='$work/console.log'/>
    </serial>
    <video>
      <model type='virtio'/>
      <driver name='vhostuser'/>
    </video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
sudo_ chown -R "$user:$group" "$work"

# exec: $! is then libvirtd itself (setpriv and env exec too).
(exec "${user_cmd[@]}" /usr/sbin/libvirtd --timeout=600) >"$work/libvirtd.log" 2>&1 &
libvirtd_pid=$!
for _ in $(seq 100); do
    virsh_ version >/dev/null 2>&1 && break
    kill -0 "$libvirtd_pid" 2>/dev/null || break
    sleep 0.1
done
rc=0; virsh_ version >/dev/null 2>&1 || rc=$?
check libvirtd $rc "session daemon as $user: $(virsh_ version 2>&1 | grep -i 'running hypervisor' || tail -n3 "$work/libvirtd.log")"

rc=0; out=$(virsh_ define "$work/domain.xml" 2>&1) || rc=$?
check define $rc "${out:-domain vgnc-libvirt defined from domain.xml}"
boot_start=$(date +%s)
rc=0; out=$(virsh_ start vgnc-libvirt 2>&1) || rc=$?
check start $rc "${out:-domain started}"

# While the guest runs: the daemon libvirt started, its argv and sandbox.
daemon_pid=
for _ in $(seq 100); do
    for p in /proc/[0-9]*; do
        exe=$(readlink "$p/exe" 2>/dev/null || true)
        [ "$exe" = "$scratch/usr/bin/vhost-gpu-nc" ] && { daemon_pid=${p#/proc/}; break; }
    done
    [ -n "$daemon_pid" ] && break
    sleep 0.05
done
if [ -n "$daemon_pid" ]; then
    argv=$(tr '\0' ' ' </proc/"$daemon_pid"/cmdline)
    seccomp=$(awk '/^Seccomp:/ {print $2}' /proc/"$daemon_pid"/status)
    nnp=$(awk '/^NoNewPrivs:/ {print $2}' /proc/"$daemon_pid"/status)
    rc=0; [[ "$argv" =~ --fd=[0-9]+ ]] && [ "$seccomp" = 2 ] && [ "$nnp" = 1 ] || rc=1
    check launched $rc "libvirt ran '$argv' (Seccomp: $seccomp, NoNewPrivs: $nnp)"
else
    check launched 1 "no vhost-gpu-nc process from the descriptor's binary"
fi

# The guest powers off after its scenarios; on_poweroff destroys the domain.
state=
for _ in $(seq 600); do
    state=$(virsh_ domstate vgnc-libvirt 2>/dev/null || true)
    [ "$state" = "shut off" ] && break
    sleep 0.5
done
echo "   (guest ran $(( $(date +%s) - boot_start )) s)"
rc=0; [ "$state" = "shut off" ] || rc=1
check domain-shutoff $rc "state: ${state:-unknown}"

qlog="$work/cache/libvirt/qemu/log/vgnc-libvirt.log"
rc=0; grep -q -- "-chardev socket,id=chr-vu-video0,fd=" "$qlog" || rc=1
check qemu-argv $rc "$(grep -o -- '-chardev socket,id=chr-vu-video0,fd=[0-9]*' "$qlog" | head -n1) $(grep -o -- '"driver":"vhost-user-[a-z]*"' "$qlog" | head -n1)"
for s in ${scenarios//,/ }; do
    line=$(grep -a "^RESULT $s " "$work/console.log" 2>/dev/null | tail -n1 || true)
    case "$line" in
        "RESULT $s PASS"*) check "guest-$s" 0 "${line#RESULT $s PASS }" ;;
        *) check "guest-$s" 1 "${line:-no result}" ;;
    esac
done
if [ -n "$daemon_pid" ]; then
    for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    rc=0; kill -0 "$daemon_pid" 2>/dev/null && rc=1
    check daemon-exit $rc "the daemon ended with its domain"
fi

echo "   (libvirt test $(( $(date +%s) - start )) s)"
echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    echo "--- libvirtd log (tail)"; tail -n 20 "$work/libvirtd.log" || true
    echo "--- domain log (tail)"; tail -n 20 "$qlog" 2>/dev/null || true
    echo "--- console (tail)"; tail -n 20 "$work/console.log" 2>/dev/null || true
    exit 1
fi

#!/usr/bin/env python3
"""The vhost-user discovery contract, checked on an installed tree the way
libvirt (src/qemu/qemu_interop_config.c, qemu_vhost_user.c) walks it:
every file in <root>/usr/share/qemu/vhost-user and <root>/etc/qemu/vhost-user,
/etc winning over /usr/share for the same name, empty files hiding, sorted
by name; the first of type "gpu" whose --print-capabilities parses is used.

usage: contract.py ROOT
Prints one "RESULT <check> PASS|FAIL ..." line per check.
"""
import json
import os
import subprocess
import sys

root = sys.argv[1]
results = []


def result(name, ok, detail):
    results.append(ok)
    print(f"RESULT {name} {'PASS' if ok else 'FAIL'} {detail}")


files = {}
for d in ("usr/share/qemu/vhost-user", "etc/qemu/vhost-user"):
    full = os.path.join(root, d)
    if os.path.isdir(full):
        for name in os.listdir(full):
            if not name.startswith("."):
                files[name] = os.path.join(full, name)
chosen = None
for name in sorted(files):
    path = files[name]
    if os.path.getsize(path) == 0:
        continue
    with open(path) as f:
        doc = json.load(f)
    if doc.get("type") == "gpu":
        chosen = (path, doc)
        break
result("descriptor", chosen is not None,
       f"{os.path.relpath(chosen[0], root) if chosen else 'no gpu descriptor'}")
if chosen is None:
    sys.exit(1)
path, doc = chosen
binary = doc.get("binary", "")
installed = os.path.join(root, binary.lstrip("/"))
result("binary", os.path.isabs(binary) and os.access(installed, os.X_OK),
       f"{binary} (absolute, executable in the installed tree)")
out = subprocess.run([installed, "--print-capabilities"], capture_output=True,
                     text=True, timeout=10)
try:
    caps = json.loads(out.stdout)
except ValueError as e:
    caps = None
    result("capabilities", False, f"not JSON: {e}: {out.stdout!r}")
if caps is not None:
    # libvirt knows the gpu features "virgl" and "render-node" only.
    feats = caps.get("features")
    ok = (out.returncode == 0 and caps.get("type") == "gpu"
          and isinstance(feats, list) and set(feats) <= {"virgl", "render-node"})
    result("capabilities", ok, json.dumps(caps, separators=(",", ":")))
sys.exit(0 if all(results) else 1)

# Shared by setup.sh and build-qemu.sh (sourced, not run).

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The Debian mirror the system already uses, from its own apt sources:
# nothing is hard-coded.
debian_uri() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { echo "cannot find the Debian mirror in the apt sources" >&2; return 1; }
    echo "$uri"
}

# add_apt_source FILE TYPE SUITE: a deb822 entry for SUITE/main on the
# system's Debian mirror, written once.
add_apt_source() {
    local file=$1 type=$2 suite=$3 uri
    uri=$(debian_uri) || return 1
    printf 'Types: %s\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$type" "$uri" "$suite" | sudo_ tee "/etc/apt/sources.list.d/$file" >/dev/null
    sudo_ apt-get update -q >&2
}

#!/bin/bash
# Build exfilwatch_<version>_<arch>.deb: the agent in its own virtual environment under
# /opt/exfilwatch, the systemd unit, /etc/exfilwatch defaults (conffiles), logrotate and
# sysctl files, and an `exfilwatch` system group that may read the logs.
#
#   sudo packaging/build-deb.sh [OUTDIR]        # as root: the venv is made at its real path
#
# A virtual environment is not relocatable (its scripts name its path), so it is built at
# /opt/exfilwatch itself and copied into the package; the script refuses to run when
# /opt/exfilwatch already exists (an installed package), and removes what it made.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/dist}"
prefix=/opt/exfilwatch

if [ "$(id -u)" != 0 ]; then
    echo "build-deb.sh: run as root (the venv is built at $prefix)" >&2
    exit 2
fi
if [ -e "$prefix" ]; then
    echo "build-deb.sh: $prefix exists (an installed package?): remove it or build elsewhere" >&2
    exit 2
fi
for tool in dpkg-deb /usr/bin/python3; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: needs $tool" >&2; exit 2; }
done

version="$(python3 -c 'import re,sys; print(re.search(r"__version__ = \"([^\"]+)\"", open(sys.argv[1]).read()).group(1))' "$repo/agent/__init__.py")"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage" "$prefix"' EXIT

# The agent and its dependencies, from the checkout.
# The system interpreter (the package depends on python3): the venv's links name it.
/usr/bin/python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --no-cache-dir "$repo"
find "$prefix" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$stage$(dirname "$prefix")"
cp -a "$prefix" "$stage$prefix"

install -d -m 0755 "$stage/etc/exfilwatch" "$stage/lib/systemd/system" \
    "$stage/etc/logrotate.d" "$stage/usr/lib/sysctl.d" "$stage/usr/share/doc/exfilwatch" \
    "$stage/DEBIAN"
# The default config, its rules path pointing at the installed packs.
sed "s#rules: \[\.\./rules\]#rules: [$prefix/share/exfilwatch/rules]#" \
    "$repo/config/agent.yaml" \
    | sed 's#^state_dir: .*#state_dir: /var/lib/exfilwatch#' \
    | grep -v '^# yaml-language-server' > "$stage/etc/exfilwatch/agent.yaml"
chmod 0600 "$stage/etc/exfilwatch/agent.yaml"
install -m 0644 "$here/systemd/exfilwatch.service" "$stage/lib/systemd/system/"
install -m 0644 "$here/sysctl.d/60-exfilwatch.conf" "$stage/usr/lib/sysctl.d/"
install -m 0644 "$here/debian/logrotate" "$stage/etc/logrotate.d/exfilwatch"
install -m 0644 "$repo/README.md" "$repo/docs/deploy.md" "$stage/usr/share/doc/exfilwatch/"
# The command on the PATH, its man page and bash completion, generated from its parser.
install -d -m 0755 "$stage/usr/bin" "$stage/usr/share/man/man8" \
    "$stage/usr/share/bash-completion/completions"
ln -s "$prefix/bin/exfilwatch" "$stage/usr/bin/exfilwatch"
"$prefix/bin/exfilwatch" manpage | gzip -9n > "$stage/usr/share/man/man8/exfilwatch.8.gz"
"$prefix/bin/exfilwatch" completion bash > "$stage/usr/share/bash-completion/completions/exfilwatch"

size="$(du -sk "$stage" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    "$here/debian/control" > "$stage/DEBIAN/control"
printf '/etc/exfilwatch/agent.yaml\n/etc/logrotate.d/exfilwatch\n' > "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done

mkdir -p "$out"
deb="$out/exfilwatch_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"

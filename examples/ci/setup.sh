# Sourced by every CI job (GitLab's before_script; the GitHub workflow's setup step does the
# same): what xsbuild needs on a Debian bookworm runner, and xsbuild itself in a venv on PATH.
# deb-src is for `xsbuild base export --debian` (apt-get source).
set -eu
export DEBIAN_FRONTEND=noninteractive
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed -i 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources
fi
apt-get update -q
apt-get install -q -y python3-venv gcc binutils patch make dpkg-dev flex bison python3-dev
python3 -m venv /opt/xsbuild
/opt/xsbuild/bin/pip install -q .
export PATH="/opt/xsbuild/bin:$PATH"
set +eu

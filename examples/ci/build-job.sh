#!/bin/sh
# One CI build job: one `xsbuild build --base ...` call for one advisory and one target.
# The workflows (github-workflow.yml, the GitLab child pipeline) call exactly this script, with
# the job's variables from `xsbuild matrix` in the environment:
#   XSB_BASE        base archive of the target (`xsbuild base export`; base-job.sh makes it)
#   XSB_PATCHES     the advisory's patches, its stack's first (space-separated)
#   XSB_OUTPUT      payloads/TARGET/NAME.livepatch
#   XSB_DEPENDS_ON  the payload this one stacks on (its build job ran earlier), or empty
#   XSB_PROVE       true: add --prove (the payload's code proven equal to the patched Xen's)
# XSBUILD overrides the command (default: xsbuild), e.g. XSBUILD="python3 -m xsbuild".
# Writes XSB_OUTPUT, XSB_OUTPUT.log and XSB_OUTPUT.build.json (the build's --json summary,
# which `xsbuild index` reads the proof status from).  Exit status: xsbuild build's.
set -eu
XSBUILD=${XSBUILD:-xsbuild}
: "${XSB_BASE:?}" "${XSB_PATCHES:?}" "${XSB_OUTPUT:?}"

set -- build --base "$XSB_BASE" -o "$XSB_OUTPUT" --json
for patch in $XSB_PATCHES; do
    set -- "$@" --patch "$patch"
done
if [ -n "${XSB_DEPENDS_ON:-}" ]; then
    # The payload it stacks on was built by an earlier job: its build-id, from that job's
    # summary (schema xsbuild.build/1).
    depends=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["build_id"])' \
        "$XSB_DEPENDS_ON.build.json")
    set -- "$@" --depends "$depends"
fi
if [ "${XSB_PROVE:-true}" = true ]; then
    set -- "$@" --prove
fi
mkdir -p "$(dirname "$XSB_OUTPUT")"
# shellcheck disable=SC2086 # XSBUILD may be several words
if $XSBUILD "$@" > "$XSB_OUTPUT.build.json.tmp"; then
    mv "$XSB_OUTPUT.build.json.tmp" "$XSB_OUTPUT.build.json"
else
    status=$?
    cat "$XSB_OUTPUT.build.json.tmp"  # the xsbuild.error/1 object, for the job's log
    rm -f "$XSB_OUTPUT.build.json.tmp"
    exit "$status"
fi
echo "$XSB_OUTPUT: built"

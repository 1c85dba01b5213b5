#!/bin/sh
# Install one release bundle into a new versioned venv, on the device (or in the image's root
# file system, or on a test host). Shared by `make image`, the Raspberry Pi OS first-boot
# installer and `make deploy`, so there is one way a release gets installed.
#   install-release.sh BUNDLE_DIR PREFIX [--system-site-packages]
# BUNDLE_DIR holds VERSION, wheels/ (an offline wheelhouse) and models/ (verified model files).
# Result: PREFIX/releases/<version>/ with bin/appliance and models/; `current` is NOT switched
# here (the caller switches it, so a deploy can check health and roll back).
# Prints the release directory on success. Never touches /var/lib.
set -eu
bundle=$1
prefix=$2
site=${3:-}
version=$(cat "$bundle/VERSION")
release="$prefix/releases/$version"
python=${PYTHON:-python3}
# A venv is not relocatable (its scripts name their own path): install in place; `.installed`
# marks a complete release, so an interrupted install is redone, never used.
if [ -e "$release/.installed" ]; then echo "$release"; exit 0; fi
if [ -L "$prefix/current" ] && [ "$(readlink "$prefix/current")" = "releases/$version" ]; then
  echo "install-release: $release is the running release and incomplete; not touching it" >&2
  exit 1
fi
rm -rf "$release"
mkdir -p "$prefix/releases"
staging=$release
"$python" -m venv $site "$staging"
# --no-index: a classroom Pi may not reach any package registry; everything is in the bundle.
"$staging/bin/python" -m pip install --quiet --no-index --no-cache-dir \
  --disable-pip-version-check --find-links "$bundle/wheels" "classroom-attendance==$version"
cp -R "$bundle/models" "$staging/models"
# Verifies every model of the installed release's manifest by size and sha256 (offline: the
# files are there; a missing one fails here, before `current` is switched).
"$staging/bin/appliance" models fetch --model-dir "$staging/models" >/dev/null
chmod -R a+rX "$staging"
touch "$release/.installed"
echo "$release"

#!/bin/sh
# Install one release bundle, on the device (or in the image's root file system, or on a test
# host). Shared by `make image`, the Raspberry Pi OS first-boot installer, `make deploy` and the
# pulled update (`appliance update apply`), so there is one way a release gets installed.
#   install-release.sh BUNDLE_DIR PREFIX [--system-site-packages]
# BUNDLE_DIR holds VERSION, wheels/ (an offline wheelhouse), requirements.txt (every wheel by
# version and sha256, from the target's lock: fleet/locks/), models/ (verified model files) and
# usually manifest.json (every file's sha256; `appliance update apply` has checked them all and
# the signature before this runs).
# Two layers:
#   PREFIX/deps/<key>/          a venv with every dependency, shared by every release whose
#                               dependency wheels are the same (key: the interpreter, the
#                               --system-site-packages flag and the dependency wheels' sha256)
#   PREFIX/releases/<version>/  a thin venv: the project's wheel only, the models, and a .pth
#                               that adds the deps layer; an update that changes only the project
#                               installs in seconds and a few MB
# `current` is NOT switched here (the caller switches it, so it can check health and revert).
# Prints the release directory on success. Never touches /var/lib.
set -eu
bundle=$1
prefix=$2
site=${3:-}
version=$(cat "$bundle/VERSION")
release="$prefix/releases/$version"
python=${PYTHON:-python3}
# A venv is not relocatable (its scripts name their own path): install in place; `.installed`
# marks a complete layer or release, so an interrupted install is redone, never used.
if [ -e "$release/.installed" ]; then echo "$release"; exit 0; fi
if [ -L "$prefix/current" ] && [ "$(readlink "$prefix/current")" = "releases/$version" ]; then
  echo "install-release: $release is the running release and incomplete; not touching it" >&2
  exit 1
fi
# The dependency set: the project wheel's requirements (its metadata) and the key of the layer.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" - "$bundle" "$version" "$site" "$work" <<'EOF'
import hashlib, json, pathlib, re, sys, zipfile
bundle, version, site, work = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
norm = version.replace("-", "_")
project = sorted((bundle / "wheels").glob(f"classroom_attendance-{norm}-*.whl"))
if not project:
    sys.exit(f"install-release: no classroom_attendance-{norm}-*.whl in {bundle}/wheels")
manifest = bundle / "manifest.json"
if manifest.exists():
    hashes = {f["path"]: f["sha256"] for f in json.loads(manifest.read_text())["files"]}
else:  # a bundle from before manifests: hash the wheels here
    hashes = {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (bundle / "wheels").glob("*.whl")}
key = hashlib.sha256(f"{sys.version}\n{site}\n".encode())
for path in sorted(hashes):
    name = path.rsplit("/", 1)[-1]
    if path.startswith("wheels/") and name.endswith(".whl") and not name.startswith("classroom_attendance-"):
        key.update(f"{name} {hashes[path]}\n".encode())
(work / "key").write_text(key.hexdigest()[:16] + "\n")
with zipfile.ZipFile(project[-1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
reqs = [l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:")]
reqs = [r for r in reqs if not re.search(r"extra\s*==", r)]
(work / "requirements.txt").write_text("\n".join(reqs) + "\n")
(work / "project").write_text(project[-1].name + "\n")
EOF
key=$(cat "$work/key")
deps="$prefix/deps/$key"
# --require-hashes: the bundle's requirements.txt pins every dependency wheel by sha256 (the
# project's line goes to the thin release below); a file changed or missing, or a dependency
# not pinned, fails here, not at run time. A bundle from before the locks has no such file:
# the project's own requirements, unpinned.
hashes=""
if [ -e "$bundle/requirements.txt" ]; then
  grep -v '^classroom-attendance==' "$bundle/requirements.txt" > "$work/requirements.txt"
  hashes="--require-hashes"
fi
# --no-index: a classroom Pi may not reach any package registry; everything is in the bundle.
# No pip configuration of this machine applies (Raspberry Pi OS ships /etc/pip.conf with an
# extra index; a builder's PIP_FIND_LINKS must not reach a chroot): PIP_CONFIG_FILE=/dev/null
# skips every config file, --isolated every PIP_* variable.
export PIP_CONFIG_FILE=/dev/null
pip_offline="--isolated --quiet --no-index --no-cache-dir --disable-pip-version-check --only-binary=:all: --find-links $bundle/wheels"
mkdir -p "$prefix/releases" "$prefix/deps"
if [ ! -e "$deps/.installed" ]; then
  rm -rf "$deps"
  "$python" -m venv $site "$deps"
  "$deps/bin/python" -m pip install $pip_offline $hashes -r "$work/requirements.txt"
  chmod -R a+rX "$deps"
  touch "$deps/.installed"
fi
rm -rf "$release"
# no pip of its own: the deps layer's pip installs the project wheel into it
"$python" -m venv --without-pip $site "$release"
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
deps_site=$(purelib "$deps/bin/python")
echo "import site; site.addsitedir('$deps_site')" > "$(purelib "$release/bin/python")/_classroom_deps.pth"
"$release/bin/python" -m pip install $pip_offline --no-deps "$bundle/wheels/$(cat "$work/project")"
cp -R "$bundle/models" "$release/models"
# Verifies every model of the installed release's manifest by size and sha256 (offline: the
# files are there; a missing one fails here, before `current` is switched).
"$release/bin/appliance" models fetch --model-dir "$release/models" >/dev/null
echo "$key" > "$release/.deps"
chmod -R a+rX "$release"
touch "$release/.installed"
echo "$release"

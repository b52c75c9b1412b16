#!/bin/sh
# The stack's first job (compose service `preflight`): refuse to start with missing, example
# ("change-me...") or short secrets, naming each bad one. Every other service waits for it.
set -eu

bad=""
for name in POSTGRES_PASSWORD MINIO_ROOT_PASSWORD DVC_S3_SECRET_KEY MLFLOW_S3_SECRET_KEY \
            MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    eval "value=\${$name:-}"
    case "$value" in
        "") bad="$bad $name(unset)" ;;
        change-me*) bad="$bad $name(the .env.example value)" ;;
        *)
            if [ "${#value}" -lt 12 ]; then bad="$bad $name(shorter than 12 characters)"; fi
            ;;
    esac
done
for name in DVC_S3_ACCESS_KEY MLFLOW_S3_ACCESS_KEY; do
    eval "value=\${$name:-}"
    if [ -z "$value" ] || [ "$value" = "${MINIO_ROOT_USER:-}" ]; then
        bad="$bad $name(unset or the MinIO root user: give DVC and MLflow their own keys)"
    fi
done
if [ -n "$bad" ]; then
    echo "preflight: refusing to start the stack: set real secrets in .env for:$bad" >&2
    exit 1
fi
echo "preflight: secrets set"

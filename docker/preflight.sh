#!/bin/sh
# The stack's first job (compose service `preflight`): refuse to start with missing, example
# ("change-me...") or short secrets, well-known default passwords, one secret reused in two
# fields, or DVC and MLflow sharing an S3 key, naming each bad one. Every other service waits
# for it.
set -eu

SECRETS="POSTGRES_PASSWORD MINIO_ROOT_PASSWORD DVC_S3_SECRET_KEY MLFLOW_S3_SECRET_KEY
MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY"
# Published defaults (MLflow's basic-auth admin, MinIO's root, postgres images, the usual
# placeholders), compared without case: a stack started with one is open to anyone who read
# the same documentation.
KNOWN_DEFAULTS="password1234 minioadmin minio123 postgres mlflow admin password changeme
change-me secret password123 admin123 123456789012 adminadmin1234 passwordpassword"

bad=""
for name in $SECRETS; do
    eval "value=\${$name:-}"
    lower=$(printf '%s' "$value" | tr '[:upper:]' '[:lower:]')
    known=""
    for d in $KNOWN_DEFAULTS; do
        if [ "$lower" = "$d" ]; then known=1; fi
    done
    case "$value" in
        "") bad="$bad $name(unset)" ;;
        change-me*) bad="$bad $name(the .env.example value)" ;;
        *)
            if [ -n "$known" ]; then
                bad="$bad $name(a well-known default password)"
            elif [ "${#value}" -lt 12 ]; then
                bad="$bad $name(shorter than 12 characters)"
            fi
            ;;
    esac
done
# One value in two secret fields: a leak of one opens both (and MinIO's root password would
# also be DVC's or MLflow's key). Each repeat is named once, with the first field holding it.
seen=""
for name in $SECRETS; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || continue
    for earlier in $seen; do
        eval "other=\${$earlier:-}"
        if [ "$value" = "$other" ]; then
            bad="$bad $name(the same value as $earlier: each secret its own)"
            break
        fi
    done
    seen="$seen $name"
done
for name in DVC_S3_ACCESS_KEY MLFLOW_S3_ACCESS_KEY; do
    eval "value=\${$name:-}"
    if [ -z "$value" ] || [ "$value" = "${MINIO_ROOT_USER:-}" ]; then
        bad="$bad $name(unset or the MinIO root user: give DVC and MLflow their own keys)"
    fi
done
if [ -n "${DVC_S3_ACCESS_KEY:-}" ] && [ "${DVC_S3_ACCESS_KEY:-}" = "${MLFLOW_S3_ACCESS_KEY:-}" ]; then
    bad="$bad MLFLOW_S3_ACCESS_KEY(the same key as DVC_S3_ACCESS_KEY: bucket-init would give one user both prefixes)"
fi
if [ -n "$bad" ]; then
    echo "preflight: refusing to start the stack: set real secrets in .env for:$bad" >&2
    exit 1
fi
echo "preflight: secrets set"

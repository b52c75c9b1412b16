#!/bin/sh
# Compose service `bucket-init` (one-shot, safe to run again): the bucket that holds the DVC
# remote (dvc/) and the MLflow artifacts (mlflow/), and one least-privilege user for each:
# DVC_S3_ACCESS_KEY may read and write s3://$S3_BUCKET/dvc/ only, MLFLOW_S3_ACCESS_KEY
# s3://$S3_BUCKET/mlflow/ only. The MinIO root credentials stay with this job and the server.
set -eu
: "${S3_BUCKET:=cose}"
export HOME=/tmp
mc alias set store http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "store/$S3_BUCKET"

policy() {  # policy NAME PREFIX: read/write objects under PREFIX/, list only that prefix
    cat >"/tmp/$1.json" <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetBucketLocation"],
   "Resource": ["arn:aws:s3:::$S3_BUCKET"]},
  {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::$S3_BUCKET"],
   "Condition": {"StringLike": {"s3:prefix": ["$2/*", "$2"]}}},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
   "Resource": ["arn:aws:s3:::$S3_BUCKET/$2/*"]}
]}
JSON
    mc admin policy create store "$1" "/tmp/$1.json"
}

policy cose-dvc dvc
policy cose-mlflow mlflow
mc admin user add store "$DVC_S3_ACCESS_KEY" "$DVC_S3_SECRET_KEY"
mc admin user add store "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
for pair in "cose-dvc:$DVC_S3_ACCESS_KEY" "cose-mlflow:$MLFLOW_S3_ACCESS_KEY"; do
    name=${pair%%:*}
    user=${pair#*:}
    # attaching twice is an error ("already attached"): check the outcome instead
    mc admin policy attach store "$name" --user "$user" >/dev/null 2>&1 || true
    mc admin user info store "$user" | grep -q "$name" \
        || { echo "bucket-init: could not attach $name to $user" >&2; exit 1; }
done
echo "bucket-init: s3://$S3_BUCKET with users for dvc/ and mlflow/"

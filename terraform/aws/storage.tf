# The artifact bucket: inputs, outputs, preemption checkpoints and work files of every job, under one prefix
# (the app's `artifacts: s3://<bucket>/<prefix>`; key layout in imagine/storage/keys.py).
# Reference design: terraform-aws-modules/s3-bucket (public access block, SSE-KMS with a bucket key, lifecycle
# rules, attach_deny_insecure_transport_policy).
#
# Versioning: off, on purpose. Everything here is either regenerable or deliberately short-lived, DELETE
# /videos/{id} and the retention sweeper must really delete (a versioned bucket keeps the bytes as noncurrent
# versions), and lifecycle expiry is the privacy and cost backstop. Durability comes from S3 itself; the job
# store (RDS, with backups) is the system of record.

locals {
  artifact_bucket = coalesce(var.artifact_bucket_name, "${var.name}-artifacts-${data.aws_caller_identity.current.account_id}-${var.region}")
  key_root        = var.artifact_prefix == "" ? "" : "${var.artifact_prefix}/"

  # Expiry per key family, shortest-lived first; each is a prefix under the store's root.
  expiring_prefixes = {
    checkpoints = var.checkpoint_retention_days
    work        = var.checkpoint_retention_days
    inputs      = var.input_retention_days
    outputs     = var.output_retention_days
  }
}

resource "aws_s3_bucket" "artifacts" {
  bucket = local.artifact_bucket
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    object_ownership = "BucketOwnerEnforced" # ACLs off: access is IAM and the bucket policy only
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    bucket_key_enabled = true # one KMS call per object batch, not per request: cheaper at video sizes
  }
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Disabled" # see the note at the top of this file
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  dynamic "rule" {
    for_each = local.expiring_prefixes
    content {
      id     = "expire-${rule.key}"
      status = "Enabled"
      filter {
        prefix = "${local.key_root}${rule.key}/"
      }
      expiration {
        days = rule.value
      }
      abort_incomplete_multipart_upload {
        days_after_initiation = var.abort_incomplete_multipart_days
      }
    }
  }

  # Anywhere else in the bucket too (weights uploads, a prefix the app adds later).
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {
      prefix = "" # the whole bucket
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.artifacts]
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
      {
        Sid       = "DenyOutdatedTLS"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
        Condition = { NumericLessThan = { "s3:TlsVersion" = "1.2" } }
      },
    ]
  })

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

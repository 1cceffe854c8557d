# Workload Identity: the Kubernetes service account imagine/imagine acts as this Google service account, which may
# use the artifact bucket and nothing else. Reference design: terraform-google-modules/kubernetes-engine
# (modules/workload-identity).

locals {
  app_namespace       = "imagine"
  app_service_account = "imagine"
}

resource "google_service_account" "app" {
  account_id   = "${var.name}-app"
  display_name = "Ray pods of ${var.name} (${local.app_namespace}/${local.app_service_account})"
}

resource "google_service_account_iam_member" "app_workload_identity" {
  service_account_id = google_service_account.app.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${local.app_namespace}/${local.app_service_account}]"

  depends_on = [google_container_cluster.this] # the workload pool exists once the cluster does
}

# Object read/write/delete/list and multipart uploads on this bucket only (the bucket is the store's alone).
resource "google_storage_bucket_iam_member" "app_objects" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.app.email}"
}

# The app's store speaks S3 (boto3, SigV4 presigned URLs); GCS's S3-compatible endpoint authenticates with an
# HMAC key of a service account, not with Workload Identity. The key acts as the account above, so it reaches
# the same bucket and nothing more; it lives in Secret Manager, never in a file.
resource "google_storage_hmac_key" "app" {
  count = var.create_s3_interop_key ? 1 : 0

  service_account_email = google_service_account.app.email
}

resource "google_secret_manager_secret" "s3_interop" {
  count = var.create_s3_interop_key ? 1 : 0

  secret_id = "${var.name}-s3-interop-hmac"
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "s3_interop" {
  count = var.create_s3_interop_key ? 1 : 0

  secret = google_secret_manager_secret.s3_interop[0].id
  secret_data = jsonencode({
    AWS_ACCESS_KEY_ID     = google_storage_hmac_key.app[0].access_id
    AWS_SECRET_ACCESS_KEY = google_storage_hmac_key.app[0].secret
  })
}

# The pods read their secrets (copied into Kubernetes Secrets at deploy time) through their own identity.
resource "google_secret_manager_secret_iam_member" "app" {
  for_each = merge(
    { database_url = google_secret_manager_secret.database_url.id, redis_auth = google_secret_manager_secret.redis_auth.id },
    var.create_s3_interop_key ? { s3_interop = google_secret_manager_secret.s3_interop[0].id } : {},
  )

  secret_id = each.value
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.app.email}"
}

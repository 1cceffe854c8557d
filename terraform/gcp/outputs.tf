# What cluster/ (the gke overlay) consumes. Secret values stay in Secret Manager; these name where they are.

output "cluster_name" {
  description = "GKE cluster (`gcloud container clusters get-credentials <this> --region <region>`)."
  value       = google_container_cluster.this.name
}

output "region" {
  description = "Region of the deployment."
  value       = var.region
}

output "node_pool_label_key" {
  description = "Node label that names a node's pool."
  value       = local.pool_label_key
}

output "node_pools" {
  description = "Per pool: its label, GPUs per node and taints."
  value = {
    for pool, p in local.node_pools : pool => {
      label         = { (local.pool_label_key) = pool }
      gpus_per_node = p.accelerator_count
      taints        = p.accelerator_count > 0 ? ["${local.gpu_taint.key}=${local.gpu_taint.value}:NoSchedule"] : []
    }
  }
}

output "namespace" {
  description = "Kubernetes namespace of the RayService."
  value       = local.app_namespace
}

output "service_account" {
  description = "Kubernetes service account of the Ray pods and the Google service account it acts as (annotate the KSA with iam.gke.io/gcp-service-account = this email)."
  value       = { kubernetes = "${local.app_namespace}/${local.app_service_account}", google = google_service_account.app.email }
}

output "artifacts_uri" {
  description = "The app's `artifacts:` setting, with `s3.endpoint_url: https://storage.googleapis.com` (S3 interoperability)."
  value       = trimsuffix("s3://${google_storage_bucket.artifacts.name}/${var.artifact_prefix}", "/")
}

output "s3_interop_secret" {
  description = "Secret Manager secret with the HMAC key (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) for the S3 API, or null."
  value       = var.create_s3_interop_key ? google_secret_manager_secret.s3_interop[0].secret_id : null
}

output "database_url_secret" {
  description = "Secret Manager secret holding IMAGINE_DATABASE_URL (private IP, TLS)."
  value       = google_secret_manager_secret.database_url.secret_id
}

output "redis_address" {
  description = "Ray GCS fault-tolerance Redis (TLS: rediss://)."
  value       = "rediss://${google_redis_instance.gcs.host}:${google_redis_instance.gcs.port}"
}

output "redis_auth_secret" {
  description = "Secret Manager secret holding the Redis AUTH string."
  value       = google_secret_manager_secret.redis_auth.secret_id
}

output "redis_server_ca_certs" {
  description = "CA certificates of the Memorystore TLS endpoint (Ray's Redis client must trust them: RAY_REDIS_CA_CERT)."
  value       = [for c in google_redis_instance.gcs.server_ca_certs : c.cert]
}

output "namespace" {
  description = "Namespace of the RayService."
  value       = kubernetes_namespace_v1.imagine.metadata[0].name
}

output "service_account" {
  description = "Service account the Ray pods run as (S3 access through EKS Pod Identity)."
  value       = kubernetes_service_account_v1.imagine.metadata[0].name
}

output "database_url_secret" {
  description = "Secret and key holding IMAGINE_DATABASE_URL (env valueFrom.secretKeyRef in the Ray pods)."
  value       = { name = kubernetes_secret_v1.database.metadata[0].name, key = "IMAGINE_DATABASE_URL" }
}

output "redis_password_secret" {
  description = "Secret and key holding the Ray GCS Redis password (gcsFaultToleranceOptions.redisPassword)."
  value       = { name = kubernetes_secret_v1.redis.metadata[0].name, key = "password" }
}

output "redis_address" {
  description = "Ray GCS Redis, TLS (gcsFaultToleranceOptions.redisAddress)."
  value       = "rediss://${data.aws_elasticache_replication_group.gcs.primary_endpoint_address}:${data.aws_elasticache_replication_group.gcs.port}"
}

output "chart_versions" {
  description = "Pinned chart versions."
  value = {
    kuberay-operator      = helm_release.kuberay_operator.version
    nvidia-device-plugin  = helm_release.nvidia_device_plugin.version
    cluster-autoscaler    = helm_release.cluster_autoscaler.version
    kube-prometheus-stack = helm_release.kube_prometheus_stack.version
  }
}

# What cluster/ (the KubeRay RayService) and aws-addons consume. No secret values: only where they live.

output "region" {
  description = "AWS region of the deployment."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name (`aws eks update-kubeconfig --name <this>`)."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA bundle of the Kubernetes API."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "node_pool_label_key" {
  description = "Node label that names a node's pool; RayService groups select on it."
  value       = local.pool_label_key
}

output "node_pools" {
  description = "Per pool: its label value, GPUs per node, size bounds and taints (key=value:Effect, as a toleration states it)."
  value = {
    for pool, g in local.node_groups : pool => {
      label         = { (local.pool_label_key) = pool }
      gpus_per_node = g.gpus_per_node
      min_size      = g.min_size
      max_size      = g.max_size
      taints        = g.gpus_per_node > 0 ? ["${local.gpu_taint.key}=${local.gpu_taint.value}:NoSchedule"] : []
    }
  }
}

output "gpu_taint" {
  description = "The taint on every GPU node (the GPU worker groups tolerate it)."
  value       = "${local.gpu_taint.key}=${local.gpu_taint.value}:NoSchedule"
}

output "namespace" {
  description = "Kubernetes namespace of the RayService (created by aws-addons)."
  value       = local.app_namespace
}

output "service_account" {
  description = "Service account of the Ray pods: bound to app_role_arn by EKS Pod Identity (S3 access to the artifact store)."
  value       = local.app_service_account
}

output "app_role_arn" {
  description = "IAM role the Ray pods get through Pod Identity."
  value       = aws_iam_role.app.arn
}

output "artifact_bucket" {
  description = "Artifact bucket name."
  value       = aws_s3_bucket.artifacts.bucket
}

output "artifacts_uri" {
  description = "The app's `artifacts:` setting (s3://bucket/prefix)."
  value       = trimsuffix("s3://${aws_s3_bucket.artifacts.bucket}/${var.artifact_prefix}", "/")
}

output "weights_uri" {
  description = "Where pods may read model weights from (s3://bucket/prefix), or null."
  value       = var.weights_prefix == null ? null : "s3://${aws_s3_bucket.artifacts.bucket}/${trim(var.weights_prefix, "/")}"
}

output "database_endpoint" {
  description = "host:port of the PostgreSQL job store."
  value       = aws_db_instance.jobs.endpoint
}

output "database_name" {
  description = "Database of the job store."
  value       = aws_db_instance.jobs.db_name
}

output "database_master_secret_arn" {
  description = "Secrets Manager secret (RDS-managed, rotated) holding the job store's username and password."
  value       = aws_db_instance.jobs.master_user_secret[0].secret_arn
}

output "database_url_env" {
  description = "Env var the pods read the job store URL from, and the Kubernetes Secret (name, key) aws-addons puts it in."
  value       = { env = "IMAGINE_DATABASE_URL", secret_name = "imagine-database", secret_key = "url" }
}

output "redis_address" {
  description = "Ray GCS fault-tolerance Redis (TLS: rediss://), the RayService's gcsFaultToleranceOptions.redisAddress."
  value       = "rediss://${aws_elasticache_replication_group.gcs.primary_endpoint_address}:${aws_elasticache_replication_group.gcs.port}"
}

output "redis_auth_secret_arn" {
  description = "Secrets Manager secret holding the Redis AUTH token."
  value       = aws_secretsmanager_secret.redis_auth.arn
}

output "redis_password_secret" {
  description = "Kubernetes Secret (name, key) aws-addons puts the Redis AUTH token in (gcsFaultToleranceOptions.redisPassword)."
  value       = { secret_name = "imagine-redis", secret_key = "password" }
}

output "cluster_autoscaler_role_arn" {
  description = "IAM role of kube-system/cluster-autoscaler."
  value       = aws_iam_role.cluster_autoscaler.arn
}

output "kms_key_arn" {
  description = "The deployment's customer-managed KMS key."
  value       = aws_kms_key.this.arn
}

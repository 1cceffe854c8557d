# External Redis for Ray GCS fault tolerance: the RayService's head keeps the GCS tables (actors, placement
# groups, Serve's state) here, so a restarted head recovers the running Serve application instead of a cold start.
# Cluster mode off (one shard: a primary + replicas), automatic failover across AZs, TLS, an auth token, encrypted.

resource "aws_elasticache_subnet_group" "gcs" {
  name        = "${var.name}-gcs"
  description = "Private subnets of the ${var.name} Ray GCS store"
  subnet_ids  = [for s in aws_subnet.private : s.id]
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-gcs-redis"
  description = "Redis for Ray GCS fault tolerance of ${var.name}: port 6379 from the EKS node security group only"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-gcs-redis" }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis (TLS) from EKS nodes (the Ray head)"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.node.id
}

# Ray's GCS keys carry no TTL and must never be evicted: with noeviction a full Redis fails writes loudly
# instead of silently dropping cluster state.
resource "aws_elasticache_parameter_group" "gcs" {
  name        = "${var.name}-gcs-redis7"
  family      = "redis7"
  description = "Ray GCS store of ${var.name}: never evict"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

# The auth token: generated once by Secrets Manager, kept in a secret under the deployment key (aws-addons copies
# it into the Kubernetes Secret the RayService reads). ignore_changes freezes the first value: the data source
# draws a new one on every plan. Rotate with `terraform apply -replace=aws_secretsmanager_secret_version.redis_auth`.
data "aws_secretsmanager_random_password" "redis_auth" {
  password_length     = 64
  exclude_punctuation = true # ElastiCache refuses @, " and / in tokens; alphanumerics avoid URL-encoding too
}

resource "aws_secretsmanager_secret" "redis_auth" {
  name                    = "${var.name}/ray-gcs-redis-auth-token"
  description             = "AUTH token of the ${var.name} Ray GCS Redis (ElastiCache)"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id     = aws_secretsmanager_secret.redis_auth.id
  secret_string = data.aws_secretsmanager_random_password.redis_auth.random_password

  lifecycle {
    ignore_changes = [secret_string]
  }
}

resource "aws_cloudwatch_log_group" "redis" {
  name              = "/aws/elasticache/${var.name}-gcs"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = aws_kms_key.this.arn
}

resource "aws_elasticache_replication_group" "gcs" {
  replication_group_id = "${var.name}-gcs"
  description          = "Ray GCS fault tolerance store of ${var.name}"

  engine               = "redis"
  engine_version       = "7.1"
  node_type            = var.redis_node_type
  port                 = 6379
  parameter_group_name = aws_elasticache_parameter_group.gcs.name

  num_cache_clusters         = 1 + var.redis_replicas
  automatic_failover_enabled = true
  multi_az_enabled           = true

  subnet_group_name  = aws_elasticache_subnet_group.gcs.name
  security_group_ids = [aws_security_group.redis.id]

  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  at_rest_encryption_enabled = "true"
  kms_key_id                 = aws_kms_key.this.arn
  auth_token                 = aws_secretsmanager_secret_version.redis_auth.secret_string
  auth_token_update_strategy = "ROTATE"

  auto_minor_version_upgrade = "true"
  maintenance_window         = "sun:06:00-sun:07:00"
  snapshot_retention_limit   = 3
  snapshot_window            = "03:00-04:00"
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.redis.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "engine-log"
  }
}

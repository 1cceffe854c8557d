# The artifact bucket, the job store (Cloud SQL PostgreSQL, private IP) and the Ray GCS store (Memorystore Redis,
# HA, AUTH, TLS). Versioning and soft delete are off for the same reason as on S3 (aws/storage.tf): deletes and
# retention must really delete; the job store is the system of record.

locals {
  key_root = var.artifact_prefix == "" ? "" : "${var.artifact_prefix}/"
  expiring_prefixes = {
    checkpoints = var.checkpoint_retention_days
    work        = var.checkpoint_retention_days
    inputs      = var.input_retention_days
    outputs     = var.output_retention_days
  }
}

resource "google_storage_bucket" "artifacts" {
  name                        = "${var.project_id}-${var.name}-artifacts"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = false
  }

  soft_delete_policy {
    retention_duration_seconds = 0
  }

  encryption {
    default_kms_key_name = google_kms_crypto_key.this.id
  }

  dynamic "lifecycle_rule" {
    for_each = local.expiring_prefixes
    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = ["${local.key_root}${lifecycle_rule.key}/"]
      }
      action {
        type = "Delete"
      }
    }
  }

  # S3-API multipart uploads (the app's store through the interoperability endpoint) that never completed.
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.service_agents]
}

# -- job store ------------------------------------------------------------------------------------------------

resource "google_sql_database_instance" "jobs" {
  name                = "${var.name}-jobs"
  database_version    = "POSTGRES_17"
  region              = var.region
  deletion_protection = var.database_deletion_protection

  settings {
    tier              = var.database_tier
    edition           = "ENTERPRISE"
    availability_type = "REGIONAL" # synchronous standby in a second zone
    disk_type         = "PD_SSD"
    disk_size         = 50
    disk_autoresize   = true

    ip_configuration {
      ipv4_enabled    = false # no public IP: private services access only
      private_network = google_compute_network.this.id
      ssl_mode        = "ENCRYPTED_ONLY"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "03:00"
      backup_retention_settings {
        retained_backups = 14
      }
    }

    maintenance_window {
      day  = 7
      hour = 5
    }

    insights_config {
      query_insights_enabled = true
    }

    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }

    user_labels = { "imagine-dev-deployment" = var.name }
  }

  depends_on = [google_service_networking_connection.private_services]
}

resource "google_sql_database" "imagine" {
  name     = "imagine"
  instance = google_sql_database_instance.jobs.name
}

resource "random_password" "database" {
  length  = 40
  special = false # goes into a URL
}

resource "google_sql_user" "imagine" {
  name     = "imagine"
  instance = google_sql_database_instance.jobs.name
  password = random_password.database.result
}

# -- Ray GCS fault-tolerance store ----------------------------------------------------------------------------

resource "google_redis_instance" "gcs" {
  name           = "${var.name}-gcs"
  region         = var.region
  tier           = "STANDARD_HA" # primary + replica in another zone, automatic failover
  memory_size_gb = var.redis_memory_size_gb
  redis_version  = "REDIS_7_2"

  authorized_network      = google_compute_network.this.id
  connect_mode            = "PRIVATE_SERVICE_ACCESS"
  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION" # TLS; Ray must trust server_ca_certs (output)
  customer_managed_key    = google_kms_crypto_key.this.id

  redis_configs = {
    maxmemory-policy = "noeviction" # Ray's GCS keys must never be evicted
  }

  persistence_config {
    persistence_mode    = "RDB"
    rdb_snapshot_period = "ONE_HOUR"
  }

  maintenance_policy {
    weekly_maintenance_window {
      day = "SUNDAY"
      start_time {
        hours   = 6
        minutes = 0
      }
    }
  }

  depends_on = [google_service_networking_connection.private_services, google_kms_crypto_key_iam_member.service_agents]
}

# -- secrets the cluster reads --------------------------------------------------------------------------------

resource "google_secret_manager_secret" "database_url" {
  secret_id = "${var.name}-database-url"
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "database_url" {
  secret = google_secret_manager_secret.database_url.id
  secret_data = format(
    "postgresql://%s:%s@%s:5432/%s?sslmode=require",
    google_sql_user.imagine.name, random_password.database.result,
    google_sql_database_instance.jobs.private_ip_address, google_sql_database.imagine.name,
  )
}

resource "google_secret_manager_secret" "redis_auth" {
  secret_id = "${var.name}-ray-gcs-redis-auth"
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "redis_auth" {
  secret      = google_secret_manager_secret.redis_auth.id
  secret_data = google_redis_instance.gcs.auth_string
}

# GKE: a regional private cluster with Workload Identity, a CPU system pool and GPU pools that scale from zero.

locals {
  pool_label_key = "imagine.dev/pool"
  # GKE puts this taint on GPU nodes by itself; stating it keeps the contract with cluster/ visible and identical
  # to the EKS pools.
  gpu_taint = { key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE" }
}

# Nodes run as this account, not the Compute default (which holds Editor): logs, metrics, image pulls only.
resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "GKE nodes of ${var.name}"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/artifactregistry.reader",
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
  ])

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_cluster" "this" {
  name     = var.name
  location = var.region

  # Pools are managed below; the default one exists only while the cluster is created.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  network           = google_compute_network.this.id
  subnetwork        = google_compute_subnetwork.nodes.id
  networking_mode   = "VPC_NATIVE"
  datapath_provider = "ADVANCED_DATAPATH" # Dataplane V2: NetworkPolicy enforcement built in

  # Dataplane V2 enforces NetworkPolicy itself; the Calico add-on must stay off beside it.
  network_policy {
    enabled = false
  }

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = !var.public_endpoint
    master_ipv4_cidr_block  = var.master_cidr
    master_global_access_config {
      enabled = true
    }
  }

  master_authorized_networks_config {
    cidr_blocks {
      cidr_block   = var.subnet_cidr
      display_name = "node subnet"
    }
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block   = cidr_blocks.value
        display_name = "authorized ${cidr_blocks.value}"
      }
    }
  }

  release_channel {
    channel = var.release_channel
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  database_encryption {
    state    = "ENCRYPTED"
    key_name = google_kms_crypto_key.this.id
  }

  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  enable_legacy_abac          = false

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = false # kube-prometheus-stack (cluster/) scrapes Ray
    }
  }

  # The temporary default pool, held to the same standard as the real ones while it exists.
  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  resource_labels = { "imagine-dev-deployment" = var.name }

  lifecycle {
    ignore_changes = [node_config] # describes the removed default pool only
  }

  depends_on = [google_kms_crypto_key_iam_member.service_agents, google_project_iam_member.nodes]
}

locals {
  node_pools = merge(
    {
      cpu = {
        machine_type      = var.cpu_node_pool.machine_type
        accelerator_type  = null
        accelerator_count = 0
        disk_size_gb      = var.cpu_node_pool.disk_size_gb
        spot              = false
        zones             = null # every zone of the region
      }
    },
    {
      for pool, p in var.gpu_node_pools : pool => {
        machine_type      = p.machine_type
        accelerator_type  = p.accelerator_type
        accelerator_count = p.accelerator_count
        disk_size_gb      = p.disk_size_gb
        spot              = p.spot
        zones             = p.zones
      }
    },
  )
}

resource "google_container_node_pool" "this" {
  for_each = local.node_pools

  name           = each.key
  cluster        = google_container_cluster.this.id
  location       = var.region
  node_locations = each.value.zones

  initial_node_count = each.value.accelerator_count > 0 ? 0 : var.cpu_node_pool.min_node_count

  # GPU pools: 0..max nodes over all their zones, placed wherever capacity exists (ANY); the CPU pool: per zone.
  autoscaling {
    total_min_node_count = each.value.accelerator_count > 0 ? 0 : null
    total_max_node_count = each.value.accelerator_count > 0 ? var.gpu_node_pools[each.key].max_nodes : null
    min_node_count       = each.value.accelerator_count > 0 ? null : var.cpu_node_pool.min_node_count
    max_node_count       = each.value.accelerator_count > 0 ? null : var.cpu_node_pool.max_node_count
    location_policy      = each.value.accelerator_count > 0 ? "ANY" : "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type    = each.value.machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-ssd"
    disk_size_gb    = each.value.disk_size_gb
    spot            = each.value.spot
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"] # narrowed by the account's roles

    labels = { (local.pool_label_key) = each.key }

    dynamic "guest_accelerator" {
      for_each = each.value.accelerator_count > 0 ? [each.value] : []
      content {
        type  = guest_accelerator.value.accelerator_type
        count = guest_accelerator.value.accelerator_count
        gpu_driver_installation_config {
          gpu_driver_version = "LATEST" # GKE installs the driver and runs its own device plugin
        }
      }
    }

    dynamic "taint" {
      for_each = each.value.accelerator_count > 0 ? [local.gpu_taint] : []
      content {
        key    = taint.value.key
        value  = taint.value.value
        effect = taint.value.effect
      }
    }

    workload_metadata_config {
      mode = "GKE_METADATA" # pods see Workload Identity, never the node's credentials
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count] # the autoscaler owns the size
  }
}

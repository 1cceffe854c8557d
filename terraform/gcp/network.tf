# Project APIs, the deployment's KMS key and the VPC (private nodes, Cloud NAT egress, private services access for
# Cloud SQL and Memorystore). Reference design: terraform-google-modules/network and .../kubernetes-engine
# (private-cluster), written as raw resources: registry modules cannot be fetched offline.

locals {
  apis = toset([
    "cloudkms.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "redis.googleapis.com",
    "secretmanager.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
  ])
  service_agents = {
    gke   = "serviceAccount:service-${data.google_project.this.number}@container-engine-robot.iam.gserviceaccount.com"
    redis = "serviceAccount:service-${data.google_project.this.number}@cloud-redis.iam.gserviceaccount.com"
    gcs   = "serviceAccount:${data.google_storage_project_service_account.this.email_address}"
  }
}

resource "google_project_service" "this" {
  for_each = local.apis

  service            = each.value
  disable_on_destroy = false
}

# -- KMS: GKE secrets (application-layer encryption), the artifact bucket and Memorystore ---------------------

resource "google_kms_key_ring" "this" {
  name     = var.name
  location = var.region

  depends_on = [google_project_service.this]
}

resource "google_kms_crypto_key" "this" {
  name            = "${var.name}-data"
  key_ring        = google_kms_key_ring.this.id
  rotation_period = "7776000s" # 90 days

  lifecycle {
    prevent_destroy = true # destroying the key destroys every secret, artifact and snapshot encrypted with it
  }
}

data "google_storage_project_service_account" "this" {}

resource "google_kms_crypto_key_iam_member" "service_agents" {
  for_each = local.service_agents

  crypto_key_id = google_kms_crypto_key.this.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = each.value
}

# -- VPC ------------------------------------------------------------------------------------------------------

resource "google_compute_network" "this" {
  name                    = var.name
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"

  depends_on = [google_project_service.this]
}

resource "google_compute_subnetwork" "nodes" {
  name                     = "${var.name}-nodes"
  region                   = var.region
  network                  = google_compute_network.this.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true # private nodes reach GCS, Artifact Registry and Google APIs without NAT

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_router" "this" {
  name    = var.name
  region  = var.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  name                               = var.name
  router                             = google_compute_router.this.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# Ingress nobody asked for is refused, explicitly and logged (GKE adds its own higher-priority allow rules for
# the control plane and node-to-node traffic).
resource "google_compute_firewall" "deny_all_ingress" {
  name      = "${var.name}-deny-all-ingress"
  network   = google_compute_network.this.id
  direction = "INGRESS"
  priority  = 65534

  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Private services access: Cloud SQL and Memorystore get addresses in this range, reachable only from the VPC.
resource "google_compute_global_address" "private_services" {
  name          = "${var.name}-private-services"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = 20
  network       = google_compute_network.this.id
}

resource "google_service_networking_connection" "private_services" {
  network                 = google_compute_network.this.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.private_services.name]
}

# Inputs of the GCP root (the same shape as the AWS root where the clouds agree).

variable "project_id" {
  description = "GCP project to deploy into."
  type        = string
}

variable "name" {
  description = "Deployment name: the GKE cluster's name and the prefix of every resource."
  type        = string
  default     = "imagine"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of a-z, 0-9 and '-', start with a letter and not end with '-' (got \"${var.name}\")."
  }
}

variable "region" {
  description = "GCP region (the GKE cluster is regional: control plane and CPU pool across its zones)."
  type        = string
  default     = "us-central1"
}

variable "labels" {
  description = "Extra labels on every resource."
  type        = map(string)
  default     = {}
}

# -- network --------------------------------------------------------------------------------------------------

variable "subnet_cidr" {
  description = "Primary range of the node subnet."
  type        = string
  default     = "10.50.0.0/20"
}

variable "pods_cidr" {
  description = "Secondary range for pod IPs (VPC-native)."
  type        = string
  default     = "10.52.0.0/14"
}

variable "services_cidr" {
  description = "Secondary range for Service IPs."
  type        = string
  default     = "10.56.0.0/20"
}

variable "master_cidr" {
  description = "/28 for the GKE control plane's private endpoint."
  type        = string
  default     = "172.16.0.0/28"
}

variable "master_authorized_cidrs" {
  description = "CIDRs allowed to reach the Kubernetes API (VPN, CI); the node subnet is always allowed."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.master_authorized_cidrs, "0.0.0.0/0")
    error_message = "master_authorized_cidrs must not contain 0.0.0.0/0."
  }
}

variable "public_endpoint" {
  description = "Also expose the control plane's public endpoint (to master_authorized_cidrs only)."
  type        = bool
  default     = false
}

# -- GKE ------------------------------------------------------------------------------------------------------

variable "release_channel" {
  description = "GKE release channel."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE (got \"${var.release_channel}\")."
  }
}

variable "cpu_node_pool" {
  description = "The CPU system pool (label imagine.dev/pool=cpu); counts are per zone of the region."
  type = object({
    machine_type   = string
    min_node_count = number
    max_node_count = number
    disk_size_gb   = number
  })
  default = {
    machine_type   = "n2-standard-8"
    min_node_count = 1
    max_node_count = 3
    disk_size_gb   = 100
  }

  validation {
    condition     = var.cpu_node_pool.min_node_count >= 1 && var.cpu_node_pool.min_node_count <= var.cpu_node_pool.max_node_count
    error_message = "cpu_node_pool needs 1 <= min_node_count <= max_node_count (the system pool never scales to zero)."
  }
}

variable "gpu_node_pools" {
  description = <<-EOT
    GPU pools keyed by their imagine.dev/pool label, each scaling from zero. `zones` must offer the accelerator
    (`gcloud compute accelerator-types list --filter=zone~<region>`); the A2 Ultra shapes carry A100 80GB GPUs.
  EOT
  type = map(object({
    machine_type      = string
    accelerator_type  = string
    accelerator_count = number
    max_nodes         = number
    zones             = list(string)
    spot              = optional(bool, false)
    disk_size_gb      = optional(number, 400)
  }))
  default = {
    "gpu-1" = {
      machine_type      = "a2-ultragpu-1g"
      accelerator_type  = "nvidia-a100-80gb"
      accelerator_count = 1
      max_nodes         = 8
      zones             = ["us-central1-a", "us-central1-c"]
    }
    "gpu-4" = {
      machine_type      = "a2-ultragpu-4g"
      accelerator_type  = "nvidia-a100-80gb"
      accelerator_count = 4
      max_nodes         = 2
      zones             = ["us-central1-a", "us-central1-c"]
    }
  }

  validation {
    condition     = alltrue([for k, p in var.gpu_node_pools : can(regex("^gpu-[0-9]+$", k)) && tonumber(trimprefix(k, "gpu-")) == p.accelerator_count])
    error_message = "gpu_node_pools keys must be \"gpu-<N>\" with N equal to that pool's accelerator_count."
  }
  validation {
    condition     = alltrue([for p in var.gpu_node_pools : p.max_nodes >= 1 && length(p.zones) >= 1 && p.disk_size_gb >= 100])
    error_message = "Each GPU pool needs max_nodes >= 1, at least one zone and disk_size_gb >= 100."
  }
}

# -- artifacts (GCS) ------------------------------------------------------------------------------------------

variable "artifact_prefix" {
  description = "Key prefix of the artifact store inside the bucket (\"\" = the bucket root)."
  type        = string
  default     = "imagine"

  validation {
    condition     = var.artifact_prefix == "" || can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", var.artifact_prefix))
    error_message = "artifact_prefix must be empty or path segments without leading/trailing '/'."
  }
}

variable "output_retention_days" {
  description = "Days after which GCS deletes generated outputs (>= the app's own output retention)."
  type        = number
  default     = 30

  validation {
    condition     = var.output_retention_days >= 1 && var.output_retention_days <= 3650 && floor(var.output_retention_days) == var.output_retention_days
    error_message = "output_retention_days must be a whole number of days in [1, 3650]."
  }
}

variable "input_retention_days" {
  description = "Days after which GCS deletes uploaded inputs (sooner than outputs)."
  type        = number
  default     = 30

  validation {
    condition     = var.input_retention_days >= 1 && var.input_retention_days <= var.output_retention_days
    error_message = "input_retention_days must be in [1, output_retention_days]."
  }
}

variable "checkpoint_retention_days" {
  description = "Days after which GCS deletes preemption checkpoints and work files."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_retention_days >= 1 && var.checkpoint_retention_days <= var.input_retention_days
    error_message = "checkpoint_retention_days must be in [1, input_retention_days]."
  }
}

variable "create_s3_interop_key" {
  description = "Create an HMAC key for the app's service account: the app's artifact store speaks the S3 API, which GCS serves at https://storage.googleapis.com with HMAC credentials only."
  type        = bool
  default     = true
}

# -- job store (Cloud SQL) and Ray GCS store (Memorystore) ----------------------------------------------------

variable "database_tier" {
  description = "Cloud SQL machine tier of the job store."
  type        = string
  default     = "db-custom-2-7680"
}

variable "database_deletion_protection" {
  description = "Refuse to delete the job store."
  type        = bool
  default     = true
}

variable "redis_memory_size_gb" {
  description = "Memorystore capacity for Ray GCS fault tolerance."
  type        = number
  default     = 5
}

# Inputs of the AWS root. Every name below is derived from `name`, so aws-addons finds the pieces by name alone.

variable "name" {
  description = "Deployment name: the EKS cluster's name and the prefix of every resource."
  type        = string
  default     = "imagine"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,22}[a-z0-9]$", var.name))
    error_message = "name must be 3-24 characters of a-z, 0-9 and '-', start with a letter and not end with '-' (got \"${var.name}\")."
  }
}

variable "region" {
  description = "AWS region of the whole deployment."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Extra tags on every resource (merged into the provider's default_tags)."
  type        = map(string)
  default     = {}
}

# -- network --------------------------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR of the VPC this root creates (a /16 leaves room for VPC-CNI pod IPs on the GPU nodes)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 18
    error_message = "vpc_cidr must be a valid IPv4 CIDR of /18 or larger (got \"${var.vpc_cidr}\")."
  }
}

variable "availability_zones" {
  description = "AZs of the subnets (2 or 3), named explicitly so the set never shifts when AWS adds or retires one; pick AZs that offer the GPU instance types (`aws ec2 describe-instance-type-offerings --location-type availability-zone`)."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b", "us-east-1c"]

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 3 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "availability_zones must list 2 or 3 distinct AZs (got ${length(var.availability_zones)})."
  }
  validation {
    condition     = alltrue([for az in var.availability_zones : startswith(az, var.region)])
    error_message = "Every AZ in availability_zones must belong to var.region."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all AZs (cheaper; egress stops if that AZ fails) instead of one per AZ."
  type        = bool
  default     = true
}

variable "flow_log_retention_days" {
  description = "Retention of the VPC flow logs and EKS control-plane logs in CloudWatch (days)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be one of CloudWatch's retention values (1, 3, 5, 7, 14, 30, ..., 365, ..., 3653); got ${var.flow_log_retention_days}."
  }
}

# -- EKS ------------------------------------------------------------------------------------------------------

variable "kubernetes_version" {
  description = "EKS Kubernetes version (keep it in step with the cluster-autoscaler chart in aws-addons)."
  type        = string
  default     = "1.32"

  validation {
    condition     = can(regex("^1\\.(2[9]|3[0-9])$", var.kubernetes_version))
    error_message = "kubernetes_version must be a 1.29+ minor version such as \"1.32\" (got \"${var.kubernetes_version}\")."
  }
}

variable "cluster_endpoint_public_access" {
  description = "Expose the Kubernetes API endpoint publicly (restricted to cluster_endpoint_public_access_cidrs); false = reachable from inside the VPC (VPN, bastion, CI runner in the VPC) only."
  type        = bool
  default     = false
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach a public API endpoint; required (and 0.0.0.0/0 refused) when cluster_endpoint_public_access is true."
  type        = list(string)
  default     = []

  validation {
    condition = (
      !var.cluster_endpoint_public_access ||
      (length(var.cluster_endpoint_public_access_cidrs) > 0 && !contains(var.cluster_endpoint_public_access_cidrs, "0.0.0.0/0"))
    )
    error_message = "A public API endpoint needs cluster_endpoint_public_access_cidrs: a non-empty list of CIDRs without 0.0.0.0/0."
  }
}

variable "admin_principal_arns" {
  description = "IAM principals (roles/users) granted cluster-admin through EKS access entries, besides the identity that creates the cluster."
  type        = list(string)
  default     = []
}

variable "cpu_node_group" {
  description = "The CPU system pool (label imagine.dev/pool=cpu): operators, the Ray head (num-cpus 0), the Serve ingress, monitoring."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
  })
  default = {
    instance_types = ["m7i.2xlarge", "m6i.2xlarge"]
    min_size       = 2
    max_size       = 6
    desired_size   = 2
    disk_size_gib  = 100
  }

  validation {
    condition = (
      length(var.cpu_node_group.instance_types) > 0 &&
      var.cpu_node_group.min_size >= 1 &&
      var.cpu_node_group.min_size <= var.cpu_node_group.desired_size &&
      var.cpu_node_group.desired_size <= var.cpu_node_group.max_size
    )
    error_message = "cpu_node_group needs instance types and 1 <= min_size <= desired_size <= max_size (the system pool never scales to zero)."
  }
}

variable "gpu_node_groups" {
  description = <<-EOT
    GPU pools, keyed by their imagine.dev/pool label. Each scales from zero (min 0, desired 0): the Ray autoscaler asks
    for pods, the cluster-autoscaler adds nodes. gpu-1: one GPU per node (one replica per GPU); gpu-4: four GPUs per
    node for the 4-way sequence-parallel pool (the ranks share NVLink/PCIe on one node).
  EOT
  type = map(object({
    instance_types = list(string)
    gpus_per_node  = number
    max_size       = number
    disk_size_gib  = optional(number, 400)
    capacity_type  = optional(string, "ON_DEMAND")
  }))
  default = {
    "gpu-1" = {
      instance_types = ["g6e.2xlarge", "g6e.4xlarge"] # 1x L40S 48 GB
      gpus_per_node  = 1
      max_size       = 8
    }
    "gpu-4" = {
      instance_types = ["g6e.12xlarge"] # 4x L40S 48 GB
      gpus_per_node  = 4
      max_size       = 2
    }
  }

  validation {
    condition     = alltrue([for k, g in var.gpu_node_groups : can(regex("^gpu-[0-9]+$", k)) && tonumber(trimprefix(k, "gpu-")) == g.gpus_per_node])
    error_message = "gpu_node_groups keys must be \"gpu-<N>\" with N equal to that group's gpus_per_node (the pool label tells the RayService how many GPUs a node has)."
  }
  validation {
    condition     = alltrue([for g in var.gpu_node_groups : contains([1, 2, 4, 8], g.gpus_per_node) && g.max_size >= 1 && length(g.instance_types) > 0])
    error_message = "Each GPU group needs gpus_per_node in {1, 2, 4, 8}, max_size >= 1 and at least one instance type."
  }
  validation {
    condition     = alltrue([for g in var.gpu_node_groups : contains(["ON_DEMAND", "SPOT"], g.capacity_type) && g.disk_size_gib >= 100])
    error_message = "Each GPU group's capacity_type must be ON_DEMAND or SPOT, and disk_size_gib at least 100 (images + model weights)."
  }
}

variable "gpu_ami_type" {
  description = "EKS-optimized accelerated AMI of the GPU groups (NVIDIA driver + container toolkit preinstalled; the device plugin comes from aws-addons)."
  type        = string
  default     = "AL2023_x86_64_NVIDIA"

  validation {
    condition     = contains(["AL2023_x86_64_NVIDIA", "AL2_x86_64_GPU"], var.gpu_ami_type)
    error_message = "gpu_ami_type must be AL2023_x86_64_NVIDIA or AL2_x86_64_GPU (got \"${var.gpu_ami_type}\")."
  }
}

# -- artifacts (S3) -------------------------------------------------------------------------------------------

variable "artifact_bucket_name" {
  description = "Name of the artifact bucket; null = \"<name>-artifacts-<account id>-<region>\"."
  type        = string
  default     = null
}

variable "artifact_prefix" {
  description = "Key prefix of the artifact store inside the bucket: the app's `artifacts: s3://<bucket>/<prefix>`; \"\" = the bucket root."
  type        = string
  default     = "imagine"

  validation {
    condition     = var.artifact_prefix == "" || can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", var.artifact_prefix))
    error_message = "artifact_prefix must be empty or path segments without leading/trailing '/' (got \"${var.artifact_prefix}\")."
  }
}

variable "weights_prefix" {
  description = "Prefix (in the same bucket) that pods may read model weights from (`source: s3://<bucket>/<prefix>/...`); null = none."
  type        = string
  default     = "models"
}

variable "output_retention_days" {
  description = "Days after which S3 deletes generated outputs (`<prefix>/outputs/`). Keep it >= the app's own output retention: this is the backstop."
  type        = number
  default     = 30

  validation {
    condition     = var.output_retention_days >= 1 && var.output_retention_days <= 3650 && floor(var.output_retention_days) == var.output_retention_days
    error_message = "output_retention_days must be a whole number of days in [1, 3650] (got ${var.output_retention_days})."
  }
}

variable "input_retention_days" {
  description = "Days after which S3 deletes uploaded inputs (`<prefix>/inputs/`); a backstop behind the app (which deletes them when a job ends): longer than any job may stay queued, or a waiting job loses its inputs and fails."
  type        = number
  default     = 30

  validation {
    condition     = var.input_retention_days >= 1 && var.input_retention_days <= var.output_retention_days
    error_message = "input_retention_days must be in [1, output_retention_days] (got ${var.input_retention_days})."
  }
}

variable "checkpoint_retention_days" {
  description = "Days after which S3 deletes preemption checkpoints and work files (`<prefix>/checkpoints/`, `<prefix>/work/`); the app deletes them when a job ends, this catches leftovers: longer than a preempted job may wait to resume, or it loses its checkpoint."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_retention_days >= 1 && var.checkpoint_retention_days <= var.input_retention_days
    error_message = "checkpoint_retention_days must be in [1, input_retention_days] (got ${var.checkpoint_retention_days})."
  }
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which S3 aborts an unfinished multipart upload (a replica that died mid-upload leaves invisible, billed parts)."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1 && var.abort_incomplete_multipart_days <= 30
    error_message = "abort_incomplete_multipart_days must be in [1, 30] (got ${var.abort_incomplete_multipart_days})."
  }
}

# -- job store (RDS PostgreSQL) -------------------------------------------------------------------------------

variable "database_instance_class" {
  description = "RDS instance class of the job store."
  type        = string
  default     = "db.m7g.large"
}

variable "database_allocated_storage_gib" {
  description = "Initial storage of the job store (it autoscales up to 10x)."
  type        = number
  default     = 50

  validation {
    condition     = var.database_allocated_storage_gib >= 20 && var.database_allocated_storage_gib <= 6000
    error_message = "database_allocated_storage_gib must be in [20, 6000] (got ${var.database_allocated_storage_gib})."
  }
}

variable "database_multi_az" {
  description = "Standby replica in a second AZ (automatic failover)."
  type        = bool
  default     = true
}

variable "database_deletion_protection" {
  description = "Refuse to delete the job store (set false, apply, then destroy)."
  type        = bool
  default     = true
}

variable "database_backup_retention_days" {
  description = "Days of automated RDS backups (point-in-time recovery window)."
  type        = number
  default     = 14

  validation {
    condition     = var.database_backup_retention_days >= 7 && var.database_backup_retention_days <= 35
    error_message = "database_backup_retention_days must be in [7, 35] (got ${var.database_backup_retention_days})."
  }
}

# -- Ray GCS fault tolerance (ElastiCache Redis) --------------------------------------------------------------

variable "redis_node_type" {
  description = "ElastiCache node type of the Ray GCS store (GCS metadata is small; a large node buys nothing)."
  type        = string
  default     = "cache.m7g.large"
}

variable "redis_replicas" {
  description = "Read replicas beside the primary (>= 1: automatic failover needs one)."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas >= 1 && var.redis_replicas <= 5
    error_message = "redis_replicas must be in [1, 5]: automatic failover and multi-AZ need at least one replica (got ${var.redis_replicas})."
  }
}

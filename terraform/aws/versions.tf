terraform {
  # 1.11: terraform test with mock providers, cross-variable validation (1.9+).
  required_version = ">= 1.11.0, < 2.0.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # Exact pin: the version the offline checks run against (the lock file, gitignored here, would pin the hash).
      version = "5.100.0"
    }
  }

  # State holds the Redis auth token and the database endpoint: keep it in an encrypted remote backend, e.g.
  #   backend "s3" { bucket = "...", key = "imagine/aws.tfstate", region = "...", use_lockfile = true, encrypt = true }
  # (left out so `terraform init -backend=false` and local experiments need no bucket).
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ "imagine.dev/deployment" = var.name, "managed-by" = "terraform" }, var.tags)
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

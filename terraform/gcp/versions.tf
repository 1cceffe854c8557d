terraform {
  required_version = ">= 1.11.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.40"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.7"
    }
  }

  # State holds the database password and the Redis AUTH string: keep it in an encrypted remote backend, e.g.
  #   backend "gcs" { bucket = "...", prefix = "imagine/gcp" }
}

provider "google" {
  project = var.project_id
  region  = var.region

  default_labels = merge({ "imagine-dev-deployment" = var.name, "managed-by" = "terraform" }, var.labels)
}

data "google_project" "this" {}
